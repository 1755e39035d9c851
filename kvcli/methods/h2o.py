"""`h2o`: heavy hitters by attention accumulated over the whole prompt, plus recent tokens.

H2O (Zhang et al., 2023, https://arxiv.org/abs/2306.14048) observes that a few tokens
receive most of the attention from every query ("heavy hitters") and keeps those plus the
most recent tokens. A token's score is the attention it receives summed over all prompt
queries, averaged over the query heads that share its KV head.

Knobs:
- `window_size`: the observation window, always kept: it is H2O's recent part;
- `recent_size`: recent tokens kept unconditionally, window included; None keeps the window
  only, so the rest of the budget goes to heavy hitters;
  `kernel_size` and `pooling` are inherited but unused (H2O does not smooth its scores).

Differences from the reference code (FMInference/H2O), all deliberate:
- the reference splits the budget half heavy hitters, half recent tokens; here the recent
  part is the observation window (or `recent_size`), and the rest goes to heavy hitters;
- the reference evicts greedily while generating; here the prompt is read in one pass and
  the accumulated scores come from all its queries, computed in blocks (never q_len x k_len);
- keys and values are stored once per KV head, scores averaged over its query heads.
Accumulated attention favours early tokens, which more queries can see; that is H2O's
score as published, not corrected here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import BudgetError
from .base import LayerObservation, Method


@dataclass
class H2O(Method):
    """Heavy hitters by accumulated attention plus the recent window (arXiv 2306.14048)."""

    name = "h2o"
    summary = "heavy hitters by attention over the whole prompt, plus recent tokens"
    paper = "https://arxiv.org/abs/2306.14048"
    needs_accumulated = True

    recent_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.recent_size is not None and self.recent_size < self.window_size:
            raise BudgetError(f"--recent-size {self.recent_size} must be at least the window ({self.window_size})")

    def scores(self, obs: LayerObservation) -> torch.Tensor:
        """Attention summed over all prompt queries, mean over each KV head's query heads."""
        if obs.accumulated is None:
            raise ValueError("internal: h2o needs accumulated attention; capture with accumulated=True")
        window = min(self.window_size, obs.k_len)
        scores = obs.accumulated[:, :, : obs.k_len - window].mean(dim=1)  # (num_kv_heads, k_len - window)
        if self.recent_size is not None:
            # Recent tokens just before the window outrank every heavy hitter.
            extra = min(self.recent_size - window, scores.shape[1])
            if extra > 0:
                scores = scores.clone()
                scores[:, scores.shape[1] - extra :] = float("inf")
        return scores

    def params(self) -> dict:
        return {"window_size": self.window_size, "recent_size": self.recent_size}
