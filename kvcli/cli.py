"""The `kvcli` command line: the only module that prints.

Answers go to stdout; progress, warnings, the report and errors go to stderr.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import time
from dataclasses import dataclass
from typing import Annotated, Optional

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from . import __version__
from .errors import BudgetError, InputError, KvcliError
from .generate import Sampling
from .methods import DEFAULT_METHOD, REGISTRY, apply_params, make_method, parse_params
from .stats import RunStats, peak_memory_bytes, render, reset_peak_memory

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Ask questions about long documents on a local LLM whose KV cache DynamicKV compresses.",
)
err = Console(stderr=True, highlight=False)
log = logging.getLogger("kvcli")

EXIT_INTERRUPTED = 130

# Options shared by the commands that run the model.
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", envvar="KVCLI_MODEL", help="Embedded model name, local folder, .gguf file or hub id [default: qwen2.5-coder-0.5b].")]
MethodOpt = Annotated[str, typer.Option("--method", help="Compression method (see `kvcli methods`).")]
RatioOpt = Annotated[Optional[float], typer.Option("--ratio", help="Fraction of the prompt's KV entries kept, summed over layers, in (0, 1] [default: 0.1].")]
BudgetOpt = Annotated[Optional[int], typer.Option("--budget", help="Mean tokens kept per layer, window included (instead of --ratio).")]
WindowOpt = Annotated[int, typer.Option("--window", help="Observation window: the prompt's last N tokens score the rest.")]
KernelOpt = Annotated[int, typer.Option("--kernel-size", help="Pooling kernel over neighbouring tokens' scores.")]
PoolingOpt = Annotated[str, typer.Option("--pooling", help="avg or max pooling of scores.")]
MaxMultipleOpt = Annotated[float, typer.Option("--max-multiple", help="DynamicKV: a layer may hold up to this multiple of the mean budget.")]
MinMultipleOpt = Annotated[float, typer.Option("--min-multiple", help="DynamicKV: every layer keeps at least this multiple of the mean budget.")]
PeriodOpt = Annotated[int, typer.Option("--period", help="DynamicKV: re-divide the budget every N layers (and at the last).")]
ParamOpt = Annotated[Optional[list[str]], typer.Option("--param", help="A method knob as KEY=VALUE, e.g. --param beta=20 (see `kvcli methods`); repeatable.")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", help="Stop after this many generated tokens.")]
TempOpt = Annotated[float, typer.Option("--temperature", help="Sampling temperature; 0 is greedy.")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling threshold.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed for sampling.")]
MaxContextOpt = Annotated[Optional[int], typer.Option("--max-context", help="Longest prompt in tokens; longer documents are cut in the middle [default: the model's limit].")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16 or float16.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of streaming text and a report.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-Q", help="No progress or report on stderr.")]
RemoteOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow a hub model's own code to run.")]


def _say(line: str) -> None:
    """A message on stderr: word-wrapped on a terminal, one line in pipes and logs (so it greps)."""
    err.print(line, markup=False, soft_wrap=not err.is_terminal)


def user_errors(fn):
    """Turn user mistakes into one line on stderr and a non-zero exit; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KvcliError as exc:
            _say(f"kvcli: error: {exc}")
            raise typer.Exit(exc.exit_code) from None
        except (torch.OutOfMemoryError, MemoryError) as exc:
            _say(f"kvcli: error: {_out_of_memory(exc)}")
            raise typer.Exit(3) from None
        except RuntimeError as exc:
            if "can't allocate memory" not in str(exc):  # torch's CPU allocator fails with a plain RuntimeError
                raise
            _say(f"kvcli: error: {_out_of_memory(exc)}")
            raise typer.Exit(3) from None
        except KeyboardInterrupt:
            sys.stdout.flush()
            err.print("\nkvcli: interrupted", markup=False)
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


def _out_of_memory(exc: BaseException) -> str:
    """One line for a failed allocation: how much was asked for, when torch says, and what to lower."""
    text = str(exc)
    needed = ""
    if match := re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", text):  # CUDA
        needed = f" (tried to allocate {match.group(1)})"
    elif match := re.search(r"tried to allocate (\d+) bytes", text):  # CPU
        needed = f" (tried to allocate {int(match.group(1)) / 2**30:.2f} GiB)"
    return (
        f"out of memory{needed}; try a lower --ratio, --chunk-size 1024 (reads the prompt in pieces, "
        "compressing after each), a shorter --max-context or a smaller model"
    )


