"""The options several commands share, declared once, and the decorator that adds them.

A command lists the groups it takes (`@shared("model", "compression", ...)`) and receives
their values as one `RunOptions` argument named `run`; its own options stay in its
signature. Typer reads the combined signature, so `--help` shows every option as usual.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ..defaults import AGNOSTIC_METHOD, AGNOSTIC_PARAMS, DEFAULT_METHOD, DEFAULT_SKIM_TOKENS

if TYPE_CHECKING:  # torch, imported only when a command runs
    from ..reading import Options

MODEL = "model"
COMPRESSION = "compression"
GENERATION = "generation"
OUTPUT = "output"
SKIM = "skim"

_MODEL_HELP = "Embedded model name, local folder, .gguf file or hub id (`kvcli models` lists them) [default: qwen2.5-coder-0.5b]."

GROUPS: dict[str, list[tuple[str, object, object]]] = {
    MODEL: [
        ("model", Annotated[Optional[str], typer.Option("--model", "-m", envvar="KVCLI_MODEL", metavar="NAME|PATH", help=_MODEL_HELP, show_default=False)], None),
        ("device", Annotated[str, typer.Option("--device", envvar="KVCLI_DEVICE", metavar="auto|cpu|cuda[:N]|mps", help="Where the model runs: auto is CUDA, else an Apple GPU (mps), else the CPU.")], "auto"),
        ("device_map", Annotated[Optional[str], typer.Option("--device-map", envvar="KVCLI_DEVICE_MAP", metavar="auto|balanced|sequential", help="Split a model too large for one GPU over the GPUs, then the CPU's memory, then disk (accelerate); each layer's cache stays on its layer's device.", show_default=False)], None),
        ("dtype", Annotated[str, typer.Option("--dtype", metavar="auto|int8|float32|bfloat16|float16", help="Compute dtype: auto is int8 on a CPU with bfloat16 instructions (int8 weights, bfloat16 compute), float32 on other CPUs, bfloat16 on CUDA, float16 on mps; a .gguf is converted to it.")], "auto"),
        ("threads", Annotated[str, typer.Option("--threads", envvar="KVCLI_THREADS", metavar="auto|N", help="CPU threads: auto prefills on the cores other processes leave free and decodes on at most half the cores, so a busy machine slows decoding instead of stalling it.")], "auto"),
        ("trust_remote_code", Annotated[bool, typer.Option("--trust-remote-code", help="Allow a hub model's own code to run.")], False),
    ],
    COMPRESSION: [
        ("method", Annotated[Optional[str], typer.Option("--method", envvar="KVCLI_METHOD", metavar="NAME", help=f"Compression method (`kvcli methods` lists them and their knobs) [default: {DEFAULT_METHOD}; a question-agnostic cache ranked by the repeat (compress, ask --reuse): {AGNOSTIC_METHOD} with {', '.join(AGNOSTIC_PARAMS)}].", show_default=False)], None),
        ("ratio", Annotated[Optional[float], typer.Option("--ratio", metavar="R", help="Fraction of the prompt's KV entries kept, summed over the layers that compress (sliding-window layers keep their window), in (0, 1] [default: 0.1, at least --min-keep tokens per layer].", show_default=False)], None),
        ("budget", Annotated[Optional[int], typer.Option("--budget", metavar="N", help="Mean tokens kept per layer that compresses, window included (instead of --ratio); in a query-aware read, tokens of the document, the question kept whole beside them.", show_default=False)], None),
        ("min_keep", Annotated[Optional[int], typer.Option("--min-keep", metavar="N", help="Fewest tokens kept per layer under the default ratio (all of a shorter prompt), so short documents answer as the full cache does; with --ratio, only when given; 0: no floor [default: 1024].", show_default=False)], None),
        ("window", Annotated[int, typer.Option("--window", metavar="N", help="Observation window: the prompt's last N tokens score the rest.")], 8),
        ("param", Annotated[Optional[list[str]], typer.Option("--param", metavar="KEY=VALUE", help="A knob of the method, e.g. --param max_multiple=5 for dynamickv (`kvcli methods` lists them); repeatable.", show_default=False)], None),
        ("chunk_size", Annotated[Optional[int], typer.Option("--chunk-size", metavar="N", help="Read the prompt in chunks of N tokens, compressing after each (less memory for long documents).", show_default=False)], None),
        ("max_context", Annotated[Optional[int], typer.Option("--max-context", metavar="N", help="Positions the model reads (prompt plus answer) [default: the model's own]; a longer document is read whole in chunks with re-indexed positions.", show_default=False)], None),
        ("cut_middle", Annotated[bool, typer.Option("--cut-middle", help="Cut the middle of a document longer than --max-context instead of reading it whole.")], False),
    ],
    GENERATION: [
        ("max_new_tokens", Annotated[int, typer.Option("--max-new-tokens", metavar="N", help="Stop after this many generated tokens.")], 256),
        ("temperature", Annotated[float, typer.Option("--temperature", metavar="T", help="Sampling temperature; 0 is greedy.")], 0.0),
        ("top_p", Annotated[float, typer.Option("--top-p", metavar="P", help="Nucleus sampling threshold.")], 1.0),
        ("seed", Annotated[Optional[int], typer.Option("--seed", metavar="N", help="Random seed for sampling.", show_default=False)], None),
        ("system", Annotated[Optional[str], typer.Option("--system", metavar="TEXT", help="A system prompt for the model.", show_default=False)], None),
    ],
    SKIM: [
        ("skim", Annotated[bool, typer.Option("--skim/--no-skim", help="Read the documents through the first layers only and the tokens the question needs through all (a faster prefill; docs/methods.md#skim).")], False),
        ("skim_tokens", Annotated[int, typer.Option("--skim-tokens", metavar="N", help="With --skim: document tokens read through every layer.")], DEFAULT_SKIM_TOKENS),
        ("skim_depth", Annotated[Optional[float], typer.Option("--skim-depth", metavar="F", help="With --skim: the deepest layer the filter reads, as a fraction of the layers [default: the shallowest layer holding a head that finds facts, from the model's retrieval-head profile].", show_default=False)], None),
    ],
    OUTPUT: [
        ("json", Annotated[bool, typer.Option("--json", help="Print one JSON object per result on stdout instead of text and a report.")], False),
        ("quiet", Annotated[bool, typer.Option("--quiet", "-Q", help="No progress, warnings or report on stderr.")], False),
        ("verbose", Annotated[bool, typer.Option("--verbose", help="Show every layer in the report instead of ranges of nearly equal layers (`plan`: every source).")], False),
    ],
}


@dataclass
class RunOptions:
    """The shared options' values; a group a command does not take keeps its defaults."""

    model: str | None = None
    device: str = "auto"
    device_map: str | None = None
    dtype: str = "auto"
    threads: str = "auto"
    trust_remote_code: bool = False
    method: str | None = None  # None: not given (DEFAULT_METHOD, or AGNOSTIC_METHOD for a question-agnostic read)
    ratio: float | None = None
    budget: int | None = None
    min_keep: int | None = None
    window: int = 8
    param: list[str] | None = None
    chunk_size: int | None = None
    max_context: int | None = None
    cut_middle: bool = False
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    system: str | None = None
    skim: bool = False
    skim_tokens: int = DEFAULT_SKIM_TOKENS
    skim_depth: float | None = None
    json: bool = False
    quiet: bool = False
    verbose: bool = False
    given: set[str] = field(default_factory=set)  # the options the user set (not left at their defaults)

    def given_flags(self, *names: str) -> list[str]:
        """The flags of the options `names` that the user set, as typed (`chunk_size`: `--chunk-size`), in that order."""
        return ["--" + name.replace("_", "-") for name in names if name in self.given]

    def make_method(self, agnostic=None):
        """The method with --window and --param applied; a knob it lacks is an error. `agnostic`:
        the question-agnostic default this command reads with (`agnostic_scorer`): where --param
        names its knobs and not the default method's, it reads every way (past the positions too)."""
        from ..errors import BudgetError
        from ..methods import configure

        try:
            return configure([self.method or DEFAULT_METHOD], self.param, self.window)[0]
        except BudgetError:
            if agnostic is None or self.method is not None:
                raise
            return agnostic

    def agnostic_scorer(self, scorer: str | None):
        """`(scorer, agnostic)` of a question-agnostic read (compress, ask --reuse): `--scorer` or
        its default (`pick_scorer`), and the agnostic default method where the repeat ranks
        without --method (`agnostic_method`), else None; checked before anything slow, each
        --param against the method that will read with it."""
        from ..reading.prefix import pick_scorer

        agnostic = self.agnostic_method() if scorer != "instruction" and not self.chunk_size else None
        scorer = pick_scorer(scorer, agnostic or self.make_method(), self.chunk_size)
        return scorer, agnostic if scorer == "repeat" else None

    def agnostic_method(self):
        """The method of a question-agnostic prefix the repeat ranks (`Reused.method_for`), when
        neither --method nor KVCLI_METHOD names one: `AGNOSTIC_METHOD` with `AGNOSTIC_PARAMS`,
        under the user's --param; else None (the named method reads every way)."""
        from ..errors import BudgetError
        from ..methods import configure, parse_params

        if self.method is not None:
            return None
        try:
            method = configure([AGNOSTIC_METHOD], [*AGNOSTIC_PARAMS, *(self.param or [])], self.window)[0]
        except BudgetError as error:
            raise BudgetError(f"{error}; a question-agnostic cache is made by {AGNOSTIC_METHOD} unless --method names another: "
                              "add --method for the knobs of another method") from None
        if method.head_split == "equal" and "head_floor" not in parse_params(self.param or []):
            method = replace(method, head_floor=0.0)  # the default's floor is for its split: the user chose none
        return method

    def options(self) -> Options:
        """How to read and answer, checked (the budget, the chunk size and --max-new-tokens)."""
        from ..generate import Sampling
        from ..methods import Budget
        from ..reading import Options

        from ..errors import InputError

        if self.chunk_size is not None and self.chunk_size < 1:
            raise InputError(f"--chunk-size must be a positive number of tokens, got {self.chunk_size}")
        knobs = self.given_flags("skim_tokens", "skim_depth")
        if knobs and not self.skim:
            raise InputError(f"{' and '.join(knobs)} set how --skim reads; add --skim or drop {' and '.join(knobs)}")
        skim = None
        if self.skim:
            from ..reading.skim import Skimming

            skim = Skimming(tokens=self.skim_tokens, depth=self.skim_depth)
        return Options(
            budget=Budget(self.ratio, self.budget, self.min_keep), chunk_size=self.chunk_size, max_context=self.max_context,
            max_new_tokens=self.max_new_tokens, sampling=Sampling(self.temperature, self.top_p, self.seed),
            system=self.system, fit="cut" if self.cut_middle else "reindex", skim=skim,
        )


def shared(*groups: str, **defaults):
    """Add the options of `groups` to a command, passed to it as `run: RunOptions`.

    `defaults` overrides a shared option's default for this command (e.g. max_new_tokens=400),
    or fixes its value where its group is not taken (inspect generates nothing: max_new_tokens=1).
    """
    entries = [entry for group in groups for entry in GROUPS[group]]

    def decorate(fn):
        signature = inspect.signature(fn, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "run"]
        added = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=defaults.get(name, default), annotation=annotation)
            for name, annotation, default in entries
        ]
        names = [name for name, _, _ in entries]

        fixed = {name: value for name, value in defaults.items() if name not in names}  # for groups not taken

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            values = {name: kwargs.pop(name) for name in names if name in kwargs}
            given = {name for name, value in values.items() if value != defaults.get(name, _default(name))}
            from .. import threads

            with threads.kept():  # --threads holds for this command only (tests run many in one process)
                return fn(*args, **kwargs, run=RunOptions(**fixed, **values, given=given))

        wrapper.__signature__ = signature.replace(parameters=own + added)
        return wrapper

    return decorate


def _default(name: str):
    return next(default for group in GROUPS.values() for entry_name, _, default in group if entry_name == name)
