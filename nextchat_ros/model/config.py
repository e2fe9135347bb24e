"""Configuration of a NExT-Chat model and the registry of presets.

A :class:`NextChatConfig` fully describes a model: the CLIP-style vision tower,
the LLaMA-style LLM, the SAM image encoder and mask decoder, the special tokens
and the conversation template (the loss weights are training's:
``nextchat_training.objective``). Presets (``tiny``, ``full``) are functions in
:data:`PRESETS`, in the spirit of segment-anything's ``sam_model_registry``. No
size is hard-coded anywhere else: every module reads its shapes from here.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class SpecialTokens:
    """Names of the special tokens. The released model calls the trigger ``<at>``
    and the location token ``<boxes>``; ours default to clearer names."""

    image_patch: str = "<im_patch>"
    image_start: str = "<im_start>"
    image_end: str = "<im_end>"
    trigger: str = "<trigger>"
    location: str = "<loc>"

    def all(self) -> list[str]:
        return [self.image_patch, self.image_start, self.image_end, self.trigger, self.location]


@dataclass
class VisionConfig:
    """CLIP-style vision tower (transformers ``CLIPVisionModel``)."""

    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # Features are taken from this hidden-state index (LLaVA: -2), CLS dropped.
    select_layer: int = -2
    # How patches become tokens: "linear" (CLIP's one strided convolution),
    # "conv" (a stack of 3x3 stride-2 convolutions, vision.ConvStem) or "cnn"
    # (normalised conv blocks with max-pooling, vision.CNNStem).
    patch_stem: str = "linear"
    # Images are padded to a square (centred) with this RGB fill before resizing.
    pad_fill: tuple[int, int, int] = (255, 255, 255)
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class LLMConfig:
    """LLaMA-architecture causal LM (transformers ``LlamaForCausalLM``)."""

    vocab_size: int = 32005
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False


@dataclass
class SamConfig:
    """SAM image encoder (ViT) + segment-anything's PromptEncoder and MaskDecoder."""

    image_size: int = 1024
    patch_size: int = 16
    encoder_embed_dim: int = 1280
    encoder_depth: int = 32
    encoder_num_heads: int = 16
    encoder_global_attn_indexes: tuple[int, ...] = (7, 15, 23, 31)
    window_size: int = 14
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    mask_threshold: float = 0.0

    @property
    def embedding_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class NextChatConfig:
    preset: str = "full"
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    sam: SamConfig = field(default_factory=SamConfig)
    tokens: SpecialTokens = field(default_factory=SpecialTokens)
    # Hidden width of the box decoder / encoder MLPs (released: 2048).
    box_head_hidden: int = 2048
    # Number of prompt tokens the segmentation MLP makes (released: 4).
    seg_prompt_tokens: int = 4
    # Amplitude of a learned 2D sin-cos position embedding added to the image
    # tokens after the projector (heads.ImagePositionEmbedding); 0 = none (released).
    image_position_scale: float = 0.0
    # A location token's embedding also carries the image tokens its box covers
    # (heads.RegionFeatures), as region-feature models (GPT4RoI, Ferret) do;
    # False = the box alone (released).
    region_features: bool = False
    # Conversation template.
    system_prompt: str = (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )
    user_role: str = "USER"
    assistant_role: str = "ASSISTANT"
    # Longest user text, in characters and in tokens.
    max_query_chars: int = 2000
    max_query_tokens: int = 256
    # Words a person uses -> the word the model was taught, replaced as whole words in
    # the normalised query before tokenising (``queries.use_vocabulary``). The released
    # model read open English and needs none; a model taught a closed vocabulary
    # (the tiny preset's six kinds) lists the everyday names of its things here.
    synonyms: dict[str, str] = field(default_factory=dict)

    # --- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NextChatConfig:
        # Model directories saved before the loss weights moved to training/ carry
        # them under "loss"; they say nothing about the model, so they are ignored.
        data = {k: v for k, v in data.items() if k != "loss"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        sub = {"vision": VisionConfig, "llm": LLMConfig, "sam": SamConfig,
               "tokens": SpecialTokens}
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            if name in sub:
                kwargs[name] = _dataclass_from_dict(sub[name], value, name)
            else:
                kwargs[name] = value
        return cls(**kwargs)

    def with_changes(self, changes: dict[str, Any]) -> NextChatConfig:
        """A copy with ``changes`` (a nested dict in :meth:`to_dict`'s shape, e.g.
        ``{"vision": {"image_size": 320, "patch_size": 32}}``) merged in; unknown
        keys raise ValueError naming them."""
        def merge(base: dict[str, Any], update: dict[str, Any], where: str) -> dict[str, Any]:
            merged = dict(base)
            for key, value in update.items():
                if key not in base:
                    raise ValueError(f"unknown config key '{where}{key}'")
                if isinstance(base[key], dict) and isinstance(value, dict) and key != "synonyms":
                    merged[key] = merge(base[key], value, f"{where}{key}.")
                else:
                    merged[key] = value
            return merged

        if not isinstance(changes, dict):
            raise ValueError("config changes must be a mapping")
        return NextChatConfig.from_dict(merge(self.to_dict(), changes, ""))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> NextChatConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"model config not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"model config {path} is not valid JSON: {exc}") from None
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"model config {path} is invalid: {exc}") from None


