"""NExT-Chat (pixel2emb): the whole model, for inference. It holds no training
code: the training objective (collate, packing, losses) is in training/
(``nextchat_training.objective``), which calls the building blocks below.

Parameter names follow the released checkpoint where it has one
(``projector.{0,2}``, ``box_decoder.{0,2}`` ...); the mapping to the released
key prefixes lives in ``checkpoint.RELEASED_KEY_MAP``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from .config import LLMConfig, NextChatConfig
from .heads import (
    BoxDecoder,
    BoxEncoder,
    ImagePositionEmbedding,
    Projector,
    RegionFeatures,
    SegPromptMLP,
)
from .prompt import PromptBuilder
from .sam import SamMaskHead
from .tokenizer import TextTokenizer
from .vision import VisionTower

# The parts that stay in fp32 whatever precision the rest runs in (``set_precision``).
# They turn hidden states into boxes and boxes into embeddings: boxes are fractions
# of the image, and at bf16's 8 significant bits a far edge moves by up to 1/256 of
# the image. SAM's prompt encoder turns box corners into Fourier features (sines of
# coordinates scaled by up to tens of radians), which half precision scrambles; and
# segment-anything casts the coordinates to fp32 itself, so its matrix must be fp32
# too. They cost a few small matrix products per object. (Mask post-processing, the
# upsampling and threshold in ``SamMaskHead.postprocess_masks``, also runs in fp32.)
FP32_PARTS = ("box_decoder", "box_encoder", "sam.prompt_encoder")


def llama_config(config: LLMConfig) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_word_embeddings,
        attn_implementation="sdpa",
    )


class NextChatModel(nn.Module):
    def __init__(self, config: NextChatConfig, tokenizer: TextTokenizer,
                 llm: LlamaForCausalLM | None = None, clip=None):
        super().__init__()
        config = copy.deepcopy(config)
        if config.llm.vocab_size == 0:
            config.llm.vocab_size = tokenizer.vocab_size
        if config.llm.vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"the LLM has {config.llm.vocab_size} token embeddings "
                f"but the tokenizer has {tokenizer.vocab_size} tokens")
        self.config = config
        self.tokenizer = tokenizer
        d_model = config.llm.hidden_size
        self.vision_tower = VisionTower(config.vision, clip)
        self.projector = Projector(config.vision.hidden_size, d_model)
        grid = config.vision.image_size // config.vision.patch_size
        # Identity when off (the released layout): no parameters, one code path.
        self.image_position = (ImagePositionEmbedding(grid, d_model, config.image_position_scale)
                               if config.image_position_scale > 0 else nn.Identity())
        self.llm = llm if llm is not None else LlamaForCausalLM(llama_config(config.llm))
        self.box_decoder = BoxDecoder(d_model, config.box_head_hidden)
        self.box_encoder = BoxEncoder(d_model, config.box_head_hidden)
        self.region_features = RegionFeatures(grid, d_model) if config.region_features else nn.Identity()
        self.seg_prompt_mlp = SegPromptMLP(d_model, config.sam.prompt_embed_dim, config.seg_prompt_tokens)
        self.sam = SamMaskHead(config.sam)
        self.prompt = PromptBuilder(tokenizer, config, config.vision.num_patches)

    @property
    def device(self) -> torch.device:
        return self.box_decoder[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (``set_precision``); boxes are fp32."""
        return self.projector[0].weight.dtype

    def set_precision(self, dtype: torch.dtype) -> NextChatModel:
        """Every part in ``dtype`` but ``FP32_PARTS``, in place; returns the model.
        The one place a model's precision is set (the predictor calls it)."""
        for name, module in self.named_modules():
            # Module by module, so that a part kept in fp32 never passes through the
            # lower precision and keeps its weights' bits.
            kept = any(name == part or name.startswith(part + ".") for part in FP32_PARTS)
            target = torch.float32 if kept else dtype
            module._apply(lambda t, target=target: t.to(target) if t.is_floating_point() else t, recurse=False)
        return self

    # --- building blocks used by the predictor and by training ----------------------
    def encode_image(self, vision_pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, num_patches, llm_hidden) image token embeddings."""
        return self.image_position(self.projector(self.vision_tower(vision_pixels).to(self.dtype)))

    def location_embeddings(self, boxes: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """(K, 4) normalised boxes -> (K, D) location-token embeddings: the box
        encoder's, plus what the image shows inside each box where the model has
        region features. ``image_embeds``: (K, N, D), each box's own image, or
        (1, N, D) for all."""
        embeds = self.box_encoder(boxes)
        if self.config.region_features:
            embeds = embeds + self.region_features(image_embeds, boxes)
        return embeds

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None,
              loc_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image patches and location tokens filled in.

        Image patch slots take ``image_embeds`` (B, N, D) and location slots take
        ``loc_embeds`` (K, D), both in row-major order of the slots.
        """
        emb = self.llm.get_input_embeddings()(input_ids)
        tok = self.tokenizer
        patch = input_ids == tok.image_patch_id
        n_patch = int(patch.sum())
        if n_patch:
            if image_embeds is None or image_embeds.numel() // emb.shape[-1] != n_patch:
                have = 0 if image_embeds is None else image_embeds.numel() // emb.shape[-1]
                raise ValueError(f"{n_patch} image patch slots but {have} image embeddings")
            emb = emb.masked_scatter(patch[..., None], image_embeds.to(emb.dtype))
        loc = input_ids == tok.location_id
        n_loc = int(loc.sum())
        if n_loc:
            if loc_embeds is None or loc_embeds.shape[0] != n_loc:
                have = 0 if loc_embeds is None else loc_embeds.shape[0]
                raise ValueError(f"{n_loc} location tokens but {have} boxes")
            emb = emb.masked_scatter(loc[..., None], loc_embeds.to(emb.dtype))
        return emb

    def trigger_hidden_to_masks(self, hidden: torch.Tensor, boxes: torch.Tensor,
                                image_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Trigger hidden states (N, D) + their boxes (N, 4) -> low-res mask logits, IoU."""
        prompt_tokens = self.seg_prompt_mlp(hidden.to(self.dtype))
        return self.sam.decode_masks(image_embedding, boxes, prompt_tokens)
