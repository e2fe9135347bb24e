"""How much memory a training stage needs per GPU, before renting the GPUs.

``nextchat train --config C --estimate-memory --gpus N`` prints, for each stage of C
and for DDP, FSDP and LoRA: parameters, gradients, optimizer state and activations
per GPU, from the model's own shapes (the model is built on the meta device: no
weights are read and nothing is allocated).

What each strategy holds per GPU (P = all parameters, T = the trained ones, w = the
weights' bytes, 4 for the fp32 weights this loop trains; c = compute bytes, 2 under
bf16 autocast):
  ddp   every parameter (P w); T's gradients, twice on several GPUs (the .grad
        tensors and DDP's buckets); AdamW's two moments of T in fp32 and, during
        the step, one more T-sized buffer of its foreach update.
  fsdp  P w / N sharded, plus the root unit (everything outside the decoder layers
        but the last one) and two decoder layers gathered in compute precision (the
        layer running and the one prefetched); T's gradients / N plus the root's
        unsharded gradients; the moments and the step buffer / N.
  lora  (one GPU) every parameter, the LLM's frozen; adapters of rank r on the
        attention and MLP projections train with the heads and projector.
Activations: the tensors autograd saves for the backward pass, per token of a row
(the image's patch tokens plus the text), counted per LLaMA decoder layer as HF's
LlamaDecoderLayer saves them (RMSNorm inputs in fp32, the projections' inputs, the
attention's q/k/v/output for a fused kernel that keeps no score matrix, the MLP's
gate/up/product), plus the loss's log-softmax over the vocabulary; with
gradient_checkpointing only each layer's input, plus one layer recomputed; and the
projector's input and hidden layer per image patch.
The peak: parameters + gradients + moments + the larger of the activations (the
backward pass, while gradients fill in) and the step's buffer (the optimizer step,
once the activations are freed).
A stage that trains nothing the gradients reach through the LLM (stage 3: the mask
parts) keeps none of the LLM's. Not counted: the activations of a trained vision
tower or SAM encoder (no stage of the shipped configs trains them with the LLM) and
of SAM's mask decoder (small beside the LLM's).

The tiny preset's figures are checked against the peak of live tensor memory
measured during a real training step on the CPU (:class:`TensorMemoryPeak`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from nextchat_ros.model import NextChatModel, build_model
from nextchat_ros.model.config import NextChatConfig

from .lora import DEFAULTS as LORA_DEFAULTS
from .lora import TARGETS as LORA_TARGETS

GB = 1024**3
STRATEGIES = ("ddp", "fsdp", "lora")
# Modules whose training sends gradients through the LLM (so its activations are kept).
THROUGH_LLM = ("llm", "projector", "image_position", "region_features", "vision_tower", "box_encoder")
# Text tokens per sample packed into a row (question and answer with their template),
# beside the image's patch tokens; the tiny preset's synthetic samples average ~40.
TEXT_TOKENS_PER_SAMPLE = 64


@dataclass
class MemoryEstimate:
    """Bytes per GPU."""

    strategy: str
    gpus: int
    parameters: int
    gradients: int
    optimizer: int  # AdamW's moments
    step_buffer: int  # the optimizer step's temporary (foreach), while activations are freed
    activations: int

    @property
    def total(self) -> int:
        """The peak (the module docstring says when each part is held)."""
        return self.parameters + self.gradients + self.optimizer + max(self.activations, self.step_buffer)

    def row(self) -> str:
        return (f"{self.strategy:5s} {self.gpus:4d}  " + "  ".join(
            f"{v / GB:8.2f}" for v in (self.parameters, self.gradients, self.optimizer, self.activations,
                                       self.total)))


def meta_model(config: NextChatConfig) -> NextChatModel:
    """The model's modules with shapes and no storage. The tiny tokenizer stands in
    (the vocabulary's size is the config's), so its special-token names are used."""
    import copy

    from nextchat_ros.model.config import SpecialTokens

    config = copy.deepcopy(config)
    config.tokens = SpecialTokens()
    with torch.device("meta"):
        return build_model(config, seed=None)


def _count(parameters) -> int:
    return sum(p.numel() for p in parameters)


def lora_parameters(model: NextChatModel, rank: int, targets=LORA_TARGETS) -> int:
    """Parameters of rank-``rank`` adapters (A: in x r, B: r x out) on the LLM's ``targets``."""
    total = 0
    for name, module in model.llm.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            total += rank * (module.in_features + module.out_features)
    return total


