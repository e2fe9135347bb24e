"""Build a model from a preset or config, like segment-anything's registry."""

from __future__ import annotations

from pathlib import Path

from .config import NextChatConfig, get_preset
from .nextchat import NextChatModel
from .tokenizer import TextTokenizer

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TINY_TOKENIZER_DIR = ASSETS / "tokenizers" / "tiny"
# The shipped default model (trained by training/, committed in the repository).
DEFAULT_MODEL_DIR = ASSETS / "models" / "tiny"


def build_model(config: NextChatConfig | str = "tiny", tokenizer: TextTokenizer | None = None,
                seed: int | None = 0) -> NextChatModel:
    """A randomly initialised model. ``tokenizer`` defaults to the committed tiny one."""
    import torch

    if isinstance(config, str):
        config = get_preset(config)
    if tokenizer is None:
        tokenizer = TextTokenizer.load(TINY_TOKENIZER_DIR, config.tokens)
    if seed is not None:
        torch.manual_seed(seed)
    model = NextChatModel(config, tokenizer)
    model.vision_tower.init_2d_position_embedding()
    return model
