"""Builders shared by tests: methods (with a per-model profile when needed) and a tiny model."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvcli.methods import Compression, make_method
from kvcli.profile import RetrievalProfile


def random_profile(num_layers: int, num_heads: int, seed: int = 0) -> RetrievalProfile:
    """A retrieval-head profile with random head scores (what matters to invariants is its shape)."""
    gen = torch.Generator().manual_seed(seed)
    return RetrievalProfile(scores=torch.rand(num_layers, num_heads, generator=gen).tolist(), model="test")


def build(name: str, num_layers: int, num_heads: int, **params):
    """`make_method(name, **params)` (the shape is that of the model it will run on, for `squeeze`)."""
    return make_method(name, **params)


def squeeze(method, plan, num_heads: int = 4) -> Compression | None:
    """What a read with `method` under `plan` compresses with (None: the full cache), with a
    random retrieval-head profile of `num_heads` query heads per layer when the method needs one."""
    if plan is None or not method.compresses:
        return None
    profile = random_profile(plan.num_layers, num_heads) if method.needs_profile else None
    return Compression(method, plan, profile)


def tiny_llama(num_layers: int = 6) -> LlamaForCausalLM:
    """A random grouped-query Llama on the CPU: 4 query heads sharing 2 KV heads."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        # Larger weights than the default give varied greedy tokens with clear margins.
        initializer_range=0.3,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def assert_same_cache(a, b) -> None:
    """Two caches hold the same positions, keys and values in every layer and head (packed heads read per head)."""
    for layer_a, layer_b in zip(a.layers, b.layers, strict=True):
        if layer_a.heads is not None or layer_b.heads is not None:
            assert layer_a.head_lengths() == layer_b.head_lengths()
            for h in range(len(layer_a.head_lengths())):
                for x, y in zip(layer_a.head_entries(h), layer_b.head_entries(h), strict=True):
                    assert torch.equal(x, y)
            continue
        assert torch.equal(layer_a.kept_positions(), layer_b.kept_positions())
        for x, y in zip(layer_a.view(), layer_b.view()):
            assert torch.equal(x, y)