@dataclass
class Settings:
    """Everything a run needs besides the documents and the question."""

    model: str | None
    method: str
    ratio: float | None
    budget: int | None
    window: int
    kernel_size: int
    pooling: str
    max_multiple: float
    min_multiple: float
    period: int
    params: list[str] | None
    chunk_size: int | None
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    max_context: int | None
    device: str
    dtype: str
    json: bool
    quiet: bool
    trust_remote_code: bool

    def make_method(self):
        if self.ratio is not None and self.budget is not None:
            raise BudgetError("give --ratio or --budget, not both")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise BudgetError(f"--ratio must be in (0, 1], got {self.ratio}")
        if self.budget is not None and self.budget <= self.window:
            raise BudgetError(f"--budget {self.budget} is not larger than the observation window ({self.window} tokens); use --budget {self.window + 1} or more, or a smaller --window")
        if self.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        return self.build_method(self.method)

    def build_method(self, name: str):
        """Method `name` with the common knobs, then any --param KEY=VALUE that it has."""
        method = make_method(
            name,
            window_size=self.window,
            kernel_size=self.kernel_size,
            pooling=self.pooling,
            max_multiple=self.max_multiple,
            min_multiple=self.min_multiple,
            period=self.period,
        )
        return apply_params(method, parse_params(self.params or []), strict=True)

    @property
    def show_progress(self) -> bool:
        return not self.quiet and err.is_terminal


def _load(settings: Settings):
    from .models import load_model
    from .pipeline import Engine

    status = None
    if settings.show_progress:
        status = err.status("loading model")
        status.start()
    try:
        lm = load_model(
            settings.model,
            device=settings.device,
            dtype=settings.dtype,
            trust_remote_code=settings.trust_remote_code,
            progress=(lambda msg: status.update(msg)) if status else None,
        )
    finally:
        if status:
            status.stop()
    engine = Engine(lm)
    reset_peak_memory(lm.device)  # the peak reported is the run's, not the load's
    return engine


def _read(files: list[str], settings: Settings):
    from .ingest import read_documents

    if not files:
        raise InputError("no documents given; pass files, folders or - for stdin before the question")
    progress = None
    bar = None
    if settings.show_progress:
        bar = Progress(TextColumn("reading"), BarColumn(), TextColumn("{task.completed}/{task.total} files"), console=err, transient=True)
        task = bar.add_task("reading", total=None)
        bar.start()
        progress = lambda done, total: bar.update(task, completed=done, total=total)  # noqa: E731
    try:
        doc = read_documents(files, progress=progress)
    finally:
        if bar:
            bar.stop()
    _warn(settings, *doc.warnings)
    return doc


def _warn(settings: Settings, *messages: str) -> None:
    if not settings.quiet:
        for message in messages:
            _say(f"kvcli: warning: {message}")


def _options(settings: Settings):
    from .pipeline import Options

    if settings.chunk_size is not None and settings.chunk_size < 2 * settings.window:
        raise InputError(f"--chunk-size must be at least twice the window ({2 * settings.window} tokens), got {settings.chunk_size}")
    return Options(
        ratio=settings.ratio, budget=settings.budget, chunk_size=settings.chunk_size, max_context=settings.max_context,
        max_new_tokens=settings.max_new_tokens, sampling=Sampling(settings.temperature, settings.top_p, settings.seed),
    )


def _reading(engine, settings: Settings, prompt):
    """Warnings about the prompt's length, and a layer progress bar for its prefill."""
    limit = engine.context_limit(_options(settings))
    if prompt.dropped_tokens:
        _warn(settings, f"the documents are {prompt.dropped_tokens} tokens longer than the {limit}-token context; cut from the middle (head and tail kept); pass --max-context to change the limit")
    if len(prompt) > engine.max_positions:
        _warn(settings, f"the {len(prompt)}-token prompt is beyond the model's trained context ({engine.max_positions}); answers may degrade")


