"""The training objective of the lm stages: batches of prompt examples, packed
turns, and every loss term (LM, box, cycle, mask, grounding attention), computed
from the inference model's building blocks. Training only: the model in
``nextchat_ros.model`` holds none of this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nextchat_ros.model.heads import BoxDecoder, patch_coverage
from nextchat_ros.model.nextchat import NextChatModel

from .losses import box_loss, cycle_loss, lm_loss, mask_loss


@dataclass
class LossWeights:
    """Loss weights. Box loss = box_l1 * L1 + box_giou * GIoU.

    We follow the paper (alpha=2, beta=0.8) rather than the released code's
    GIoU/5: on the small synthetic data GIoU is what keeps thin or small boxes
    from collapsing, and the weight is one flag away for anyone reproducing
    the released recipe (``loss: {box_giou: 0.2}`` in a stage YAML).
    """

    lm: float = 1.0
    box_l1: float = 2.0
    box_giou: float = 0.8
    cycle: float = 1.0
    mask_focal: float = 20.0
    mask_dice: float = 1.0
    mask_iou: float = 1.0
    # Weight of the grounding-attention loss (0 = off, as released;
    # grounding_attention_nll), which teaches one attention head of the LLM's last
    # layer to look, from each trigger and location token, at the image patches its
    # box covers.
    grounding_attention: float = 0.0
    # The same loss from the positions that predict the answer (0 = off;
    # answer_attention_targets): a region caption's words look at the region asked
    # about; the first answer word of a grounded answer (a "yes" of an existence
    # question, a referring answer) at the objects it grounds.
    answer_attention: float = 0.0


# Each preset's weights, which a stage's ``loss:`` mapping overrides.
PRESET_LOSS_WEIGHTS = {"tiny": LossWeights(grounding_attention=1.0, answer_attention=1.0), "full": LossWeights()}


def loss_weights(preset: str, overrides: dict | None = None) -> LossWeights:
    base = PRESET_LOSS_WEIGHTS.get(preset, LossWeights())
    unknown = set(overrides or {}) - set(LossWeights.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown loss weights {sorted(unknown)}; known: {sorted(LossWeights.__dataclass_fields__)}")
    return LossWeights(**{**base.__dict__, **(overrides or {})})


@dataclass
class TrainingBatch:
    """One padded batch. ``loc_boxes`` holds the normalised xyxy box of every
    location token in the batch in row-major (sample, position) order: user
    regions and answer boxes alike. ``mask_targets[b]`` holds, for each trigger of
    sample b in order, its low-res target mask (see ``SamMaskHead.target_masks``),
    or is None to skip that sample's mask loss. ``turns`` says which turn each
    token is in (``prompt.Example.turns``; -1 for padding): rows with several
    turns are packed (``prompt.pack_turns``)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    vision_pixels: torch.Tensor
    loc_boxes: torch.Tensor
    sam_pixels: torch.Tensor | None = None
    mask_targets: list[torch.Tensor | None] | None = None
    turns: torch.Tensor | None = None
    # (rows, positions, boxes) of question tokens that should look at a box
    # (prompt.Example.look), supervised with the grounding-attention loss.
    look: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def collate(examples, pad_id: int, vision_pixels: torch.Tensor, sam_pixels: torch.Tensor | None = None,
            mask_targets: list[torch.Tensor | None] | None = None) -> TrainingBatch:
    """Right-pad ``prompt.Example``s into a TrainingBatch."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    turns = torch.full((len(examples), length), -1, dtype=torch.long)
    boxes = []
    for i, e in enumerate(examples):
        ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
        attention[i, :len(e.input_ids)] = 1
        turns[i, :len(e.input_ids)] = torch.tensor(e.turns) if e.turns else 1
        boxes += e.loc_boxes
    loc_boxes = torch.tensor(boxes, dtype=torch.float32).view(-1, 4)
    looks = [(i, t, box) for i, e in enumerate(examples) for t, box in e.look]
    look = None
    if looks:
        rows, positions, look_boxes = zip(*looks)
        look = (torch.tensor(rows), torch.tensor(positions), torch.tensor(look_boxes, dtype=torch.float32))
    return TrainingBatch(ids, attention, labels, vision_pixels, loc_boxes, sam_pixels, mask_targets, turns, look)


def packed_positions_and_mask(turns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids (B, T) and the attention a token may pay (B, T, T; True =
    allowed) for rows of packed turns (``turns``: 0 prefix, k >= 1 turn k, -1
    padding): each turn sees the prefix and its own earlier tokens, and its
    positions continue from the prefix's end, as a single turn's do."""
    index = torch.arange(turns.shape[1], device=turns.device).expand_as(turns)
    starts = torch.ones_like(turns, dtype=torch.bool)
    starts[:, 1:] = turns[:, 1:] != turns[:, :-1]
    segment_start = torch.where(starts, index, torch.zeros_like(index)).cummax(1).values
    prefix_len = (turns == 0).sum(1, keepdim=True)
    positions = torch.where(turns == 0, index, index - segment_start + prefix_len)
    same = (turns[:, None, :] == 0) | (turns[:, None, :] == turns[:, :, None])
    causal = index[:, None, :] <= index[:, :, None]
    return positions, same & causal


