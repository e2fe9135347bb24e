"""The two ways the predictor runs its LLM over a frame, behind one interface.

Both hold the frame's system + image prefix once and run queries after it:

- ``StaticDecoder`` (the engine, the default): ``StaticLlama`` over a
  preallocated cache, queries batched, a decode step that can be captured as a
  CUDA graph;
- ``EagerDecoder`` (the reference): transformers' own forward over a
  ``DynamicCache``, cropped back to the prefix after each query; one query at a
  time. Tests and ``benchmarks/engine.py`` check the engine against it.

Every method takes and returns embeddings and hidden states in the LLM's dtype;
the predictor does the token embedding, the heads and the picking, so the
generation loop is written once for both.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .graphs import CapturedCall
from .static_llama import StaticLlama


class EagerDecoder:
    max_rows = 1

    def __init__(self, llm):
        self.llm = llm.model
        self.context = llm.config.max_position_embeddings
        self.cache: DynamicCache | None = None
        self.prefix_len = 0

    def set_prefix(self, embeds: torch.Tensor) -> None:
        """``embeds`` (1, P, D): the frame's prefix."""
        cache = DynamicCache(config=self.llm.config)
        self.llm(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
        self.cache, self.prefix_len = cache, embeds.shape[1]

    def prefill(self, embeds: list[torch.Tensor]) -> list[torch.Tensor]:
        """One query's embeddings (Q, D) after the prefix -> its hidden states (Q, D)."""
        if len(embeds) != 1:
            raise ValueError("the eager decoder runs one query at a time")
        self.end()
        return [self._run(embeds[0][None])[0]]

    def step(self, embeds: torch.Tensor) -> torch.Tensor:
        """(1, D): the next input -> its hidden state (1, D)."""
        return self._run(embeds[:, None])[:, 0]

    def end(self) -> None:
        """Drop the last query's tokens (transformers 5 crops by a negative count)."""
        extra = self.cache.get_seq_length() - self.prefix_len if self.cache is not None else 0
        if extra > 0:
            self.cache.crop(-extra)

    def _run(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.llm(inputs_embeds=embeds, past_key_values=self.cache, use_cache=True).last_hidden_state


class StaticDecoder:
    """The engine's decoder. ``cuda_graphs``: capture the decode step once per batch
    size and replay it (CUDA only; the step then reads the whole cache, masked)."""

    def __init__(self, llm, context: int, max_rows: int = 8, cuda_graphs: bool = False):
        self.llama = StaticLlama(llm.model, context)
        self.context = context
        self.max_rows = max_rows
        self.prefix_len = 0
        self._rows_with_prefix = 0
        self._positions: list[int] = []  # each row's next position, on the host
        self._position_tensor: torch.Tensor | None = None  # the same, (B, 1) on the device
        device = self.llama.cos.device
        if cuda_graphs and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[int, CapturedCall] = {}

    def set_prefix(self, embeds: torch.Tensor) -> None:
        length = embeds.shape[1]
        if length >= self.context:
            raise ValueError(f"the prefix is {length} tokens; the cache holds {self.context}")
        positions = torch.arange(length, device=embeds.device)[None]
        self.llama(embeds, positions, length, start=0)
        self.prefix_len, self._rows_with_prefix = length, 1

    def prefill(self, embeds: list[torch.Tensor]) -> list[torch.Tensor]:
        """Queries (Q_b, D) after the prefix, one cache row each -> hidden states (Q_b, D).

        Shorter queries are padded at the end; their pads sit past their own
        position, where no token looks and the decode steps overwrite them."""
        rows = len(embeds)
        if not 1 <= rows <= self.max_rows:
            raise ValueError(f"{rows} queries in one batch; the engine takes 1 to {self.max_rows}")
        lengths = [e.shape[0] for e in embeds]
        longest = max(lengths)
        if self.prefix_len + longest >= self.context:
            raise ValueError(f"the query is {longest} tokens; the cache has room for "
                             f"{self.context - self.prefix_len - 1} after the image")
        if rows > self.llama.rows:
            self.llama.ensure_rows(rows)
            self._graphs.clear()  # they read the cache tensors that were just replaced
        if self._rows_with_prefix < rows:
            self.llama.copy_prefix(rows, self.prefix_len)
            self._rows_with_prefix = rows
        batch = embeds[0].new_zeros(rows, longest, embeds[0].shape[-1])
        for b, e in enumerate(embeds):
            batch[b, :e.shape[0]] = e
        device = batch.device
        start = self.prefix_len
        positions = (start + torch.arange(longest, device=device))[None].expand(rows, -1)
        hidden = self.llama(batch, positions, start + longest, start=start)
        self._positions = [start + n for n in lengths]
        self._position_tensor = torch.tensor(self._positions, device=device)[:, None]
        return [hidden[b, :n] for b, n in enumerate(lengths)]

    def step(self, embeds: torch.Tensor) -> torch.Tensor:
        """(B, D): each row's next input -> its hidden state (B, D)."""
        if max(self._positions) >= self.context:
            raise ValueError("the answer ran past the cache")
        if self.cuda_graphs:
            hidden = self._graph(embeds[:, None], self._position_tensor)[:, 0]
        else:
            hidden = self.llama(embeds[:, None], self._position_tensor, max(self._positions) + 1)[:, 0]
        self._position_tensor += 1
        self._positions = [p + 1 for p in self._positions]
        return hidden

    def end(self) -> None:
        """Nothing to undo: the next query overwrites this one's positions."""

    def _graph(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The decode step over the whole cache, captured at the first step of each
        batch size with that step's own inputs (so capturing writes what the step
        writes anyway), replayed after."""
        rows = embeds.shape[0]
        graph = self._graphs.get(rows)
        if graph is None:
            def decode_step(step_embeds, step_positions):
                return self.llama(step_embeds, step_positions, None)

            graph = self._graphs[rows] = CapturedCall(decode_step, (embeds, positions))
        return graph(embeds, positions)