class _LayerBar:
    """A progress bar over layers during prefill, on a terminal only."""

    def __init__(self, settings: Settings, num_layers: int, label: str = "prefill") -> None:
        self.progress = None
        if settings.show_progress:
            self.progress = Progress(TextColumn(label), BarColumn(), TextColumn("layer {task.completed}/{task.total}"), TimeElapsedColumn(), console=err, transient=True)
            self.task = self.progress.add_task(label, total=num_layers)

    def __enter__(self):
        if self.progress:
            self.progress.start()
            return lambda layer: self.progress.update(self.task, completed=layer + 1)
        return None

    def __exit__(self, *exc):
        if self.progress:
            self.progress.stop()


def _emit(settings: Settings, question: str, answer: str, stats: RunStats) -> None:
    if settings.json:
        print(json.dumps({"question": question, "answer": answer, "stats": stats.to_dict()}, ensure_ascii=False))
    elif not settings.quiet:
        err.print(render(stats))


def _stream(settings: Settings):
    if settings.json:
        return None

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    return write


def _finish_line(settings: Settings) -> None:
    if not settings.json:
        sys.stdout.write("\n")
        sys.stdout.flush()


def _run_questions(files: list[str], questions: list[str], settings: Settings, cache_path: str | None = None, reuse: bool = False) -> None:
    """Answer each question: query-aware by default, or from one compressed prefix (--reuse, --cache)."""
    if cache_path and files:
        raise InputError("give documents or --cache, not both")
    method = settings.make_method()
    options = _options(settings)
    doc = None if cache_path else _read(files, settings)
    engine = _load(settings)
    prefix = None
    if cache_path:
        from .pipeline import Prefix
        from .store import load_cache

        saved = load_cache(cache_path, engine.lm.config_hash, engine.lm.name, device=engine.lm.device, dtype=engine.lm.dtype)
        method = make_method(saved.meta["method"], **saved.meta.get("method_params", {}))
        ignored = [flag for flag, given in (
            ("--method", settings.method != DEFAULT_METHOD), ("--ratio", settings.ratio is not None),
            ("--budget", settings.budget is not None), ("--chunk-size", settings.chunk_size is not None),
        ) if given]
        if ignored:
            _warn(settings, f"{', '.join(ignored)} ignored: {cache_path} was compressed with {method.name} when it was saved")
        prefix = Prefix.saved(saved.cache, saved.prompt_tokens, saved.meta.get("note", ""), saved.meta.get("window_text", ""))
    elif reuse:
        with _LayerBar(settings, engine.num_layers, "compress") as callback:
            prompt, prefix = engine.compress_prefix(doc.text, method, options, layer_callback=callback)
        _reading(engine, settings, prompt)
    for question in questions:
        started = time.perf_counter()
        if prefix is not None:
            state = engine.answer_after(prefix, question)
            stats = engine.stats(method, state, prefix.note, prefix.window)
            stats.extra["prefix"] = prefix.source
        else:
            prompt = engine.prompt(doc.text, question, options)
            _reading(engine, settings, prompt)
            probe = prompt.ids[:, prompt.prefix_len :] if options.chunk_size else None
            with _LayerBar(settings, engine.num_layers) as callback:
                state, note = engine.read(prompt.ids, method, options, probe_ids=probe, layer_callback=callback)
            stats = engine.stats(method, state, note, engine.window_text(prompt, method, state), prompt.dropped_tokens)
        try:
            answer = engine.generate(state, options, stats, started, on_text=_stream(settings))
        finally:
            _finish_line(settings)
        _emit(settings, question, answer, stats)


CacheOpt = Annotated[Optional[str], typer.Option("--cache", help="Answer from a cache saved by `kvcli compress` instead of reading documents.")]
ReuseOpt = Annotated[bool, typer.Option("--reuse", help="Compress the documents once (question-agnostic: cheaper, but keeps specific facts less well) and answer every question from that cache.")]
ChunkOpt = Annotated[Optional[int], typer.Option("--chunk-size", help="Read the prompt in chunks of N tokens, compressing after each (less memory for long documents).")]


def _make_settings(**kwargs) -> Settings:
    return Settings(**kwargs)


