"""Prefill with compression, then token-by-token decoding with explicit positions.

The engine sees token ids only. `prefill` runs the whole prompt in one forward pass; each
layer's KV is compressed right after that layer's attention (inside `attention.py`'s hook),
so the prefill's own output is exact and the peak KV memory stays near the compressed size
plus one layer's full KV. `decode` then feeds one token per step; RoPE positions continue
from the full prompt length although layers hold fewer tokens.
"""

from __future__ import annotations

import logging
import secrets
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from . import attention, heap
from .attention import ModelAttention, UnsupportedAttention, accumulated_attention
from .cache import KVCache
from .methods import Compression, Compressor, LayerObservation
from .step import STEP_KWARG, Step

log = logging.getLogger(__name__)

# What prepare_model found for each live model: (attn implementation, layout). Every prefill
# makes a cache through it, so the probe is remembered; kept beside the model, not on it, so the
# user's model object carries nothing of kvcli's (a copy of it is probed anew), and dropped with it.
_probed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prepare_model(model) -> ModelAttention:
    """Route the model's attention through kvcli's function and return how each layer attends.

    The first call probes the model with a two-token forward: every layer whose attention
    reaches kvcli's function says how it attends (scaling, softcapping, sinks, sliding window);
    anything kvcli cannot do exactly raises `UnsupportedAttention`. A model whose attention
    bypasses the function (its own attention classes, or a decoder layer that does not pass
    kvcli's step on) can only be read with the full cache (`ModelAttention.bypassed`).
    Later calls return the probed layout.
    """
    attention.register()
    if getattr(type(model), "_supports_attention_backend", True) and model.config._attn_implementation != attention.ATTN_IMPLEMENTATION:
        model.set_attn_implementation(attention.ATTN_IMPLEMENTATION)
    probed = _probed.get(model)
    if probed is not None and probed[0] == model.config._attn_implementation:
        return probed[1]
    layout = _probe(model)
    _probed[model] = (model.config._attn_implementation, layout)
    if layout.bypassed:
        log.info("%s attends without kvcli's attention function: only the full cache can be read", type(model).__name__)
    return layout


def _num_layers(model) -> int:
    return model.config.get_text_config().num_hidden_layers


def _probe(model) -> ModelAttention:
    """Feed two tokens into a fresh cache and see which layers attended through kvcli's function."""
    num_layers = _num_layers(model)
    cache = KVCache(num_layers)
    device = model.get_input_embeddings().weight.device
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    step = Step(cache=cache, positions=torch.arange(2, device=device))
    with torch.inference_mode(), cache.feeding(step):
        model(input_ids=ids, position_ids=step.positions[None, :], cache=cache, use_cache=True, logits_to_keep=1, **{STEP_KWARG: step})
    name = type(model).__name__
    if any(layer.get_seq_length() != 2 for layer in cache.layers):
        raise UnsupportedAttention(f"{name} does not keep its keys and values in the cache it is given, so kvcli cannot run it")
    seen = [step.attended.get(i) for i in range(num_layers)]
    if any(layer is not None for layer in seen) and any(layer is None for layer in seen):
        missing = [i for i, layer in enumerate(seen) if layer is None]
        raise UnsupportedAttention(f"{name}'s layers {missing} attend without kvcli's attention function while the others use it")
    return ModelAttention.of_layers(seen, name)


def new_cache(model) -> KVCache:
    """An empty cache for `model`: one layer per model layer, each sliding-window layer with its window."""
    layout = prepare_model(model)
    return KVCache(layout.num_layers, list(layout.windows))


