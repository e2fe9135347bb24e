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
        return self.to_valid_box(self(hidden))


class BoxEncoder(nn.Sequential):
    """Normalised xyxy box -> LLM input embedding for the location token."""

    def __init__(self, llm_dim: int, hidden: int):
        super().__init__(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, llm_dim))


class SegPromptMLP(nn.Sequential):
    """LLM hidden state -> ``num_tokens`` prompt tokens for SAM's mask decoder."""

    def __init__(self, llm_dim: int, prompt_dim: int, num_tokens: int):
        super().__init__(nn.Linear(llm_dim, llm_dim), nn.ReLU(), nn.Linear(llm_dim, prompt_dim * num_tokens))
        self.prompt_dim = prompt_dim
        self.num_tokens = num_tokens

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden).view(*hidden.shape[:-1], self.num_tokens, self.prompt_dim)