@app.command()
@user_errors
def ask(
    args: Annotated[Optional[list[str]], typer.Argument(help="Files, folders or - (stdin), then the question (unless -q is used).", show_default=False, metavar="PATHS... QUESTION")] = None,
    question: Annotated[Optional[list[str]], typer.Option("--question", "-q", help="A question; repeat for several (then every argument is a document).")] = None,
    cache: CacheOpt = None,
    reuse: ReuseOpt = False,
    model: ModelOpt = None,
    method: MethodOpt = DEFAULT_METHOD,
    ratio: RatioOpt = None,
    budget: BudgetOpt = None,
    window: WindowOpt = 8,
    kernel_size: KernelOpt = 7,
    pooling: PoolingOpt = "avg",
    max_multiple: MaxMultipleOpt = 10.0,
    min_multiple: MinMultipleOpt = 0.1,
    period: PeriodOpt = 4,
    param: ParamOpt = None,
    chunk_size: ChunkOpt = None,
    max_new_tokens: MaxNewOpt = 256,
    temperature: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
    max_context: MaxContextOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    trust_remote_code: RemoteOpt = False,
) -> None:
    """Answer a question about documents, streaming the answer; report what the cache kept on stderr.

    Examples: kvcli ask report.pdf "What did the audit find?" --ratio 0.05;
    kvcli ask src/ -q "Where is the retry logic?" -q "What are its limits?" --reuse;
    kvcli ask --cache report.kvc "Who signed it?"
    """
    args = list(args or [])
    if question:
        files, questions = args, list(question)
    elif cache:
        if not args:
            raise InputError(f'give the question in quotes: kvcli ask --cache {cache} "question"')
        files, questions = [], args
    else:
        if len(args) < 2:
            raise InputError('give the documents, then the question in quotes: kvcli ask FILE "question"')
        files, questions = list(args[:-1]), [args[-1]]
    if cache and question and args:
        raise InputError("with --cache, give no documents: the cache already holds them")
    for q in questions:
        if not q.strip():
            raise InputError("the question is empty; pass a question in quotes after the files")
    settings = _make_settings(
        model=model, method=method, ratio=ratio, budget=budget, window=window, kernel_size=kernel_size,
        pooling=pooling, max_multiple=max_multiple, min_multiple=min_multiple, period=period, params=param, chunk_size=chunk_size,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
        max_context=max_context, device=device, dtype=dtype, json=json_out, quiet=quiet,
        trust_remote_code=trust_remote_code,
    )
    _run_questions(files, questions, settings, cache_path=cache, reuse=reuse)


@app.command()
@user_errors
def summarize(
    files: Annotated[Optional[list[str]], typer.Argument(help="Files, folders or - (stdin).", show_default=False)] = None,
    length: Annotated[str, typer.Option("--length", help="short, medium or long.")] = "medium",
    focus: Annotated[Optional[str], typer.Option("--focus", help="What the summary should concentrate on.")] = None,
    cache: CacheOpt = None,
    model: ModelOpt = None,
    method: MethodOpt = DEFAULT_METHOD,
    ratio: RatioOpt = None,
    budget: BudgetOpt = None,
    window: WindowOpt = 8,
    kernel_size: KernelOpt = 7,
    pooling: PoolingOpt = "avg",
    max_multiple: MaxMultipleOpt = 10.0,
    min_multiple: MinMultipleOpt = 0.1,
    period: PeriodOpt = 4,
    param: ParamOpt = None,
    chunk_size: ChunkOpt = None,
    max_new_tokens: MaxNewOpt = 400,
    temperature: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
    max_context: MaxContextOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    trust_remote_code: RemoteOpt = False,
) -> None:
    """Summarize documents, streaming the summary; report what the cache kept on stderr.

    Examples: kvcli summarize paper.pdf --length short; kvcli summarize --cache paper.kvc
    """
    from .prompt import summary_instruction

    instruction = summary_instruction(length, focus)
    if not files and not cache:
        raise InputError("give the documents to summarize, or --cache FILE.kvc")
    settings = _make_settings(
        model=model, method=method, ratio=ratio, budget=budget, window=window, kernel_size=kernel_size,
        pooling=pooling, max_multiple=max_multiple, min_multiple=min_multiple, period=period, params=param, chunk_size=chunk_size,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
        max_context=max_context, device=device, dtype=dtype, json=json_out, quiet=quiet,
        trust_remote_code=trust_remote_code,
    )
    _run_questions(list(files or []), [instruction], settings, cache_path=cache)


