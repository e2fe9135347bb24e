"""A function of fixed-shape tensors, captured once as a CUDA graph and replayed.

What makes a decode step cheap on a GPU: one launch for the whole step instead
of one per kernel, and no Python between them. The function must not depend on
host values that change between calls (``StaticLlama`` reads its position from
a device tensor and the whole cache, masked, for this reason).
"""

from __future__ import annotations

import torch


class CapturedCall:
    def __init__(self, fn, example_inputs: tuple[torch.Tensor, ...], warmup: int = 2):
        """Capture ``fn(*example_inputs)``. The warm-up and the capture run ``fn`` on
        the example inputs, so its side effects (cache writes) must be the ones a call
        with those inputs would make anyway."""
        self.inputs = tuple(t.clone() for t in example_inputs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):  # lazy initialisation (cuBLAS handles, workspaces) outside the graph
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn(*self.inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for static, value in zip(self.inputs, inputs):
            if static.data_ptr() != value.data_ptr():
                static.copy_(value)
        self.graph.replay()
        # The output buffer is the graph's: the next replay overwrites it.
        return self.output.clone()
