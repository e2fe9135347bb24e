"""Saving and loading models.

Our format (a directory): ``config.json`` (NextChatConfig), ``model.safetensors``
and ``tokenizer.json``. Nothing is ever unpickled.

The released ``nextchat-7b-336`` layout: a LLaVA-style directory with sharded
``pytorch_model-*.bin`` files (+ ``pytorch_model.bin.index.json``), a LLaMA
``config.json`` and the tokenizer, with CLIP in a directory of its own (as the
official code loads it). ``.bin`` shards are read with
``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.
:data:`RELEASED_KEY_MAP` is the one place the two key layouts are related.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import ModelFileError
from .config import LLMConfig, NextChatConfig, SamConfig, VisionConfig, full_config
from .nextchat import NextChatModel
from .tokenizer import TOKENIZER_FILE, TextTokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# released key prefix -> our key prefix (longest match wins; order is irrelevant).
RELEASED_KEY_MAP: dict[str, str] = {
    "model.embed_tokens.": "llm.model.embed_tokens.",
    "model.layers.": "llm.model.layers.",
    "model.norm.": "llm.model.norm.",
    "lm_head.": "llm.lm_head.",
    "model.mm_projector.": "projector.",
    "loc_encoder.": "box_encoder.",
    "loc_decoder.": "box_decoder.",
    "seg_prompt_mlp.": "seg_prompt_mlp.",
    "sam.model.image_encoder.": "sam.image_encoder.",
    "sam.model.prompt_encoder.": "sam.prompt_encoder.",
    "sam.model.mask_decoder.": "sam.mask_decoder.",
}
# Keys of the released checkpoint we deliberately do not load: the vision tower
# comes from its own CLIP directory, and rotary caches are recomputed.
RELEASED_IGNORED_PREFIXES = ("model.vision_tower.",)
RELEASED_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def released_to_ours(key: str) -> str | None:
    if key.startswith(RELEASED_IGNORED_PREFIXES) or key.endswith(RELEASED_IGNORED_SUFFIXES):
        return None
    best = max((p for p in RELEASED_KEY_MAP if key.startswith(p)), key=len, default=None)
    if best is None:
        raise ModelFileError(f"released checkpoint key '{key}' is not in RELEASED_KEY_MAP")
    return RELEASED_KEY_MAP[best] + key[len(best):]


def ours_to_released(key: str) -> str | None:
    if key.startswith("vision_tower."):
        return None
    best = max((p for p in RELEASED_KEY_MAP.values() if key.startswith(p)), key=len, default=None)
    if best is None:
        raise ValueError(f"parameter '{key}' has no released name")
    released = next(k for k, v in RELEASED_KEY_MAP.items() if v == best)
    return released + key[len(best):]


# --- our format ---------------------------------------------------------------------

def save_pretrained(model: NextChatModel, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """``state``: the weights to write instead of the model's own state dict (training
    writes the base weights of a model that carries LoRA adapters this way)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory / CONFIG_FILE)
    # Copies: a predictor's engine makes the LLM's projections views of one fused
    # matrix (engine.static_llama), and safetensors refuses tensors that share memory.
    state = model.state_dict() if state is None else state
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "preset": model.config.preset})
    model.tokenizer.save(directory)