@app.command()
@user_errors
def compress(
    files: Annotated[list[str], typer.Argument(help="Files, folders or - (stdin).", show_default=False)],
    output: Annotated[str, typer.Option("--output", "-o", help="The .kvc file to write.", show_default=False)],
    model: ModelOpt = None,
    method: MethodOpt = DEFAULT_METHOD,
    ratio: RatioOpt = None,
    budget: BudgetOpt = None,
    window: WindowOpt = 8,
    kernel_size: KernelOpt = 7,
    pooling: PoolingOpt = "avg",
    max_multiple: MaxMultipleOpt = 10.0,
    min_multiple: MinMultipleOpt = 0.1,
    period: PeriodOpt = 4,
    param: ParamOpt = None,
    chunk_size: ChunkOpt = None,
    max_context: MaxContextOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    trust_remote_code: RemoteOpt = False,
) -> None:
    """Compress documents once and save the cache, to answer many questions later with --cache.

    The cache is question-agnostic: a generic instruction fills the observation window, so it
    keeps specific facts far less well than `kvcli ask` does (docs/results.md); it suits
    summaries and broad questions. Example: kvcli compress report.pdf -o report.kvc --ratio 0.2
    """
    from pathlib import Path

    from .store import save_cache

    target = Path(output)
    if target.suffix != ".kvc":
        raise InputError(f"--output {output} should end in .kvc")
    if not target.parent.exists():
        raise InputError(f"folder {target.parent} does not exist; create it or choose another --output")
    settings = _make_settings(
        model=model, method=method, ratio=ratio, budget=budget, window=window, kernel_size=kernel_size,
        pooling=pooling, max_multiple=max_multiple, min_multiple=min_multiple, period=period, params=param, chunk_size=chunk_size,
        max_new_tokens=1, temperature=0.0, top_p=1.0, seed=None,
        max_context=max_context, device=device, dtype=dtype, json=json_out, quiet=quiet,
        trust_remote_code=trust_remote_code,
    )
    method_obj = settings.make_method()
    options = _options(settings)
    doc = _read(list(files), settings)
    engine = _load(settings)
    with _LayerBar(settings, engine.num_layers, "compress") as callback:
        prompt, prefix = engine.compress_prefix(doc.text, method_obj, options, layer_callback=callback)
    _reading(engine, settings, prompt)
    stats = engine.stats(method_obj, prefix.state, prefix.note, prefix.window, prompt.dropped_tokens)
    stats.peak_memory_bytes = peak_memory_bytes(engine.lm.device)
    meta = {
        "kvcli_version": __version__,
        "model": engine.lm.name,
        "config_hash": engine.lm.config_hash,
        "dtype": str(engine.lm.dtype).removeprefix("torch."),
        "method": method_obj.name,
        "method_params": method_obj.params(),
        "prompt_tokens": prompt.prefix_len,
        "note": prefix.note,
        "window_text": prefix.window,
        "retained_per_layer": stats.retained_per_layer,
        "sources": [{"name": s.name, "page": s.page, "sha256": s.sha256} for s in doc.sources],
    }
    written = save_cache(target, prefix.state.cache, meta)
    stats.extra["file_bytes"] = written
    if settings.json:
        print(json.dumps({"output": str(target), "stats": stats.to_dict()}, ensure_ascii=False))
    elif not settings.quiet:
        err.print(render(stats))
        err.print(f"saved {target} ({written / 2**20:.1f} MiB); ask with: kvcli ask --cache {target} \"question\"", markup=False)


