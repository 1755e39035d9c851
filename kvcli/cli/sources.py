"""`--sources [N]` on `ask`, `chat` and `batch`: the option, its optional number, and citing an answer.

Click gives an option either a value or none; `--sources` takes an optional one, so a command
that has it parses its arguments through `SourcesCommand`, which puts the default count after a
`--sources` that no number follows (`kvcli ask doc.pdf "q" --sources` is `--sources 3`).
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from typer.core import TyperCommand

from ..defaults import DEFAULT_SOURCES
from ..errors import InputError

FLAG = "--sources"

SourcesOpt = Annotated[Optional[int], typer.Option(
    FLAG, metavar="[N]", show_default=False,
    help=f"After the answer, the N passages it drew on (default {DEFAULT_SOURCES} when no number follows): each "
         "document and page or lines, and the text, the most-attended words highlighted; ranked by the attention "
         "the model's retrieval heads paid while answering (docs/methods.md#sources).")]


def with_default_count(args: list[str], flag: str = FLAG, default: int = DEFAULT_SOURCES) -> list[str]:
    """`args` with `default` put after each `flag` that no number follows (up to a `--`)."""
    out: list[str] = []
    for index, arg in enumerate(args):
        if arg == "--":
            return out + args[index:]
        out.append(arg)
        if arg == flag and not (index + 1 < len(args) and args[index + 1].lstrip("-").isdigit()):
            out.append(str(default))
    return out


class SourcesCommand(TyperCommand):
    """A command with `--sources [N]`: its number may be left out."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, with_default_count(list(args)))


def check_count(count: int | None) -> None:
    """Refuse a count of passages below one."""
    if count is not None and count < 1:
        raise InputError(f"--sources takes the number of passages to show, at least 1; got {count}")


__all__ = ["SourcesCommand", "SourcesOpt", "check_count", "with_default_count"]
