"""Moved to ``nextchat_ros.synthetic.scenes``; this name keeps working for one release."""

from .synthetic.scenes import *  # noqa: F403
from .synthetic.scenes import COLORS, KINDS, SIZES, Scene, SceneObject, real_photo, render_scene  # noqa: F401
