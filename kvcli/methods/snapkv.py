"""`snapkv`: tokens chosen by the attention of the prompt's last queries, same budget per layer.

SnapKV (Li et al., 2024, https://arxiv.org/abs/2404.14469) notices that the attention the
last few prompt tokens (the observation window) pay to the rest of the prompt predicts what
generation will attend to. It scores every earlier token by that attention, smoothed over
neighbouring positions so kept tokens come with their context, and keeps the top ones plus
the window, the same number in every layer.

Knobs:
- `window_size`: how many of the prompt's last queries score the rest (8 by default: on our
  small models it measured better than the paper's 32);
- `kernel_size`: width of the pooling over neighbouring positions (the paper's 7);
- `pooling`: `avg` or `max` pooling.

Differences from the references, all deliberate:
- kvpress averages the window's attention where the SnapKV and DynamicKV reference code sum
  it; within a layer the ranking is identical, so the kept tokens are the same;
- keys and values are stored once per KV head, scores averaged over its query heads (the
  reference code repeats KV heads);
- the budget counts the window, and the total over layers equals the budget exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method


@dataclass
class SnapKV(Method):
    """Pooled window-attention scores, the same budget for every layer (arXiv 2404.14469)."""

    name = "snapkv"
    summary = "tokens the prompt's last queries attend to, same budget per layer"
    paper = "https://arxiv.org/abs/2404.14469"
