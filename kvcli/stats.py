"""Run statistics: a dataclass for `--json`, and a Rich rendering for people."""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass, field

import torch
from rich.console import Group
from rich.table import Table
from rich.text import Text


def _read_status(key: str) -> int | None:
    """A size from /proc/self/status in bytes (Linux), or None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_memory(device: torch.device) -> bool:
    """Start the peak over from what is held now (after the model load, whose transient
    copies would otherwise be the peak). False where the system cannot reset it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # Linux >= 4.0: VmHWM (and ru_maxrss) restart from the current RSS
        return True
    except OSError:
        return False


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA peak allocated on a GPU; the process's peak resident set size on CPU (since the
    last `reset_peak_memory`, where the system allows one)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = _read_status("VmHWM")
    if peak is not None:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)


def current_memory_bytes(device: torch.device) -> int:
    """CUDA memory allocated now on a GPU; the resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return _read_status("VmRSS") or peak_memory_bytes(device)


@dataclass
class RunStats:
    """What one `ask`/`summarize`/`inspect` run did and cost. Keys are documented in docs/json.md."""

    model: str
    method: str
    method_params: dict
    ratio: float  # fraction of the prompt's KV entries kept, summed over layers
    budget: float  # mean tokens kept per layer (window included)
    prompt_tokens: int
    compressed: bool
    note: str  # why compression was skipped, or ""
    window_text: str  # what the observation window covers
    retained_per_layer: list[int]  # tokens kept per layer after prefill, window included
    kv_bytes_full: int
    kv_bytes_kept: int
    kv_bytes_peak: int  # most KV bytes held at once during the prefill
    peak_memory_bytes: int
    load_s: float
    prefill_s: float
    ttft_s: float | None = None
    decode_tokens: int = 0
    decode_s: float = 0.0
    dropped_tokens: int = 0
    read: str = "query"  # how the document was read: query, chunked, reused or saved
    stopped: str | None = None  # why the answer ended: "end of sequence" or "max_new_tokens"
    extra: dict = field(default_factory=dict)
    # per layer: the window of a sliding-window layer (it keeps at most window - 1 tokens and is
    # never compressed), None for a global layer (the ones --ratio and --budget apply to)
    layer_windows: list[int | None] = field(default_factory=list)
    dtype: str = ""  # what the model computed in, its activations and KV cache: float32, bfloat16, float16
    weights: str = ""  # how its linear layers' weights were stored: the dtype, or int8 (kvcli/models/weights.py)
    int8_kernel: str = ""  # int8 weights: the kernel of their decode products, "kvcli" or "torch" (kvcli/models/int8_kernel.py)

    def _global(self) -> list[float]:
        """Tokens each global layer kept: the exact mean over its KV heads where a per-head split left
        them unequal (`retained_per_layer` rounds it), as `budget` counts them."""
        heads = self.extra.get("heads")
        kept = [sum(h) / len(h) if h else 0.0 for h in heads["per_layer"]] if heads else self.retained_per_layer
        windows = self.layer_windows or [None] * len(kept)
        return [n for n, window in zip(kept, windows) if window is None]

    @property
    def global_ratio(self) -> float | None:
        """Fraction of the prompt's KV entries the global layers kept (what --ratio sets); None without global layers."""
        kept = self._global()
        return sum(kept) / (len(kept) * self.prompt_tokens) if kept and self.prompt_tokens else None

    @property
    def global_budget(self) -> float | None:
        """Mean tokens kept per global layer (what --budget sets); None without global layers."""
        kept = self._global()
        return sum(kept) / len(kept) if kept else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        # The first token comes from the prefill's logits; the rest from decode steps.
        steps = self.decode_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["decode_tokens_per_s"] = self.decode_tokens_per_s
        data["kv_kept_fraction"] = self.kv_bytes_kept / self.kv_bytes_full if self.kv_bytes_full else None
        data["global_ratio"] = self.global_ratio
        data["global_budget"] = self.global_budget
        return data


