"""Budget and selection invariants of every compression method, on random observations (no model)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvcli.errors import BudgetError
from kvcli.methods import REGISTRY, BudgetPlan, LayerObservation, make_method, plan_budget
from kvcli.methods.dynamickv import DynamicKV
from kvcli.methods.pyramidkv import PyramidKV
from methodutil import build, squeeze


pytestmark = pytest.mark.usefixtures("one_thread")


COMPRESSING = [name for name, cls in REGISTRY.items() if cls.compresses]

# (num_layers, num_kv_heads, group, k_len): small, odd-sized and deep fake models.
SHAPES = [(5, 2, 3, 300), (6, 3, 7, 1200), (30, 2, 4, 400)]
# Per-layer budgets as a ratio of the prompt, and the tightest budget allowed (window + 1).
BUDGETS = [0.05, 0.137, 0.5, "window+1"]
SEEDS = [0, 1]


def make_observation(layer_idx: int, num_kv_heads: int, group: int, k_len: int, window: int, gen: torch.Generator, peak: float = 1.0) -> LayerObservation:
    """Random softmax window attention and accumulated attention; `peak` > 1 concentrates attention."""
    logits = torch.randn(num_kv_heads, group, window, k_len, generator=gen) * peak
    accumulated = torch.rand(num_kv_heads, group, k_len, generator=gen) * k_len / 10
    return LayerObservation(
        layer_idx=layer_idx,
        positions=torch.arange(k_len).expand(num_kv_heads, -1),
        window_attn=logits.softmax(dim=-1),
        accumulated=accumulated,
    )


def make_plan(budget, num_layers: int, k_len: int, window: int) -> BudgetPlan:
    if budget == "window+1":
        return plan_budget(k_len, num_layers, window_size=window, budget=window + 1)
    return plan_budget(k_len, num_layers, window_size=window, ratio=budget)


def replay(method, plan: BudgetPlan, observations: list[LayerObservation]) -> tuple[dict[int, torch.Tensor], object]:
    """Run a compressor over every layer, applying decisions in order as `Capture.derive` does."""
    compressor = squeeze(method, plan, observations[0].window_attn.shape[0] * observations[0].window_attn.shape[1]).compressor()
    held: dict[int, torch.Tensor] = {}
    for obs in observations:
        held[obs.layer_idx] = obs.positions
        for target, positions in compressor.observe(obs).items():
            assert target <= obs.layer_idx, "a decision about a layer not yet observed"
            assert positions.shape[0] == held[target].shape[0], "one row of positions per KV head"
            for head in range(positions.shape[0]):
                assert torch.isin(positions[head], held[target][head]).all(), "a decision keeps a position the layer no longer holds"
            held[target] = positions
    return held, compressor


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", COMPRESSING)
def test_method_invariants(name, shape, budget, seed):
    """Every method keeps each layer's window once, sorted unique positions, the top-scored rest, and exactly the plan's total."""
    num_layers, num_kv_heads, group, k_len = shape
    method = build(name, num_layers, num_kv_heads * group)
    window = method.window_size
    plan = make_plan(budget, num_layers, k_len, window)
    gen = torch.Generator().manual_seed(seed)
    observations = [make_observation(i, num_kv_heads, group, k_len, window, gen) for i in range(num_layers)]
    held, _ = replay(method, plan, observations)

    assert sorted(held) == list(range(num_layers))
    counts = []
    for obs in observations:
        kept = held[obs.layer_idx]  # (num_kv_heads, n_kept): one count per layer, shared by its heads
        counts.append(kept.shape[1])
        assert kept.shape[0] == num_kv_heads
        assert (kept[:, 1:] > kept[:, :-1]).all(), "positions must be strictly increasing per head (sorted, no duplicates)"
        assert kept.shape[1] > window
        window_positions = obs.positions[:, -window:]
        assert torch.equal(kept[:, -window:], window_positions), "the window is kept, once, in every head"
        if not method.selects_by_scores:
            continue
        # The kept entries outside the window are the best-scored ones of that layer.
        scores = method.scores(obs)  # (num_kv_heads, k_len - window)
        rest = kept[:, :-window]  # positions equal local indices here
        dropped = torch.ones_like(scores, dtype=torch.bool).scatter(1, rest, False)
        for head in range(num_kv_heads):
            if rest.shape[1] and dropped[head].any():
                assert scores[head, rest[head]].min() >= scores[head][dropped[head]].max()
    assert sum(counts) == plan.total


@pytest.mark.parametrize("name", COMPRESSING)
def test_budget_total_matches_across_methods(name):
    """For one plan, every method keeps the same total over layers, each layer within (window, k_len] (cross-layer methods included)."""
    method = build(name, 7, 4)
    plan = BudgetPlan(num_layers=7, prompt_len=500, total=7 * 60 + 3)
    gen = torch.Generator().manual_seed(0)
    held, _ = replay(method, plan, [make_observation(i, 2, 2, 500, method.window_size, gen) for i in range(7)])
    counts = [held[i].shape[1] for i in range(7)]
    assert sum(counts) == plan.total
    assert all(method.window_size < c <= plan.prompt_len for c in counts), counts


def test_streamingllm_keeps_sinks_and_recent():
    """streamingllm keeps the first n_sink positions and a contiguous run of the most recent ones."""
    method = make_method("streamingllm", n_sink=4)
    plan = BudgetPlan(num_layers=3, prompt_len=100, total=3 * 20)
    gen = torch.Generator().manual_seed(0)
    held, _ = replay(method, plan, [make_observation(i, 2, 3, 100, method.window_size, gen) for i in range(3)])
    expected = torch.cat([torch.arange(4), torch.arange(84, 100)])
    for kept in held.values():
        assert torch.equal(kept, expected.expand(2, -1))


def test_streamingllm_tight_budget_prefers_earliest_sinks():
    """With room for fewer than n_sink tokens outside the window, streamingllm keeps the earliest sinks."""
    method = make_method("streamingllm", n_sink=4)
    plan = BudgetPlan(num_layers=1, prompt_len=50, total=method.window_size + 2)
    gen = torch.Generator().manual_seed(0)
    held, _ = replay(method, plan, [make_observation(0, 2, 3, 50, method.window_size, gen)])
    assert held[0][0, :2].tolist() == [0, 1]


def test_h2o_scores_are_mean_accumulated_attention():
    """h2o scores an entry by its accumulated attention averaged over its KV head's query heads."""
    method = make_method("h2o")
    gen = torch.Generator().manual_seed(0)
    obs = make_observation(0, 2, 4, 64, method.window_size, gen)
    assert torch.allclose(method.scores(obs), obs.accumulated[:, :, :-method.window_size].mean(dim=1))
    obs.accumulated = None
    with pytest.raises(ValueError):
        method.scores(obs)


