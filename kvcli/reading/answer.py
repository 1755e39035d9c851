"""From a `Reading` to text: greedy or sampled decoding, streamed through a callback, and the
run's statistics. Shared by `ask`, `summarize`, `inspect` and `eval`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ..generate import decode
from ..models.checkpoints import kvcli_home
from ..models.int8_kernel import name as int8_kernel_name
from ..speed import TIMED_READS, names, record_read
from ..stats import RunStats, heads_summary, peak_memory_bytes
from .reader import Options, Reader, Reading

STOP_EOS = "end of sequence"
STOP_LIMIT = "max_new_tokens"


@dataclass
class Answer:
    """The decoded answer and what decoding it cost."""

    text: str
    tokens: list[int]
    stopped: str  # STOP_EOS or STOP_LIMIT: why the answer ended
    ttft_s: float | None  # from `started` to the first token, plus the prefill charged to it earlier (`Reading.charged_s`)
    decode_s: float  # from the first token to the last


def answer(reader: Reader, reading: Reading, options: Options, on_text: Callable[[str], None] | None = None,
           started: float | None = None, watch=None) -> Answer:
    """Decode from `reading`, calling `on_text` with each new piece of text as it is complete;
    `watch` (an `attribution.AttentionAt`, for --sources) sees each decoding step's attention.

    On Ctrl-C the text so far has been passed to `on_text`, and the interrupt goes on up.
    """
    started = time.perf_counter() if started is None else started
    tokenizer = reader.tokenizer
    tokens: list[int] = []
    shown = ""
    first_at = None
    with reader.decoding():  # --threads: fewer threads for decoding's small operations
        for token in decode(reader.model, reading.state, options.max_new_tokens, reader.eos_ids, options.sampling, watch):
            if first_at is None:
                first_at = time.perf_counter()
            tokens.append(token)
            if on_text is not None:
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    on_text(text[len(shown):])
                    shown = text
    finished = time.perf_counter()
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if on_text is not None and text[len(shown):]:
        on_text(text[len(shown):])
    return Answer(
        text=text.strip(), tokens=tokens, stopped=STOP_LIMIT if len(tokens) >= options.max_new_tokens else STOP_EOS,
        ttft_s=(first_at - started + reading.charged_s) if first_at else None, decode_s=(finished - first_at) if first_at else 0.0,
    )


def run_stats(reader: Reader, reading: Reading) -> RunStats:
    """What reading cost and kept, for the report and `--json`: taken before decoding, which
    grows every layer by the tokens it generates (`add_answer` fills in the rest)."""
    state = reading.state
    retained = state.cache.retained_per_layer()
    kept = sum(layer.mean_length() for layer in state.cache.layers)  # exact where a per-head split left heads unequal
    prompt_len = state.prompt_len
    stats = RunStats(
        model=reader.lm.name,
        method=reading.method.name,
        method_params=reading.method.params(),
        ratio=kept / (reader.num_layers * prompt_len),
        budget=kept / reader.num_layers,
        prompt_tokens=prompt_len,
        compressed=state.compressed,
        note=reading.note,
        window_text=reading.window,
        retained_per_layer=retained,
        layer_windows=state.cache.windows,
        kv_bytes_full=state.cache.full_nbytes(prompt_len),
        kv_bytes_kept=state.cache.nbytes(),
        kv_bytes_peak=state.cache.kv_peak_nbytes,
        peak_memory_bytes=peak_memory_bytes(reader.device),
        load_s=reader.lm.load_s,
        prefill_s=state.seconds,
        dropped_tokens=reading.dropped_tokens,
        read=reading.mode,
        dtype=str(reader.lm.dtype).removeprefix("torch."),
        weights=reader.lm.weights or str(reader.lm.dtype).removeprefix("torch."),
        int8_kernel=int8_kernel_name() if reader.lm.weights == "int8" else "",
    )
    heads = heads_summary(state.cache.head_lengths(), state.cache.windows)
    if heads is not None:
        stats.extra["heads"] = heads
    if state.compressed and state.compression is not None and state.compression.question:
        stats.extra["question_tokens"] = state.compression.question  # kept whole, beside the document's budget
        if state.compression.kept_whole:  # the question's tokens before the window (methods.base.Compression)
            stats.extra["question_kept_whole"] = state.compression.kept_whole
    if reading.prefix is not None:
        stats.extra["prefix"] = reading.prefix
    if reading.past is not None:
        stats.extra["past_window"] = reading.past
    if reading.skim is not None:
        stats.extra["skim"] = reading.skim
    if reading.mode in TIMED_READS:  # for `kvcli plan`'s estimate of a read's time
        record_read(kvcli_home(), reader.lm.name, *names(reader.device, reader.lm.precision), prompt_len, state.seconds)
    if len(state.chunks) > 1:
        stats.extra["chunks"] = [
            {"start": start, "stop": stop, "kept_tokens_over_layers": round(kept, 1)}
            for (start, stop), kept in zip(state.chunks, state.kept_per_chunk())
        ]
    return stats


def add_answer(stats: RunStats, reader: Reader, result: Answer) -> RunStats:
    """What answering cost: decode timing, why it stopped, and the process's peak memory."""
    stats.ttft_s = result.ttft_s
    stats.decode_tokens = len(result.tokens)
    stats.decode_s = result.decode_s
    stats.stopped = result.stopped
    stats.peak_memory_bytes = peak_memory_bytes(reader.device)
    return stats
