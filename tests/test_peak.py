"""The default method's memory promise: a long prompt read by `kvcli ask` (QueryAware.read) with
evidencekv peaks within the kept cache plus PEAK_LAYERS layers' full KV, where one pass held every
layer up to its last evidence head in full."""

from __future__ import annotations

import pytest
import torch
from methodutil import random_profile
from test_models import save_tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

import kvcli.methods.evidencekv as evidencekv
from kvcli.methods import Budget, make_method
from kvcli.models import load_model
from kvcli.profile import RetrievalProfile
from kvcli.reading import Options, QueryAware, Reader

pytestmark = pytest.mark.usefixtures("one_thread")
NUM_LAYERS = 8


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    """An 8-layer random Llama with a word-level tokenizer, its evidence heads in layer 5 (6 layers held in one pass)."""
    folder = save_tiny_llama(tmp_path_factory.mktemp("deep") / "deep", max_positions=4096)
    config = LlamaConfig.from_pretrained(folder)
    config.num_hidden_layers = NUM_LAYERS
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    reader = Reader(load_model(str(folder)))
    scores = [[0.0] * config.num_attention_heads for _ in range(NUM_LAYERS)]
    scores[2] = [1.0] * config.num_attention_heads
    scores[5] = [2.0] * config.num_attention_heads
    reader._profile = RetrievalProfile(scores=scores, model="test")
    return reader


def words(n: int) -> str:
    gen = torch.Generator().manual_seed(0)
    return " ".join(f"w{int(i)}" for i in torch.randint(3, 60, (n,), generator=gen))


def excess_layers(reading) -> float:
    """The prefill's KV peak above the kept cache, in layers' full KV of the prompt."""
    cache = reading.state.cache
    layer = cache.full_nbytes(reading.state.prompt_len) / cache.num_layers
    return (cache.kv_peak_nbytes - cache.nbytes()) / layer


def test_a_long_prompt_is_read_in_chunks_within_the_promise(reader, monkeypatch):
    """Past CHUNK_FROM_TOKENS, evidencekv reads in chunks and peaks within the kept cache plus PEAK_LAYERS layers' full KV; the same prompt in one pass (--chunk-size past its length) holds the 6 layers up to its last evidence head."""
    monkeypatch.setattr(evidencekv, "CHUNK_FROM_TOKENS", 600)
    mode = QueryAware(reader, words(900), Options(budget=Budget(ratio=0.1), max_new_tokens=4))
    method = make_method("evidencekv")
    chunked = mode.read("w5 w6?", method)
    one_pass = mode.read("w5 w6?", method, chunk_size=10**6)
    assert len(chunked.state.chunks) > 1 and chunked.mode == "chunked" and len(one_pass.state.chunks) == 1
    assert excess_layers(chunked) <= evidencekv.PEAK_LAYERS + 1e-9
    assert excess_layers(one_pass) > 5
    assert chunked.state.cache.retained_per_layer() == one_pass.state.cache.retained_per_layer()  # the same budget either way


def test_a_short_prompt_is_still_read_in_one_pass(reader):
    """Below CHUNK_FROM_TOKENS, evidencekv reads in one pass, as its accuracy was measured."""
    mode = QueryAware(reader, words(900), Options(budget=Budget(ratio=0.1), max_new_tokens=4))
    reading = mode.read("w5 w6?", make_method("evidencekv"))
    assert len(reading.state.chunks) == 1 and reading.mode == "query"


def test_the_chunk_keeps_the_held_layers_within_the_promise():
    """prefill_chunk sizes chunks so that the held layers x (chunk + probe) is at most PEAK_LAYERS x the prompt; none below the threshold or when few layers are held."""
    method = make_method("evidencekv")
    profile = random_profile(24, 14)
    for n in (8192, 32768, 131072):
        plan = Budget(ratio=0.05).plan(n, 24, method.window_size)[0]
        held = method.held_layers(plan, profile)
        chunk = method.prefill_chunk(plan, profile, 40)
        assert held * (chunk + 40) <= evidencekv.PEAK_LAYERS * n < held * (chunk + 41)
    plan = Budget(ratio=0.05).plan(8191, 24, method.window_size)[0]
    assert method.prefill_chunk(plan, profile, 40) is None
    early = RetrievalProfile(scores=[[1.0] * 14] + [[0.0] * 14] * 23, model="test")
    assert method.prefill_chunk(Budget(ratio=0.05).plan(32768, 24, method.window_size)[0], early, 40) is None
    assert make_method("snapkv").prefill_chunk(plan, profile, 40) is None