def jitter_boxes(boxes: torch.Tensor, amount: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Move each corner of normalised xyxy boxes by N(0, amount * box size); keep them valid."""
    if amount <= 0 or boxes.numel() == 0:
        return boxes
    size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    noise = torch.randn(boxes.shape, generator=generator).to(boxes.device, boxes.dtype)
    return BoxDecoder.to_valid_box(boxes + noise * amount * size)


def capture_layer_input(store: dict):
    """A forward pre-hook that keeps a decoder layer's input hidden states in ``store["h"]``."""
    def hook(module, args, kwargs):
        store["h"] = args[0] if args else kwargs["hidden_states"]
    return hook


def grounding_attention_nll(model: NextChatModel, layer_input: torch.Tensor, ids: torch.Tensor,
                            rows: torch.Tensor, positions: torch.Tensor, boxes: torch.Tensor,
                            packing: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(N,) -log of the attention mass that head 0 of the LLM's last layer puts on the
    image patches under ``boxes[i]``, queried from token ``positions[i]`` of row
    ``rows[i]``: the grounding-attention losses (training only; inference is unchanged).

    Why: pixel2emb decodes a box from what the trigger's hidden state gathered.
    Trained from scratch, the LLM finds *where to look* only after a long
    plateau (box loss stuck at the value of a constant box for thousands of
    steps, also with 3x the samples on a GPU); supervising one head's attention
    gives that routing a direct signal. ``packing``: packed_positions_and_mask's
    output for rows of packed turns.
    """
    if len(rows) == 0:
        return layer_input.new_zeros(0)
    probs = last_layer_head0_attention(model, layer_input, rows, positions, packing)
    patch = ids == model.tokenizer.image_patch_id
    patch_positions = patch.nonzero(as_tuple=True)[1].view(len(ids), -1)[rows]  # (N, P)
    grid = model.config.vision.image_size // model.config.vision.patch_size
    cover = patch_coverage(boxes.float(), grid)
    mass = (probs.gather(1, patch_positions) * cover).sum(-1)
    return -(mass + 1e-6).log()


def answer_attention_targets(ids: torch.Tensor, labels: torch.Tensor, is_loc: torch.Tensor, loc_boxes: torch.Tensor,
                             turns: torch.Tensor | None = None, max_answer_words: int = 6, max_boxes: int = 4):
    """(rows, positions, boxes) for the grounding-attention loss from the positions
    that predict answer tokens (logits at t - 1 predict the token at t):

    - a question with exactly one region (``describe [0]``): the positions that
      predict the first ``max_answer_words`` answer tokens, each at that region;
    - a question without regions whose answer grounds objects (referring answers,
      an existence question's "yes" with its matches or "no" with the look-alikes
      it names, grounded captions): the position that predicts the first answer
      token, at each of the first ``max_boxes`` objects.

    A bare "no." (nothing to ground) gets no target: its attention is free to find nothing.
    Each turn of a packed row (``turns``, as in TrainingBatch) is one question.
    """
    loc_index = (torch.cumsum(is_loc.flatten(), 0) - 1).view_as(ids)
    if turns is None:
        turns = torch.ones_like(ids)
    rows, positions, boxes = [], [], []
    segments = [(row, int(k)) for row in range(len(ids)) for k in turns[row].unique() if k > 0]
    for b, turn in segments:
        in_turn = turns[b] == turn
        answer = ((labels[b] != -100) & in_turn).nonzero(as_tuple=True)[0]
        if len(answer) == 0:
            continue
        first = int(answer[0])
        locs = (is_loc[b] & in_turn).nonzero(as_tuple=True)[0]
        asked, answered = locs[locs < first], locs[locs >= first]
        if len(asked) == 1:
            targets = [(int(t) - 1, loc_index[b, asked[0]]) for t in answer[:max_answer_words]]
        elif len(asked) == 0 and len(answered):
            targets = [(first - 1, loc_index[b, t]) for t in answered[:max_boxes]]
        else:
            continue
        for position, box_index in targets:
            rows.append(b)
            positions.append(position)
            boxes.append(loc_boxes[box_index])
    if not rows:
        return ids.new_zeros(0), ids.new_zeros(0), loc_boxes.new_zeros(0, 4)
    return ids.new_tensor(rows), ids.new_tensor(positions), torch.stack(boxes)


def last_layer_head0_attention(model: NextChatModel, layer_input: torch.Tensor, rows: torch.Tensor,
                               positions: torch.Tensor,
                               packing: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(N, T) attention probabilities of head 0 of the LLM's last layer, from token
    ``positions[i]`` (an index into the row) of row ``rows[i]``, recomputed from the
    layer's input exactly as LlamaAttention does (RMSNorm, q/k projections, RoPE,
    scaling, causal mask; right padding never precedes a real token, so it needs no
    mask here). ``packing``: (position ids, allowed) of rows of packed turns."""
    from transformers.models.llama.modeling_llama import rotate_half

    layer = model.llm.model.layers[-1]
    attn = layer.self_attn
    head_dim = attn.head_dim
    x = layer.input_layernorm(layer_input)  # (B, T, D)
    index = torch.arange(x.shape[1], device=x.device)
    position_ids = packing[0] if packing is not None else index[None]
    cos, sin = model.llm.model.rotary_emb(x, position_ids)  # (B or 1, T, head_dim)
    cos, sin = cos.to(x.dtype).expand(len(x), -1, -1), sin.to(x.dtype).expand(len(x), -1, -1)
    query = attn.q_proj(x[rows, positions])[:, :head_dim]  # head 0
    query = query * cos[rows, positions] + rotate_half(query) * sin[rows, positions]
    keys = attn.k_proj(x).unflatten(-1, (-1, head_dim))[:, :, 0]  # key/value head 0 serves head 0
    keys = keys * cos + rotate_half(keys) * sin  # (B, T, head_dim)
    # Queries grouped per row and multiplied with that row's keys in one bmm: indexing
    # keys[rows] instead would sum the gradients of a row's several queries in a
    # thread-dependent order, and training would no longer repeat bit for bit.
    slot = (torch.nn.functional.one_hot(rows, len(x)).cumsum(0) - 1)[torch.arange(len(rows)), rows]
    grouped = query.new_zeros(len(x), int(slot.max()) + 1, head_dim).index_put((rows, slot), query)
    scores = (grouped @ keys.transpose(1, 2))[rows, slot].float() * attn.scaling  # (N, T)
    allowed = packing[1][rows, positions] if packing is not None else index[None] <= positions[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1)


class NextChatObjective(nn.Module):
    """The training loss of the lm stages (1-3) around a NextChatModel: what DDP wraps.

    ``mask_box_jitter``: SAM is prompted with the true boxes jittered by this fraction
    of their size while training (at inference the box comes from the decoder)."""

    def __init__(self, model: NextChatModel, weights: LossWeights, mask_box_jitter: float = 0.0):
        super().__init__()
        self.model = model
        self.weights = weights
        self.mask_box_jitter = mask_box_jitter

    def forward(self, batch: TrainingBatch) -> dict[str, torch.Tensor]:
        """All losses of one batch. Returns ``loss`` (weighted total) and each term,
        ``pred_boxes``, ``target_boxes``, and ``image_embeds`` with its graph (for the
        image-token attribute loss)."""
        return _lm_losses(self.model, batch, self.weights, self.mask_box_jitter if self.model.training else 0.0)


def _lm_losses(model: NextChatModel, batch: TrainingBatch, weights: LossWeights,
               jitter: float) -> dict[str, torch.Tensor]:
    tok = model.tokenizer
    ids = batch.input_ids.to(model.device)
    image_embeds = model.encode_image(batch.vision_pixels.to(model.device))
    loc_boxes = batch.loc_boxes.to(model.device, model.dtype)
    is_loc = ids == tok.location_id
    loc_rows = is_loc.nonzero(as_tuple=True)[0]  # row-major, like loc_boxes
    loc_embeds = model.location_embeddings(loc_boxes, image_embeds[loc_rows]) if loc_boxes.numel() else None
    emb = model.embed(ids, image_embeds, loc_embeds)
    attention_mask, position_ids, packing = batch.attention_mask.to(model.device), None, None
    if batch.turns is not None and int(batch.turns.max()) > 1:
        packing = packed_positions_and_mask(batch.turns.to(model.device))
        position_ids, attention_mask = packing[0], packing[1][:, None]
    supervise_attention = (weights.grounding_attention > 0 or weights.answer_attention > 0) and \
        loc_boxes.numel() > 0 and any(p.requires_grad for p in model.llm.parameters())
    captured = {}
    hook = (model.llm.model.layers[-1].register_forward_pre_hook(capture_layer_input(captured), with_kwargs=True)
            if supervise_attention else None)
    try:
        hidden = model.llm.model(inputs_embeds=emb, attention_mask=attention_mask,
                                position_ids=position_ids).last_hidden_state
    finally:
        if hook is not None:
            hook.remove()
    logits = model.llm.lm_head(hidden)
    losses = {"lm": lm_loss(logits, batch.labels.to(model.device))}

    # A trigger's target is the box its following location token carries.
    loc_index = (torch.cumsum(is_loc.flatten(), 0) - 1).view_as(ids)
    trig = torch.zeros_like(is_loc)
    trig[:, :-1] = (ids[:, :-1] == tok.trigger_id) & is_loc[:, 1:]
    b_idx, t_idx = trig.nonzero(as_tuple=True)
    trig_hidden = hidden[b_idx, t_idx]
    targets = loc_boxes[loc_index[b_idx, t_idx + 1]] if len(b_idx) else loc_boxes[:0]
    pred_raw = model.box_decoder(trig_hidden)
    losses["box"] = box_loss(pred_raw, targets, weights.box_l1, weights.box_giou)
    losses["cycle"] = cycle_loss(trig_hidden, targets, model.box_decoder, model.box_encoder)

    if batch.sam_pixels is not None and batch.mask_targets is not None:
        losses["mask"] = _mask_loss(model, batch, b_idx, trig_hidden, targets, weights, jitter)

    total = weights.lm * losses["lm"] + losses["box"] + weights.cycle * losses["cycle"]
    if supervise_attention:
        # (loss name, weight, (rows, positions, boxes)) of each grounding-attention loss.
        terms = []
        if weights.grounding_attention > 0:
            # Every location token looks at its own box; every trigger at the box it
            # grounds; a question token the batch names (a relation's anchor) at its box.
            loc_b, loc_t = is_loc.nonzero(as_tuple=True)
            look = [t.to(model.device) for t in batch.look] if batch.look is not None else \
                [b_idx[:0], t_idx[:0], targets[:0]]
            terms.append(("attention", weights.grounding_attention,
                          (torch.cat([b_idx, loc_b, look[0]]), torch.cat([t_idx, loc_t, look[1]]),
                           torch.cat([targets, loc_boxes, look[2].to(targets.dtype)]))))
        if weights.answer_attention > 0:
            turns = batch.turns.to(model.device) if packing is not None else None
            terms.append(("answer_attention", weights.answer_attention,
                          answer_attention_targets(ids, batch.labels.to(model.device), is_loc, loc_boxes, turns)))
        # One pass over the last layer's queries and keys for every term.
        rows, positions, boxes = (torch.cat(parts) for parts in zip(*(t[2] for t in terms)))
        nll = grounding_attention_nll(model, captured["h"], ids, rows, positions, boxes, packing)
        for (name, weight, _), part in zip(terms, nll.split([len(t[2][0]) for t in terms])):
            losses[name] = part.mean() if len(part) else captured["h"].sum() * 0.0
            total = total + weight * losses[name]
    if "mask" in losses:
        total = total + losses["mask"]
    losses["loss"] = total
    losses["pred_boxes"] = BoxDecoder.to_valid_box(pred_raw.detach())
    losses["target_boxes"] = targets.detach()
    losses["image_embeds"] = image_embeds
    return losses


def _mask_loss(model: NextChatModel, batch: TrainingBatch, b_idx, trig_hidden, targets, weights: LossWeights,
               jitter: float) -> torch.Tensor:
    sam_pixels = batch.sam_pixels.to(model.device, model.dtype)
    trainable = any(p.requires_grad for p in model.sam.image_encoder.parameters())
    with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
        embeddings = model.sam.encode_image(sam_pixels)
    logits, ious, gts = [], [], []
    for b, target in enumerate(batch.mask_targets):
        sel = (b_idx == b).nonzero(as_tuple=True)[0]
        if target is None or len(sel) == 0:
            continue
        if target.shape[0] != len(sel):
            raise ValueError(f"sample {b} has {len(sel)} triggers but {target.shape[0]} target masks")
        # SAM is prompted with the ground-truth box (teacher forcing), as in stage 3.
        boxes = jitter_boxes(targets[sel], jitter)
        low, iou = model.trigger_hidden_to_masks(trig_hidden[sel], boxes, embeddings[b:b + 1])
        logits.append(low)
        ious.append(iou)
        gts.append(target.to(low.device, low.dtype).view_as(low))
    if not logits:
        return trig_hidden.sum() * 0.0
    return mask_loss(torch.cat(logits), torch.cat(ious), torch.cat(gts),
                     weights.mask_focal, weights.mask_dice, weights.mask_iou)
