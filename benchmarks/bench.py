"""Prefill, decode speed, KV bytes and peak memory of kvcli's methods against `model.generate`, in one run.

Every number is read against baselines measured in the same run (kvcli's full cache,
transformers' `model.generate` with its default cache, and the copy bandwidth of this
machine), so the ratios mean something on a busy machine where absolute times do not.

Each configuration (prompt length x method x ratio) runs in its own spawned process: the
model is loaded and warmed up, the process's peak resident size is reset
(`/proc/self/clear_refs`), and the configuration is measured, so its peak is its own and not
the load's or an earlier configuration's. See docs/bench.md for what each column means.

    python benchmarks/bench.py --model smollm2-135m --lengths 500 --new-tokens 8 --threads 1
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field

# The prose the prompts are made of: CPython's reference documentation (PSF License).
START_TOPIC = "assignment"
# Targets this benchmark reports against (docs/bench.md).
PREFILL_OVERHEAD_MAX = 1.10  # dynamickv prefill / full prefill
TARGET_RATIO = 0.05  # the ratio the decode targets are stated at
DECODE_VS_GENERATE_MIN = 2.0  # dynamickv@TARGET_RATIO decode / generate decode
DECODE_VS_BOUND_MIN = 0.5  # dynamickv@TARGET_RATIO decode / bandwidth bound
FULL_VS_GENERATE_MIN = 1.0  # kvcli full decode / generate decode
KV_TOLERANCE = 0.02  # kept KV bytes vs ratio x full bytes
COPY_BYTES = 256 << 20  # far larger than any last-level cache
# glibc keeps freed blocks below a threshold that it raises as large blocks are freed, so a
# process that prunes its cache layer by layer keeps their memory resident: with this fixed
# threshold every tensor buffer is its own mapping, returned on free, and RSS follows live tensors.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
GENERATE = "generate"


@dataclass(frozen=True)
class Config:
    """One measured configuration; `method` is a kvcli method name or `generate`."""

    length: int
    method: str
    ratio: float | None = None  # None: the method keeps the full cache

    @property
    def label(self) -> str:
        return self.method if self.ratio is None else f"{self.method}@{self.ratio:g}"


@dataclass(frozen=True)
class Settings:
    """What every configuration shares."""

    model: str
    new_tokens: int
    threads: int
    repeats: int


@dataclass
class Row:
    """What one configuration measured; the ratios against baselines are filled in by the parent."""

    length: int
    method: str
    ratio: float | None
    prefill_s: float | None = None  # kvcli: prefill with scoring and selection; generate: None (not separable)
    ttft_s: float | None = None  # prompt in -> first new token out
    decode_tokens_per_s: float | None = None  # over new_tokens - 1 steps, prefill excluded
    kv_bytes_kept: int | None = None  # after the prompt, before decoding
    kv_bytes_full: int | None = None  # what the full cache holds for this prompt
    weight_bytes: int | None = None  # bytes of weights read per decode step
    matvec_tokens_per_s: float | None = None  # decode rate if a step were only its weight products
    peak_rss_bytes: int | None = None  # the process's peak resident size while measuring
    peak_added_bytes: int | None = None  # that peak above the resident size after load and warm-up
    peak_source: str = ""  # how the peak was measured
    seconds: float | None = None  # wall time of the child process, load included
    error: str | None = None
    derived: dict = field(default_factory=dict)  # ratios and verdicts (parent)


# --- prompts and machine measurements ---------------------------------------------------------


def prose_ids(tokenizer, n_tokens: int):
    """Exactly `n_tokens` token ids `(1, n_tokens)` of real English reference prose."""
    import torch
    from pydoc_data.topics import topics

    names = sorted(topics)
    names = names[names.index(START_TOPIC) :] + names[: names.index(START_TOPIC)]
    text = "\n\n".join(topics[name] for name in names)
    chars = 8 * n_tokens  # English prose runs about 4 characters a token; tokenize only what is needed
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) > n_tokens or chars >= len(text):
            break
        chars *= 2
    if len(ids) < n_tokens:
        raise ValueError(f"the prose corpus has only {len(ids)} tokens; ask for --lengths up to that")
    return torch.tensor([ids[:n_tokens]])


def copy_bandwidth_gb_s(n_bytes: int = COPY_BYTES, repeats: int = 5) -> float:
    """Best-of copy bandwidth, counting bytes read plus bytes written (STREAM's convention)."""
    import torch

    src = torch.ones(n_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page once, so page faults are not timed
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - started)
    return 2 * n_bytes / best / 1e9


def weight_bytes_per_step(model) -> int:
    """Bytes of weights one decode step reads: every parameter once, less an untied input embedding.

    An input embedding only has one row gathered per step; when it is tied to the output
    head it is read whole by the head, and counted once.
    """
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if param.data_ptr() in seen:
            continue
        seen.add(param.data_ptr())
        total += param.numel() * param.element_size()
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None or head.weight.data_ptr() != embed.data_ptr():
        total -= embed.numel() * embed.element_size()
    return total


def matvec_tokens_per_s(model, repeats: int = 7) -> float:
    """Tokens/s if a decode step did nothing but its weight products, with this machine's kernels.

    One `(1, in) x (in, out)` product per linear layer (the output head included), best of
    `repeats` passes: the ceiling a decode step reaches with no attention, norms, Python or
    cache work, to read beside the bandwidth bound (which assumes the products run at copy speed).
    """
    import torch

    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(1, w.shape[1], dtype=w.dtype, device=w.device) for w in weights]
    best = math.inf
    with torch.inference_mode():
        for i in range(repeats + 1):  # the first pass warms the kernels and is not counted
            started = time.perf_counter()
            for w, x in zip(weights, inputs):
                torch.nn.functional.linear(x, w)
            if i:
                best = min(best, time.perf_counter() - started)
    return 1.0 / best