def test_h2o_recent_size_keeps_recent_tokens():
    """h2o with recent_size keeps that many latest tokens whatever their attention."""
    method = make_method("h2o", recent_size=20)
    plan = BudgetPlan(num_layers=2, prompt_len=200, total=2 * 30)
    gen = torch.Generator().manual_seed(0)
    held, _ = replay(method, plan, [make_observation(i, 2, 3, 200, method.window_size, gen) for i in range(2)])
    for kept in held.values():
        assert torch.equal(kept[:, -20:], torch.arange(180, 200).expand(2, -1))
    with pytest.raises(BudgetError):
        make_method("h2o", recent_size=4)


def test_snapkv_same_budget_every_layer():
    """snapkv gives every layer the same budget, up to one token of rounding."""
    budgets = make_method("snapkv").layer_budgets(BudgetPlan(num_layers=6, prompt_len=300, total=6 * 40 + 5))
    assert max(budgets) - min(budgets) <= 1


@settings(max_examples=200, deadline=None)
@given(
    num_layers=st.integers(1, 64),
    prompt_len=st.integers(10, 5000),
    fraction=st.floats(0.0, 1.0),
    window_size=st.integers(1, 64),
    beta=st.integers(1, 40),
)
def test_pyramidkv_budgets(num_layers, prompt_len, fraction, window_size, beta):
    """pyramidkv budgets are integers in [window + 1, prompt_len], non-increasing with depth, summing exactly to the plan's total."""
    assume(window_size + 1 < prompt_len)  # otherwise no plan compresses
    lowest = (window_size + 1) * num_layers
    highest = prompt_len * num_layers - 1
    total = lowest + round(fraction * (highest - lowest))
    method = PyramidKV(window_size=window_size, beta=beta)
    budgets = method.layer_budgets(BudgetPlan(num_layers, prompt_len, total))
    assert len(budgets) == num_layers
    assert all(isinstance(b, int) for b in budgets)
    assert sum(budgets) == total
    assert all(window_size + 1 <= b <= prompt_len for b in budgets)
    assert all(a >= b - 1 for a, b in zip(budgets, budgets[1:])), "the ramp falls with depth (up to rounding)"


