"""NExT-Chat (pixel2emb): the whole model and its training forward.

Parameter names follow the released checkpoint where it has one
(``projector.{0,2}``, ``box_decoder.{0,2}`` ...); the mapping to the released
key prefixes lives in ``checkpoint.RELEASED_KEY_MAP``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from .config import LLMConfig, NextChatConfig
from .heads import BoxDecoder, BoxEncoder, Projector, SegPromptMLP
from .losses import box_loss, cycle_loss, lm_loss, mask_loss
from .prompt import PromptBuilder
from .sam import SamMaskHead
from .tokenizer import TextTokenizer
from .vision import VisionTower


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


@dataclass
class TrainingBatch:
    """One padded batch. ``loc_boxes`` holds the normalised xyxy box of every
    location token in the batch in row-major (sample, position) order: user
    regions and answer boxes alike. ``mask_targets[b]`` holds, for each trigger of
    sample b in order, its low-res target mask (see ``SamMaskHead.target_masks``),
    or is None to skip that sample's mask loss."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    vision_pixels: torch.Tensor
    loc_boxes: torch.Tensor
    sam_pixels: torch.Tensor | None = None
    mask_targets: list[torch.Tensor | None] | None = None


def collate(examples, pad_id: int, vision_pixels: torch.Tensor, sam_pixels: torch.Tensor | None = None,
            mask_targets: list[torch.Tensor | None] | None = None) -> TrainingBatch:
    """Right-pad ``prompt.Example``s into a TrainingBatch."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    boxes = []
    for i, e in enumerate(examples):
        ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
        attention[i, :len(e.input_ids)] = 1
        boxes += e.loc_boxes
    loc_boxes = torch.tensor(boxes, dtype=torch.float32).view(-1, 4)
    return TrainingBatch(ids, attention, labels, vision_pixels, loc_boxes, sam_pixels, mask_targets)


def jitter_boxes(boxes: torch.Tensor, amount: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Move each corner of normalised xyxy boxes by N(0, amount * box size); keep them valid."""
    if amount <= 0 or boxes.numel() == 0:
        return boxes
    size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    noise = torch.randn(boxes.shape, generator=generator).to(boxes.device, boxes.dtype)
    return BoxDecoder.to_valid_box(boxes + noise * amount * size)


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
        self.llm = llm if llm is not None else LlamaForCausalLM(llama_config(config.llm))
        self.box_decoder = BoxDecoder(d_model, config.box_head_hidden)
        self.box_encoder = BoxEncoder(d_model, config.box_head_hidden)
        self.seg_prompt_mlp = SegPromptMLP(d_model, config.sam.prompt_embed_dim, config.seg_prompt_tokens)
        self.sam = SamMaskHead(config.sam)
        self.prompt = PromptBuilder(tokenizer, config, config.vision.num_patches)

    @property
    def device(self) -> torch.device:
        return self.box_decoder[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.box_decoder[0].weight.dtype

    # --- building blocks used by training and by the predictor ----------------------
    def encode_image(self, vision_pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, num_patches, llm_hidden) image token embeddings."""
        return self.projector(self.vision_tower(vision_pixels).to(self.dtype))

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
        prompt_tokens = self.seg_prompt_mlp(hidden)
        return self.sam.decode_masks(image_embedding, boxes.to(image_embedding.dtype), prompt_tokens)

    # --- training ---------------------------------------------------------------------
    def forward(self, batch: TrainingBatch) -> dict[str, torch.Tensor]:
        """All losses of one batch. Returns ``loss`` (weighted total) and each term."""
        weights = self.config.loss
        tok = self.tokenizer
        ids = batch.input_ids.to(self.device)
        image_embeds = self.encode_image(batch.vision_pixels.to(self.device))
        loc_boxes = batch.loc_boxes.to(self.device, self.dtype)
        loc_embeds = self.box_encoder(loc_boxes) if loc_boxes.numel() else None
        emb = self.embed(ids, image_embeds, loc_embeds)
        attention_mask = batch.attention_mask.to(self.device)
        hidden = self.llm.model(inputs_embeds=emb, attention_mask=attention_mask).last_hidden_state
        logits = self.llm.lm_head(hidden)
        losses = {"lm": lm_loss(logits, batch.labels.to(self.device))}

        # A trigger's target is the box its following location token carries.
        is_loc = ids == tok.location_id
        loc_index = (torch.cumsum(is_loc.flatten(), 0) - 1).view_as(ids)
        trig = torch.zeros_like(is_loc)
        trig[:, :-1] = (ids[:, :-1] == tok.trigger_id) & is_loc[:, 1:]
        b_idx, t_idx = trig.nonzero(as_tuple=True)
        trig_hidden = hidden[b_idx, t_idx]
        targets = loc_boxes[loc_index[b_idx, t_idx + 1]] if len(b_idx) else loc_boxes[:0]
        pred_raw = self.box_decoder(trig_hidden)
        losses["box"] = box_loss(pred_raw, targets, weights.box_l1, weights.box_giou)
        losses["cycle"] = cycle_loss(trig_hidden, targets, self.box_decoder, self.box_encoder)

        if batch.sam_pixels is not None and batch.mask_targets is not None:
            losses["mask"] = self._mask_loss(batch, b_idx, trig_hidden, pred_raw, targets)

        total = weights.lm * losses["lm"] + losses["box"] + weights.cycle * losses["cycle"]
        if "mask" in losses:
            total = total + losses["mask"]
        losses["loss"] = total
        losses["pred_boxes"] = BoxDecoder.to_valid_box(pred_raw.detach())
        losses["target_boxes"] = targets.detach()
        return losses

    def _mask_loss(self, batch, b_idx, trig_hidden, pred_raw, targets) -> torch.Tensor:
        weights = self.config.loss
        sam_pixels = batch.sam_pixels.to(self.device, self.dtype)
        trainable = any(p.requires_grad for p in self.sam.image_encoder.parameters())
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            embeddings = self.sam.encode_image(sam_pixels)
        logits, ious, gts = [], [], []
        for b, target in enumerate(batch.mask_targets):
            sel = (b_idx == b).nonzero(as_tuple=True)[0]
            if target is None or len(sel) == 0:
                continue
            if target.shape[0] != len(sel):
                raise ValueError(f"sample {b} has {len(sel)} triggers but {target.shape[0]} target masks")
            # SAM is prompted with the ground-truth box (teacher forcing), as in stage 3.
            boxes = targets[sel]
            if self.training:
                boxes = jitter_boxes(boxes, weights.mask_box_jitter)
            low, iou = self.trigger_hidden_to_masks(trig_hidden[sel], boxes, embeddings[b:b + 1])
            logits.append(low)
            ious.append(iou)
            gts.append(target.to(low.device, low.dtype).view_as(low))
        if not logits:
            return trig_hidden.sum() * 0.0
        return mask_loss(torch.cat(logits), torch.cat(ious), torch.cat(gts),
                         weights.mask_focal, weights.mask_dice, weights.mask_iou)
