"""Properties of splitting a token budget among layers (`allocate`, `even_split`)."""

from __future__ import annotations

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvcli.methods.allocation import allocate, even_split


@st.composite
def layers(draw, equal_floors: bool = False, feasible: bool = False):
    """Weights, caps and floors for 1-40 layers, and a total that may exceed what they hold.

    `feasible` draws a total that covers the floors (clipped to the caps).
    """
    n = draw(st.integers(1, 40))
    weights = draw(st.lists(st.one_of(st.just(0.0), st.floats(0.0, 1e4), st.integers(0, 2000).map(float)), min_size=n, max_size=n))
    caps = draw(st.lists(st.integers(0, 5000), min_size=n, max_size=n))
    if equal_floors:
        floors = [draw(st.integers(0, 50))] * n
    else:
        floors = draw(st.lists(st.integers(0, 200), min_size=n, max_size=n))
    lowest = sum(min(f, c) for f, c in zip(floors, caps)) if feasible else 0
    total = draw(st.integers(lowest, sum(caps) + 1000))
    return total, weights, caps, floors


@settings(max_examples=200, deadline=None)
@given(layers())
def test_allocate_sums_to_total_within_caps(case):
    """allocate returns one integer per layer, each in [0, cap], summing to min(total, sum(caps))."""
    total, weights, caps, floors = case
    out = allocate(total, weights, caps, floors)
    assert len(out) == len(weights)
    assert all(isinstance(x, int) for x in out)
    assert all(0 <= x <= c for x, c in zip(out, caps))
    assert sum(out) == min(total, sum(caps))


@settings(max_examples=200, deadline=None)
@given(layers(feasible=True))
def test_allocate_respects_floors_when_feasible(case):
    """When the floors (clipped to caps) fit in the total, every layer gets at least its floor."""
    total, weights, caps, floors = case
    out = allocate(total, weights, caps, floors)
    assert all(x >= min(f, c) for x, f, c in zip(out, floors, caps))


@settings(max_examples=200, deadline=None)
@given(layers(equal_floors=True, feasible=True))
def test_allocate_roughly_proportional(case):
    """With equal floors, a layer with a larger weight and no binding cap never gets more than one token fewer than a lighter one."""
    total, weights, caps, floors = case
    out = allocate(total, weights, caps, floors)
    for i, heavy in enumerate(weights):
        for j, light in enumerate(weights):
            if heavy > light and out[i] < caps[i] and out[j] < caps[j]:
                assert out[i] >= out[j] - 1, (i, j, out)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 40), st.integers(0, 10_000), st.integers(0, 3))
def test_allocate_even_without_weights(n, total, floor):
    """All-zero weights share the total evenly (differing by at most one) above the floors."""
    assume(n * floor <= total)
    out = allocate(total, [0.0] * n, [total] * n, [floor] * n)
    assert sum(out) == total
    assert max(out) - min(out) <= 1


def test_allocate_passes_surplus_of_capped_layers_on():
    """A capped layer's surplus goes to the others in proportion to their weights."""
    assert allocate(100, [8, 1, 1], [20, 100, 100]) == [20, 40, 40]


def test_allocate_shrinks_floors_that_overshoot():
    """Floors larger than the total shrink in proportion and still sum to the total."""
    out = allocate(10, [1, 1, 1], [100, 100, 100], [10, 5, 5])
    assert sum(out) == 10 and out[0] >= out[1]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 100_000), st.integers(1, 128))
def test_even_split(total, num_layers):
    """even_split sums to the total, differs by at most one, and puts the extra tokens first."""
    out = even_split(total, num_layers)
    assert len(out) == num_layers
    assert sum(out) == total
    assert max(out) - min(out) <= 1
    assert out == sorted(out, reverse=True)
