"""The repeat scorer: question-agnostic token scores from the model repeating its document.

After KVzip (Kim et al., 2025, https://arxiv.org/abs/2505.23416): a cache that must serve any
later question should keep what the model needs to reproduce the document. The prefix is read
with the full cache; then the model is teacher-forced to repeat the document (a request to
repeat, then the document's own tokens as the answer) in chunks. Each chunk is fed after a
fork of the prefix at the positions right after it, so it attends to the whole prefix and to
itself; each layer's copy is dropped as soon as that layer is scored, so the prefix is never
written and only one layer is ever held twice. A cached entry's score is the most attention any
repeat query of a query head pays it: `(num_kv_heads, group, k_len)` per layer, the max over
the queries of every chunk. `Method.scores` pools these and takes the max over each KV head's
query heads. Cost: a second pass over the document in which every token attends to the whole
prefix, plus the scoring (`kvcli eval --modes reuse-repeat` reports `repeat_s` against the prefill).

Differences from the reference code (snu-mllab/KVzip, kvpress's KVzipPress), all deliberate:
- a chunk's attention is normalised over every key it attends to (the whole prefix and the
  chunk), as the model computes it; the references renormalise over the sinks, the chunk's own
  span and the repeat, and score only that span;
- every chunk scores every entry (the max over chunks), and no first tokens are forced in as
  attention sinks: a sink already draws the most attention;
- budgets are split by kvcli's methods (equal per layer, PyramidKV's ramp, DynamicKV's
  re-division), and over heads by the method's `head_split`: equal per head unless asked;
  `--param head_split=global` is KVzip's one top-k over every layer and head;
- with the method's `rescore` (R > 1), the prefix is first cut to R times the budget by the
  first repeat's scores (`first_cut`), the document is repeated again over what is kept, and the
  budget is kept by that second repeat's scores. The first repeat scores each entry beside every
  other; the second, beside the entries that will stay in the running, as pruning in steps
  does. Cost: a second repeat pass, over a cache of R times the budget;
- with the method's `surprisal` (E > 0), the scores of the repeat over the whole prefix (with
  `rescore`, the first repeat, which decides what stays in the running) are multiplied by
  (1 + s) ** E, where s is how surprising the entry's token was when the prefix was read:
  -log p(token | the tokens before), in nats, from the prefill's own next-token logits. A token
  the model predicts from what came before (the rest of a common phrase) can be predicted again;
  a name, a number or an unusual word cannot, and the repeat's attention alone does not tell them
  apart (a copying head pays every token nearly all its attention). The second repeat ranks the
  survivors, already the surprising ones, by its scores alone. Cost: the output layer over every
  prefix position, read a slice of vocabulary rows at a time (1.5 s of a ~39 s compress of 4,609
  tokens on the default model, docs/results.md), once per repeat and only when a method weighs by it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace

import torch

from .attention import causal_mask, layer_attention
from .cache import KVCache, KVLayer
from .generate import Prefill, forward, prefill, prepare_model
from .methods import Compression, Compressor, LayerObservation, make_method

# Largest (query rows x keys) block of logits materialised at once while scoring a chunk. On a CPU,
# blocks that stay in cache score about three times faster than 16M-element ones (measured on
# the default model's shapes); an accelerator gains from fewer, larger blocks.
_CPU_BLOCK_ELEMENTS = 1 << 20
_BLOCK_ELEMENTS = 1 << 24

REPEAT_CHUNK_SIZE = 2048  # target tokens per repeat chunk (KVzip's)
# Next-token logits held at once while measuring surprisal (positions x vocabulary rows, float32),
# and the output layer's rows widened at once. Both count in a CPU's peak: 512 positions against the
# whole 152K vocabulary of the default model, its int8 head widened per block, raised the process's
# peak by ~800 MiB (benchmarks/surprisal_block.py); an accelerator gains from fewer, larger blocks.
_CPU_SURPRISAL_ELEMENTS = 1 << 22
_SURPRISAL_ELEMENTS = 1 << 24
SURPRISAL_VOCAB_ROWS = 1 << 14


def _head_rows(head) -> Callable[[int, int], torch.Tensor] | None:
    """Rows `start:stop` of the output layer's weight as its products use them, for the heads whose
    weight can be read in slices (a plain `nn.Linear` holding its weight, kvcli's int8 head); None
    for any other (a quantized library's, one whose weight a device map loads only in `forward`)."""
    widened_rows = getattr(head, "widened_rows", None)  # kvcli's int8 head (models.weights.Int8Linear)
    if callable(widened_rows):
        return widened_rows
    if type(head) is torch.nn.Linear and head.weight.device.type != "meta":
        return lambda start, stop: head.weight[start:stop]
    return None


def surprisal_block(model, width: int) -> int:
    """Positions whose logits over `width` vocabulary rows `token_surprisal` holds at once on `model`'s device."""
    device = next(model.get_output_embeddings().parameters()).device
    return max(1, (_CPU_SURPRISAL_ELEMENTS if device.type == "cpu" else _SURPRISAL_ELEMENTS) // width)


def peak_attention(query: torch.Tensor, keys: torch.Tensor, attn, n_keys: int,
                   block_elements: int | None = None) -> torch.Tensor:
    """The most attention each of the first `n_keys` keys receives from any query, per query head.

    query `(1, num_heads, q_len, head_dim)` sits at the last `q_len` of the `k_len` positions of
    keys `(1, num_kv_heads, k_len, head_dim)` and attends causally, as the layer does (`attn`: an
    `attention.LayerAttention` with its scaling, softcapping and sinks, or a bare scaling). Returns
    `(num_kv_heads, group, n_keys)` float32, computed in query blocks of at most `block_elements`
    logits (default: by device), so a chunk's `(q_len, k_len)` matrix is never held whole.
    """
    _, num_heads, q_len, head_dim = query.shape
    num_kv_heads, k_len = keys.shape[1], keys.shape[2]
    group = num_heads // num_kv_heads
    if block_elements is None:
        block_elements = _CPU_BLOCK_ELEMENTS if keys.device.type == "cpu" else _BLOCK_ELEMENTS
    attn = layer_attention(attn)
    keys_t = keys[0].float().transpose(1, 2)  # (num_kv_heads, head_dim, k_len)
    peak = torch.zeros(num_kv_heads, group, n_keys, dtype=torch.float32, device=keys.device)
    block = max(1, block_elements // max(1, num_heads * k_len))
    for start in range(0, q_len, block):
        stop = min(q_len, start + block)
        q = query[0, :, start:stop].float().reshape(num_kv_heads, group * (stop - start), head_dim)
        dots = torch.bmm(q, keys_t).view(num_kv_heads, group, stop - start, k_len)
        probs = attn.probabilities(dots, causal_mask(q_len, k_len, keys.device, attn.sliding_window, start, stop))
        peak = torch.maximum(peak, probs[..., :n_keys].amax(dim=2))
    return peak


class _RepeatRecorder:
    """Stands in for a compressor while a repeat chunk is fed after a fork of the prefix: keeps
    each layer's peak attention on the prefix's entries, then drops the layer's copy."""

    def __init__(self, prefix: KVCache) -> None:
        self.prefix = prefix
        self.peaks: list[torch.Tensor | None] = [None] * prefix.num_layers
        self.peak_nbytes = 0  # most bytes the forks held at once (one layer's copy)

    def observe_live(self, cache, layer_idx: int, query, keys, attn, **_) -> None:
        if attn.sliding_window is not None:
            return  # a sliding-window layer keeps its window: it is not scored (its copy is trimmed by the step)
        base = self.prefix.layers[layer_idx]
        peak = peak_attention(query, keys, attn, base.get_seq_length())
        old = self.peaks[layer_idx]
        self.peaks[layer_idx] = peak if old is None else torch.maximum(old, peak.to(old.device))
        self.peak_nbytes = max(self.peak_nbytes, cache.nbytes())
        # This layer's copy (prefix + chunk) is not read again in this pass: drop it now.
        cache.layers[layer_idx] = KVLayer(base=base)


def repeat_scores(
    model,
    prefix: Prefill,
    target_ids: torch.Tensor,
    prompt_for: Callable[[int], torch.Tensor],
    chunk_size: int = REPEAT_CHUNK_SIZE,
    on_layer: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """Per layer `(num_kv_heads, group, k_len)`: the most attention each entry of `prefix`'s cache
    receives from the queries of the model repeating `target_ids` `(1, t)` after it (None for a
    sliding-window layer, which is not scored).

    The repeat is fed in chunks of `chunk_size` target tokens, each after `prompt_for(start)`
    `(1, p)` (the request to repeat `target_ids[:, start:]`, the template's closing included), at
    the positions right after the prefix: each chunk attends to the prefix and to itself. The
    prompt's queries count too. The prefix's cache is left as it was.
    """
    scores, _ = _repeat(model, prefix, target_ids, prompt_for, chunk_size, on_layer)
    return scores


def _repeat(model, prefix: Prefill, target_ids, prompt_for, chunk_size, on_layer) -> tuple[list[torch.Tensor], int]:
    """`repeat_scores` and the most bytes the forks held at once."""
    if chunk_size < 1:
        raise ValueError(f"internal: the repeat's chunk size must be positive, got {chunk_size}")
    if target_ids.shape[1] == 0:
        raise ValueError("internal: nothing to repeat")
    prepare_model(model)
    recorder = _RepeatRecorder(prefix.cache)
    device = target_ids.device
    with torch.inference_mode():
        for start in range(0, target_ids.shape[1], chunk_size):
            ids = torch.cat([prompt_for(start).to(device), target_ids[:, start : start + chunk_size]], dim=1)
            forward(model, prefix.cache.fork(), ids, prefix.prompt_len, recorder, on_layer=on_layer)
    return recorder.peaks, recorder.peak_nbytes


@contextmanager
def _decoder_outputs(model) -> Iterator[list[torch.Tensor]]:
    """The last hidden states `(1, q_len, hidden)` of every forward pass of `model`'s decoder made
    inside, in order (the decoder applies its final norm; the output layer reads them)."""
    seen: list[torch.Tensor] = []

    def keep(_module, _args, output) -> None:
        seen.append(output[0].detach())

    handle = model.get_decoder().register_forward_hook(keep)
    try:
        yield seen
    finally:
        handle.remove()


def token_surprisal(model, ids: torch.Tensor, hidden: torch.Tensor, block: int | None = None,
                    vocab_rows: int = SURPRISAL_VOCAB_ROWS) -> torch.Tensor:
    """How surprising each token of `ids` `(1, n)` was to `model`: -log p(token t | tokens before t)
    in nats, `(n,)` float32 on the CPU, from the decoder's last hidden states `hidden` `(1, n, d)`
    through the output layer and what the model's config says it does to its logits (Cohere's and
    Granite's scales, Gemma 2's softcapping). The first token, which nothing predicts, gets the
    largest of the others.

    The output layer is read `vocab_rows` rows at a time, each slice widened once for every
    position (`block` positions per product; default `surprisal_block`), and each slice's
    log-sum-exp combined, so neither the whole vocabulary's logits nor the whole widened weight
    is held at once. A head that cannot be read in slices (`_head_rows`) is called whole."""
    n = ids.shape[1]
    if hidden.shape[1] != n:
        raise ValueError(f"internal: {hidden.shape[1]} hidden states for {n} tokens")
    surprisal = torch.zeros(n, dtype=torch.float32)
    if n < 2:
        return surprisal
    head = model.get_output_embeddings()
    config = model.config.get_text_config()
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None) or 1.0  # Cohere multiplies its logits
    scale /= getattr(config, "logits_scaling", None) or 1.0  # Granite divides them
    rows_of = _head_rows(head)
    vocab = getattr(head, "out_features", None) or config.vocab_size
    width = min(vocab, vocab_rows) if rows_of is not None else vocab
    block = block or surprisal_block(model, width)
    states = hidden[0, :-1]  # position t predicts token t + 1
    following = ids[0, 1:].to(states.device)
    chosen = torch.zeros(n - 1, dtype=torch.float32, device=states.device)  # each next token's logit
    sums = []  # per slice of the vocabulary, each position's log-sum-exp over it
    with torch.inference_mode():
        for first in range(0, vocab, width):
            last = min(vocab, first + width)
            weight = rows_of(first, last) if rows_of is not None else None
            bias = getattr(head, "bias", None) if weight is not None else None
            part = torch.empty(n - 1, dtype=torch.float32, device=states.device)
            for start in range(0, n - 1, block):
                stop = min(n - 1, start + block)
                rows = states[start:stop]
                if weight is None:
                    logits = head(rows).float()
                else:
                    logits = torch.nn.functional.linear(rows.to(weight.device, weight.dtype), weight).float().to(rows.device)
                    if bias is not None:
                        logits += bias[first:last].float().to(rows.device)
                if scale != 1.0:
                    logits.mul_(scale)
                if cap:
                    logits.div_(cap).tanh_().mul_(cap)
                part[start:stop] = torch.logsumexp(logits, dim=1)
                target = following[start:stop] - first
                inside = ((target >= 0) & (target < last - first)).nonzero()[:, 0]
                chosen[start + inside] = logits[inside, target[inside]]
            sums.append(part)
    surprisal[1:] = (torch.logsumexp(torch.stack(sums), dim=0) - chosen).cpu()
    surprisal[0] = surprisal[1:].max()
    return surprisal


def weigh(scores: list[torch.Tensor | None], weights: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The whole prefix's `scores` (per layer `(num_kv_heads, group, prompt_len)`, None for a layer
    not scored) times the weight of each entry's token, `weights` `(prompt_len,)`; None weights:
    the scores as they are."""
    if weights is None:
        return scores
    return [None if layer is None else layer * weights.to(layer.device)[None, None, : layer.shape[-1]] for layer in scores]


def key_observation(layer_idx: int, positions: torch.Tensor, scores: torch.Tensor) -> LayerObservation:
    """A layer's observation ranked by `scores` `(num_kv_heads, group, k_len)` instead of a window.

    The window attention holds the same scores as one row, so a method that reads the window
    directly (evidencekv's shared evidence) reads the repeat's scores too.
    """
    return LayerObservation(layer_idx=layer_idx, positions=positions, window_attn=scores[:, :, None, :], key_scores=scores)


def keep_by_scores(cache: KVCache, scores: list[torch.Tensor], compression: Compression) -> Compressor:
    """Prune `cache` in place to what `compression` keeps when each layer's entries are ranked by
    `scores`: the method's budget split and its window, exactly as in a prefill."""
    if not compression.method.takes_key_scores:
        raise ValueError(f"internal: {compression.method.name} does not rank by per-entry scores")
    compressor = compression.compressor()
    compressor.entries_held = [min(cache.layers[i].head_lengths()) for i in cache.compressed_layers]
    for layer_idx in cache.compressed_layers:
        if scores[layer_idx] is None:
            raise ValueError(f"internal: the repeat did not score layer {layer_idx}")
        compressor.prune(cache, key_observation(layer_idx, cache.layers[layer_idx].kept_positions(), scores[layer_idx]))
    return compressor


def first_cut(compression: Compression) -> Compression | None:
    """What a re-scored repeat keeps before its second repeat (the method's `rescore` > 1): that
    many times the budget, DynamicKV's layer budgets with every head of a layer equal (so the
    second repeat reads dense layers), ranked by the first repeat as the method pools it. None
    when the method does not re-score or the cut would keep every entry."""
    method, plan = compression.method, compression.plan
    if not method.rescore:
        return None
    total = round(plan.total * method.rescore)
    if total >= plan.num_layers * plan.prompt_len:
        return None
    cut = make_method("dynamickv", window_size=method.window_size, kernel_size=method.kernel_size, pooling=method.pooling)
    return Compression(cut, replace(plan, total=total), question=compression.question)


@dataclass
class Repeated:
    """A prefix read with the full cache and scored by its repeat: any method's cache is derived from it."""

    state: Prefill  # the full prefix; never decoded from directly
    scores: list[torch.Tensor | None]  # per layer (num_kv_heads, group, k_len); None for a sliding-window layer
    repeat_s: float  # what the repeat pass cost (the prefix's own read is `state.seconds`)
    # Scores a cut of the prefix by repeating the document again over it (`repeat_scores` with the
    # first repeat's request and chunks); None: a method's `rescore` cannot act (said by `derive`).
    again: Callable[[Prefill], list[torch.Tensor | None]] | None = None
    # Measures each prefix token's surprisal in nats, `(prompt_len,)` (`token_surprisal` over the
    # prefill's hidden states); run by `surprisal()` at once for a read whose method weighs by it, or
    # the first time a method does (the output layer over every position: real work, done only when
    # asked). None: cannot, or measured already.
    measure: Callable[[], torch.Tensor] | None = None
    surprisal_s: float = 0.0  # what measuring it cost (added to `repeat_s`); 0 until it is measured
    _surprisal: torch.Tensor | None = field(default=None, repr=False)

    @property
    def seconds(self) -> float:
        return self.state.seconds + self.repeat_s

    def surprisal(self) -> torch.Tensor:
        """Each prefix token's surprisal in nats `(prompt_len,)`, measured on the first call."""
        if self._surprisal is None:
            if self.measure is None:
                raise ValueError("internal: this repeat cannot measure its tokens' surprisal (no model or hidden states)")
            started = time.perf_counter()
            self._surprisal = self.measure()
            self.measure = None  # frees the hidden states it held
            self.surprisal_s = time.perf_counter() - started
            self.repeat_s += self.surprisal_s  # scoring work, as the repeat's own
        return self._surprisal

    def weights(self, method) -> torch.Tensor | None:
        """Each prefix position's weight under `method`'s `surprisal` exponent; None when it is 0."""
        if not method.surprisal:
            return None
        return (1.0 + self.surprisal()).pow(method.surprisal)

    def derive(self, compression: Compression | None, copy: bool = True) -> Prefill:
        """The cache `compression` keeps by the repeat's scores (of a copy unless `copy` is False).
        With the method's `rescore`, by a second repeat over the `first_cut` of the prefix; with its
        `surprisal`, the (first) repeat's scores weighed by each token's surprisal (`weigh`)."""
        weights = self.weights(compression.method) if compression is not None else None  # measured in repeat_s, not here
        started = time.perf_counter()
        cache = self.state.cache.clone() if copy else self.state.cache
        scores = weigh(self.scores, weights)
        cut = first_cut(compression) if compression is not None else None
        if cut is not None:
            if self.again is None:
                raise ValueError("internal: this repeat cannot score a cut again (no model to repeat with)")
            keep_by_scores(cache, scores, cut)
            scores = self.again(Prefill(cache=cache, logits=None, prompt_len=self.state.prompt_len, seconds=0.0))
        compressor = keep_by_scores(cache, scores, compression) if compression is not None else None
        return Prefill(
            cache=cache, logits=self.state.logits, prompt_len=self.state.prompt_len,
            seconds=self.seconds + time.perf_counter() - started, compression=compression, compressor=compressor,
        )


def _measure_later(model, ids: torch.Tensor, seen: list[torch.Tensor]) -> Callable[[], torch.Tensor] | None:
    """`token_surprisal` of `ids` over the decoder outputs `seen` (emptied), to run later; the
    returned function alone holds the hidden states. None when nothing was seen."""
    if not seen:
        return None
    hidden = seen[0] if len(seen) == 1 else torch.cat(seen, dim=1)  # (1, n, hidden)
    seen.clear()
    return lambda: token_surprisal(model, ids, hidden)


def repeat_prefix(
    model,
    prefix_ids: torch.Tensor,
    target_ids: torch.Tensor,
    prompt_for: Callable[[int], torch.Tensor],
    chunk_size: int = REPEAT_CHUNK_SIZE,
    on_layer: Callable[[int], None] | None = None,
    surprisal: bool | None = None,
) -> Repeated:
    """Prefill `prefix_ids` `(1, n)` with the full cache, then score it by repeating `target_ids`
    (`repeat_scores`). Each prefix token's surprisal (`Repeated.surprisal`), from the prefill's last
    hidden states: with `surprisal` True measured at once, before the repeat, so the hidden states
    are not held through it (a read whose method weighs by it); False: never (nothing watched or
    held); None: kept to measure the first time a method asks (a capture whose methods are not
    known when it is made). The cache's peak counts the full prefix plus the repeat's one layer copy."""
    prepare_model(model)  # its first call probes the model with a forward pass of its own: before the decoder is watched
    with _decoder_outputs(model) if surprisal is not False else nullcontext([]) as seen:
        state = prefill(model, prefix_ids)  # the full cache, in one pass
    started = time.perf_counter()
    repeated = Repeated(state, [], 0.0, measure=_measure_later(model, prefix_ids, seen))
    if surprisal:
        repeated.surprisal()  # frees the hidden states; its time counts in repeat_s, as when measured later
    scores, fork_nbytes = _repeat(model, state, target_ids, prompt_for, chunk_size, on_layer)
    state.cache.peak_nbytes = state.cache.nbytes() + fork_nbytes

    def again(cut: Prefill) -> list[torch.Tensor | None]:
        return _repeat(model, cut, target_ids, prompt_for, chunk_size, on_layer)[0]  # the same progress bar moves on

    repeated.scores, repeated.again = scores, again
    repeated.repeat_s += time.perf_counter() - started - repeated.surprisal_s
    return repeated


__all__ = ["REPEAT_CHUNK_SIZE", "Repeated", "first_cut", "keep_by_scores", "key_observation", "peak_attention", "repeat_prefix",
           "repeat_scores", "surprisal_block", "token_surprisal", "weigh"]
