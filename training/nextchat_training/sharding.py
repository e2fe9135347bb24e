"""Sharded data-parallel training (FSDP) and its checkpoints.

``parallel: fsdp`` in a stage YAML trains the stage through PyTorch's own FSDP
(``torch.distributed.fsdp.fully_shard``): every LLaMA decoder layer but the last is a
unit of its own (and so is every CLIP / SAM-encoder block that trains); the rest of the model is
the root unit, around the stage's objective, so that one all-gather serves the
vision tower, the projector, the embeddings and the heads the objective calls
directly. Parameters, gradients and AdamW's moments are sharded over the ranks;
frozen parts are sharded too and never get gradients. With bf16 mixed precision the
layers compute in bf16 (the all-gathered copy) and gradients are reduced in fp32 onto
fp32 master shards.

Checkpoints are ``torch.distributed.checkpoint`` directories: each rank writes its
own shards, and a run resumes on the same or another number of ranks (DCP reshards
on load). :func:`convert_checkpoint` turns one into a ``save_pretrained`` model
directory on one process, without a process group.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from nextchat_ros.model import NextChatModel, save_pretrained
from nextchat_ros.model.checkpoint import CONFIG_FILE, _load_state
from nextchat_ros.model.config import NextChatConfig
from nextchat_ros.model.tokenizer import TextTokenizer

SHARDS_DIR = "shards"  # the DCP directory inside a stage checkpoint
PARALLEL = ("ddp", "fsdp")


def init_single_process_group(device: torch.device) -> None:
    """FSDP needs a process group even alone: a one-rank group with an in-memory store."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)


def shard_units(model: NextChatModel, trainable: list[str]) -> list[nn.Module]:
    """The modules that become FSDP units of their own: the LLaMA decoder layers, and
    the blocks of the vision tower and of SAM's image encoder where those train.

    The last decoder layer stays in the root unit: the grounding-attention losses
    (objective.last_layer_head0_attention) call its norm and projections outside its
    forward, which only the root unit keeps gathered for the whole step."""
    units = list(model.llm.model.layers)[:-1]
    if "vision_tower" in trainable:
        units += list(model.vision_tower.clip.vision_model.encoder.layers)
    if "sam.image_encoder" in trainable:
        units += list(model.sam.image_encoder.blocks)
    return units


def fully_shard_stage(root: nn.Module, model: NextChatModel, trainable: list[str], bf16: bool,
                      heads: nn.Module | None = None) -> None:
    """Shard ``model`` in place under ``root`` (the objective that holds it), and the
    stage's training heads as a unit of their own."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(model.device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for unit in shard_units(model, trainable):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(root, mesh=mesh, mp_policy=policy)
    if heads is not None:
        fully_shard(heads, mesh=mesh, mp_policy=policy)


class Trainee(nn.Module):
    """What a sharded checkpoint holds: the model and the stage's training heads."""

    def __init__(self, model: NextChatModel, heads: nn.Module | None):
        super().__init__()
        self.model = model
        self.heads = heads if heads is not None else nn.Module()


def save_sharded(directory: Path, model: NextChatModel, heads, optimizer, scheduler, step: int) -> None:
    """Every rank writes its shards (collective); rank 0 writes the rest and swaps the
    finished checkpoint in, so a checkpoint is either complete or absent."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, world = dist.get_rank(), dist.get_world_size()
    tmp = directory.with_name(directory.name + ".tmp")
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    dist.barrier()
    trainee = Trainee(model, heads)
    state, optim = get_state_dict(trainee, optimizer)
    dcp.save({"trainee": state, "optimizer": optim}, checkpoint_id=tmp / SHARDS_DIR)
    if rank == 0:
        model.config.save(tmp / CONFIG_FILE)
        model.tokenizer.save(tmp)
        torch.save({"scheduler": scheduler.state_dict()}, tmp / "trainer.pt")
        (tmp / "trainer.json").write_text(json.dumps({"step": step, "parallel": "fsdp", "world_size": world}))
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    dist.barrier()


def load_sharded(directory: Path, model: NextChatModel, heads, optimizer, scheduler) -> int:
    """Resume from a sharded checkpoint, written by any number of ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    trainee = Trainee(model, heads)
    state, optim = get_state_dict(trainee, optimizer)
    loaded = {"trainee": state, "optimizer": optim}
    dcp.load(loaded, checkpoint_id=directory / SHARDS_DIR)
    set_state_dict(trainee, optimizer, model_state_dict=loaded["trainee"], optim_state_dict=loaded["optimizer"])
    scheduler.load_state_dict(torch.load(directory / "trainer.pt", map_location="cpu", weights_only=True)["scheduler"])
    return int(json.loads((directory / "trainer.json").read_text())["step"])


def gathered_model(model: NextChatModel) -> NextChatModel:
    """An ordinary (unsharded) copy of a sharded model, on every rank (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # Not cpu_offload: that leaves the full tensors on rank 0 only.
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return _model_from_state(model.config, model.tokenizer, state, model.device)


def _model_from_state(config: NextChatConfig, tokenizer: TextTokenizer, state: dict, device) -> NextChatModel:
    with torch.device("meta"):
        fresh = NextChatModel(config, tokenizer)
    _load_state(fresh, state, "the sharded model")
    return fresh.to(device)


def convert_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """A sharded stage checkpoint -> a model directory (``load_pretrained`` reads it).
    One process, no process group: DCP reads every rank's shards."""
    import torch.distributed.checkpoint as dcp

    checkpoint, out = Path(checkpoint), Path(out)
    info = checkpoint / "trainer.json"
    if not (checkpoint / SHARDS_DIR).is_dir() or not info.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a sharded checkpoint (no {SHARDS_DIR}/ and trainer.json); "
                                "a DDP checkpoint already is a model directory")
    config = NextChatConfig.load(checkpoint / CONFIG_FILE)
    tokenizer = TextTokenizer.load(checkpoint, config.tokens)
    with torch.device("meta"):
        skeleton = NextChatModel(config, tokenizer)
    state = {f"model.{k}": torch.empty(v.shape, dtype=v.dtype) for k, v in skeleton.state_dict().items()}
    dcp.load({"trainee": state}, checkpoint_id=checkpoint / SHARDS_DIR, no_dist=not dist.is_initialized())
    model = _model_from_state(config, tokenizer, {k[len("model."):]: v for k, v in state.items()}, "cpu")
    save_pretrained(model, out)
    return out
