"""Dividing a token budget among layers: proportional, capped, floored, integral."""

from __future__ import annotations

import math
from collections.abc import Sequence


def allocate(total: int, weights: Sequence[float], caps: Sequence[int], floors: Sequence[int] | None = None) -> list[int]:
    """Split `total` tokens among layers in proportion to `weights`.

    Every layer gets at least its floor and at most its cap (what it holds); the surplus a
    capped layer cannot take goes to the others in proportion to their weights. The result
    sums to `min(total, sum(caps))` exactly. Layers whose weights are all zero share evenly.
    """
    n = len(weights)
    if len(caps) != n or (floors is not None and len(floors) != n):
        raise ValueError("weights, caps and floors must have one entry per layer")
    caps = [max(0, int(c)) for c in caps]
    total = min(max(0, int(total)), sum(caps))
    out = [min(int(f), c) for f, c in zip(floors or [0] * n, caps)]
    if sum(out) > total:
        # Floors alone overshoot (tiny budgets): shrink them, largest first.
        out = _integral([total * f / sum(out) for f in out], total, caps)
        return out
    remaining = total - sum(out)
    active = [i for i in range(n) if out[i] < caps[i]]
    shares = [0.0] * n
    while remaining > 0 and active:
        weight_sum = sum(max(0.0, float(weights[i])) for i in active)
        if weight_sum <= 0:
            split = {i: remaining / len(active) for i in active}
        else:
            split = {i: remaining * max(0.0, float(weights[i])) / weight_sum for i in active}
        overflow = [i for i in active if out[i] + shares[i] + split[i] > caps[i]]
        if not overflow:
            for i in active:
                shares[i] += split[i]
            remaining = 0
            break
        for i in overflow:
            remaining -= caps[i] - out[i] - shares[i]
            shares[i] = caps[i] - out[i]
        active = [i for i in active if i not in overflow]
    targets = [out[i] + shares[i] for i in range(n)]
    return _integral(targets, total, caps)


def _integral(targets: Sequence[float], total: int, caps: Sequence[int]) -> list[int]:
    """Round `targets` to integers that sum to `total` and stay within `caps` (largest remainder)."""
    out = [min(int(math.floor(t + 1e-9)), c) for t, c in zip(targets, caps)]
    leftover = total - sum(out)
    order = sorted(range(len(out)), key=lambda i: (out[i] - targets[i], i))
    while leftover > 0:
        progressed = False
        for i in order:
            if leftover == 0:
                break
            if out[i] < caps[i]:
                out[i] += 1
                leftover -= 1
                progressed = True
        if not progressed:
            break
    return out


def even_split(total: int, num_layers: int) -> list[int]:
    """`total` tokens over `num_layers` layers, differing by at most one."""
    base, extra = divmod(int(total), num_layers)
    return [base + (1 if i < extra else 0) for i in range(num_layers)]
