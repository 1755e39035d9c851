"""kvcli/rope.py: each layer's RoPE read from the config, and moving post-RoPE keys to new positions."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
import transformers
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from kvcli.errors import KvcliError
from kvcli.rope import (
    _ARCHITECTURES,
    HALF,
    INTERLEAVED,
    UnsupportedRope,
    rerotate,
    rotary_layout,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# Small enough to build in milliseconds; grouped-query (4 query heads, 2 KV heads) where the
# architecture allows, head_dim 16 so partial rotary leaves whole pairs.
SMALL = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 4096, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 512,
            "short_factor": [1.0 + 0.1 * i for i in range(4)], "long_factor": [2.0 + 0.5 * i for i in range(4)]}


def _config(name: str, **fields):
    return getattr(transformers, name)(**{**SMALL, "num_hidden_layers": 2, **fields})


# One tiny config per architecture kind kvcli accepts; the model-equality test runs each of them.
CASES = {
    "llama": lambda: _config("LlamaConfig"),
    "llama-llama3": lambda: _config("LlamaConfig", rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "llama-linear": lambda: _config("LlamaConfig", rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "qwen2-yarn": lambda: _config("Qwen2Config", rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}),
    "mistral": lambda: _config("MistralConfig"),
    "ministral": lambda: _config("MinistralConfig", head_dim=16),
    "mixtral": lambda: _config("MixtralConfig", num_local_experts=2, num_experts_per_tok=1),
    "qwen2_moe": lambda: _config("Qwen2MoeConfig", num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=32),
    "qwen3": lambda: _config("Qwen3Config", head_dim=16),
    "qwen3_moe": lambda: _config("Qwen3MoeConfig", head_dim=16, num_experts=2, num_experts_per_tok=1,
                                 moe_intermediate_size=32),
    "gemma": lambda: _config("GemmaConfig", head_dim=16),
    "gemma2": lambda: _config("Gemma2Config", head_dim=16),
    "gemma3-local-global": lambda: _config(
        "Gemma3TextConfig", head_dim=16, layer_types=["sliding_attention", "full_attention"], rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0, rope_scaling={"rope_type": "linear", "factor": 8.0}),
    "phi-partial": lambda: _config("PhiConfig", partial_rotary_factor=0.5),
    "phi3-partial-longrope": lambda: _config("Phi3Config", partial_rotary_factor=0.5, rope_scaling=LONGROPE,
                                             original_max_position_embeddings=512),
    "gpt_neox-partial": lambda: _config("GPTNeoXConfig", rotary_pct=0.25),
    "stablelm-partial": lambda: _config("StableLmConfig", partial_rotary_factor=0.25),
    "olmo": lambda: _config("OlmoConfig"),
    "olmo2": lambda: _config("Olmo2Config"),
    "olmo3": lambda: _config("Olmo3Config", layer_types=["sliding_attention", "full_attention"]),
    "granite": lambda: _config("GraniteConfig"),
    "granitemoe": lambda: _config("GraniteMoeConfig", num_local_experts=2, num_experts_per_tok=1),
    "starcoder2": lambda: _config("Starcoder2Config"),
    "gpt_oss-yarn": lambda: _config("GptOssConfig", head_dim=16, num_local_experts=2, num_experts_per_tok=1,
                                    layer_types=["sliding_attention", "full_attention"], sliding_window=8),
    "seed_oss": lambda: _config("SeedOssConfig", head_dim=16),
    "smollm3-nope": lambda: _config("SmolLM3Config", num_hidden_layers=3, no_rope_layers=[1, 0, 1]),
    "exaone4-nope": lambda: _config("Exaone4Config", head_dim=16, sliding_window=8,
                                    layer_types=["sliding_attention", "full_attention"]),
    "cohere-interleaved": lambda: _config("CohereConfig"),
    "cohere2-nope": lambda: _config("Cohere2Config", layer_types=["sliding_attention", "full_attention"]),
    "glm-interleaved-partial": lambda: _config("GlmConfig", head_dim=16),
    "glm4-interleaved-partial": lambda: _config("Glm4Config", head_dim=16),
    "helium-interleaved": lambda: _config("HeliumConfig", head_dim=16),
    "gptj-interleaved-partial": lambda: transformers.GPTJConfig(
        vocab_size=96, n_embd=64, n_head=4, n_layer=2, rotary_dim=8, n_positions=4096, bos_token_id=1, eos_token_id=2),
    "llama4-interleaved-nope": lambda: _config(
        "Llama4TextConfig", head_dim=16, intermediate_size_mlp=64, num_local_experts=2, no_rope_layers=[1, 0],
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}),
}

PROBE = "kvcli_rope_probe"
_recorded: dict[int, torch.Tensor] | None = None


def _probe_attention(module, query, key, value, attention_mask, **kwargs):
    """Records each layer's post-RoPE keys, then attends causally as SDPA does."""
    if _recorded is not None:
        _recorded[module.layer_idx] = key.detach().clone()  # (1, num_kv_heads, n, head_dim)
    for unused in ("sliding_window", "softcap"):  # both runs attend alike to every earlier token: enough here
        kwargs.pop(unused, None)
    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


