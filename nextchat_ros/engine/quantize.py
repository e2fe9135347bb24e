"""The LLM's precision: ``llm_precision`` on the CLI, the node and the launch file.

``auto`` keeps the predictor's dtype. ``fp32`` / ``fp16`` / ``bf16`` cast the LLM.
(On a CPU without fp16 arithmetic, fp16 halves what a decode step reads but slows
the prefill's many-row products: no faster overall; ``benchmarks/engine.py``.)
``int8`` / ``int4`` quantise the weights of its linear layers (activations stay
in the LLM's float dtype) with torchao, the library gpt-fast's quantisation grew
into: int8 per output channel; int4 in groups of 128 (tinygemm's packed layout on
CUDA, which wants bf16; on the CPU torchao has no packed int4 kernel, so the
int4 values are kept one per byte and the CPU gets int4's accuracy, not its size).
The token embedding stays in float: it is a lookup, not a matrix product.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelFileError
from ..options import LLM_PRECISIONS

# The float precisions by name: the model's (``options.PRECISIONS``) and the LLM's.
FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INT4_GROUP_SIZE = 128


def llm_dtype(precision: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The float dtype the LLM computes in under ``precision``."""
    if precision not in LLM_PRECISIONS:
        raise ValueError(f"llm_precision '{precision}' is not one of {LLM_PRECISIONS}")
    if precision in FLOAT_DTYPES:
        return FLOAT_DTYPES[precision]
    if precision == "int4" and device.type == "cuda":
        return torch.bfloat16  # the packed int4 kernel computes in bf16
    return model_dtype


def quantize_linears(modules: list[nn.Module], precision: str, device: torch.device) -> None:
    """Weight-only int8 / int4 for every ``nn.Linear`` in ``modules``, in place."""
    if precision not in ("int8", "int4"):
        return
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup
    except ImportError as exc:
        raise ModelFileError(f"llm_precision '{precision}' needs torchao (pip install torchao): {exc}") from None
    if precision == "int8":
        config = Int8WeightOnlyConfig()
    elif device.type == "cuda":
        from torchao.quantization.quantize_.workflows.int4.int4_packing_format import Int4PackingFormat

        config = Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE,
                                      int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D)
    else:
        config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP_SIZE))
    group = INT4_GROUP_SIZE if precision == "int4" else 1

    def quantizable(module: nn.Module, _name: str) -> bool:
        # int4 groups run along the input features: a layer they do not divide stays in float.
        return isinstance(module, nn.Linear) and module.in_features % group == 0

    for module in modules:
        quantize_(module, config, filter_fn=quantizable)