@app.command()
@user_errors
def inspect(
    files: Annotated[list[str], typer.Argument(help="Files, folders or - (stdin).", show_default=False)],
    layers: Annotated[bool, typer.Option("--layers", help="Show kept tokens per layer and where they fall in the documents (the default view).")] = True,
    question: Annotated[Optional[str], typer.Option("--question", "-q", help="The question to compress for [default: the summary instruction].")] = None,
    buckets: Annotated[int, typer.Option("--buckets", help="Position buckets for a single document without pages or files.")] = 10,
    plot: Annotated[Optional[str], typer.Option("--plot", help="Also draw the profile (bars per layer, heat map over the document) to FILE.png or FILE.svg; needs kvcli[plot].", show_default=False)] = None,
    model: ModelOpt = None,
    method: MethodOpt = DEFAULT_METHOD,
    ratio: RatioOpt = None,
    budget: BudgetOpt = None,
    window: WindowOpt = 8,
    kernel_size: KernelOpt = 7,
    pooling: PoolingOpt = "avg",
    max_multiple: MaxMultipleOpt = 10.0,
    min_multiple: MinMultipleOpt = 0.1,
    period: PeriodOpt = 4,
    param: ParamOpt = None,
    chunk_size: ChunkOpt = None,
    max_context: MaxContextOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    trust_remote_code: RemoteOpt = False,
) -> None:
    """Run the prefill and compression without generating; show the retention profile.

    Example: kvcli inspect --layers paper.pdf --question "What dataset did they use?"
    """
    from .inspect import render_profile, retention_profile
    from .prompt import summary_instruction

    if question is not None and not question.strip():
        raise InputError("the question is empty; pass a question in quotes")
    if buckets < 1:
        raise InputError(f"--buckets must be at least 1, got {buckets}")
    if plot is not None:
        from .plot import check_target

        plot_target = check_target(plot)  # before the model runs, so a typo costs nothing
    settings = _make_settings(
        model=model, method=method, ratio=ratio, budget=budget, window=window, kernel_size=kernel_size,
        pooling=pooling, max_multiple=max_multiple, min_multiple=min_multiple, period=period, params=param, chunk_size=chunk_size,
        max_new_tokens=1, temperature=0.0, top_p=1.0, seed=None,
        max_context=max_context, device=device, dtype=dtype, json=json_out, quiet=quiet,
        trust_remote_code=trust_remote_code,
    )
    method_obj = settings.make_method()
    options = _options(settings)
    doc = _read(list(files), settings)
    engine = _load(settings)
    prompt = engine.prompt(doc.text, question or summary_instruction(), options)
    _reading(engine, settings, prompt)
    probe = prompt.ids[:, prompt.prefix_len :] if options.chunk_size else None
    with _LayerBar(settings, engine.num_layers) as callback:
        state, note = engine.read(prompt.ids, method_obj, options, probe_ids=probe, layer_callback=callback)
    stats = engine.stats(method_obj, state, note, engine.window_text(prompt, method_obj, state), prompt.dropped_tokens)
    stats.peak_memory_bytes = peak_memory_bytes(engine.lm.device)
    profile = retention_profile(state.cache, prompt, doc, buckets=buckets)
    if plot is not None:
        from .inspect import position_map
        from .plot import save_retention_plot

        save_retention_plot(plot_target, position_map(state.cache, prompt, doc), stats)
        if not settings.quiet:
            err.print(f"wrote {plot_target}", markup=False)
    if settings.json:
        print(json.dumps({"stats": stats.to_dict(), "profile": profile.to_dict()}, ensure_ascii=False))
        return
    console = Console(highlight=False)
    console.print(render(stats))
    console.print(render_profile(profile))


@app.command()
def methods(json_out: JsonOpt = False) -> None:
    """List the compression methods, their parameters with defaults, and their papers."""
    rows = []
    for name, cls in REGISTRY.items():
        inst = cls()
        rows.append({"name": name, "summary": cls.summary, "paper": cls.paper, "params": inst.params()})
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    console = Console(highlight=False)
    for row in rows:
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items()) or "-"
        default = " (default)" if row["name"] == DEFAULT_METHOD else ""
        console.print(f"[bold]{row['name']}[/bold]{default}: {row['summary']}")
        console.print(f"  parameters: {params}")
        if row["paper"]:
            console.print(f"  paper: {row['paper']}")


def _split_list(option: str, value: str | None, kind: type) -> list | None:
    """'32,64,128' as [32, 64, 128]; None stays None."""
    if value is None:
        return None
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise InputError(f"{option} is empty; give comma-separated values")
    try:
        return [kind(item) for item in items]
    except ValueError:
        raise InputError(f"{option} must be comma-separated {'integers' if kind is int else 'numbers'}, got {value!r}") from None


