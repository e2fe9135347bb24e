"""CLIP-style vision tower: pad to square, resize, normalise, encode.

Features are ``hidden_states[select_layer]`` of a transformers
``CLIPVisionModel`` without the CLS token (LLaVA / NExT-Chat convention).
"""

from __future__ import annotations

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


class VisionTower(nn.Module):
    def __init__(self, config: VisionConfig, clip: CLIPVisionModel | None = None):
        super().__init__()
        self.config = config
        self.clip = clip if clip is not None else CLIPVisionModel(self.clip_config(config))

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
        does), scaled like the patch embeddings. Only for towers trained from
        scratch: a random 0.02-std init leaves the position signal so weak that
        learning to localise objects takes far longer."""
        emb = self.clip.embeddings
        grid = self.config.image_size // self.config.patch_size
        dim = emb.position_embedding.weight.shape[1]
        quarter = dim // 4
        omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
        ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                                indexing="ij")
        parts = []
        for coord in (xs.flatten(), ys.flatten()):
            angles = coord[:, None] * omega[None]
            parts += [angles.sin(), angles.cos()]
        table = torch.cat(parts, dim=1)
        table = torch.nn.functional.pad(table, (0, dim - table.shape[1]))
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