def activation_bytes_per_token(config: NextChatConfig, compute_bytes: int, checkpointing: bool) -> float:
    """Bytes autograd keeps per token of a row, over the whole LLM and the LM loss."""
    llm = config.llm
    h, i, layers = llm.hidden_size, llm.intermediate_size, llm.num_hidden_layers
    kv = llm.num_key_value_heads * (h // llm.num_attention_heads)
    vocab = llm.vocab_size
    fp32 = 4
    norms = 2 * 2 * h * fp32  # two RMSNorms a layer, each its fp32 input and normalised value
    projections = (h + h + h) * compute_bytes  # inputs of q/k/v, o and gate/up
    attention = (h + 2 * kv + h) * compute_bytes + llm.num_attention_heads * fp32  # q, k, v, output, log-sum-exp
    mlp = 4 * i * compute_bytes  # gate output, its SiLU, up output, their product (down's input)
    layer = norms + projections + attention + mlp
    loss = vocab * fp32 + h * compute_bytes  # the log-softmax kept for backward; lm_head's input
    embeds = h * fp32  # the row's input embeddings (text and image tokens)
    if checkpointing:
        return layers * h * fp32 + layer + loss + embeds
    return layers * layer + loss + embeds


def image_activation_bytes(config: NextChatConfig, compute_bytes: int) -> float:
    """Bytes the projector keeps per image: its input (the vision features) and its
    hidden layer, per patch."""
    return config.vision.num_patches * (config.vision.hidden_size + 2 * config.llm.hidden_size) * compute_bytes


def tokens_per_row(config: NextChatConfig, turns_per_image: int) -> int:
    return config.vision.num_patches + TEXT_TOKENS_PER_SAMPLE * turns_per_image


def estimate(config: NextChatConfig, stage, gpus: int, strategy: str, model: NextChatModel | None = None,
             tokens: int | None = None, device_type: str = "cuda") -> MemoryEstimate:
    """One stage's memory per GPU under one strategy (``stage``: a StageConfig), on
    GPUs (``device_type`` cpu: no bf16 under mixed_precision auto, as train.uses_bf16)."""
    model = model if model is not None else meta_model(config)
    bf16 = stage.mixed_precision == "bf16" or (stage.mixed_precision == "auto" and device_type == "cuda")
    compute = 2 if bf16 else 4
    weights = 4
    total = _count(model.parameters())
    trained = sum(_count(model.get_submodule(name).parameters()) for name in stage.trainable)
    if strategy == "lora" and "llm" in stage.trainable:
        lora = {**LORA_DEFAULTS, **(stage.lora or {})}
        adapters = lora_parameters(model, lora["rank"], lora["targets"])
        trained = trained - _count(model.llm.parameters()) + adapters
        total += adapters
    tokens = tokens if tokens is not None else tokens_per_row(config, stage.turns_per_image)
    # Gradients pass through the LLM only to what trains in it or before it; a stage
    # that trains only the mask parts (stage 3) keeps none of the LLM's activations.
    through_llm = stage.kind == "lm" and bool(set(stage.trainable) & set(THROUGH_LLM))
    activations = through_llm * int(stage.batch_size * (tokens * activation_bytes_per_token(config, compute,
                                                                              stage.gradient_checkpointing)
                                          + image_activation_bytes(config, compute)))
    moments, step_buffer = 2 * trained * 4, trained * 4
    if strategy == "fsdp":
        layers = model.llm.model.layers
        layer = _count(layers[0].parameters())
        sharded_units = layer * (len(layers) - 1)
        root = total - sharded_units
        root_trained = max(0, trained - sharded_units) if "llm" in stage.trainable else trained
        return MemoryEstimate(strategy, gpus, total * weights // gpus + (root + 2 * layer) * compute,
                              trained * 4 // gpus + root_trained * 4, moments // gpus, step_buffer // gpus,
                              activations)
    grad_copies = 2 if strategy == "ddp" and gpus > 1 else 1
    return MemoryEstimate(strategy, gpus, total * weights, grad_copies * trained * 4, moments, step_buffer,
                          activations)


def model_config_of(train_config) -> NextChatConfig:
    """The architecture a training config starts from: its checkpoint's config, else
    its preset with the config's changes."""
    if train_config.init_checkpoint and (Path(train_config.init_checkpoint) / "config.json").is_file():
        return NextChatConfig.load(Path(train_config.init_checkpoint) / "config.json")
    if train_config.init_preset:
        return train_config.model_config()
    raise ValueError(f"{train_config.name}: init_checkpoint {train_config.init_checkpoint} not found and no "
                     "init_preset to take the shapes from")


def print_estimates(config_path: str | Path, gpus: list[int]) -> None:
    from .train import StageConfig, TrainConfig

    train_config = TrainConfig.load(config_path)
    config = model_config_of(train_config)
    model = meta_model(config)
    print(f"{config_path}: preset {config.preset}, {_count(model.parameters()) / 1e9:.2f} B parameters; "
          f"GB per GPU (weights fp32, AdamW; LoRA: a stage's lora rank, else {LORA_DEFAULTS['rank']}, "
          f"on {', '.join(LORA_TARGETS)})")
    for stage_path in train_config.stages:
        stage = StageConfig.load(Path(stage_path))
        tokens = tokens_per_row(config, stage.turns_per_image)
        rows = f"{tokens} tokens" if stage.kind == "lm" else f"images (a {stage.kind} stage: activations not estimated)"
        print(f"\n{stage.name}: trains {', '.join(stage.trainable)}; batch {stage.batch_size} x {rows}, "
              f"{stage.mixed_precision} precision, checkpointing {'on' if stage.gradient_checkpointing else 'off'}")
        print("strat  gpus    params     grads     optim      acts     total  (total: the peak, with the larger of "
              "acts and the optimizer step's buffer)")
        for strategy in STRATEGIES:
            if (strategy == "lora" and "llm" not in stage.trainable) or (strategy != "ddp" and stage.kind != "lm"):
                continue  # LoRA adapts the LLM; FSDP and LoRA run lm stages
            for n in sorted(set(gpus)) if strategy != "lora" else (1,):
                print(estimate(config, stage, n, strategy, model, tokens).row())


class TensorMemoryPeak(TorchDispatchMode):
    """The peak bytes of live tensors while active, as CUDA's max_memory_allocated
    counts them, on any device: every storage an operation creates is counted until it
    is freed. ``track`` adds tensors that existed before (parameters, optimizer state).
    Memory an operation uses only inside its kernel is not seen."""

    def __init__(self):
        super().__init__()
        self._sizes = WeakIdKeyDictionary()
        self.current = self.peak = 0

    def track(self, tensors) -> None:
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._sizes:
            return
        size = storage.nbytes()
        self._sizes[storage] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and not tensor.is_meta:
                self._track(tensor)
        return out


def measured_step(model: NextChatModel, stage, seed: int = 0) -> dict:
    """One training step of ``model`` on this process, set up as train_stage sets it up
    (frozen, LoRA, FSDP of one rank, bf16 autocast where the stage says so), after a
    first step that creates the optimizer's state, measured: the step's peak memory
    (CUDA's max_memory_allocated on a GPU, else the peak of live tensor bytes), the
    bytes of the tensors autograd saved for backward, the batch's tokens per row, and
    the step's seconds. For checking :func:`estimate`."""
    import time

    from torch.utils.data import DataLoader

    from .batches import StreamSampler
    from .train import prepare_stage, uses_bf16

    prepared = prepare_stage(model, stage, seed)
    parts, trained, optimizer = prepared.parts, prepared.trained, prepared.optimizer
    device = model.device
    bf16 = uses_bf16(stage, device)
    batches = iter(DataLoader(parts.dataset, batch_size=stage.batch_size, sampler=StreamSampler(0),
                              collate_fn=parts.collate_fn, num_workers=0))
    storages = WeakIdKeyDictionary()
    sizes = [0]

    def saved(tensor):  # summed while the step's graph still holds them
        if isinstance(tensor, torch.Tensor) and tensor.untyped_storage() not in storages:
            storages[tensor.untyped_storage()] = tensor.untyped_storage().nbytes()
            sizes.append(sum(storages.values()))
        return tensor

    def step(batch) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(saved, lambda t: t), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = parts.losses(batch)["loss"]
        loss.backward()
        del loss
        torch.nn.utils.clip_grad_norm_(trained, stage.max_grad_norm)
        optimizer.step()

    step(next(batches))
    batch = next(batches)
    storages.clear()
    sizes[:] = [0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        step(batch)
        torch.cuda.synchronize(device)
        seconds, peak = time.perf_counter() - t0, torch.cuda.max_memory_allocated(device)
    else:
        tracker = TensorMemoryPeak()
        with tracker:
            tracker.track(list(model.parameters()) + list(model.buffers()) + trained)
            tracker.track(tensor for state in optimizer.state.values() for tensor in state.values())
            t0 = time.perf_counter()
            step(batch)
            seconds, peak = time.perf_counter() - t0, tracker.peak
    model.eval()
    return {"peak_bytes": peak, "saved_activation_bytes": max(sizes),
            "tokens_per_row": int(batch[0].input_ids.shape[1]), "step_seconds": seconds}