NIAH_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
NIAH_QUESTION = "What is the best thing to do in San Francisco?"
NIAH_ANSWER = "Dolores Park"


@app.command("eval")
@user_errors
def eval_(
    data: Annotated[Optional[str], typer.Option("--data", help="LongBench-style JSONL: context, input, answers, optional _id.", show_default=False)] = None,
    metric: Annotated[Optional[str], typer.Option("--metric", help="contains, qa_f1, rouge_l or choice [default: qa_f1; contains with --niah].", show_default=False)] = None,
    methods_list: Annotated[str, typer.Option("--methods", help="Comma-separated methods, or all (every registered method).")] = "all",
    budgets: Annotated[Optional[str], typer.Option("--budgets", help="Comma-separated mean tokens kept per layer [default: 32,64,128,256].", show_default=False)] = None,
    ratios: Annotated[Optional[str], typer.Option("--ratios", help="Comma-separated fractions of the KV cache kept (instead of --budgets).", show_default=False)] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N rows.", show_default=False)] = None,
    template: Annotated[Optional[str], typer.Option("--template", help="User message with {context} and {input}, e.g. LongBench's per-dataset prompt.", show_default=False)] = None,
    json_path: Annotated[Optional[str], typer.Option("--json", help="Write the results as JSON to this file; OUT.partial.jsonl beside it logs samples as they finish, so a rerun resumes.", show_default=False)] = None,
    niah: Annotated[bool, typer.Option("--niah", help="Needle in a haystack instead of --data: a length x depth grid.")] = False,
    haystack: Annotated[Optional[str], typer.Option("--haystack", help="NIAH: a text file or folder of text files to hide the needle in.", show_default=False)] = None,
    needle: Annotated[str, typer.Option("--needle", help="NIAH: the sentence to hide.")] = NIAH_NEEDLE,
    niah_question: Annotated[str, typer.Option("--question", help="NIAH: the question about the needle.")] = NIAH_QUESTION,
    answer: Annotated[str, typer.Option("--answer", help="NIAH: the text a correct answer contains.")] = NIAH_ANSWER,
    lengths: Annotated[str, typer.Option("--lengths", help="NIAH: comma-separated prompt lengths in model tokens.")] = "1000,2000,4000,7000",
    depths: Annotated[str, typer.Option("--depths", help="NIAH: comma-separated needle depths, 0 (start) to 1 (end).")] = "0,0.25,0.5,0.75,1",
    modes: Annotated[str, typer.Option("--modes", help="How each prompt is read, comma-separated to compare: query (the question in the window), reuse (as ask --reuse and saved caches), chunked (as ask --chunk-size).")] = "query",
    chunk_size: Annotated[Optional[int], typer.Option("--chunk-size", help="Chunk length in tokens for --modes chunked [default: 1024].", show_default=False)] = None,
    model: ModelOpt = None,
    window: WindowOpt = 8,
    kernel_size: KernelOpt = 7,
    pooling: PoolingOpt = "avg",
    max_multiple: MaxMultipleOpt = 10.0,
    min_multiple: MinMultipleOpt = 0.1,
    period: PeriodOpt = 4,
    param: ParamOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Stop each answer after this many tokens (raise it for summaries).")] = 64,
    max_context: MaxContextOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quiet: QuietOpt = False,
    trust_remote_code: RemoteOpt = False,
) -> None:
    """Score compression methods on a dataset or a needle-in-a-haystack grid; print mean scores per method x budget.

    Each sample is read once (one prefill) and every method x budget is derived from it, then
    answered greedily. Examples: kvcli eval --data qasper.jsonl --metric qa_f1 --limit 50 --json qasper.json;
    kvcli eval --niah --haystack samples/ --methods full,snapkv,dynamickv --budgets 64,128
    """
    from pathlib import Path

    from .evaluate import get_metric, log_path, niah_rows, read_rows, render, run_eval, settings_for, write_json

    if haystack and not niah:
        raise InputError("--haystack is for --niah runs; add --niah or drop --haystack")
    if niah == (data is not None):
        raise InputError("give --data FILE.jsonl or --niah (with --haystack), not both" if niah else "give --data FILE.jsonl or --niah --haystack PATH")
    metric = metric or ("contains" if niah else "qa_f1")
    get_metric(metric)
    budget_values = _split_list("--budgets", budgets, int)
    ratio_values = _split_list("--ratios", ratios, float)
    if budget_values is not None and ratio_values is not None:
        raise BudgetError("give --budgets or --ratios, not both")
    if budget_values is None and ratio_values is None:
        budget_values = [32, 64, 128, 256]
    names = [name.strip() for name in methods_list.split(",") if name.strip()]
    if not names:
        raise InputError("--methods is empty; give comma-separated method names or all")
    if names == ["all"]:
        names = list(REGISTRY)
    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    out = Path(json_path) if json_path else None
    if out is not None and not out.parent.exists():
        raise InputError(f"folder {out.parent} does not exist; create it or choose another --json")
    settings = _make_settings(
        model=model, method="", ratio=None, budget=None, window=window, kernel_size=kernel_size,
        pooling=pooling, max_multiple=max_multiple, min_multiple=min_multiple, period=period, params=param, chunk_size=None,
        max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, seed=None,
        max_context=max_context, device=device, dtype=dtype, json=False, quiet=quiet,
        trust_remote_code=trust_remote_code,
    )
    method_objs = [settings.build_method(name) for name in names]
    if param and not any(apply_params(settings.build_method(n), parse_params(param), strict=False) for n in names):
        raise BudgetError("no method in --methods has the knobs given with --param")
    mode_names = _split_list("--modes", modes, str)
    if chunk_size is not None and "chunked" not in mode_names:
        raise InputError("--chunk-size is for --modes chunked; add chunked to --modes or drop --chunk-size")
    if "chunked" in mode_names and chunk_size is None:
        chunk_size = 1024
    settings_for(method_objs, budget_values, ratio_values, mode_names, chunk_size)  # bad settings fail before the model loads
    if niah:
        if not haystack:
            raise InputError("--niah needs --haystack PATH (a text file or a folder of text files)")
        length_values = _split_list("--lengths", lengths, int)
        depth_values = _split_list("--depths", depths, float)
        hay = _read([haystack], settings)
        engine = _load(settings)
        rows = niah_rows(hay.text, needle, niah_question, answer, length_values, depth_values, engine.tokenizer)[:limit]
    else:
        rows = read_rows(data, limit=limit)
        engine = _load(settings)

    bar = None
    progress = None
    if settings.show_progress:
        bar = Progress(TextColumn("eval"), BarColumn(), TextColumn("{task.completed}/{task.total} samples"), TimeElapsedColumn(), console=err, transient=True)
        task = bar.add_task("eval", total=None)
        bar.start()
        progress = lambda done, total: bar.update(task, completed=done, total=total)  # noqa: E731
    try:
        result = run_eval(
            engine, rows, method_objs, budget_values, ratio_values, metric, max_new_tokens,
            log_path(out) if out else None, progress, template=template, max_context=max_context,
            modes=mode_names, chunk_size=chunk_size,
        )
    finally:
        if bar:
            bar.stop()
    if out is not None:
        write_json(out, result)
    Console(highlight=False).print(render(result))
    if not settings.quiet:
        timing = result.timing
        if timing["resumed_samples"]:
            err.print(f"{timing['resumed_samples']} samples taken from {log_path(out)}", markup=False)
        err.print(
            f"prefill {timing['capture_s']:.1f}s for {len(timing['rows'])} rows; derive {timing['derive_s']:.1f}s, "
            f"decode {timing['decode_s']:.1f}s for {len(result.samples) - timing['resumed_samples']} samples",
            markup=False,
        )
        if out is not None:
            err.print(f"wrote {out}", markup=False)


def _version(value: bool) -> None:
    if value:
        print(f"kvcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = False) -> None:
    logging.basicConfig(level=logging.ERROR, format="kvcli: %(message)s")
    # transformers' own progress bars and advice would interleave with the answer's report.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _return_freed_memory() -> None:
    """Ask glibc to give large freed buffers back to the system at once.

    Compression frees each layer's full KV right after its attention; with glibc's default
    thresholds those buffers stay resident, so the process's memory would not show the saving.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, 128 * 1024)
    except (OSError, AttributeError):
        pass


def main() -> None:
    _return_freed_memory()
    app()
