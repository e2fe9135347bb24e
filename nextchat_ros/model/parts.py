"""The model's vision and mask parts as modules with fixed graph boundaries.

These are what the backends run (torch directly; ONNX Runtime and TensorRT from
graphs exported from exactly these modules), so every backend computes the same
function:

- ``VisionPart``     : pixels (B, 3, S, S) -> image token embeddings (B, N, D)
                       (vision tower + projector [+ image position])
- ``SamEncoderPart`` : SAM pixels (B, 3, S', S') -> image embedding (B, C, h, w)
- ``MaskPart``       : image embedding (1, C, h, w), boxes (N, 4) normalised xyxy,
                       trigger hidden states (N, D) -> low-res mask logits
                       (N, 1, 4h, 4w), predicted IoU (N, 1)
                       (segmentation prompt MLP + SAM prompt encoder + mask decoder)
"""

from __future__ import annotations

import torch
from torch import nn


class VisionPart(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.vision_tower, self.projector = model.vision_tower, model.projector
        self.image_position = model.image_position

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.image_position(self.projector(self.vision_tower(pixel_values)))


class SamEncoderPart(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.image_encoder = model.sam.image_encoder

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(pixels)


class MaskPart(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.seg_prompt_mlp = model.seg_prompt_mlp
        self.sam = model.sam

    def forward(self, image_embedding: torch.Tensor, boxes: torch.Tensor, trigger_hidden: torch.Tensor):
        prompt_tokens = self.seg_prompt_mlp(trigger_hidden)
        return self.sam.decode_masks(image_embedding, boxes, prompt_tokens)
