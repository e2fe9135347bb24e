"""A LLaMA forward over a preallocated KV cache, in the manner of gpt-fast.

It computes what a transformers ``LlamaModel`` computes, from the same weights,
with fewer and cheaper steps:

- the query, key and value projections are one matrix, and so are the gate and
  up projections (the transformers modules are pointed at slices of them, so the
  weights exist once and both forwards read the same memory);
- the cache is one tensor per K and V for all layers, allocated once for
  ``context`` tokens and ``rows`` queries: the frame's prefix is written once
  and each query after it by position, so there is no cropping and no
  reallocation between queries. A query never sees another: keys past a row's
  own position are masked, and the next query overwrites them;
- every row has its own position, so queries of different lengths about one
  frame run as one batch;
- nothing in a step depends on a host value when ``kv_len`` is None (the
  position lives in a device tensor and the mask over the whole cache is
  computed from it),
  which is what lets ``graphs.CapturedCall`` capture a decode step once.

Weight-only int8 / int4 (``quantize.quantize_llm``) replaces the fused
matrices; the transformers forward cannot run after that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StaticLlama(nn.Module):
    def __init__(self, llama_model: nn.Module, context: int, rows: int = 1):
        """``llama_model``: a transformers ``LlamaModel`` (``LlamaForCausalLM.model``).
        ``context``: cache length in tokens (prefix + query + answer).
        ``rows``: queries the cache holds at once (``ensure_rows`` grows it)."""
        super().__init__()
        config = llama_model.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.hidden_size = config.hidden_size
        self.eps = config.rms_norm_eps
        self.context = context
        self.layers = nn.ModuleList(_FusedLayer(layer, self.eps) for layer in llama_model.layers)
        self.norm = llama_model.norm
        weight = self.norm.weight
        self.dtype = weight.dtype
        rotary = llama_model.rotary_emb
        # transformers computes cos/sin per call as position * inv_freq in fp32; a
        # table of the same products holds the same values.
        positions = torch.arange(context, device=weight.device, dtype=torch.float32)
        freqs = positions[:, None] * rotary.inv_freq.to(weight.device, torch.float32)[None]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", (emb.cos() * rotary.attention_scaling).to(self.dtype), persistent=False)
        self.register_buffer("sin", (emb.sin() * rotary.attention_scaling).to(self.dtype), persistent=False)
        self.register_buffer("key_positions", torch.arange(context, device=weight.device), persistent=False)
        self.k_cache = self.v_cache = None
        self.ensure_rows(rows)

    @property
    def rows(self) -> int:
        return self.k_cache.shape[1]

    def ensure_rows(self, rows: int) -> None:
        """Room for ``rows`` queries at once; what the cache holds is kept."""
        if self.k_cache is not None and self.rows >= rows:
            return
        shape = (len(self.layers), rows, self.num_kv_heads, self.context, self.head_dim)
        k = torch.zeros(shape, device=self.cos.device, dtype=self.dtype)
        v = torch.zeros_like(k)
        if self.k_cache is not None:
            k[:, :self.rows] = self.k_cache
            v[:, :self.rows] = self.v_cache
        self.k_cache, self.v_cache = k, v

    def copy_prefix(self, rows: int, length: int) -> None:
        """Row 0's first ``length`` positions (the frame's prefix) into rows 1..rows-1."""
        self.k_cache[:, 1:rows, :, :length] = self.k_cache[:, :1, :, :length]
        self.v_cache[:, 1:rows, :, :length] = self.v_cache[:, :1, :, :length]

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, kv_len: int | None,
                start: int | None = None) -> torch.Tensor:
        """``embeds`` (B, Q, D) for cache rows 0..B-1 at ``positions`` (B, Q) -> last
        hidden states (B, Q, D), after the final norm.

        A prefill (``start`` given) writes every row at ``start .. start + Q``; a
        decode step (Q = 1) writes each row at its own ``positions[:, 0]``. A token
        sees the cache up to its own position. ``kv_len`` (> every position) bounds
        the keys read; None reads the whole cache, masked by position, with nothing
        taken from the host (what a captured graph runs).
        """
        batch, q_len, _ = embeds.shape
        x = embeds.to(self.dtype)
        cos = self.cos[positions][:, :, None]  # (B, Q, 1, hd)
        sin = self.sin[positions][:, :, None]
        # One row decoding on the host's count: its position is kv_len - 1, so it is
        # written by slice and sees exactly the keys read, with no mask to build.
        single = start is None and batch == 1 and kv_len is not None
        if single:
            start, mask = kv_len - 1, None
        else:
            keys = self.key_positions if kv_len is None else self.key_positions[:kv_len]
            mask = keys <= positions[:, :, None]  # (B, Q, kv)
        kv_len = kv_len or self.context
        rows = torch.arange(batch, device=x.device) if start is None else None
        heads, kv_heads = self.num_heads, self.num_kv_heads
        for index, layer in enumerate(self.layers):
            h = layer.attention_input(x)
            qkv = layer.qkv(h).view(batch, q_len, heads + 2 * kv_heads, self.head_dim)
            qk = qkv[:, :, :heads + kv_heads]
            qk = qk * cos + _rotate_half(qk) * sin
            q = qk[:, :, :heads].transpose(1, 2)  # (B, H, Q, hd)
            k = qk[:, :, heads:].transpose(1, 2)
            v = qkv[:, :, heads + kv_heads:].transpose(1, 2)
            k_cache, v_cache = self.k_cache[index], self.v_cache[index]
            if start is not None:
                k_cache[:batch, :, start:start + q_len] = k
                v_cache[:batch, :, start:start + q_len] = v
            else:
                k_cache[rows, :, positions[:, 0]] = k[:, :, 0]
                v_cache[rows, :, positions[:, 0]] = v[:, :, 0]
            out = self._attend(q, k_cache[:batch, :, :kv_len], v_cache[:batch, :, :kv_len], mask)
            x = x + layer.o_proj(out.transpose(1, 2).reshape(batch, q_len, -1))
            x = x + layer.mlp(x)
        return _rms_norm(x, self.norm.weight, self.eps)

    def _attend(self, q, k, v, mask):
        """q (B, H, Q, hd), k/v (B, KV, L, hd), mask (B, Q, L) -> (B, H, Q, hd)."""
        if q.shape[2] > 1:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None],
                                                  enable_gqa=self.num_kv_heads != self.num_heads)
        # One token: grouped heads as a matrix product against their shared keys,
        # which on the CPU costs a fraction of SDPA's kernel for one query.
        batch, groups = q.shape[0], self.num_heads // self.num_kv_heads
        q = q.view(batch, self.num_kv_heads, groups, self.head_dim)
        scores = (q @ k.transpose(-1, -2)) * self.head_dim ** -0.5  # (B, KV, G, L)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None], float("-inf"))
        out = scores.softmax(-1, dtype=torch.float32).to(v.dtype) @ v
        return out.view(batch, self.num_heads, 1, self.head_dim)


class _FusedLayer(nn.Module):
    """One decoder layer's weights, with q/k/v and gate/up fused. The transformers
    layer's projections become views of the fused matrices (one copy of each)."""

    def __init__(self, layer: nn.Module, eps: float):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.eps = eps
        self.input_norm = layer.input_layernorm
        self.post_norm = layer.post_attention_layernorm
        self.qkv = _fuse(attn.q_proj, attn.k_proj, attn.v_proj)
        self.gate_up = _fuse(mlp.gate_proj, mlp.up_proj)
        self.o_proj, self.down_proj = attn.o_proj, mlp.down_proj
        self.act = mlp.act_fn

    def attention_input(self, x: torch.Tensor) -> torch.Tensor:
        return _rms_norm(x, self.input_norm.weight, self.eps)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(_rms_norm(x, self.post_norm.weight, self.eps)).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


def _fuse(*linears: nn.Linear) -> nn.Linear:
    if any(lin.bias is not None for lin in linears):
        raise ValueError("the static-cache LLaMA forward expects projections without bias")
    weight = torch.cat([lin.weight.detach() for lin in linears])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    offset = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = nn.Parameter(weight[offset:offset + rows], requires_grad=False)
        offset += rows
    return fused


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: the statistics in fp32, the scale in the input
    dtype (F.rms_norm is slower on the CPU: it decomposes into more ops)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