def load_pretrained(directory: str | Path, device: str | torch.device = "cpu") -> NextChatModel:
    """Load a model saved by :func:`save_pretrained`. Errors name the faulty file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelFileError(f"model directory not found: {directory}")
    for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE):
        if not (directory / name).is_file():
            raise ModelFileError(f"model file missing: {directory / name}")
    try:
        config = NextChatConfig.load(directory / CONFIG_FILE)
    except (ValueError, FileNotFoundError) as exc:
        raise ModelFileError(str(exc)) from None
    tokenizer = TextTokenizer.load(directory, config.tokens)
    try:
        state = load_file(str(directory / WEIGHTS_FILE), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"weights file {directory / WEIGHTS_FILE} is corrupt or truncated: {exc}") from None
    with torch.device("meta"):
        model = NextChatModel(config, tokenizer)
    _load_state(model, state, directory / WEIGHTS_FILE)
    return model.to(device).eval()


def _load_state(model: NextChatModel, state: dict[str, torch.Tensor], source: Path | str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelFileError(
            f"{source} does not match the model config: "
            f"{len(missing)} missing key(s) {missing[:5]}, {len(unexpected)} unexpected key(s) {unexpected[:5]}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ModelFileError(
                f"{source}: '{key}' has shape {tuple(tensor.shape)}, the config needs {tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (normalisation constants, rotary tables) are rebuilt
    # on the CPU: they are not in any checkpoint.
    _rebuild_buffers(model)
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise ModelFileError(f"{source}: no values for {still_meta[:5]}")


def _rebuild_buffers(model: NextChatModel) -> None:
    rotary = model.llm.model.rotary_emb
    with torch.device("cpu"):
        model.llm.model.rotary_emb = type(rotary)(config=model.llm.config)
    for module in model.modules():
        if type(module).__name__ == "CLIPVisionEmbeddings":
            module.position_ids = torch.arange(module.num_positions).expand((1, -1))


# --- the released nextchat-7b-336 layout ---------------------------------------------

def save_released_layout(model: NextChatModel, directory: str | Path, clip_directory: str | Path,
                         max_shard_bytes: int = 2 * 1024**3) -> None:
    """Write ``model`` the way the released checkpoint is laid out (used to test the
    released-layout loader with a tiny model; also handy to hand a model to the
    official code)."""
    extras = [name for name, used in (("image_position_scale > 0", model.config.image_position_scale > 0),
                                      (f"vision.patch_stem '{model.config.vision.patch_stem}'",
                                       model.config.vision.patch_stem != "linear"),
                                      ("region_features", model.config.region_features))
              if used]
    if extras:
        raise ValueError(f"the released layout has no place for this model's {' and '.join(extras)} "
                         "(tiny-preset additions); build the model without them to write that layout")
    directory, clip_directory = Path(directory), Path(clip_directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, tensor in model.state_dict().items():
        released = ours_to_released(key)
        if released is not None:
            state[released] = tensor.detach().cpu().contiguous()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, directory / name)
        weight_map.update({k: name for k in shard})
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=1))
    cfg = model.config
    llm = model.llm.config.to_dict()
    llm.update({
        "architectures": ["NextChatLlamaForCausalLM"],
        "mm_vision_tower": str(clip_directory), "mm_hidden_size": cfg.vision.hidden_size,
        "mm_vision_select_layer": cfg.vision.select_layer, "mm_use_im_start_end": True,
        "image_aspect_ratio": "pad", "mm_projector_type": "mlp2x_gelu",
    })
    (directory / CONFIG_FILE).write_text(json.dumps(llm, indent=1, default=str))
    model.tokenizer.save(directory)
    model.vision_tower.clip.save_pretrained(clip_directory)


def load_released(checkpoint_dir: str | Path, clip_dir: str | Path, base: NextChatConfig | None = None,
                  device: str | torch.device = "cpu") -> NextChatModel:
    """Load a checkpoint in the released nextchat-7b-336 layout from local directories.

    Shapes are read from the files: the LLM from ``config.json``, the vision tower
    from ``clip_dir``, SAM from its weights. ``base`` supplies what the files do not
    say (template, token names, ...); default: the ``full`` preset.
    """
    from transformers import CLIPVisionModel

    checkpoint_dir, clip_dir = Path(checkpoint_dir), Path(clip_dir)
    config = copy.deepcopy(base) if base is not None else full_config()
    if not (clip_dir / CONFIG_FILE).is_file():
        raise ModelFileError(f"CLIP vision tower not found: {clip_dir / CONFIG_FILE}")
    state = _read_released_state(checkpoint_dir)
    cfg_path = checkpoint_dir / CONFIG_FILE
    try:
        llm_cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise ModelFileError(f"model file missing: {cfg_path}") from None
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{cfg_path} is not valid JSON: {exc}") from None
    config.llm = LLMConfig(**{k: llm_cfg[k] for k in LLMConfig.__dataclass_fields__ if k in llm_cfg})
    try:
        clip = CLIPVisionModel.from_pretrained(str(clip_dir), local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/... for bad files
        raise ModelFileError(f"cannot load the CLIP vision tower from {clip_dir}: {exc}") from None
    vc = clip.config
    config.vision = VisionConfig(
        image_size=vc.image_size, patch_size=vc.patch_size, hidden_size=vc.hidden_size,
        intermediate_size=vc.intermediate_size, num_hidden_layers=vc.num_hidden_layers,
        num_attention_heads=vc.num_attention_heads, hidden_act=vc.hidden_act, layer_norm_eps=vc.layer_norm_eps,
        select_layer=llm_cfg.get("mm_vision_select_layer", config.vision.select_layer),
        pad_fill=config.vision.pad_fill, image_mean=config.vision.image_mean, image_std=config.vision.image_std)
    ours = {}
    for key, tensor in state.items():
        mapped = released_to_ours(key)
        if mapped is not None:
            ours[mapped] = tensor
    config.sam = sam_config_from_state(ours, config.sam)
    config.box_head_hidden = ours["box_decoder.0.weight"].shape[0]
    config.seg_prompt_tokens = ours["seg_prompt_mlp.2.weight"].shape[0] // config.sam.prompt_embed_dim
    tokenizer = TextTokenizer.load(checkpoint_dir, config.tokens)
    with torch.device("meta"):
        model = NextChatModel(config, tokenizer)
    model.vision_tower.clip = clip
    for key, tensor in clip.state_dict().items():
        ours["vision_tower.clip." + key] = tensor
    _load_state(model, ours, checkpoint_dir)
    return model.to(device).eval()


def _read_released_state(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    if not checkpoint_dir.is_dir():
        raise ModelFileError(f"checkpoint directory not found: {checkpoint_dir}")
    index = checkpoint_dir / "pytorch_model.bin.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as exc:
            raise ModelFileError(f"{index} is not a valid shard index: {exc}") from None
    elif (checkpoint_dir / "pytorch_model.bin").is_file():
        files = ["pytorch_model.bin"]
    else:
        raise ModelFileError(
            f"no weights in {checkpoint_dir}: expected pytorch_model.bin.index.json or pytorch_model.bin")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        path = checkpoint_dir / name
        if not path.is_file():
            raise ModelFileError(f"weight shard missing: {path}")
        try:
            state.update(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:  # unpickling errors of every kind: refuse, name the file
            raise ModelFileError(
                f"cannot read weight shard {path} (corrupt, truncated or not weights-only): {exc}") from None
    return state


def sam_config_from_state(state: dict[str, torch.Tensor], base: SamConfig) -> SamConfig:
    """Infer the SAM image encoder's shape (ViT-B/L/H or any other) from its weights."""
    prefix = "sam.image_encoder."
    try:
        patch = state[prefix + "patch_embed.proj.weight"]  # (C, 3, p, p)
        pos = state[prefix + "pos_embed"]  # (1, g, g, C)
    except KeyError as exc:
        raise ModelFileError(f"the checkpoint has no SAM image encoder weight {exc}") from None
    embed_dim, patch_size, grid = patch.shape[0], patch.shape[-1], pos.shape[1]
    depth = 1 + max(int(k[len(prefix) + 7:].split(".")[0]) for k in state if k.startswith(prefix + "blocks."))
    global_idx, window = [], base.window_size
    head_dim = None
    for i in range(depth):
        rel = state[f"{prefix}blocks.{i}.attn.rel_pos_h"]  # (2 * size - 1, head_dim)
        head_dim = rel.shape[1]
        size = (rel.shape[0] + 1) // 2
        if size == grid:
            global_idx.append(i)
        else:
            window = size
    hidden = state[prefix + "blocks.0.mlp.lin1.weight"].shape[0]
    return SamConfig(
        image_size=grid * patch_size, patch_size=patch_size, encoder_embed_dim=embed_dim, encoder_depth=depth,
        encoder_num_heads=embed_dim // head_dim, encoder_global_attn_indexes=tuple(global_idx), window_size=window,
        mlp_ratio=hidden / embed_dim, prompt_embed_dim=state[prefix + "neck.0.weight"].shape[0],
        mask_in_chans=base.mask_in_chans, decoder_depth=base.decoder_depth,
        decoder_mlp_dim=state["sam.mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
        decoder_num_heads=base.decoder_num_heads, pixel_mean=base.pixel_mean, pixel_std=base.pixel_std,
        mask_threshold=base.mask_threshold)
