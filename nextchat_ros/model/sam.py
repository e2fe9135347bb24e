"""SAM for pixel2emb: segment-anything's real image encoder, prompt encoder and
mask decoder, with NExT-Chat's centre padding and an extra set of prompt tokens
that come from the LLM instead of from clicks.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn

from .config import SamConfig


def resized_shape(height: int, width: int, config: SamConfig) -> tuple[int, int]:
    """Size of an image once its longest side is ``config.image_size``."""
    scale = config.image_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def preprocess_image(image: torch.Tensor, config: SamConfig) -> torch.Tensor:
    """uint8 RGB (H, W, 3) -> (3, S, S): resized, normalised, centre-padded with zeros."""
    h, w = image.shape[:2]
    rh, rw = resized_shape(h, w, config)
    x = image.permute(2, 0, 1).float()[None]
    x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)[0]
    x = (x - torch.tensor(config.pixel_mean).view(3, 1, 1)) / torch.tensor(config.pixel_std).view(3, 1, 1)
    size = config.image_size
    canvas = torch.zeros(3, size, size)
    top, left = (size - rh) // 2, (size - rw) // 2
    canvas[:, top:top + rh, left:left + rw] = x
    return canvas


def target_masks(masks: torch.Tensor, config: SamConfig) -> torch.Tensor:
    """Ground-truth masks (N, H, W) in original pixels -> (N, 1, 4h, 4w) {0, 1} targets
    in the frame of the mask decoder's low-resolution output (training)."""
    n, h, w = masks.shape
    size = config.image_size
    rh, rw = resized_shape(h, w, config)
    x = F.interpolate(masks[:, None].float(), size=(rh, rw), mode="bilinear", align_corners=False)
    canvas = torch.zeros(n, 1, size, size, dtype=x.dtype, device=x.device)
    top, left = (size - rh) // 2, (size - rw) // 2
    canvas[..., top:top + rh, left:left + rw] = x
    low = config.embedding_size * 4
    return (F.interpolate(canvas, size=(low, low), mode="bilinear", align_corners=False) > 0.5).float()


class RelPosAttention(Attention):
    """segment-anything's encoder attention through one fused kernel: its decomposed
    relative-position term (MViTv2) becomes SDPA's additive bias instead of being
    added to an explicitly computed score matrix. Same parameters, same result to
    float rounding (tests/test_model.py); SDPA picks a fused kernel that accepts a
    bias (memory-efficient attention on CUDA, the flash-style kernel on the CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        # (3, B, heads, H*W, head_dim)
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = None
        if self.use_rel_pos:
            r_q = q.unflatten(2, (h, w))  # the unscaled query, as add_decomposed_rel_pos takes it
            rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, get_rel_pos(h, h, self.rel_pos_h))
            rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, get_rel_pos(w, w, self.rel_pos_w))
            bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, self.num_heads, h * w, h * w)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(x.unflatten(2, (h, w)).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1))


def fuse_attention(encoder: ImageEncoderViT) -> ImageEncoderViT:
    """Every block's attention as :class:`RelPosAttention` (in place; the state dict is
    unchanged)."""
    for block in encoder.blocks:
        block.attn.__class__ = RelPosAttention
    return encoder


class SamMaskHead(nn.Module):
    """Image encoder + prompt encoder + mask decoder.

    Geometry: the image is resized so its longest side is ``image_size`` and
    centred on a square canvas (zeros after normalisation), so a box normalised
    to the centre-padded square maps to SAM coordinates by ``* image_size``.
    """

    def __init__(self, config: SamConfig):
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoderViT(
            depth=config.encoder_depth,
            embed_dim=config.encoder_embed_dim,
            img_size=config.image_size,
            mlp_ratio=config.mlp_ratio,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=config.encoder_num_heads,
            patch_size=config.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(config.encoder_global_attn_indexes),
            window_size=config.window_size,
            out_chans=config.prompt_embed_dim,
        )
        fuse_attention(self.image_encoder)
        side = config.embedding_size
        self.prompt_encoder = PromptEncoder(
            embed_dim=config.prompt_embed_dim,
            image_embedding_size=(side, side),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=config.mask_in_chans,
        )
        self.mask_decoder = MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth, embedding_dim=config.prompt_embed_dim,
                mlp_dim=config.decoder_mlp_dim, num_heads=config.decoder_num_heads,
            ),
            transformer_dim=config.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        )

    # --- geometry ------------------------------------------------------------------
    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        return resized_shape(height, width, self.config)

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 RGB (H, W, 3) -> (3, S, S) normalised, resized, centre-padded."""
        return preprocess_image(image, self.config)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, prompt_dim, S/patch, S/patch)."""
        return self.image_encoder(pixels)

    # --- masks ---------------------------------------------------------------------
    def decode_masks(
        self,
        image_embedding: torch.Tensor,
        boxes: torch.Tensor,
        prompt_tokens: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for N objects of ONE image.

        image_embedding: (1, C, h, w); boxes: (N, 4) normalised xyxy in the
        centre-padded square; prompt_tokens: (N, T, C) from the seg prompt MLP.
        Returns low-resolution mask logits (N, 1, 4h, 4w) and predicted IoU (N, 1).
        (segment-anything's MaskDecoder expands one image over its prompts, so a
        batch of images is decoded one image at a time.)
        """
        # The prompt encoder runs in its own dtype (fp32: nextchat.FP32_PARTS), the
        # mask decoder in the image embedding's.
        pe_dtype, dtype = self.prompt_encoder.point_embeddings[0].weight.dtype, image_embedding.dtype
        sam_boxes = boxes.to(pe_dtype) * self.config.image_size
        box_tokens, dense = self.prompt_encoder(points=None, boxes=sam_boxes, masks=None)
        sparse = torch.cat([prompt_tokens.to(dtype), box_tokens.to(dtype)], dim=1)
        return self.mask_decoder(
            image_embeddings=image_embedding,
            image_pe=self.prompt_encoder.get_dense_pe().to(dtype),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense.to(dtype),
            multimask_output=False,
        )

    def postprocess_masks(self, low_res: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Low-res logits (N, 1, h, w) -> logits at the original image size (N, H, W)."""
        size = self.config.image_size
        masks = F.interpolate(low_res.float(), size=(size, size), mode="bilinear", align_corners=False)
        rh, rw = self.resized_shape(height, width)
        top, left = (size - rh) // 2, (size - rw) // 2
        masks = masks[..., top:top + rh, left:left + rw]
        masks = F.interpolate(masks, size=(height, width), mode="bilinear", align_corners=False)
        return masks[:, 0]

    def target_masks(self, masks: torch.Tensor) -> torch.Tensor:
        return target_masks(masks, self.config)