def test_pyramidkv_follows_kvpress_ramp():
    """pyramidkv's last layer keeps about mean/beta outside the window and the first about 2*mean - mean/beta."""
    method = PyramidKV(window_size=8, beta=20)
    plan = BudgetPlan(num_layers=11, prompt_len=4000, total=11 * (8 + 200))
    budgets = method.layer_budgets(plan)
    assert budgets[-1] - 8 == 10
    assert budgets[0] - 8 == 390
    assert budgets[5] - 8 == 200
    with pytest.raises(BudgetError):
        PyramidKV(beta=0)


# DynamicKV's cross-layer behaviour.


def dynamickv_run(num_layers: int, k_len: int, per_layer: int, seed: int, peaked=()):
    method = DynamicKV()
    plan = BudgetPlan(num_layers=num_layers, prompt_len=k_len, total=num_layers * per_layer)
    gen = torch.Generator().manual_seed(seed)
    observations = [make_observation(i, 2, 4, k_len, method.window_size, gen, peak=8.0 if i in peaked else 0.5) for i in range(num_layers)]
    held, compressor = replay(method, plan, observations)
    return method, plan, held, compressor


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("num_layers,k_len,per_layer", [(30, 600, 20), (5, 300, 12), (6, 2000, 108)])
def test_dynamickv_caps_and_floors(num_layers, k_len, per_layer, seed):
    """dynamickv keeps each layer between its floor and its candidates (max_multiple x average + window)."""
    method, plan, held, compressor = dynamickv_run(num_layers, k_len, per_layer, seed, peaked={1, 3})
    window = method.window_size
    average = plan.total / num_layers - window
    cap = min(math.ceil(method.max_multiple * average), k_len - window) + window
    floor = math.ceil(method.min_multiple * average) + window
    counts = [held[i].shape[1] for i in range(num_layers)]
    assert sum(counts) == plan.total
    assert all(floor <= c <= cap for c in counts), counts


def test_dynamickv_redivides_at_last_layer():
    """dynamickv re-divides at the last layer even when the layer count is not a multiple of the period."""
    method, plan, held, compressor = dynamickv_run(30, 600, 20, 0)
    assert 30 % method.period != 0
    assert len(compressor.allocations) == math.ceil(30 / method.period)
    assert len(compressor.allocations[-1]) == 30
    assert sum(held[i].shape[1] for i in range(30)) == plan.total
    # Without the last re-division, layers 28 and 29 would keep all their candidates.
    assert max(held[28].shape[1], held[29].shape[1]) < min(math.ceil(method.max_multiple * 12), 592) + 8