AttentionInterface.register(PROBE, _probe_attention)
AttentionMaskInterface.register(PROBE, lambda *args, **kwargs: None)


@contextlib.contextmanager
def _recording():
    global _recorded
    _recorded = {}
    try:
        yield _recorded
    finally:
        _recorded = None


def _model_keys(model, ids: torch.Tensor, start: int) -> dict[int, torch.Tensor]:
    """Every layer's post-RoPE keys when `ids` sit at positions start, start + 1, ..."""
    positions = torch.arange(start, start + ids.shape[1])[None]
    with _recording() as keys, torch.no_grad():
        model(input_ids=ids, position_ids=positions, use_cache=False)
    return keys


def _heads(positions: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    return positions[None].expand(num_kv_heads, -1).contiguous()  # (num_kv_heads, n)


def _random(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_every_accepted_architecture_is_checked_against_its_model():
    """Each architecture kvcli accepts has a case in the model-equality test below."""
    checked = {CASES[name]().get_text_config().model_type for name in CASES}
    assert set(_ARCHITECTURES) <= checked, set(_ARCHITECTURES) - checked


@pytest.mark.parametrize("name", list(CASES))
def test_rerotated_keys_equal_the_models_keys_at_the_new_positions(name):
    """The model's post-RoPE keys at positions d.. equal its keys at 0.. moved by d; NoPE layers' keys do not move."""
    torch.manual_seed(0)
    config = CASES[name]()
    layout = rotary_layout(config)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=PROBE).eval()
    n, shift = 12, 300  # the longrope case switches factors at 512: stay below it
    ids = torch.randint(0, 96, (1, n), generator=torch.Generator().manual_seed(1))
    at_zero, shifted = _model_keys(model, ids, 0), _model_keys(model, ids, shift)
    assert len(at_zero) == len(layout) == config.get_text_config().num_hidden_layers
    for layer_idx, layer_rotary in enumerate(layout):
        keys = at_zero[layer_idx]
        num_kv_heads = keys.shape[1]
        moved = rerotate(keys, _heads(torch.arange(n), num_kv_heads), _heads(torch.arange(shift, shift + n), num_kv_heads),
                         layer_rotary)
        torch.testing.assert_close(moved, shifted[layer_idx], atol=2e-5, rtol=1e-4, msg=f"{name} layer {layer_idx}")
        if layer_rotary is not None:  # the check means something only where the keys did move
            assert not torch.allclose(keys, shifted[layer_idx], atol=1e-3), f"{name} layer {layer_idx}"


def test_layouts_read_from_the_config():
    """Conventions, partial rotary dims, per-layer thetas, NoPE layers and YaRN's scaling come out as the model uses them."""
    kinds = {name: rotary_layout(CASES[name]()) for name in CASES}
    assert kinds["llama"][0].convention == HALF and kinds["llama"][0].rotary_dim == 16
    for name in ("cohere-interleaved", "glm4-interleaved-partial", "gptj-interleaved-partial", "llama4-interleaved-nope"):
        assert kinds[name][0].convention == INTERLEAVED, name
    assert kinds["gpt_neox-partial"][0].rotary_dim == 4 and kinds["phi-partial"][0].rotary_dim == 8
    assert kinds["glm-interleaved-partial"][0].rotary_dim == 8 and kinds["gptj-interleaved-partial"][0].rotary_dim == 8
    local, global_ = kinds["gemma3-local-global"]
    assert local.inv_freq[1] > global_.inv_freq[1]  # theta 1e4 (sliding) against 1e6 / 8 (global)
    assert [r is None for r in kinds["smollm3-nope"]] == [False, True, False]
    assert [r is None for r in kinds["cohere2-nope"]] == [False, True]
    assert [r is None for r in kinds["llama4-interleaved-nope"]] == [False, True]
    yarn = kinds["qwen2-yarn"][0]
    assert yarn.attention_scaling == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1.0)
    assert kinds["phi3-partial-longrope"][0].max_positions == 512 and kinds["llama"][0].max_positions is None


