"""The NExT-Chat (pixel2emb) model, one component a file."""

from .build import build_model
from .checkpoint import load_pretrained, load_released, save_pretrained, save_released_layout
from .config import PRESETS, NextChatConfig, get_preset
from .nextchat import NextChatModel
from .tokenizer import TextTokenizer

__all__ = [
           "PRESETS",
           "NextChatConfig",
           "NextChatModel",
           "TextTokenizer",
           "build_model",
           "get_preset",
           "load_pretrained",
           "load_released",
           "save_pretrained",
           "save_released_layout",
]
