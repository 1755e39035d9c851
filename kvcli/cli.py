"""The `kvcli` command line: the only module that prints.

Answers go to stdout; progress, warnings, the report and errors go to stderr.
"""

from __future__ import annotations

import functools
import json
import logging
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
from .generate import Prefill, Sampling, decode, prefill
from .methods import DEFAULT_METHOD, REGISTRY, make_method, plan_budget
from .stats import RunStats, peak_memory_bytes, render

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


def user_errors(fn):
    """Turn user mistakes into one line on stderr and a non-zero exit; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KvcliError as exc:
            err.print(f"kvcli: error: {exc}", markup=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except torch.OutOfMemoryError as exc:
            err.print(f"kvcli: error: out of memory ({str(exc).splitlines()[0]}); try a lower --ratio, a shorter --max-context or a smaller model", markup=False, soft_wrap=True)
            raise typer.Exit(3) from None
        except MemoryError:
            err.print("kvcli: error: out of memory; try a lower --ratio, a shorter --max-context or a smaller model", markup=False)
            raise typer.Exit(3) from None
        except KeyboardInterrupt:
            sys.stdout.flush()
            err.print("\nkvcli: interrupted", markup=False)
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


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
        return make_method(
            self.method,
            window_size=self.window,
            kernel_size=self.kernel_size,
            pooling=self.pooling,
            max_multiple=self.max_multiple,
            min_multiple=self.min_multiple,
            period=self.period,
        )

    @property
    def show_progress(self) -> bool:
        return not self.quiet and err.is_terminal


def _layer_progress(settings: Settings, num_layers: int):
    """A progress bar over layers during prefill (only on a terminal)."""
    if not settings.show_progress:
        return None, None
    progress = Progress(TextColumn("prefill"), BarColumn(), TextColumn("layer {task.completed}/{task.total}"), TimeElapsedColumn(), console=err, transient=True)
    task = progress.add_task("prefill", total=num_layers)
    return progress, lambda layer: progress.update(task, completed=layer + 1)


@dataclass
class Loaded:
    """A model plus its tokenizer, as the commands use them."""

    lm: object  # models.LoadedModel

    @property
    def model(self):
        return self.lm.model

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 32768)

    @property
    def eos_ids(self) -> set[int]:
        ids = set()
        for source in (self.model.generation_config, self.model.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid >= 0 and tid != getattr(self.tokenizer, "unk_token_id", None):
                ids.add(tid)
        return ids


def _load(settings: Settings) -> Loaded:
    from .models import load_model

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
    return Loaded(lm)


def _read(files: list[str], settings: Settings):
    from .ingest import read_documents

    if not files:
        raise InputError("no documents given; pass files, folders or - for stdin before the question")
    doc = read_documents(files)
    if not settings.quiet:
        for warning in doc.warnings:
            err.print(f"kvcli: warning: {warning}", markup=False, soft_wrap=True)
    return doc


def _prefill(loaded: Loaded, prompt, method, settings: Settings) -> tuple[Prefill, RunStats]:
    from .cache import KVShape
    from .prompt import window_text

    config = loaded.model.config
    num_layers = config.num_hidden_layers
    plan = None
    note = ""
    if method.compresses:
        plan = plan_budget(len(prompt), num_layers, window_size=method.window_size, ratio=settings.ratio, budget=settings.budget)
        if plan is None:
            note = f"the {len(prompt)}-token prompt already fits the budget"
    else:
        note = "method full keeps every token"
    progress, callback = _layer_progress(settings, num_layers)
    if progress:
        progress.start()
    try:
        state = prefill(loaded.model, prompt.ids.to(loaded.lm.device), method, plan, layer_callback=callback)
    finally:
        if progress:
            progress.stop()
    shape = KVShape.of(config, loaded.lm.dtype)
    retained = state.cache.retained_per_layer()
    stats = RunStats(
        model=loaded.lm.name,
        method=method.name,
        method_params=method.params(),
        ratio=sum(retained) / (num_layers * len(prompt)),
        budget=sum(retained) / num_layers,
        prompt_tokens=len(prompt),
        compressed=state.compressed,
        note=note,
        window_text=window_text(loaded.tokenizer, prompt, method.window_size) if state.compressed else "",
        retained_per_layer=retained,
        kv_bytes_full=shape.bytes_for(len(prompt)),
        kv_bytes_kept=state.cache.nbytes(),
        peak_memory_bytes=0,
        load_s=loaded.lm.load_s,
        prefill_s=state.seconds,
        dropped_tokens=prompt.dropped_tokens,
    )
    return state, stats


def _answer(loaded: Loaded, doc, question: str, settings: Settings, method) -> tuple[str, RunStats]:
    """Prefill, then stream the answer (unless --json); return it with the run's stats."""
    from .prompt import build_prompt

    max_context = min(settings.max_context or loaded.max_positions, loaded.max_positions)
    reserve = min(settings.max_new_tokens, max_context // 4)
    prompt = build_prompt(loaded.tokenizer, doc.text, question, max_context, reserve=reserve)
    if prompt.dropped_tokens and not settings.quiet:
        err.print(f"kvcli: warning: the documents are {prompt.dropped_tokens} tokens longer than the {max_context}-token context; cut from the middle (head and tail kept); raise --max-context if the model allows", markup=False, soft_wrap=True)
    started = time.perf_counter()
    state, stats = _prefill(loaded, prompt, method, settings)
    tokens: list[int] = []
    shown = ""
    first_at = None
    decode_started = None
    sampling = Sampling(settings.temperature, settings.top_p, settings.seed)
    try:
        for token in decode(loaded.model, state, settings.max_new_tokens, loaded.eos_ids, sampling):
            now = time.perf_counter()
            if first_at is None:
                first_at = now
                decode_started = now
            tokens.append(token)
            if not settings.json:
                text = loaded.tokenizer.decode(tokens, skip_special_tokens=True)
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    sys.stdout.write(text[len(shown):])
                    sys.stdout.flush()
                    shown = text
    except KeyboardInterrupt:
        if not settings.json:
            sys.stdout.write("\n")
        raise
    finished = time.perf_counter()
    answer = loaded.tokenizer.decode(tokens, skip_special_tokens=True)
    if not settings.json:
        sys.stdout.write(answer[len(shown):] + "\n")
        sys.stdout.flush()
    stats.ttft_s = (first_at - started) if first_at else None
    stats.decode_tokens = len(tokens)
    stats.decode_s = (finished - decode_started) if decode_started else 0.0
    stats.peak_memory_bytes = peak_memory_bytes(loaded.lm.device)
    return answer.strip(), stats


def _settings(**kwargs) -> Settings:
    return Settings(**kwargs)


def _run_questions(files: list[str], questions: list[str], settings: Settings) -> None:
    method = settings.make_method()
    doc = _read(files, settings)
    loaded = _load(settings)
    for question in questions:
        answer, stats = _answer(loaded, doc, question, settings, method)
        if settings.json:
            print(json.dumps({"question": question, "answer": answer, "stats": stats.to_dict()}, ensure_ascii=False))
        elif not settings.quiet:
            err.print(render(stats))


@app.command()
@user_errors
def ask(
    args: Annotated[list[str], typer.Argument(help="Files, folders or - (stdin), then the question (unless -q is used).", show_default=False)],
    question: Annotated[Optional[list[str]], typer.Option("--question", "-q", help="A question; repeat for several (then every argument is a document).")] = None,
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

    Example: kvcli ask report.pdf "What did the audit find?" --ratio 0.05
    """
    if question:
        files, questions = list(args), list(question)
    else:
        if len(args) < 2:
            raise InputError('give the documents, then the question in quotes: kvcli ask FILE "question"')
        files, questions = list(args[:-1]), [args[-1]]
    for q in questions:
        if not q.strip():
            raise InputError("the question is empty; pass a question in quotes after the files")
    settings = _settings(
        model=model, method=method, ratio=ratio, budget=budget, window=window, kernel_size=kernel_size,
        pooling=pooling, max_multiple=max_multiple, min_multiple=min_multiple, period=period,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
        max_context=max_context, device=device, dtype=dtype, json=json_out, quiet=quiet,
        trust_remote_code=trust_remote_code,
    )
    _run_questions(files, questions, settings)


@app.command()
@user_errors
def summarize(
    files: Annotated[list[str], typer.Argument(help="Files, folders or - (stdin).", show_default=False)],
    length: Annotated[str, typer.Option("--length", help="short, medium or long.")] = "medium",
    focus: Annotated[Optional[str], typer.Option("--focus", help="What the summary should concentrate on.")] = None,
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

    Example: kvcli summarize paper.pdf --length short
    """
    from .prompt import summary_instruction

    instruction = summary_instruction(length, focus)
    settings = _settings(
        model=model, method=method, ratio=ratio, budget=budget, window=window, kernel_size=kernel_size,
        pooling=pooling, max_multiple=max_multiple, min_multiple=min_multiple, period=period,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
        max_context=max_context, device=device, dtype=dtype, json=json_out, quiet=quiet,
        trust_remote_code=trust_remote_code,
    )
    _run_questions(list(files), [instruction], settings)


@app.command()
@user_errors
def inspect(
    files: Annotated[list[str], typer.Argument(help="Files, folders or - (stdin).", show_default=False)],
    layers: Annotated[bool, typer.Option("--layers", help="Show kept tokens per layer and where they fall in the documents.")] = True,
    question: Annotated[Optional[str], typer.Option("--question", "-q", help="The question to compress for [default: the summary instruction].")] = None,
    buckets: Annotated[int, typer.Option("--buckets", help="Position buckets for a single document without pages or files.")] = 10,
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
    from .inspect import retention_profile, render_profile
    from .prompt import build_prompt, summary_instruction

    if question is not None and not question.strip():
        raise InputError("the question is empty; pass a question in quotes")
    if buckets < 1:
        raise InputError(f"--buckets must be at least 1, got {buckets}")
    settings = _settings(
        model=model, method=method, ratio=ratio, budget=budget, window=window, kernel_size=kernel_size,
        pooling=pooling, max_multiple=max_multiple, min_multiple=min_multiple, period=period,
        max_new_tokens=1, temperature=0.0, top_p=1.0, seed=None,
        max_context=max_context, device=device, dtype=dtype, json=json_out, quiet=quiet,
        trust_remote_code=trust_remote_code,
    )
    method_obj = settings.make_method()
    doc = _read(list(files), settings)
    loaded = _load(settings)
    max_context = min(settings.max_context or loaded.max_positions, loaded.max_positions)
    prompt = build_prompt(loaded.tokenizer, doc.text, question or summary_instruction(), max_context)
    state, stats = _prefill(loaded, prompt, method_obj, settings)
    stats.peak_memory_bytes = peak_memory_bytes(loaded.lm.device)
    profile = retention_profile(state.cache, prompt, doc, buckets=buckets)
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


def _version(value: bool) -> None:
    if value:
        print(f"kvcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = False) -> None:
    logging.basicConfig(level=logging.ERROR, format="kvcli: %(message)s")


def main() -> None:
    app()