@pytest.mark.parametrize("name", ["llama", "qwen2-yarn", "gpt_neox-partial", "cohere-interleaved", "gptj-interleaved-partial"])
def test_round_trip_returns_the_original_keys(name):
    """Keys moved p -> p' -> p (different positions per head) equal the original."""
    layer_rotary = rotary_layout(CASES[name]())[0]
    keys = _random((1, 2, 50, 16), 0)
    start = torch.randint(0, 4000, (2, 50), generator=torch.Generator().manual_seed(1))
    to = torch.randint(0, 4000, (2, 50), generator=torch.Generator().manual_seed(2))
    back = rerotate(rerotate(keys, start, to, layer_rotary), to, start, layer_rotary)
    torch.testing.assert_close(back, keys, atol=1e-5, rtol=1e-5)


def test_a_shift_does_not_scale_the_keys():
    """Re-rotation keeps each key's norm: YaRN's attention scaling is already in the stored key and is not applied again."""
    layer_rotary = rotary_layout(CASES["qwen2-yarn"]())[0]
    assert layer_rotary.attention_scaling > 1.1
    keys = _random((1, 2, 30, 16), 3)
    moved = rerotate(keys, _heads(torch.arange(30), 2), _heads(torch.arange(500, 530), 2), layer_rotary)
    torch.testing.assert_close(moved.norm(dim=-1), keys.norm(dim=-1))


def test_each_head_moves_by_its_own_positions():
    """Per-head positions move each head as a call on that head alone would."""
    layer_rotary = rotary_layout(CASES["llama"]())[0]
    keys = _random((1, 3, 20, 16), 4)
    start = torch.randint(0, 1000, (3, 20), generator=torch.Generator().manual_seed(5))
    to = torch.randint(0, 1000, (3, 20), generator=torch.Generator().manual_seed(6))
    moved = rerotate(keys, start, to, layer_rotary)
    for head in range(3):
        alone = rerotate(keys[:, head : head + 1], start[head : head + 1], to[head : head + 1], layer_rotary)
        torch.testing.assert_close(moved[:, head : head + 1], alone)


def test_keys_keep_their_dtype():
    """bfloat16 keys come back bfloat16, within bfloat16 rounding of the float32 move."""
    layer_rotary = rotary_layout(CASES["llama"]())[0]
    keys = _random((1, 2, 20, 16), 13)
    start, to = _heads(torch.arange(20), 2), _heads(torch.arange(900, 920), 2)
    moved = rerotate(keys.bfloat16(), start, to, layer_rotary)
    assert moved.dtype == torch.bfloat16
    torch.testing.assert_close(moved.float(), rerotate(keys, start, to, layer_rotary), atol=0.03, rtol=0.02)


def test_a_far_move_matches_rotating_at_the_far_position():
    """A key rotated at p and moved to p' equals the key rotated at p' directly, even for positions far apart."""
    layer_rotary = rotary_layout(CASES["llama"]())[0]
    raw = _random((1, 2, 8, 16), 7)
    zero = torch.zeros(2, 8, dtype=torch.long)
    near, far = _heads(torch.arange(8), 2), _heads(torch.arange(120_000, 120_008), 2)
    direct = rerotate(raw, zero, far, layer_rotary)  # from position 0 (no rotation): RoPE at p'
    via_near = rerotate(rerotate(raw, zero, near, layer_rotary), near, far, layer_rotary)
    torch.testing.assert_close(via_near, direct, atol=1e-5, rtol=1e-5)


def _placed(x: torch.Tensor, positions: torch.Tensor, layer_rotary) -> torch.Tensor:
    """`x` as RoPE places it at `positions`: a move from position 0, where RoPE is the identity."""
    return rerotate(x, torch.zeros_like(positions), positions, layer_rotary)