def _dataclass_from_dict(klass, value: dict[str, Any], where: str):
    if not isinstance(value, dict):
        raise ValueError(f"'{where}' must be an object")
    known = {f.name: f for f in dataclasses.fields(klass)}
    unknown = set(value) - set(known)
    if unknown:
        raise ValueError(f"unknown keys in '{where}': {sorted(unknown)}")
    converted = {}
    for name, item in value.items():
        # JSON has no tuples; the dataclass defaults say which fields are tuples.
        default = known[name].default
        converted[name] = tuple(item) if isinstance(default, tuple) and isinstance(item, list) else item
    return klass(**converted)


# --- presets ------------------------------------------------------------------------

# Everyday names of the tiny preset's kinds and colours (synthetic/scenes.py), singular
# and plural. Not "can" (a verb in "can you find ...").
TINY_SYNONYMS = {
    "block": "cube", "blocks": "cubes", "box": "cube", "boxes": "cubes", "dice": "cube",
    "sphere": "ball", "spheres": "balls", "orb": "ball",
    "mug": "cup", "mugs": "cups", "glass": "cup", "glasses": "cups",
    "tube": "cylinder", "tubes": "cylinders", "pillar": "cylinder",
    "donut": "ring", "donuts": "rings", "doughnut": "ring", "doughnuts": "rings", "torus": "ring", "hoop": "ring",
    "flask": "bottle", "flasks": "bottles",
    "violet": "purple", "grey": "black", "gray": "black",
}


def tiny_config() -> NextChatConfig:
    """Small enough to train from scratch on 2 CPU cores (the shipped default)."""
    return NextChatConfig(
        preset="tiny",
        vision=VisionConfig(
            image_size=160, patch_size=16, hidden_size=128, intermediate_size=512,
            num_hidden_layers=4, num_attention_heads=4, hidden_act="quick_gelu",
            select_layer=-2, pad_fill=(255, 255, 255), patch_stem="conv",
        ),
        llm=LLMConfig(
            vocab_size=0,  # set from the tokenizer when the model is built
            hidden_size=256, intermediate_size=688, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rope_theta=10000.0, tie_word_embeddings=False,
        ),
        sam=SamConfig(
            image_size=192, patch_size=8, encoder_embed_dim=64, encoder_depth=2,
            encoder_num_heads=4, encoder_global_attn_indexes=(1,), window_size=8,
            prompt_embed_dim=128, decoder_depth=2, decoder_mlp_dim=256, decoder_num_heads=4,
        ),
        box_head_hidden=256,
        image_position_scale=0.5,
        region_features=True,
        system_prompt="A robot asks about its camera image.",
        max_query_tokens=128,
        synonyms=dict(TINY_SYNONYMS),
    )


def full_config() -> NextChatConfig:
    """The released ``nextchat-7b-336`` shapes: CLIP ViT-L/14-336, Vicuna-7B, SAM ViT-H."""
    return NextChatConfig(
        preset="full",
        vision=VisionConfig(),
        llm=LLMConfig(),
        sam=SamConfig(),
        tokens=SpecialTokens(trigger="<at>", location="<boxes>"),
        box_head_hidden=2048,
    )


PRESETS: dict[str, Callable[[], NextChatConfig]] = {
    "tiny": tiny_config,
    "full": full_config,
}


def get_preset(name: str) -> NextChatConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset '{name}'; choose one of {sorted(PRESETS)}") from None
