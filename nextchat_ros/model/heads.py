"""The small heads of pixel2emb: projector, box decoder / encoder, seg prompt MLP.

Each is an ``nn.Sequential`` so that its parameter names (``0.weight``,
``2.weight``) match the released checkpoint's ``{0,2}`` layout one to one.
"""

from __future__ import annotations

import torch
from torch import nn


class Projector(nn.Sequential):
    """Vision features -> LLM embeddings: Linear - GELU - Linear (LLaVA mlp2x_gelu)."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))


class BoxDecoder(nn.Sequential):
    """LLM hidden state at a trigger token -> normalised xyxy box.

    No sigmoid (as released). :meth:`decode` clamps to [0, 1] and orders the
    corners; training losses use the raw output so gradients never vanish.
    """

    def __init__(self, llm_dim: int, hidden: int):
        super().__init__(nn.Linear(llm_dim, hidden), nn.ReLU(), nn.Linear(hidden, 4))

    @staticmethod
    def to_valid_box(raw: torch.Tensor) -> torch.Tensor:
        raw = raw.clamp(0.0, 1.0)
        x1 = torch.minimum(raw[..., 0], raw[..., 2])
        x2 = torch.maximum(raw[..., 0], raw[..., 2])
        y1 = torch.minimum(raw[..., 1], raw[..., 3])
        y2 = torch.maximum(raw[..., 1], raw[..., 3])
        return torch.stack([x1, y1, x2, y2], dim=-1)

    def decode(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) hidden states in any dtype -> (..., 4) boxes in this head's dtype."""
        return self.to_valid_box(self(hidden.to(self[0].weight.dtype)))


class BoxEncoder(nn.Sequential):
    """Normalised xyxy box -> LLM input embedding for the location token."""

    def __init__(self, llm_dim: int, hidden: int):
        super().__init__(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, llm_dim))

    def forward(self, boxes: torch.Tensor) -> torch.Tensor:
        """(..., 4) boxes in any dtype -> (..., D) in this head's dtype."""
        return super().forward(boxes.to(self[0].weight.dtype))


class SegPromptMLP(nn.Sequential):
    """LLM hidden state -> ``num_tokens`` prompt tokens for SAM's mask decoder."""

    def __init__(self, llm_dim: int, prompt_dim: int, num_tokens: int):
        super().__init__(nn.Linear(llm_dim, llm_dim), nn.ReLU(), nn.Linear(llm_dim, prompt_dim * num_tokens))
        self.prompt_dim = prompt_dim
        self.num_tokens = num_tokens

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden).view(*hidden.shape[:-1], self.num_tokens, self.prompt_dim)


def patch_coverage(boxes: torch.Tensor, grid: int, min_fraction: float = 0.3) -> torch.Tensor:
    """(N, 4) normalised xyxy boxes -> (N, grid * grid) bool: the patches a box covers
    by at least ``min_fraction`` of their area, and always the one under its centre."""
    edges = torch.arange(grid + 1, device=boxes.device, dtype=boxes.dtype) / grid
    lo, hi = edges[:-1], edges[1:]
    ox = (torch.minimum(boxes[:, 2:3], hi) - torch.maximum(boxes[:, 0:1], lo)).clamp_min(0) * grid  # (N, g)
    oy = (torch.minimum(boxes[:, 3:4], hi) - torch.maximum(boxes[:, 1:2], lo)).clamp_min(0) * grid
    cover = (oy[:, :, None] * ox[:, None, :]).flatten(1) >= min_fraction  # row-major, like the patches
    cx = ((boxes[:, 0] + boxes[:, 2]) / 2 * grid).long().clamp(0, grid - 1)
    cy = ((boxes[:, 1] + boxes[:, 3]) / 2 * grid).long().clamp(0, grid - 1)
    cover[torch.arange(len(boxes), device=boxes.device), cy * grid + cx] = True
    return cover


class ImagePositionEmbedding(nn.Module):
    """A learned 2D position embedding added to the image tokens in LLM space,
    initialised with sin-cos values (tiny preset only; not part of the released
    model, whose pretrained CLIP features already carry their position).

    Why: a vision tower trained from scratch for minutes keeps its patches'
    positions only loosely (a linear probe reads them back to within ~1.4
    patches), and pixel2emb decodes a box from whatever the trigger's attention
    gathers from the image tokens. With the position in every image token, the
    gathered value carries where the object is, and a location token's
    embedding can be matched to the patches it covers.
    """

    def __init__(self, grid: int, llm_dim: int, scale: float):
        super().__init__()
        from .vision import sincos_2d

        self.weight = nn.Parameter(sincos_2d(grid, llm_dim) * scale)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return image_embeds + self.weight.to(image_embeds.dtype)


class RegionFeatures(nn.Module):
    """What the image shows inside a box, added to the location token's embedding
    (tiny preset only; the released model embeds the box coordinates alone): the
    image tokens the box covers, averaged by coverage, through a zero-initialised
    linear layer (so training starts from the box-only embedding).

    Why: a region caption ("describe [0]") must read the colour and kind of what
    is inside the region. A linear probe reads both from the covered image tokens
    (colour 99 %, kind 91 %), but the tiny LLM trained for minutes did not learn
    to find a box's patches from its coordinate embedding: region-caption colour
    stayed at chance (0.18).
    """

    def __init__(self, grid: int, llm_dim: int):
        super().__init__()
        self.grid = grid
        self.proj = nn.Linear(llm_dim, llm_dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, image_embeds: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """image_embeds (K, N, D) or (1, N, D), boxes (K, 4) normalised xyxy -> (K, D)."""
        weights = patch_coverage(boxes.float(), self.grid).to(image_embeds.dtype)  # (K, N), >= 1 patch each
        weights = weights / weights.sum(-1, keepdim=True)
        pooled = torch.einsum("kn,knd->kd", weights, image_embeds.expand(len(boxes), -1, -1))
        return self.proj(pooled)
