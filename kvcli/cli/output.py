"""Everything kvcli shows on the terminal: messages, progress bars, the report, errors.

Answers go to stdout; progress, warnings, reports and errors go to stderr. Exit codes:
0 done, 1 a bug (with its traceback), 2 a user error (one line), 3 out of memory,
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import sys
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from ..errors import KvcliError

if TYPE_CHECKING:  # rich.progress is imported when a bar is shown
    from rich.progress import Progress

err = Console(stderr=True, highlight=False)

EXIT_USER_ERROR = 2
EXIT_OUT_OF_MEMORY = 3
EXIT_INTERRUPTED = 130


def say(line: str) -> None:
    """A message on stderr: word-wrapped on a terminal, one line in pipes and logs (so it greps)."""
    err.print(line, markup=False, soft_wrap=not err.is_terminal)


class Screen:
    """What one command run may show on stderr, given --quiet and whether stderr is a terminal."""

    def __init__(self, quiet: bool = False, json_out: bool = False, verbose: bool = False) -> None:
        self.quiet = quiet
        self.json = json_out
        self.verbose = verbose  # the report shows every layer, not ranges of nearly equal ones

    @property
    def show_progress(self) -> bool:
        return not self.quiet and err.is_terminal

    def warn(self, *messages: str) -> None:
        if not self.quiet:
            for message in messages:
                say(f"kvcli: warning: {message}")

    def note(self, message: str) -> None:
        if not self.quiet:
            say(message)

    @contextlib.contextmanager
    def progress(self, label: str, unit: str = "", total: int | None = None):
        """A transient bar on a terminal; yields `update(done, total=None)` (a no-op elsewhere)."""
        if not self.show_progress:
            yield lambda done, total=None: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        # MofN: "3/10", or "0/?" before the total is known
        bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn(unit), TimeElapsedColumn(), console=err, transient=True)
        task = bar.add_task(label, total=total)
        bar.start()
        try:
            yield lambda done, total=None: bar.update(task, completed=done, **({"total": total} if total is not None else {}))
        finally:
            bar.stop()

    @contextlib.contextmanager
    def layers(self, num_layers: int, label: str = "prefill"):
        """One bar over a read; yields the `on_layer(layer_idx)` callback (or None).

        The engine's prefill tells the callback where each chunk starts (`ReadBar.chunk`), so a
        chunked read shows one bar over all its tokens with the chunk and an ETA; a read that
        says nothing of chunks shows its layers."""
        if not self.show_progress:
            yield None
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        bar = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24), TimeElapsedColumn(), TextColumn("ETA"),
                       TimeRemainingColumn(), console=err, transient=True)
        read = ReadBar(bar, num_layers, label)
        bar.start()
        try:
            yield read
        finally:
            bar.stop()

    @contextlib.contextmanager
    def status(self, message: str):
        """A spinner with a message on a terminal; yields `update(message)`."""
        if not self.show_progress:
            yield lambda message: None
            return
        status = err.status(message)
        status.start()
        try:
            yield status.update
        finally:
            status.stop()

    def report(self, stats) -> None:
        if not self.quiet and not self.json:
            from ..stats import render

            err.print(render(stats, every_layer=self.verbose))

    def sources(self, passages, lead: str = "") -> None:
        """The passages an answer drew on (`sources.Passage`), on stderr after the answer: each
        one's document and page or lines in bold, its text indented, the most-attended words
        highlighted. Shown with --quiet too (they were asked for); --json carries them instead."""
        if self.json:
            return
        from rich.text import Text

        if not passages:
            say(f"{lead}no sources: the answer's attention fell on no document text")
            return
        err.print(Text(f"{lead}Sources:", style="bold"))
        for number, passage in enumerate(passages, 1):
            heading = Text(f"{number}. ")
            heading.append(passage.label, style="bold")
            heading.append(f"  ({100 * passage.score:.0f}% of the attention)", style="dim")
            err.print(heading, soft_wrap=not err.is_terminal)
            text = Text(passage.text)
            for start, end in passage.highlights:
                text.stylize("bold yellow", start, end)
            for line in text.split("\n"):
                err.print(Text("   ") + line, soft_wrap=not err.is_terminal)

    def stream(self):
        """The callback that writes the answer to stdout as it comes (None with --json)."""
        if self.json:
            return None

        def write(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        return write

    def end_answer(self) -> None:
        if not self.json:
            sys.stdout.write("\n")
            sys.stdout.flush()


class ReadBar:
    """The `on_layer` callback behind `Screen.layers`: layers done in a read of one pass, or,
    once the prefill names its chunks, tokens done over the whole prompt."""

    def __init__(self, bar: Progress, num_layers: int, label: str) -> None:
        self.bar, self.num_layers, self.label = bar, num_layers, label
        self.task = bar.add_task(f"{label} 0/{num_layers} layers", total=num_layers)
        self.where: tuple[int, int, int, int, int] | None = None  # (index, count, start, stop, prompt_len) of the chunk being fed

    def chunk(self, index: int, count: int, start: int, stop: int, prompt_len: int) -> None:
        """The prefill is about to feed tokens start..stop of `prompt_len`, chunk `index` of `count` (from 0)."""
        self.where = (index, count, start, stop, prompt_len)
        self._show(start)
        self.bar.refresh()  # every chunk is seen, however fast the read

    def __call__(self, layer_idx: int) -> None:
        if self.where is None:
            self.bar.update(self.task, completed=layer_idx + 1, description=f"{self.label} {layer_idx + 1}/{self.num_layers} layers")
            return
        _, _, start, stop, _ = self.where
        self._show(start + (stop - start) * (layer_idx + 1) // self.num_layers)

    def _show(self, done: int) -> None:
        index, count, _, _, prompt_len = self.where
        text = f"{self.label} {done:,}/{prompt_len:,} tokens" + (f", chunk {index + 1} of {count}" if count > 1 else "")
        self.bar.update(self.task, completed=done, total=prompt_len, description=text)


def print_json(data: dict) -> None:
    print(json.dumps(data, ensure_ascii=False))


def user_errors(fn):
    """Turn user mistakes into one line on stderr and a non-zero exit; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KvcliError as exc:
            say(f"kvcli: error: {exc}")
            raise typer.Exit(exc.exit_code) from None
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            say(f"kvcli: error: {out_of_memory(exc)}")
            raise typer.Exit(EXIT_OUT_OF_MEMORY) from None
        except KeyboardInterrupt:
            interrupted()
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


def interrupted() -> None:
    """Say that Ctrl-C stopped kvcli, after what stdout already holds (the answer so far)."""
    sys.stdout.flush()
    err.print("\nkvcli: interrupted", markup=False)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is a failed allocation: Python's, torch's on a GPU, or torch's CPU allocator's
    (a plain RuntimeError). torch is not imported for this: where it is not loaded, it allocated nothing."""
    torch = sys.modules.get("torch")
    if isinstance(exc, MemoryError) or (torch is not None and isinstance(exc, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def out_of_memory(exc: BaseException) -> str:
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
