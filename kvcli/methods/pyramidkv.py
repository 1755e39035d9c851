"""`pyramidkv`: SnapKV's scores with budgets falling linearly from the first layer to the last.

PyramidKV (Cai et al., 2024, https://arxiv.org/abs/2406.02069) sees attention spread widely
in the lower layers and concentrate on a few tokens in the upper ones ("pyramidal
information funneling"), so it gives the lower layers more of the cache and the upper ones
less, around the same mean. Tokens are chosen within a layer exactly as in `snapkv`.

Knobs:
- `beta`: steepness; the last layer keeps 1/beta of the mean budget outside the window and
  the first layer the mirror image (2 - 1/beta times the mean), as in kvpress's
  PyramidKVPress (default 20);
- `window_size`, `kernel_size`, `pooling`: as in `snapkv`.

Differences from kvpress's PyramidKVPress and the reference code, all deliberate:
- the pyramid is built over the tokens outside the window, and every layer keeps its window
  on top (as the reference does; kvpress builds it over whole layers);
- when the first layer would need more than the prompt, it is capped at the prompt and the
  last layer raised to keep the mean (as kvpress does); kvpress falls back to SnapKV when
  the pyramid dips below the window, here every layer keeps at least its window and one token;
- budgets are integers that sum to the budget exactly (kvpress rounds each layer on its
  own, so the total drifts by up to half a token per layer).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BudgetError
from .allocation import allocate
from .base import BudgetPlan
from .snapkv import SnapKV


@dataclass
class PyramidKV(SnapKV):
    """SnapKV scores, per-layer budgets falling linearly with depth (arXiv 2406.02069)."""

    name = "pyramidkv"
    summary = "snapkv scores, more budget for lower layers, less for upper ones"
    paper = "https://arxiv.org/abs/2406.02069"

    # the profile split moves budget between layers by the profile, which would undo the pyramid
    head_splits = ("equal", "adaptive", "global")

    beta: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 1:
            raise BudgetError(f"--beta must be at least 1, got {self.beta}")

    def layer_budgets(self, plan: BudgetPlan) -> list[int]:
        """A linear ramp of budgets from the first layer down to the last, summing to `plan.total`."""
        num_layers = plan.num_layers
        window = min(self.window_size, plan.prompt_len)
        average = plan.total / num_layers - window  # mean tokens kept outside the window
        most = plan.prompt_len - window  # what a layer can keep outside its window
        low = average / self.beta
        high = 2 * average - low
        if high > most:
            high = most
            low = 2 * average - high
        step = (high - low) / (num_layers - 1) if num_layers > 1 else 0.0
        targets = [window + high - i * step for i in range(num_layers)]  # sums to plan.total
        # Each layer keeps its window and one more token; what the ramp puts above that floor is
        # the weight, so the proportional split reproduces the ramp and only rounds it.
        floor = min(window + 1, plan.prompt_len)
        weights = [max(0.0, t - floor) for t in targets]
        return allocate(plan.total, weights, [plan.prompt_len] * num_layers, [floor] * num_layers)
