"""LoRA on the LLM (through peft): the one-GPU way to fine-tune the full preset.

``lora: {rank: 16, alpha: 32, dropout: 0.05}`` in a stage YAML (with ``llm`` among
its ``trainable`` modules) puts rank-r adapters on the LLM's attention and MLP
projections and freezes the LLM's own weights; the stage's other trainable modules
(projector, box heads, seg MLP...) train in full. The adapters are saved on their own
(``adapters/``, peft's layout: adapter_config.json + adapter_model.safetensors); the
stage's model directory holds the merged weights, and ``nextchat train
--merge-adapters`` merges saved adapters into a model directory on request.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nextchat_ros.model import NextChatModel, load_pretrained, save_pretrained

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULTS = {"rank": 16, "alpha": 32, "dropout": 0.0, "targets": list(TARGETS)}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def lora_spec(values: dict | None) -> dict:
    """A stage's ``lora`` values with the defaults filled in; unknown keys refused."""
    values = dict(values or {})
    unknown = set(values) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown lora keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    spec = {**DEFAULTS, **values}
    if spec["rank"] < 1:
        raise ValueError(f"lora rank must be >= 1, not {spec['rank']}")
    return spec


def _peft_config(spec: dict):
    from peft import LoraConfig

    return LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                      target_modules=list(spec["targets"]), bias="none")


def add_lora(model: NextChatModel, spec: dict) -> list[torch.nn.Parameter]:
    """Adapters on the LLM's projections, in place; the LLM's own weights frozen.
    Returns the adapters' parameters (trainable)."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(_peft_config(lora_spec(spec)), model.llm)
    adapters = []
    for name, param in model.llm.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_" in name:
            adapters.append(param)
    return adapters


def has_lora(model: NextChatModel) -> bool:
    return any("lora_" in name for name, _ in model.llm.named_parameters())


def plain_state(model: NextChatModel) -> dict[str, torch.Tensor]:
    """The model's own weights under their usual names (adapters left out): what
    ``save_pretrained`` writes and ``load_pretrained`` reads."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}


def load_plain_state(model: NextChatModel, state: dict[str, torch.Tensor]) -> None:
    """The inverse of :func:`plain_state` into a model that has adapters."""
    names = {k.replace(".base_layer.", "."): k for k in model.state_dict() if "lora_" not in k}
    model.load_state_dict({names[k]: v for k, v in state.items()}, strict=False)
    missing = set(names) - set(state)
    if missing:
        raise ValueError(f"no values for {sorted(missing)[:5]}")


def save_adapters(model: NextChatModel, directory: str | Path, spec: dict) -> Path:
    from peft import get_peft_model_state_dict

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in get_peft_model_state_dict(model.llm).items()}
    save_file(state, str(directory / ADAPTER_WEIGHTS))
    (directory / ADAPTER_CONFIG).write_text(json.dumps({"nextchat_lora": lora_spec(spec)}, indent=2))
    return directory


def load_adapters(model: NextChatModel, directory: str | Path) -> None:
    """Saved adapters onto ``model`` (adding them first if it has none)."""
    from peft import set_peft_model_state_dict

    directory = Path(directory)
    spec = json.loads((directory / ADAPTER_CONFIG).read_text())["nextchat_lora"]
    if not has_lora(model):
        add_lora(model, spec)
    result = set_peft_model_state_dict(model.llm, load_file(str(directory / ADAPTER_WEIGHTS)))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{directory}: adapters that do not fit this model: {unexpected[:5]}")


def merge_lora(model: NextChatModel) -> NextChatModel:
    """Fold the adapters into the LLM's weights and remove them, in place."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.llm.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.llm.get_submodule(parent_name), child, module.get_base_layer())
    return model


def merge_adapters(base: str | Path, adapters: str | Path, out: str | Path) -> Path:
    """A model directory: ``base`` with the ``adapters`` merged in."""
    model = load_pretrained(base)
    load_adapters(model, adapters)
    save_pretrained(merge_lora(model), out)
    return Path(out)