def heads_summary(head_lengths: list[list[int]], windows: list[int | None] | None = None) -> dict | None:
    """How unevenly a per-head split kept the global layers' KV heads, for `extra.heads`: the
    fewest and most entries one head held, and every layer's heads; None when each layer's heads
    held the same number (the equal split)."""
    windows = windows or [None] * len(head_lengths)
    kept = [lengths for lengths, window in zip(head_lengths, windows) if window is None and lengths]
    if all(len(set(lengths)) <= 1 for lengths in kept):
        return None
    flat = [n for lengths in kept for n in lengths]
    return {"min": min(flat), "max": max(flat), "per_layer": head_lengths}


def mib(n: int) -> str:
    """Bytes as MiB, as the reports print them."""
    return f"{n / 2**20:,.1f} MiB"


@dataclass
class LayerRun:
    """Consecutive layers that kept (nearly) the same number of tokens: one row of the report."""

    first: int
    last: int
    low: int  # fewest tokens one of them kept
    high: int  # most
    sliding: bool  # sliding-window layers (they keep their window whatever the method)

    @property
    def layers(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"

    @property
    def kept(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


def nearly_equal(low: int, high: int) -> bool:
    """Counts close enough to show as one range: within 2% of the larger, or one token."""
    return high - low <= max(1, high // 50)


def layer_runs(counts: list[int], windows: list[int | None] | None = None, every_layer: bool = False) -> list[LayerRun]:
    """Kept tokens per layer as runs of consecutive, nearly equal layers of one kind (global or
    sliding); `every_layer` gives each layer a run of its own."""
    windows = windows or [None] * len(counts)
    runs: list[LayerRun] = []
    for i, (kept, window) in enumerate(zip(counts, windows)):
        last = runs[-1] if runs else None
        if (not every_layer and last is not None and last.sliding == (window is not None)
                and nearly_equal(min(last.low, kept), max(last.high, kept))):
            last.last, last.low, last.high = i, min(last.low, kept), max(last.high, kept)
        else:
            runs.append(LayerRun(i, i, kept, kept, window is not None))
    return runs


class LayerBars:
    """Kept tokens per run of layers as horizontal bars; many rows are laid out in side-by-side
    blocks (layers 0-9 | 10-19 | ...) as the width allows, so 30 layers take 10 lines at 80 columns."""

    MAX_BLOCKS = 4
    MIN_BAR = 10
    GLOBAL, SLIDING = "█", "▒"  # a sliding-window layer's bar is shaded: it keeps its window, whatever the method

    def __init__(self, runs: list[LayerRun], width: int = 40) -> None:
        self.runs = runs
        self.width = width

    def __rich_console__(self, console, options):
        runs = self.runs
        n = len(runs)
        single = all(run.first == run.last for run in runs)
        label_w = max([len("layer" if single else "layers")] + [len(run.layers) for run in runs])
        kept_w = max([len("kept")] + [len(run.kept) for run in runs])
        overhead = label_w + kept_w + 3  # two column gaps and the gap before the next block
        blocks = 1
        if n > 12:
            fitting = (options.max_width + 1) // (overhead + self.MIN_BAR)
            blocks = max(1, min(self.MAX_BLOCKS, fitting, n // 6))
        rows = -(-n // blocks) if n else 0
        blocks = -(-n // rows) if rows else 1
        bar_w = max(1, min(self.width, (options.max_width + 1) // blocks - overhead))
        top = max((run.high for run in runs), default=0) or 1
        table = Table(box=None, show_header=True, pad_edge=False, padding=(0, 1), collapse_padding=True)
        for block in range(blocks):
            table.add_column("layer" if single else "layers", justify="right", no_wrap=True)
            table.add_column("kept", justify="right", no_wrap=True)
            table.add_column("", width=bar_w, no_wrap=True)
        for row in range(rows):
            cells: list = []
            for block in range(blocks):
                i = block * rows + row
                if i < n:
                    run = runs[i]
                    bar = (self.SLIDING if run.sliding else self.GLOBAL) * max(1 if run.high else 0, round(bar_w * run.high / top))
                    cells += [run.layers, run.kept, Text(bar, style="yellow" if run.sliding else "cyan")]
                else:
                    cells += ["", "", ""]
            table.add_row(*cells)
        yield table


def layers_summary(counts: list[int], windows: list[int | None] | None = None, every_layer: bool = False,
                   unequal_heads: bool = False):
    """The report's layer part: one line when every layer kept nearly the same ("layers 0-23:
    230-231 tokens each"), else a bar per run of nearly equal layers (per layer with `every_layer`).
    `unequal_heads`: a per-head split left some layer's KV heads unequal, so a count is their mean."""
    runs = layer_runs(counts, windows, every_layer)
    head = "retained tokens per layer (window included" + ("; a mean over KV heads)" if unequal_heads else ")")
    if len(runs) == 1 and not every_layer:
        run = runs[0]
        each = "tokens each" if run.low == run.high else "tokens"
        return Text(f"{head}: layers {run.layers}: {run.kept} {each}")
    return Group(Text(f"{head}:"), LayerBars(runs))


def _sliding_text(windows: list[int | None]) -> str:
    """"3 sliding-window layers (▒) keep at most 511 tokens", or "" without sliding layers."""
    sizes = sorted({w for w in windows if w is not None})
    if not sizes:
        return ""
    count = sum(w is not None for w in windows)
    most = ", ".join(str(w - 1) for w in sizes)
    return f"{count} sliding-window layer{'s' if count > 1 else ''} ({LayerBars.SLIDING}) keep at most their last {most} tokens, whatever the method"


def add_kept_rows(facts: Table, stats: RunStats, kv_note: str = "") -> dict | None:
    """The report's rows of what the cache kept (budget, window, sliding layers, heads, KV bytes;
    `kv_note` after the bytes), added to `facts`; the per-head summary, or None."""
    sliding = _sliding_text(stats.layer_windows)
    if stats.compressed:
        question = stats.extra.get("question_tokens", 0)
        # a query-aware read's question, kept whole beside the document's budget in every global layer (methods.question_plan)
        among = f", the question's {question} tokens among them, kept whole beside the document's budget" if question else ""
        budget = Text(f"{stats.budget:.1f} tokens/layer = ratio {stats.ratio:.4f}{among}")
        if sliding and stats.global_ratio is not None:  # sliding-window layers keep their window, not the question
            budget = Text(f"global layers {stats.global_budget:.1f} tokens/layer = ratio {stats.global_ratio:.4f}{among}; "
                          f"all layers {stats.budget:.1f} tokens/layer = ratio {stats.ratio:.4f}")
        if stats.note:
            budget.append(f" ({stats.note})", style="yellow")
        facts.add_row("budget", budget)
        if stats.window_text:
            facts.add_row("window", Text(f"covers {stats.window_text!r}"))
    else:
        facts.add_row("budget", f"not compressed: {stats.note}")
    if sliding:
        facts.add_row("sliding", sliding)
    heads = stats.extra.get("heads")
    if heads:
        facts.add_row("heads", f"KV heads kept {heads['min']}-{heads['max']} tokens each (split unevenly; the budget is their mean)")
    kept_pct = 100 * stats.kv_bytes_kept / stats.kv_bytes_full if stats.kv_bytes_full else 100.0
    facts.add_row(
        "KV cache",
        f"{mib(stats.kv_bytes_kept)} kept of {mib(stats.kv_bytes_full)} full ({kept_pct:.1f}%), "
        f"saved {mib(stats.kv_bytes_full - stats.kv_bytes_kept)}" + kv_note,
    )
    return heads


def fact_table() -> Table:
    """The report's table: a bold label, then its fact, one per row."""
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold", no_wrap=True)
    facts.add_column()
    return facts


def method_text(stats: RunStats) -> str:
    """The method and its knobs, as the report's method row gives them."""
    params = ", ".join(f"{k}={v}" for k, v in stats.method_params.items())
    return f"{stats.method} ({params})" if params else stats.method


def render(stats: RunStats, every_layer: bool = False) -> Group:
    """The compact report printed on stderr after an answer: one labelled fact per line, then the
    layers (runs of nearly equal layers as one row, each layer its own with `every_layer`)."""
    facts = fact_table()
    kernel = f" ({stats.int8_kernel} kernel)" if stats.int8_kernel else ""  # what multiplied the int8 weights in decode
    numbers = stats.dtype if stats.weights in ("", stats.dtype) else f"{stats.weights} weights{kernel}, {stats.dtype}"
    facts.add_row("model", f"{stats.model} ({numbers})" if numbers else stats.model)
    facts.add_row("method", method_text(stats))
    prompt = Text(f"{stats.prompt_tokens} tokens")
    if stats.dropped_tokens:
        prompt.append(f" ({stats.dropped_tokens} cut from the middle)", style="yellow")
    facts.add_row("prompt", prompt)
    if stats.extra.get("encodings"):  # documents that were not UTF-8, read in the encoding detected
        facts.add_row("encoding", ", ".join(f"{name}: {encoding}" for name, encoding in stats.extra["encodings"].items()))
    facts.add_row("read", _read_line(stats))
    heads = add_kept_rows(facts, stats)
    facts.add_row("memory", f"peak {mib(stats.peak_memory_bytes)} (process); KV peak during prefill {mib(stats.kv_bytes_peak)}")
    rate = stats.decode_tokens_per_s
    facts.add_row(
        "time",
        f"load {stats.load_s:.2f}s  prefill {stats.prefill_s:.2f}s"
        + (f"  first token {stats.ttft_s:.2f}s" if stats.ttft_s is not None else "")
        + (f"  decode {rate:.2f} tokens/s ({stats.decode_tokens} tokens)" if rate else ""),
    )
    if stats.stopped is not None:
        facts.add_row("answer", f"{stats.decode_tokens} tokens, stopped at {'--max-new-tokens' if stats.stopped == 'max_new_tokens' else 'the end of sequence'}")
    return Group(facts, layers_summary(stats.retained_per_layer, stats.layer_windows, every_layer, bool(heads)))


_READS = {
    "query": "query-aware, one pass (the question in the observation window)",
    "chunked": "query-aware, in chunks (the question probes each chunk)",
    "once": "query-aware, the document read once",
    "reindexed": "query-aware, past the context",
    "sections": "summarized by sections, past the context",
    "reused": "question-agnostic prefix, compressed once and reused for each question",
    "saved": "question-agnostic prefix from a saved cache",
    "skim": "skimmed (the documents through the first layers, what the question needs through all)",
}


def _read_line(stats: RunStats) -> str:
    line = _READS.get(stats.read, stats.read)
    if stats.extra.get("scorer") == "repeat":
        rescore = stats.extra.get("rescore")
        weighed = ", each score weighed by how surprising its token was" if stats.extra.get("surprisal") else ""
        line += (f" (ranked by the model repeating it twice, the second time over the {rescore:g}x budget the first kept{weighed})"
                 if rescore else f" (ranked by the model repeating it{weighed})")
    skim = stats.extra.get("skim")
    if skim and skim.get("skipped"):
        line += f" (not skimmed: {skim['skipped']})"
    elif skim:
        line += (f": {skim['prompt_tokens']:,} tokens through {skim['filter_layers']} of {skim['layers']} layers in {skim['filter_s']:.2f}s"
                 + (f" ({skim['filter_chunks']} chunks)" if skim["filter_chunks"] > 1 else "")
                 + f", then {skim['continued_tokens']:,} through all in {skim['read_s']:.2f}s")
    chunks = stats.extra.get("chunks")
    if chunks:
        line += f": {len(chunks)} chunks"
    past = stats.extra.get("past_window")
    if past and past.get("strategy") == "sections":
        line += (
            f": document {past['prompt_tokens']:,} tokens = {past['prompt_tokens'] / past['positions']:.1f}x the "
            f"{past['positions']:,}-position context: {past['sections']} sections of up to {past['section_tokens']:,} tokens summarized "
            f"with {past['section_method']} in {past['sections_s']:.1f}s, then their summaries"
            + (" read whole" if past.get("summaries_read") == "whole" else f" compressed with {past.get('summaries_read')}")
        )
        return line
    if past:
        line += (
            f": document {past['prompt_tokens']:,} tokens = {past['prompt_tokens'] / past['positions']:.1f}x the "
            f"{past['positions']:,}-position context: read in {past['chunks']} chunks, positions re-indexed"
        )
        return line
    prefix = stats.extra.get("prefix")
    if prefix:
        paid = f", read in {prefix['seconds']:.2f}s by this question" if prefix["seconds"] else ", read earlier"
        many = f" for {prefix['questions']} questions" if prefix.get("questions") else ""
        line += f"{many}: prefix {prefix['tokens']} tokens ({mib(prefix['kv_bytes'])} full{paid}); question step {prefix['question_s']:.2f}s"
    return line