def forward(
    model,
    cache: KVCache,
    input_ids: torch.Tensor,
    start: int,
    compressor=None,
    probe_len: int = 0,
    on_layer: Callable[[int], None] | None = None,
    accumulated_before: list[torch.Tensor] | None = None,
    queries_before: list[torch.Tensor] | None = None,
    original_start: int | None = None,
    watch=None,
    *,
    positions: torch.Tensor | None = None,
    original: torch.Tensor | None = None,
    skim=None,
) -> torch.Tensor:
    """Feed `input_ids` `(1, q_len)` at positions start.. and return the last position's logits `(vocab,)`.

    `compressor` (if any) prunes each layer right after its attention; the last `probe_len`
    tokens score the rest but are not kept. With `original_start` the tokens are fed at positions
    start.. but recorded as the prompt's tokens original_start.. (a re-indexed read). `watch`
    (`Step.watch`) sees each layer's attention.
    """
    windows = list(prepare_model(model).windows)  # probed once per model
    if cache.windows != windows:
        cache.adopt_windows(windows)  # a saved cache's sliding layers: compressors must know them
    q_len = input_ids.shape[1]
    if positions is None:
        positions = torch.arange(start, start + q_len, device=input_ids.device)
    if original is None and original_start is not None:
        original = torch.arange(original_start, original_start + q_len, device=input_ids.device)
    step = Step(cache=cache, positions=positions, original=original, compressor=compressor, probe_len=probe_len,
                on_layer=on_layer, accumulated_before=accumulated_before, queries_before=queries_before, skim=skim,
                watch=watch)
    with cache.feeding(step):
        out = model(
            input_ids=input_ids,
            position_ids=positions[None, :],
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
            **{STEP_KWARG: step},
        )
    if compressor is not None and len(step.attended) != cache.num_layers:
        # A compressor that never saw a layer would leave it whole while the run claims compression.
        raise UnsupportedAttention(
            f"{type(model).__name__}'s attention does not go through transformers' attention interface, so kvcli cannot compress its cache: use --method full")
    return out.logits[0, -1]


@dataclass
class Prefill:
    """The state after reading the prompt: the cache, the next-token logits, and what it cost."""

    cache: KVCache
    logits: torch.Tensor  # (vocab,) for the token after the prompt
    prompt_len: int
    seconds: float
    compression: Compression | None = None  # None: the full cache
    compressor: Compressor | None = None  # the last step's, for reports (DynamicKV's allocations)
    chunks: list[tuple[int, int]] = field(default_factory=list)  # [start, stop) of each prefill step
    compressed: bool | None = None  # defaults to whether `compression` is set (a saved cache says itself)
    next_position: int | None = None  # where RoPE places the next token, when re-indexed; None: prompt_len

    def __post_init__(self) -> None:
        if self.compressed is None:
            self.compressed = self.compression is not None

    def kept_per_chunk(self) -> list[float]:
        """Tokens kept from each chunk, summed over layers (mean over KV heads)."""
        edges = torch.tensor([stop for _, stop in self.chunks])
        chunk_of = torch.searchsorted(edges, torch.arange(self.prompt_len), right=True)  # (prompt_len,)
        return sum(layer.kept_per_group(chunk_of, len(self.chunks)) for layer in self.cache.layers).tolist()


def chunk_bounds(prompt_len: int, chunk_size: int | None, compressed: bool, tail: int = 0, reindexed: bool = False) -> list[int]:
    """Where `prefill` splits a prompt: [0, prompt_len] (one pass), unless a compressing read has a
    chunk size shorter than the prompt or is re-indexed; the last `tail` tokens stay in the last chunk."""
    if not (chunk_size and compressed and (chunk_size < prompt_len or reindexed)):
        return [0, prompt_len]
    return list(range(0, max(1, prompt_len - tail), chunk_size)) + [prompt_len]


def prefill_bounds(prompt_len: int, chunk_size: int | None, compression: Compression | None, tail: int = 0,
                   reindexed: bool = False) -> list[int]:
    """Where `prefill` splits a prompt read under `compression` (`chunk_bounds`): a question kept
    whole (`compression.question`) is read whole, in the last chunk, with the last `tail` tokens."""
    if compression is not None:
        tail = max(tail, compression.question)
    return chunk_bounds(prompt_len, chunk_size, compression is not None, tail, reindexed)


def announce_chunk(on_layer, index: int, count: int, start: int, stop: int, prompt_len: int) -> None:
    """Tell a progress callback that tokens start..stop of `prompt_len` (chunk `index` of `count`,
    from 0) are next, so it can show one bar over the whole read; a plain `on_layer(layer_idx)`
    function, which has no `chunk` method, hears only of layers."""
    chunk = getattr(on_layer, "chunk", None)
    if chunk is not None:
        chunk(index, count, start, stop, prompt_len)


