"""DynamicKV's interim re-divisions under both rules, on observations built in the test (issue 22, defect 7)."""

from __future__ import annotations

import math

import pytest
import torch

from kvcli.errors import BudgetError
from kvcli.methods import BudgetPlan, LayerObservation, make_method
from kvcli.methods.allocation import allocate

pytestmark = pytest.mark.usefixtures("one_thread")

# (num_layers, k_len, tokens per layer, layers whose attention is peaked): the peaked layers win
# the global top-k; early ones test what interim re-divisions do to the layers after them.
CASES = [(24, 800, 40, {0, 1, 2}), (30, 600, 20, {1, 3, 28}), (8, 400, 30, {0, 2, 5}), (7, 300, 12, set())]


def observations(num_layers: int, k_len: int, peaked: set[int], seed: int, window: int) -> list[LayerObservation]:
    """Random window attention per layer (2 KV heads x 3 query heads); peaked layers concentrate theirs."""
    gen = torch.Generator().manual_seed(seed)
    made = []
    for layer in range(num_layers):
        logits = torch.randn(2, 3, window, k_len, generator=gen) * (8.0 if layer in peaked else 0.5)
        made.append(LayerObservation(layer_idx=layer, positions=torch.arange(k_len).expand(2, -1), window_attn=logits.softmax(-1)))
    return made


def run(rule: str, num_layers: int, k_len: int, per_layer: int, peaked: set[int], seed: int):
    """Replay DynamicKV with `interim_budget=rule`; the method, plan, kept positions per layer and compressor."""
    method = make_method("dynamickv", interim_budget=rule)
    plan = BudgetPlan(num_layers=num_layers, prompt_len=k_len, total=num_layers * per_layer)
    compressor = method.compressor(plan)
    held = {}
    for obs in observations(num_layers, k_len, peaked, seed, method.window_size):
        held[obs.layer_idx] = obs.positions
        for layer, positions in compressor.observe(obs).items():
            assert torch.isin(positions, held[layer]).all(), "a re-division kept a token the layer no longer held"
            held[layer] = positions
    return method, plan, held, compressor


@pytest.mark.parametrize("rule", ["model", "seen"])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("num_layers,k_len,per_layer,peaked", CASES)
def test_dynamickv_rules_meet_budget_and_floor(rule, seed, num_layers, k_len, per_layer, peaked):
    """Under either interim rule the layers keep exactly the budget, each between its floor (min_multiple x mean + window) and its candidates."""
    method, plan, held, _ = run(rule, num_layers, k_len, per_layer, peaked, seed)
    window = method.window_size
    average = plan.total / num_layers - window
    floor = math.ceil(method.min_multiple * average) + window
    cap = min(math.ceil(method.max_multiple * average), k_len - window) + window
    kept = [held[i].shape[1] for i in range(num_layers)]
    assert sum(kept) == plan.total
    assert all(floor <= n <= cap for n in kept), kept


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("num_layers,k_len,per_layer,peaked", CASES)
def test_dynamickv_interim_budget_starves_no_later_layer(seed, num_layers, k_len, per_layer, peaked):
    """With the whole model's budget at interim re-divisions, the layers after the last interim one keep at least what one division at the last layer gives them."""
    method, plan, held, compressor = run("model", num_layers, k_len, per_layer, peaked, seed)
    window = method.window_size
    average = compressor.average
    cap = min(math.ceil(method.max_multiple * average), k_len - window)
    floor = math.ceil(method.min_multiple * average)
    single = allocate(compressor.shared_total, compressor.counts[-1], [cap] * num_layers, [floor] * num_layers)
    last_interim = (num_layers - 1) // method.period * method.period  # layers from here were never trimmed before the end
    for layer in range(last_interim, num_layers):
        assert held[layer].shape[1] - window >= single[layer] - 1, (layer, held[layer].shape[1] - window, single[layer])


def test_dynamickv_seen_rule_trims_early_layers_for_good():
    """interim_budget=seen gives the layers seen so far their own part at each interim re-division, so early layers may keep less than under the model rule; unknown rules are refused."""
    args = (24, 800, 40, {0, 1, 2}, 0)
    _, _, whole, model = run("model", *args)
    _, _, own, seen = run("seen", *args)
    assert sum(seen.allocations[0]) == round(seen.average * seen.method.period) < sum(model.allocations[0])
    assert sum(own[i].shape[1] for i in range(4)) < sum(whole[i].shape[1] for i in range(4))
    with pytest.raises(BudgetError):
        make_method("dynamickv", interim_budget="half")


def test_rules_benchmark_replays_as_derive():
    """benchmarks/dynamickv_rules.py's step-by-step replay keeps per layer what Capture.derive keeps, under both rules."""
    from test_benchmarks import _script

    from kvcli.generate import capture
    from kvcli.methods import Compression
    from methodutil import tiny_llama

    _script("reuse_check")  # what the script imports from beside it
    rules = _script("dynamickv_rules")
    ids = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(2))
    captured = capture(tiny_llama(8), ids, 8)
    for rule in rules.RULES:
        compression = Compression(make_method("dynamickv", interim_budget=rule), BudgetPlan(num_layers=8, prompt_len=120, total=8 * 20))
        kept, most, compressor = rules.replay(captured, compression)
        assert kept == captured.derive(compression).cache.retained_per_layer()
        assert sum(kept) == 8 * 20 and most >= 8 * 20
        short, lost = rules.cut_short(compressor, 120)
        assert (short == 0) == (lost == 0)
