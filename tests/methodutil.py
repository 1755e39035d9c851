"""Building methods in tests, including those that need a per-model profile."""

from __future__ import annotations

import torch

from kvcli.methods import make_method
from kvcli.profile import RetrievalProfile


def random_profile(num_layers: int, num_heads: int, seed: int = 0) -> RetrievalProfile:
    """A retrieval-head profile with random head scores (what matters to invariants is its shape)."""
    gen = torch.Generator().manual_seed(seed)
    return RetrievalProfile(scores=torch.rand(num_layers, num_heads, generator=gen).tolist(), model="test")


def build(name: str, num_layers: int, num_heads: int, **params):
    """`make_method(name, **params)`, with a random profile when the method needs one."""
    method = make_method(name, **params)
    if method.needs_profile:
        method.profile = random_profile(num_layers, num_heads)
    return method