def prefill(
    model,
    input_ids: torch.Tensor,
    compression: Compression | None = None,
    *,
    chunk_size: int | None = None,
    probe_ids: torch.Tensor | None = None,
    on_layer: Callable[[int], None] | None = None,
    reindex=None,
    tail: int = 0,
) -> Prefill:
    """Read the prompt `(1, prompt_len)`, compressing each layer right after its attention.

    `compression` None keeps the full cache. With `chunk_size` the prompt is read in chunks
    and the cache is compressed after each, so it never holds more than the budget plus one
    chunk; `probe_ids` (the question) are fed after each chunk but the last so the chunk is
    scored against the question, then dropped. The last `tail` tokens (the question, when it
    is the prompt's end; at least `compression.question`) stay together in the last chunk, so its
    observation window is whole and the question is kept whole.
    With `reindex` (a `reindex.Reindexer`) the prompt is read in chunks whatever its length and
    the kept entries are packed before each next chunk, so positions stay below budget + chunk + probe.
    An `on_layer` with a `chunk` method hears of each chunk before it is fed (`announce_chunk`).
    """
    cache = new_cache(model)
    prompt_len = input_ids.shape[1]
    bounds = prefill_bounds(prompt_len, chunk_size, compression, tail, reindex is not None)
    compressor = None
    chunks: list[tuple[int, int]] = []
    position = 0  # where the next chunk is fed (its start, unless re-indexed)
    started = time.perf_counter()
    with torch.inference_mode():
        for index, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            announce_chunk(on_layer, index, len(bounds) - 1, start, stop, prompt_len)
            step_ids = input_ids[:, start:stop]
            probe_len = 0
            if stop < prompt_len and probe_ids is not None:
                step_ids = torch.cat([step_ids, probe_ids.to(step_ids.device)], dim=1)
                probe_len = probe_ids.shape[1]
            if compression is not None:
                compressor = compression.compressor() if compressor is None else compressor.next_step()
                compressor.last_step = stop == prompt_len  # heads are split unevenly at the last step only
            if reindex is None:
                logits = forward(model, cache, step_ids, start, compressor, probe_len, on_layer)
            else:
                logits = forward(model, cache, step_ids, position, compressor, probe_len, on_layer, original_start=start)
                position = reindex.pack(cache)
            chunks.append((start, stop))
    heap.release()  # the prompt's activations are freed: what stays resident is the cache
    return Prefill(
        cache=cache, logits=logits, prompt_len=prompt_len, seconds=time.perf_counter() - started,
        compression=compression, compressor=compressor, chunks=chunks,
        next_position=position if reindex is not None else None,
    )


def extend(model, state: Prefill, suffix_ids: torch.Tensor, copy: bool = True, seconds: float = 0.0) -> Prefill:
    """Feed `suffix_ids` `(1, n)` after the cache of `state` (a copy of it unless `copy` is False).

    The fed tokens are kept in full; `seconds` is what making `state` cost the caller.
    """
    cache = state.cache.clone() if copy else state.cache
    started = time.perf_counter()
    with torch.inference_mode():
        if state.next_position is None:
            logits = forward(model, cache, suffix_ids, state.prompt_len)
        else:  # a re-indexed prefix: the suffix goes where RoPE left off
            logits = forward(model, cache, suffix_ids, state.next_position, original_start=state.prompt_len)
    return Prefill(
        cache=cache, logits=logits, prompt_len=state.prompt_len + suffix_ids.shape[1],
        seconds=seconds + time.perf_counter() - started, compression=state.compression, compressor=state.compressor,
        compressed=state.compressed,
        next_position=None if state.next_position is None else state.next_position + suffix_ids.shape[1],
    )


@dataclass
class FullPrefix:
    """A document prefix read once with the full cache, and what its questions' scoring needs of it."""

    state: Prefill
    tail_queries: list[torch.Tensor]  # per layer (1, num_heads, w, head_dim): the prefix's last queries
    accumulated: list[torch.Tensor] | None  # per layer (num_kv_heads, group, n): attention from its own queries (H2O)