@pytest.mark.parametrize("name", ["llama", "qwen2-yarn", "phi-partial", "cohere-interleaved", "gemma3-local-global"])
def test_attention_scores_depend_only_on_the_distance(name):
    """q at a against k at p scores as q at a + d against k at p + d."""
    q, k = _random((1, 2, 16, 16), 8), _random((1, 2, 16, 16), 9)
    a = torch.randint(0, 2000, (2, 16), generator=torch.Generator().manual_seed(10))
    p = torch.randint(0, 2000, (2, 16), generator=torch.Generator().manual_seed(11))
    for layer_rotary in {id(r): r for r in rotary_layout(CASES[name]()) if r is not None}.values():
        near = (_placed(q, a, layer_rotary) * _placed(k, p, layer_rotary)).sum(-1)  # (1, num_kv_heads, n)
        far = (_placed(q, a + 1234, layer_rotary) * _placed(k, p + 1234, layer_rotary)).sum(-1)
        torch.testing.assert_close(far, near, atol=1e-4, rtol=1e-5)
        moved_query_only = (_placed(q, a + 1234, layer_rotary) * _placed(k, p, layer_rotary)).sum(-1)
        assert not torch.allclose(moved_query_only, near, atol=1e-2)  # the score does depend on the distance


def test_dynamic_ntk_is_refused_from_the_config():
    """rope_type 'dynamic' is refused by rotary_layout, before any weights, with one actionable line."""
    config = _config("LlamaConfig", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(UnsupportedRope) as err:
        rotary_layout(config)
    message = str(err.value)
    assert isinstance(err.value, KvcliError) and "\n" not in message
    assert "'dynamic'" in message and "--max-context 4096" in message


def test_unverified_architectures_are_refused():
    """A model type whose rotary embedding kvcli has not checked is refused, naming it."""
    config = transformers.FalconConfig(vocab_size=96, hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    with pytest.raises(UnsupportedRope, match="model type 'falcon'"):
        rotary_layout(config)


def test_longrope_refuses_to_move_keys_past_its_short_factors():
    """LongRoPE's model leaves its short factors once a pass reaches original_max_position_embeddings, so moving a key there is refused."""
    config = CASES["phi3-partial-longrope"]()
    layer_rotary = rotary_layout(config)[0]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=PROBE).eval()
    ids = torch.randint(0, 96, (1, 4), generator=torch.Generator().manual_seed(1))
    at_zero, past = _model_keys(model, ids, 0)[0], _model_keys(model, ids, 510)[0]
    start, to = _heads(torch.arange(4), 2), _heads(torch.arange(510, 514), 2)
    unchecked = dataclasses.replace(layer_rotary, max_positions=None)
    assert not torch.allclose(rerotate(at_zero, start, to, unchecked), past, atol=1e-3)  # the long factors
    with pytest.raises(UnsupportedRope, match="--max-context 512"):
        rerotate(at_zero, start, to, layer_rotary)


def test_many_packs_in_bfloat16_round_once():
    """64 packs of a bfloat16 layer leave its keys as far from the exact rotation as one pack does: each pack
    rotates from the keys as the model computed them, so bfloat16 rounding does not pile up chunk after chunk."""
    from kvcli.cache import KVCache
    from kvcli.reindex import Reindexer

    layout = rotary_layout(_config("Qwen2Config", rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}))
    raw = _random((1, 2, 300, 16), seed=3).double()  # the key of original position p before RoPE, for p < 300

    def model_keys(original, placed):  # keys of `original` positions as the model computes them at `placed`
        return rerotate(raw[:, :, original], torch.zeros(2, len(original), dtype=torch.long), _heads(placed, 2), _exact(layout[0]))

    cache = KVCache(1)
    n = 200
    cache.layers[0].append(model_keys(torch.arange(n), torch.arange(n)).bfloat16(), torch.zeros(1, 2, n, 16, dtype=torch.bfloat16),
                           torch.arange(n), rope_positions=torch.arange(n))
    reindex, layer, errors = Reindexer(layout[:1]), cache.layers[0], []
    for step in range(64):
        top = reindex.pack(cache)
        truth = model_keys(layer.kept_positions()[0], layer.rope_positions()[0])
        errors.append(float((layer.view()[0].double() - truth).norm() / truth.norm()))
        # a chunk of one token at `top`, then the oldest entry dropped: every kept entry moves down by one
        layer.append(model_keys(torch.tensor([n + step]), torch.tensor([top])).bfloat16(), torch.zeros(1, 2, 1, 16, dtype=torch.bfloat16),
                     torch.tensor([n + step]), rope_positions=torch.tensor([top]))
        layer.keep(torch.arange(1, n + 1).expand(2, -1))
    assert errors[-1] < 1.2 * errors[1], errors  # errors[0]: nothing moved yet; errors[1]: one move


def _exact(layer_rotary):
    """The same rotary in float64: a reference with no rounding of its own."""
    return dataclasses.replace(layer_rotary, inv_freq=layer_rotary.inv_freq.double())
