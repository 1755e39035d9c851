"""`streamingllm`: attention sinks plus the most recent tokens.

StreamingLLM (Xiao et al., 2023, https://arxiv.org/abs/2309.17453) keeps the first few
tokens, which soak up attention whatever they say (the "attention sinks"), and a sliding
window of the latest tokens. It reads no attention at all: the choice depends only on
where a token sits, so it is the position-only baseline the attention-scored methods must beat.

Knobs:
- `n_sink`: how many of the first tokens are kept as attention sinks (the paper's 4);
- `window_size`: the observation window, kept like in every method; it is the newest part
  of the recent tokens, and the budget left after the sinks extends it further back.
  `kernel_size` and `pooling` are inherited but unused.

Differences from the reference code (mit-han-lab/streaming-llm), all deliberate:
- the reference evicts while streaming past a fixed cache size; here the prompt is read in
  one pass and each layer then keeps its share of the budget, the same for every layer;
- when the budget outside the window is smaller than `n_sink`, the earliest sinks are kept
  and the rest dropped (the reference's cache is never that small).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import BudgetError
from .base import LayerObservation, Method


@dataclass
class StreamingLLM(Method):
    """The first `n_sink` tokens and the most recent ones (arXiv 2309.17453)."""

    name = "streamingllm"
    summary = "attention sinks plus the most recent tokens"
    paper = "https://arxiv.org/abs/2309.17453"
    head_splits = ("equal",)  # see Method.head_splits

    n_sink: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_sink < 0:
            raise BudgetError(f"--n-sink must be 0 or more, got {self.n_sink}")

    def scores(self, obs: LayerObservation) -> torch.Tensor:
        """Recency (the original position) outside the window; sinks outrank everything, earliest first."""
        window = min(self.window_size, obs.k_len)
        positions = obs.positions[:, : obs.k_len - window].double()  # (num_kv_heads, k_len - window)
        scores = positions.clone()
        n_sink = min(self.n_sink, scores.shape[1])
        # Above every position, and falling with the sink's rank so a tight budget keeps the first.
        top = positions.max() + 1 if positions.numel() else 0
        scores[:, :n_sink] = top + torch.arange(n_sink, 0, -1, dtype=scores.dtype, device=scores.device)
        return scores

    def params(self) -> dict:
        return {"window_size": self.window_size, "n_sink": self.n_sink}