def test_dynamickv_budgets_follow_attention():
    """dynamickv gives layers different budgets when some layers' attention is peaked and others' flat."""
    _, _, held, _ = dynamickv_run(8, 400, 30, 0, peaked={0, 2, 5})
    counts = [held[i].shape[1] for i in range(8)]
    assert min(counts[i] for i in (0, 2, 5)) > max(counts[i] for i in (1, 3, 4, 6, 7)), counts


def test_a_knob_that_changes_nothing_is_named_in_the_report_note(tmp_path):
    """head_floor with the equal split, and evidencekv's head split at shared_fraction 1 (every head keeps the shared
    evidence alone), change nothing: the method says so for the report instead of ignoring them silently."""
    from kvcli.methods import configure

    assert "acts only with head_split=adaptive, global or profile" in configure(["snapkv"], ["head_floor=0.5"], None)[0].idle_knobs()
    assert configure(["snapkv"], ["head_floor=0.5", "head_split=adaptive"], None)[0].idle_knobs() == ""
    assert "splits nothing at shared_fraction=1" in configure(["evidencekv"], ["head_split=adaptive"], None)[0].idle_knobs()
    assert configure(["evidencekv"], ["head_split=adaptive", "shared_fraction=0.5"], None)[0].idle_knobs() == ""
    assert configure(["evidencekv"], ["head_split=profile"], None)[0].idle_knobs() == ""  # the profile sizes heads at any shared_fraction
    assert "acts only with head_split=adaptive or profile" in configure(["evidencekv"], ["head_floor=0.2"], None)[0].idle_knobs()
    assert configure(["h2o"], [], None)[0].idle_knobs() == "" and configure(["dynamickv"], [], None)[0].idle_knobs() == ""
    # the note offers only the splits the method makes
    assert configure(["dynamickv"], ["head_floor=0.3"], None)[0].idle_knobs().endswith("acts only with head_split=adaptive")
    # rescore acts only where the repeat scorer ranks the cache; both notes are said when both knobs idle
    assert "rescore=2 acts only on a cache the repeat scorer ranks" in configure(["snapkv"], ["rescore=2"], None)[0].idle_knobs()
    assert configure(["snapkv"], ["rescore=2"], None)[0].idle_knobs(repeat=True) == ""
    both = configure(["snapkv"], ["rescore=3", "head_floor=0.5"], None)[0].idle_knobs()
    assert "head_floor=0.5 acts only" in both and "rescore=3 acts only" in both


@pytest.mark.parametrize("value", ["-0.1", "4.5", "nan"])
def test_surprisal_is_a_power_from_zero_to_four(value):
    """--param surprisal: 0 (the repeat's scores alone) up to 4; else one line naming the knob and its range.
    It acts only where the repeat scorer ranks; methods that cannot rank by the repeat do not show it."""
    from kvcli.methods import configure

    with pytest.raises(BudgetError, match="surprisal must be between 0 .* and 4"):
        configure(["dynamickv"], [f"surprisal={value}"], None)
    method = configure(["dynamickv"], ["surprisal=0.25"], None)[0]
    assert method.surprisal == 0.25 and method.params()["surprisal"] == 0.25
    assert "surprisal=0.25 acts only on a cache the repeat scorer ranks" in method.idle_knobs()
    assert method.idle_knobs(repeat=True) == ""
    assert "surprisal" not in make_method("h2o").params()


@pytest.mark.parametrize("value", ["1", "0.5", "-2"])
def test_rescore_is_off_or_above_one(value):
    """--param rescore: 0 (one repeat) or more than 1 (times the budget kept before the second repeat); else one line."""
    from kvcli.methods import configure

    with pytest.raises(BudgetError, match="rescore must be 0 .* or above 1"):
        configure(["dynamickv"], [f"rescore={value}"], None)
    assert configure(["dynamickv"], ["rescore=2.5"], None)[0].rescore == 2.5
