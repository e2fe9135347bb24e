"""CLIP-style vision tower: pad to square, resize, normalise, encode.

Features are ``hidden_states[select_layer]`` of a transformers
``CLIPVisionModel`` without the CLS token (LLaVA / NExT-Chat convention).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from .config import VisionConfig


def pad_to_square(image: torch.Tensor, fill: torch.Tensor | float) -> torch.Tensor:
    """Centre ``image`` (C, H, W) on a square canvas of side max(H, W).

    ``fill`` is a per-channel value (C,) or a scalar. Centre padding matches the
    released model (LLaVA's expand2square) and the box convention of this
    package: normalised boxes live in this square.
    """
    c, h, w = image.shape
    side = max(h, w)
    if isinstance(fill, torch.Tensor):
        canvas = fill.to(image.dtype).view(c, 1, 1).expand(c, side, side).clone()
    else:
        canvas = torch.full((c, side, side), float(fill), dtype=image.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[:, top:top + h, left:left + w] = image
    return canvas


def preprocess_image(image: torch.Tensor, config: VisionConfig) -> torch.Tensor:
    """uint8 RGB (H, W, 3) -> normalised (3, S, S) float tensor, as the tower expects."""
    x = image.permute(2, 0, 1).float()
    x = pad_to_square(x, torch.tensor(config.pad_fill, dtype=torch.float32))
    size = config.image_size
    x = F.interpolate(x[None], size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0]
    x = x.clamp(0, 255) / 255.0
    mean = torch.tensor(config.image_mean).view(3, 1, 1)
    std = torch.tensor(config.image_std).view(3, 1, 1)
    return (x - mean) / std


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid * grid, dim) 2D sin-cos position table in row-major patch order.

    A quarter of the channels each holds sin(x), cos(x), sin(y), cos(y) at
    wavelengths spread geometrically from 2 patches to 4 grids. (MAE's 10000**k
    spacing is made for long sequences: on a 10x10 grid most of its channels are
    almost constant and the position is hard to read back.) Channels beyond
    4 * (dim // 4) are zero.
    """
    quarter = dim // 4
    ratio = (2.0 * grid) ** (torch.arange(quarter, dtype=torch.float32) / max(1, quarter - 1))
    omega = 2 * torch.pi / (2.0 * ratio)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")
    parts = []
    for coord in (xs.flatten() + 0.5, ys.flatten() + 0.5):
        angles = coord[:, None] * omega[None]
        parts += [angles.sin(), angles.cos()]
    table = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(table, (0, dim - table.shape[1]))


def halvings(patch_size: int, stem: str) -> int:
    """How many 2x downsamplings make ``patch_size``-pixel patches (a power of two)."""
    steps = int(math.log2(patch_size))
    if 2 ** steps != patch_size:
        raise ValueError(f"a {stem} patch stem needs a power-of-two patch size, not {patch_size}")
    return steps


class PatchStem(nn.Sequential):
    """Layers that stand in for CLIP's single strided patch convolution."""

    @property
    def weight(self) -> torch.Tensor:  # CLIP's embeddings read the patch embedding's dtype from here
        return self[0].weight


class ConvStem(PatchStem):
    """Patches -> tokens through log2(patch_size) 3x3 stride-2 convolutions, a
    drop-in for CLIP's single strided patch convolution (tiny preset only).

    Why: a ViT trained from scratch for minutes with a linear patch embedding
    learns colour but hardly shape, and queries name kinds; with this stem the
    same short vision stage tells kinds apart far better (training/EXPERIMENTS.md).
    Early convolutions are the known cure for ViTs' slow, data-hungry start
    (Xiao et al., "Early Convolutions Help Transformers See Better", 2021).
    """

    def __init__(self, patch_size: int, hidden_size: int):
        steps = halvings(patch_size, "conv")
        widths = [3] + [max(32, hidden_size >> (steps - 1 - k)) for k in range(steps - 1)] + [hidden_size]
        layers: list[nn.Module] = []
        for k in range(steps):
            layers.append(nn.Conv2d(widths[k], widths[k + 1], 3, stride=2, padding=1))
            if k < steps - 1:
                layers.append(nn.GELU())
        super().__init__(*layers)


class CNNStem(PatchStem):
    """Patches -> tokens through a small CNN: per halving a 3x3 convolution,
    GroupNorm, ReLU and a 2x2 max-pool, then a 3x3 convolution to the tower's
    width (tiny preset pilots only).

    Why: a crop CNN of these blocks, trained on the same scenes, tells the kinds of
    3D solids apart where the ConvStem tower does not (benchmarks/kind_ceiling.py,
    training/EXPERIMENTS.md). GroupNorm rather than BatchNorm, so that a frozen
    tower (stage 1) stays the same function in train mode.
    """

    def __init__(self, patch_size: int, hidden_size: int):
        steps = halvings(patch_size, "CNN")
        widths = [3] + [min(hidden_size, 32 << k) for k in range(steps)]
        layers: list[nn.Module] = []
        for k in range(steps):
            layers += [nn.Conv2d(widths[k], widths[k + 1], 3, padding=1), nn.GroupNorm(8, widths[k + 1]),
                       nn.ReLU(), nn.MaxPool2d(2)]
        layers.append(nn.Conv2d(widths[-1], hidden_size, 3, padding=1))
        super().__init__(*layers)


PATCH_STEMS = {"conv": ConvStem, "cnn": CNNStem}  # VisionConfig.patch_stem; "linear" keeps CLIP's own


class VisionTower(nn.Module):
    def __init__(self, config: VisionConfig, clip: CLIPVisionModel | None = None):
        super().__init__()
        self.config = config
        self.clip = clip if clip is not None else CLIPVisionModel(self.clip_config(config))
        if config.patch_stem in PATCH_STEMS:
            stem = PATCH_STEMS[config.patch_stem]
            self.clip.embeddings.patch_embedding = stem(config.patch_size, config.hidden_size)
        elif config.patch_stem != "linear":
            raise ValueError(f"unknown patch_stem '{config.patch_stem}'; use 'linear', 'conv' or 'cnn'")

    @staticmethod
    def clip_config(config: VisionConfig) -> CLIPVisionConfig:
        return CLIPVisionConfig(
            image_size=config.image_size, patch_size=config.patch_size,
            hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            hidden_act=config.hidden_act, layer_norm_eps=config.layer_norm_eps,
            projection_dim=config.hidden_size,
        )

    @property
    def num_patches(self) -> int:
        return self.config.num_patches

    @torch.no_grad()
    def init_2d_position_embedding(self) -> None:
        """Initialise the patch position embeddings with 2D sin-cos values (as MAE
        does, see :func:`sincos_2d`). Only for towers trained from
        scratch: a random 0.02-std init leaves the position signal so weak that
        learning to localise objects takes far longer."""
        emb = self.clip.embeddings
        grid = self.config.image_size // self.config.patch_size
        table = sincos_2d(grid, emb.position_embedding.weight.shape[1])
        weight = emb.position_embedding.weight
        weight[1:] = table.to(weight.dtype)
        weight[0] = 0  # the CLS position

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 RGB (H, W, 3) -> normalised (3, S, S) float tensor."""
        return preprocess_image(image, self.config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, num_patches, hidden_size) patch features."""
        pixel_values = pixel_values.to(device=self.clip.device, dtype=self.clip.dtype)
        out = self.clip(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[self.config.select_layer][:, 1:]