class _PrefixRecorder:
    """Stands in for a compressor while a prefix is read in full: keeps each layer's last queries."""

    def __init__(self, window_size: int, accumulated: bool) -> None:
        self.window_size = window_size
        self.accumulated = accumulated
        self.tail_queries: list[torch.Tensor] = []
        self.sums: list[torch.Tensor] = []

    def observe_live(self, cache, layer_idx: int, query, keys, attn, **_) -> None:
        # every layer's, sliding-window ones included (never scored), so the lists go one per layer
        self.tail_queries.append(query[:, :, -self.window_size :].clone())
        if self.accumulated:
            self.sums.append(accumulated_attention(query, keys, attn))


def read_prefix(model, input_ids: torch.Tensor, window_size: int, accumulated: bool = False,
                on_layer: Callable[[int], None] | None = None) -> FullPrefix:
    """Prefill a prefix `(1, n)` with the full cache, keeping the last `window_size` queries of
    every layer (and, for H2O, the attention its entries received from all its queries)."""
    recorder = _PrefixRecorder(window_size, accumulated)
    cache, logits, seconds = _read_full(model, input_ids, recorder, on_layer)
    state = Prefill(cache=cache, logits=logits, prompt_len=input_ids.shape[1], seconds=seconds)
    return FullPrefix(state, recorder.tail_queries, recorder.sums if accumulated else None)


def ask_after(
    model,
    prefix: FullPrefix,
    suffix_ids: torch.Tensor,
    compression: Compression | None,
    on_layer: Callable[[int], None] | None = None,
) -> Prefill:
    """Feed `suffix_ids` `(1, n)` (a question) after a full `prefix` and compress as one pass would.

    Each layer is copied from the prefix right before its attention and compressed right after
    it, scored by the prompt's last window queries (the prefix's tail kept from its read, then
    this step's), which see exactly the keys a one-pass read of prefix + suffix sees: the kept
    positions are that read's. The prefix is left untouched for the next question.
    """
    cache = prefix.state.cache.fork()
    started = time.perf_counter()
    compressor = compression.compressor() if compression is not None else None
    accumulated = prefix.accumulated if compression is not None and compression.method.needs_accumulated else None
    if compression is not None and compression.method.needs_accumulated and prefix.accumulated is None:
        raise ValueError("internal: the prefix was read without the all-query attention this method scores by")
    if compression is not None and compression.method.window_size > prefix.tail_queries[0].shape[2] + suffix_ids.shape[1]:
        raise ValueError("internal: the prefix kept fewer queries than the method's window needs")
    with torch.inference_mode():
        logits = forward(model, cache, suffix_ids, prefix.state.prompt_len, compressor, on_layer=on_layer,
                         accumulated_before=accumulated, queries_before=prefix.tail_queries)
    return Prefill(
        cache=cache, logits=logits, prompt_len=prefix.state.prompt_len + suffix_ids.shape[1],
        seconds=time.perf_counter() - started, compression=compression, compressor=compressor,
    )


