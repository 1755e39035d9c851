"""The `kvcli` command line: the only package that prints.

One module per command (or pair of commands); `options.py` declares the shared options
once, `output.py` owns the terminal (messages, progress, reports, exit codes), and
`session.py` holds the steps every model-running command takes.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from .. import __version__, heap
from .ask import ask, summarize
from .batch import batch
from .chat import chat
from .compress import compress
from .evaluate import eval_
from .info import methods, models
from .inspect import inspect
from .plan import plan
from .read import read
from .sources import SourcesCommand
from .output import EXIT_INTERRUPTED, EXIT_OUT_OF_MEMORY, EXIT_USER_ERROR

__all__ = ["EXIT_INTERRUPTED", "EXIT_OUT_OF_MEMORY", "EXIT_USER_ERROR", "app", "main"]

HELP = """Ask questions about long documents on a local LLM whose KV cache is compressed.

The default method is evidencekv, kvcli's own: DynamicKV's idea (arXiv 2412.14838) of sharing
evidence across layers, taken one step further; dynamickv (the paper's method) and four others are
one --method away (`kvcli methods`).

Environment: KVCLI_MODEL (--model), KVCLI_METHOD (--method), KVCLI_DEVICE (--device),
KVCLI_DEVICE_MAP (--device-map), KVCLI_THREADS (--threads), and KVCLI_HOME (where converted
models and profiles are kept, default ~/.cache/kvcli).
Exit codes: 0 done, 1 a bug, 2 a user error, 3 out of memory, 130 interrupted.
"""

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
for command in (ask, summarize, chat, read, compress, inspect, batch, methods, models):
    # `--sources [N]` (ask, chat, batch): its number may be left out
    app.command(cls=SourcesCommand if command in (ask, chat, batch) else None)(command)
app.command("eval")(eval_)
app.command()(plan)


def _version(value: bool) -> None:
    if value:
        print(f"kvcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", "-V", callback=_version, is_eager=True, help="Show the version and exit.")] = False) -> None:
    logging.basicConfig(level=logging.ERROR, format="kvcli: %(message)s")
    readable_arguments()


def readable_arguments() -> None:
    """Typer prints an argument's Python type after its metavar (`PATHS... <list[str]>`); kvcli's
    metavars already say what goes there, so the type is left out where a metavar is set.

    A patch, for want of a hook: typer.main builds every TyperArgument itself (no `cls=` for
    arguments, as commands have), and both help formatters call `display_type_rich`."""
    from typer.core import TyperArgument

    if getattr(TyperArgument, "_kvcli_readable", False):
        return
    shown = TyperArgument.display_type_rich
    TyperArgument.display_type_rich = lambda self, ctx: "" if self.metavar else shown(self, ctx)
    TyperArgument._kvcli_readable = True


def main() -> None:
    heap.tune()  # freed activation buffers reused while reading (kvcli/heap.py)
    app()