def reset_peak_rss() -> str:
    """Reset the process's peak resident size to its current size, if the kernel allows it."""
    import torch

    from kvcli.stats import reset_peak_memory

    return "VmHWM after reset" if reset_peak_memory(torch.device("cpu")) else "ru_maxrss (not reset: includes the load)"


def peak_rss_bytes() -> int:
    import torch

    from kvcli.stats import peak_memory_bytes

    return peak_memory_bytes(torch.device("cpu"))


def current_rss_bytes() -> int:
    import torch

    from kvcli.stats import current_memory_bytes

    return current_memory_bytes(torch.device("cpu"))


# --- one configuration, in a child process ----------------------------------------------------


class _TokenClock:
    """A `generate` streamer that timestamps each new token (its first `put` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _decode_rate(times: list[float]) -> float | None:
    """Tokens per second over the steps after the first token, which comes from the prefill."""
    steps = len(times) - 1
    return steps / (times[-1] - times[0]) if steps > 0 and times[-1] > times[0] else None


def measure_kvcli(reader, ids, compression, new_tokens: int) -> dict:
    """One kvcli prefill (compression included; None keeps the full cache) and `new_tokens`
    greedy decode steps, EOS ignored."""
    from kvcli.generate import decode, prefill

    started = time.perf_counter()
    state = prefill(reader.model, ids, compression)
    prefill_s = time.perf_counter() - started
    kv_bytes_kept = state.cache.nbytes()
    kv_bytes_full = state.cache.full_nbytes(ids.shape[1])
    times = []
    for _ in decode(reader.model, state, new_tokens, set()):
        times.append(time.perf_counter())
    return {"prefill_s": prefill_s, "ttft_s": times[0] - started, "decode_tokens_per_s": _decode_rate(times), "kv_bytes_kept": kv_bytes_kept,
            "kv_bytes_full": kv_bytes_full}


def measure_generate(reader, ids, new_tokens: int) -> dict:
    """`model.generate` with SDPA attention and its default cache, greedy, exactly `new_tokens` tokens."""
    import torch

    from kvcli.generate import prepare_model

    model = reader.model
    pad = reader.tokenizer.pad_token_id
    clock = _TokenClock()
    model.set_attn_implementation("sdpa")
    try:
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=pad if pad is not None else 0,
                streamer=clock,
                return_dict_in_generate=True,
            )
    finally:
        prepare_model(model)
    if len(clock.times) != new_tokens:
        raise RuntimeError(f"generate produced {len(clock.times)} tokens, expected {new_tokens}")
    # The default cache after generating holds prompt + new_tokens - 1 entries per layer.
    cache = out.cache
    held = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size() for layer in cache.layers)
    kv_bytes_kept = held * ids.shape[1] // cache.get_seq_length()
    return {"prefill_s": None, "ttft_s": clock.times[0] - started, "decode_tokens_per_s": _decode_rate(clock.times), "kv_bytes_kept": kv_bytes_kept,
            "kv_bytes_full": kv_bytes_kept}


def _best(runs: list[dict]) -> dict:
    """Best of repeated runs: least time, most tokens per second."""
    best = dict(runs[0])
    for key, pick in (("prefill_s", min), ("ttft_s", min), ("decode_tokens_per_s", max)):
        values = [run[key] for run in runs if run[key] is not None]
        best[key] = pick(values) if values else None
    return best


def run_config(config: Config, settings: Settings) -> Row:
    """Load the model, warm up, reset the peak, measure `config`: the body of one child process."""
    started = time.perf_counter()
    import torch
    from transformers.utils import logging as hf_logging

    from kvcli.methods import Budget, make_method
    from kvcli.models import load_model
    from kvcli.reading import Reader

    hf_logging.disable_progress_bar()  # a bar per child would bury the benchmark's own progress
    torch.set_num_threads(settings.threads)
    reader = Reader(load_model(settings.model, device="cpu"))
    model = reader.model
    limit = reader.max_positions
    if config.length + settings.new_tokens > limit:
        raise ValueError(f"{config.length} + {settings.new_tokens} tokens exceed {settings.model}'s {limit} positions")
    ids = prose_ids(reader.tokenizer, config.length)

    if config.method == GENERATE:
        def measure(prompt):
            return measure_generate(reader, prompt, settings.new_tokens)

        def warm(prompt):
            return measure_generate(reader, prompt, 4)
    else:
        method = make_method(config.method)
        compression = None  # a method that keeps every token, or no ratio: the full cache
        if method.compresses and config.ratio is not None:
            compression, _ = reader.compression(method, Budget(ratio=config.ratio), config.length)

        def measure(prompt):
            return measure_kvcli(reader, prompt, compression, settings.new_tokens)

        def warm(prompt):
            small, _ = reader.compression(method, Budget(tokens=2 * method.window_size), prompt.shape[1])
            return measure_kvcli(reader, prompt, small, 4)

    # First calls pay for lazy initialisation (kernels, allocator pools, mask functions).
    warm(ids[:, :64])
    matvec = matvec_tokens_per_s(model)
    gc.collect()
    source = reset_peak_rss()
    resident = current_rss_bytes()
    runs = [measure(ids) for _ in range(settings.repeats)]
    peak = peak_rss_bytes()
    result = _best(runs)
    return Row(
        length=config.length,
        method=config.method,
        ratio=config.ratio,
        prefill_s=result["prefill_s"],
        ttft_s=result["ttft_s"],
        decode_tokens_per_s=result["decode_tokens_per_s"],
        kv_bytes_kept=result["kv_bytes_kept"],
        kv_bytes_full=result["kv_bytes_full"],  # from the cache's tensors
        weight_bytes=weight_bytes_per_step(model),
        matvec_tokens_per_s=matvec,
        peak_rss_bytes=peak,
        peak_added_bytes=peak - resident,
        peak_source=source,
        seconds=time.perf_counter() - started,
    )


def run_isolated(config: Config, settings: Settings) -> Row:
    """`run_config` in a fresh spawned process: its peak memory is its own, and a crash is one row."""
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    try:
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            return pool.submit(run_config, config, settings).result()
    except Exception as err:  # the child's exception, or BrokenProcessPool if it was killed
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return Row(length=config.length, method=config.method, ratio=config.ratio, error=message, seconds=time.perf_counter() - started)


# --- ratios and verdicts ------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def derive(rows: list[Row], bandwidth_gb_s: float, new_tokens: int) -> list[dict]:
    """Fill in each row's ratios against the same run's baselines; return the target checks."""
    checks = []
    by_key = {(row.length, row.method, row.ratio): row for row in rows if row.error is None}
    for row in rows:
        if row.error is not None:
            continue
        full = by_key.get((row.length, "full", None))
        generate = by_key.get((row.length, GENERATE, None))
        # KV read per step, averaged over the decode: the kept entries plus half the new ones.
        kv_mean = row.kv_bytes_kept + row.kv_bytes_full / row.length * (new_tokens - 1) / 2
        bound = bandwidth_gb_s * 1e9 / (row.weight_bytes + kv_mean)
        d = row.derived
        d["bound_tokens_per_s"] = bound
        d["decode_vs_bound"] = _ratio(row.decode_tokens_per_s, bound)
        d["matvec_vs_bound"] = _ratio(row.matvec_tokens_per_s, bound)
        d["decode_vs_matvec"] = _ratio(row.decode_tokens_per_s, row.matvec_tokens_per_s)
        d["decode_vs_generate"] = _ratio(row.decode_tokens_per_s, generate.decode_tokens_per_s) if generate else None
        d["ttft_vs_generate"] = _ratio(row.ttft_s, generate.ttft_s) if generate else None
        d["prefill_vs_full"] = _ratio(row.prefill_s, full.prefill_s) if full else None
        d["peak_vs_full"] = _ratio(row.peak_added_bytes, full.peak_added_bytes) if full else None
        d["kv_vs_target"] = _ratio(row.kv_bytes_kept, row.ratio * row.kv_bytes_full) if row.ratio is not None else None

        def check(name: str, key: str, op: str, threshold: float) -> None:
            value = d[key]
            if value is None:
                return
            # margin: how far from failing, relative to the threshold (negative fails)
            if op in ("<", "<="):
                margin = (threshold - value) / threshold
            elif op == ">=":
                margin = (value - threshold) / threshold
            else:  # "within": |value - 1| <= threshold
                margin = threshold - abs(value - 1)
            passed = margin > 0 if op == "<" else margin >= 0
            d.setdefault("verdicts", {})[key] = passed
            checks.append({
                "target": name, "length": row.length, "method": row.method, "ratio": row.ratio,
                "value": value, "op": op, "threshold": threshold, "margin": margin, "passed": passed,
            })

        if row.method == "dynamickv":
            check(f"dynamickv prefill <= {PREFILL_OVERHEAD_MAX:g}x full", "prefill_vs_full", "<=", PREFILL_OVERHEAD_MAX)
            check("dynamickv peak memory < full", "peak_vs_full", "<", 1.0)
            if row.ratio is not None and math.isclose(row.ratio, TARGET_RATIO):
                check(f"dynamickv@{TARGET_RATIO:g} decode >= {DECODE_VS_GENERATE_MIN:g}x generate", "decode_vs_generate", ">=", DECODE_VS_GENERATE_MIN)
                check(f"dynamickv@{TARGET_RATIO:g} decode >= {DECODE_VS_BOUND_MIN:g}x bandwidth bound", "decode_vs_bound", ">=", DECODE_VS_BOUND_MIN)
        if row.method == "full":
            check(f"kvcli full decode >= {FULL_VS_GENERATE_MIN:g}x generate", "decode_vs_generate", ">=", FULL_VS_GENERATE_MIN)
        if row.ratio is not None:
            check(f"KV bytes kept within {KV_TOLERANCE:.0%} of ratio x full", "kv_vs_target", "within", KV_TOLERANCE)
    return checks


# --- output -------------------------------------------------------------------------------------


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _times(row: Row, key: str) -> str:
    """A ratio as `1.03x`, with a tick or cross when a target applies to it."""
    value = row.derived.get(key)
    if value is None:
        return "-"
    verdict = row.derived.get("verdicts", {}).get(key)
    mark = "" if verdict is None else (" [green]ok[/green]" if verdict else " [red]FAIL[/red]")
    return f"{value:.2f}x{mark}"


def render(result: dict, rows: list[Row]):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    meta = result["machine"]
    head = Text(
        f"{result['model']} | {result['threads']} thread(s) | {result['new_tokens']} new tokens | "
        f"copy bandwidth {result['bandwidth_gb_s']:.1f} GB/s | torch {meta['torch']} | transformers {meta['transformers']}"
    )
    table = Table(show_edge=False, pad_edge=False)
    for name, justify in [
        ("tokens", "right"), ("method", "left"), ("prefill s", "right"), ("ttft s", "right"), ("decode tok/s", "right"),
        ("bound tok/s", "right"), ("matvec tok/s", "right"), ("KV MiB", "right"), ("peak +MiB", "right"), ("prefill/full", "right"), ("decode/generate", "right"),
        ("decode/bound", "right"), ("decode/matvec", "right"), ("KV/target", "right"), ("peak/full", "right"),
    ]:
        table.add_column(name, justify=justify)
    for row in rows:
        label = Config(row.length, row.method, row.ratio).label
        if row.error is not None:
            table.add_row(str(row.length), label, f"[red]error: {row.error}[/red]", *[""] * 12)
            continue
        table.add_row(
            str(row.length), label, _num(row.prefill_s, ".2f"), _num(row.ttft_s, ".2f"), _num(row.decode_tokens_per_s, ".2f"),
            _num(row.derived.get("bound_tokens_per_s"), ".1f"), _num(row.matvec_tokens_per_s, ".1f"), _num(row.kv_bytes_kept / 2**20, ",.1f"), _num(row.peak_added_bytes / 2**20, ",.0f"),
            _times(row, "prefill_vs_full"), _times(row, "decode_vs_generate"), _times(row, "decode_vs_bound"), _times(row, "decode_vs_matvec"),
            _times(row, "kv_vs_target"), _times(row, "peak_vs_full"),
        )
    summary = Table(title="targets", show_edge=False, pad_edge=False)
    summary.add_column("target")
    summary.add_column("passed", justify="right")
    summary.add_column("worst", justify="right")
    for name in dict.fromkeys(check["target"] for check in result["checks"]):
        checks = [c for c in result["checks"] if c["target"] == name]
        passed = sum(c["passed"] for c in checks)
        worst = min(checks, key=lambda c: c["margin"])
        where = f"{worst['length']} tokens, {Config(worst['length'], worst['method'], worst['ratio']).label}"
        style = "green" if passed == len(checks) else "red"
        summary.add_row(name, f"[{style}]{passed}/{len(checks)}[/{style}]", f"{worst['value']:.2f}x ({where})")
    return Group(head, table, Text(""), summary)


# --- command line -------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="embedded name, checkpoint folder, .gguf or hub id (default: kvcli's default model)")
    parser.add_argument("--lengths", type=_ints, default=[1000, 2000, 4000, 7000], help="prompt lengths in tokens (default 1000,2000,4000,7000)")
    parser.add_argument("--ratios", type=_floats, default=[0.02, 0.05, 0.1, 0.2], help="fractions of the KV kept (default 0.02,0.05,0.1,0.2)")
    parser.add_argument("--methods", default="full,snapkv,dynamickv", help="kvcli methods; generate is always measured as the baseline")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per configuration, EOS ignored (default 64)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's default here)")
    parser.add_argument("--repeats", type=int, default=1, help="measure each configuration this many times and keep the best timings")
    parser.add_argument("--json", metavar="OUT", default=None, help="also write the results as JSON to OUT")
    args = parser.parse_args(argv)
    from kvcli.methods import REGISTRY
    from kvcli.models import DEFAULT_MODEL

    args.model = args.model or os.environ.get("KVCLI_MODEL") or DEFAULT_MODEL
    args.methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    unknown = [name for name in args.methods if name not in REGISTRY and name != GENERATE]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(REGISTRY)}")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the decode rate is measured after the first token)")
    if not args.lengths or min(args.lengths) < 64:
        parser.error("--lengths must be prompt lengths of at least 64 tokens")
    if any(not 0 < ratio <= 1 for ratio in args.ratios):
        parser.error("--ratios must be in (0, 1]")
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be at least 1")
    return args


def configs(args: argparse.Namespace) -> list[Config]:
    from kvcli.methods import REGISTRY

    out = []
    for length in args.lengths:
        out.append(Config(length, GENERATE))
        for name in args.methods:
            if name == GENERATE:
                continue
            if REGISTRY[name].compresses:
                out.extend(Config(length, name, ratio) for ratio in args.ratios)
            else:
                out.append(Config(length, name))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import transformers
    from rich.console import Console

    err = Console(stderr=True, highlight=False)
    for key, value in MALLOC_ENV.items():
        os.environ.setdefault(key, value)  # read by each spawned child's allocator at start
    settings = Settings(model=args.model, new_tokens=args.new_tokens, threads=args.threads, repeats=args.repeats)
    torch.set_num_threads(args.threads)
    bandwidth = copy_bandwidth_gb_s()
    err.print(f"copy bandwidth {bandwidth:.1f} GB/s ({args.threads} thread(s))")
    todo = configs(args)
    rows = []
    for i, config in enumerate(todo, 1):
        row = run_isolated(config, settings)
        rows.append(row)
        status = f"[red]{row.error}[/red]" if row.error else f"{row.seconds:.0f} s"
        err.print(f"[{i}/{len(todo)}] {config.length} tokens {config.label}: {status}")
    # Measured again at the end: the bound uses the better of the two (least disturbed) figures.
    bandwidth = max(bandwidth, copy_bandwidth_gb_s())
    checks = derive(rows, bandwidth, args.new_tokens)
    result = {
        "model": args.model,
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "malloc_env": {key: os.environ.get(key) for key in MALLOC_ENV},
        "bandwidth_gb_s": bandwidth,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__},
        "rows": [asdict(row) for row in rows],
        "checks": checks,
    }
    out = Console(highlight=False)
    if not out.is_terminal:
        out.width = max(out.width, 180)  # a file or pipe gets whole rows, not wrapped cells
    out.print(render(result, rows))
    if args.json:
        from kvcli.atomic import write_atomic

        write_atomic(args.json, json.dumps(result, indent=2) + "\n")
    return 1 if any(row.error for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