@dataclass
class Sampling:
    """How the next token is chosen: greedy unless a temperature is set."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def generator(self, device) -> torch.Generator | None:
        """A generator of its own (the global RNG is never seeded nor drawn from): `seed`, or fresh entropy."""
        if self.temperature <= 0:
            return None
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed if self.seed is not None else secrets.randbits(63))
        return gen

    def pick(self, logits: torch.Tensor, gen: torch.Generator | None) -> int:
        if self.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(0) - sorted_probs > self.top_p
            sorted_probs[outside] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=gen))


def decode(
    model,
    state: Prefill,
    max_new_tokens: int,
    eos_token_ids: set[int],
    sampling: Sampling | None = None,
    watch=None,
) -> Iterator[int]:
    """Yield generated token ids one by one, stopping at EOS or `max_new_tokens`.

    The cache in `state` grows by one entry per layer per step. `watch` (`Step.watch`, e.g. an
    `attribution.DecodeAttention`) sees every layer's attention of every fed token.
    """
    sampling = sampling or Sampling()
    device = state.logits.device
    gen = sampling.generator(device)
    logits = state.logits
    position = state.prompt_len
    fed_at = state.next_position  # re-indexed: RoPE places the answer here, its tokens still counted from prompt_len
    state.cache.reserve(max_new_tokens - 1)
    with torch.inference_mode():
        for step in range(max_new_tokens):
            token = sampling.pick(logits, gen)
            if token in eos_token_ids:
                return
            yield token
            if step + 1 == max_new_tokens:
                return
            ids = torch.tensor([[token]], device=device)
            if fed_at is None:
                logits = forward(model, state.cache, ids, position, watch=watch)
            else:
                logits = forward(model, state.cache, ids, fed_at + step, original_start=position, watch=watch)
            position += 1


class _Recorder:
    """Stands in for a compressor during a capturing prefill: records, prunes nothing."""

    def __init__(self, window_size: int, accumulated: bool) -> None:
        self.window_size = window_size
        self.accumulated = accumulated
        self.observations: list[LayerObservation] = []

    def observe_live(self, cache, layer_idx: int, query, keys, attn, **_) -> None:
        if attn.sliding_window is not None:
            return  # a sliding-window layer keeps its window whatever the method
        positions = cache.layers[layer_idx].kept_positions()
        self.observations.append(LayerObservation.compute(layer_idx, query, keys, positions, attn, self.window_size, self.accumulated))


@dataclass
class Capture:
    """One prefill's full KV and per-layer observations, from which any method's cache is derived.

    During prefill every layer attends over its full KV, so the prefill does not depend on
    the method: one capture serves every method and budget.
    """

    cache: KVCache  # the full cache; never decoded from directly
    observations: list[LayerObservation]  # one per global layer, in order (sliding-window layers are not scored)
    logits: torch.Tensor
    prompt_len: int
    seconds: float

    def derive(self, compression: Compression | None) -> Prefill:
        """The cache `compression` would have kept live, built by replaying the observations."""
        started = time.perf_counter()
        compressor = compression.compressor() if compression is not None else None
        cache = self.cache.clone()  # keeps the capture's peak: the full cache was held to derive this
        if compressor is not None and len(self.observations) != len(cache.compressed_layers):
            raise UnsupportedAttention("this architecture's attention does not go through transformers' attention interface, "
                                       "so kvcli cannot compress its cache: use --method full")
        if compressor is not None:
            for obs in self.observations:
                if obs.window_attn.shape[2] < compression.method.window_size:
                    raise ValueError("internal: the capture's window is smaller than the method's")
                compressor.prune(cache, obs)
        return Prefill(
            cache=cache, logits=self.logits, prompt_len=self.prompt_len,
            seconds=self.seconds + time.perf_counter() - started, compression=compression, compressor=compressor,
        )


def capture(
    model,
    input_ids: torch.Tensor,
    window_size: int,
    accumulated: bool = False,
    on_layer: Callable[[int], None] | None = None,
) -> Capture:
    """Prefill once with the full cache, recording what every method needs to choose tokens.

    `window_size` is the largest observation window any method will use; `accumulated`
    records all-query attention too (H2O).
    """
    recorder = _Recorder(window_size, accumulated)
    cache, logits, seconds = _read_full(model, input_ids, recorder, on_layer)
    return Capture(cache, recorder.observations, logits, input_ids.shape[1], seconds)


def _read_full(model, input_ids: torch.Tensor, recorder, on_layer) -> tuple[KVCache, torch.Tensor, float]:
    """One forward over `input_ids` `(1, n)` into a new full cache, `recorder` seeing every layer
    (it prunes nothing, so the full cache is the read's peak); the cache, logits and seconds."""
    cache = new_cache(model)
    if prepare_model(model).bypassed:
        recorder = None  # its attention never reaches kvcli's function: there is nothing to record (and nothing to derive)
    announce_chunk(on_layer, 0, 1, 0, input_ids.shape[1], input_ids.shape[1])
    started = time.perf_counter()
    with torch.inference_mode():
        logits = forward(model, cache, input_ids, 0, recorder, on_layer=on_layer)
    return cache, logits, time.perf_counter() - started
