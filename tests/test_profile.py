"""Retrieval-head profiles (kvcli/profile.py): computed from a model and tokenizer alone, cached once under KVCLI_HOME."""

from __future__ import annotations

import pytest
from test_models import save_tiny_llama

import kvcli.profile as profile_module
from kvcli.models import load_model
from kvcli.profile import RetrievalProfile, load_or_compute_profile, profile_path, stored_profile

pytestmark = pytest.mark.usefixtures("one_thread")


def test_top_heads_rank_by_score_then_layer():
    """top_heads returns the best (layer, head) pairs, optionally only up to a layer, ties broken by position."""
    profile = RetrievalProfile(scores=[[0.0, -1.0], [-0.5, 0.0], [-3.0, -0.1]], model="m")
    assert profile.top_heads(3) == [(0, 0), (1, 1), (2, 1)]
    assert profile.top_heads(2, max_layer=1) == [(0, 0), (1, 1)]
    assert RetrievalProfile.from_json(profile.to_json()) == profile


def test_profile_is_computed_once_and_cached(tmp_path, monkeypatch):
    """The first call computes the profile (progress from 0 to 9 prefills) and stores it; the next call reads it back."""
    monkeypatch.setenv("KVCLI_HOME", str(tmp_path / "home"))
    lm = load_model(str(save_tiny_llama(tmp_path / "tiny", max_positions=4096)))
    assert stored_profile(lm.name, lm.config_hash) is None
    calls = []
    first = load_or_compute_profile(lm, progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, 9) and calls[-1] == (9, 9)
    config = lm.model.config
    assert len(first.scores) == config.num_hidden_layers and all(len(row) == config.num_attention_heads for row in first.scores)
    assert profile_path(lm.name, lm.config_hash).is_file()

    def fail(*args, **kwargs):
        raise AssertionError("computed again")

    monkeypatch.setattr(profile_module, "compute_profile", fail)
    assert load_or_compute_profile(lm) == first
