"""Checking and compiling the user's include and exclude globs (the rules: `kvcli.ingest`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pathspec

from ..errors import InputError
from .log import one_line


@dataclass(frozen=True)
class Filters:
    """The compiled include and exclude globs; None where the user gave none."""

    include: pathspec.GitIgnoreSpec | None = None
    exclude: pathspec.GitIgnoreSpec | None = None


def compile_globs(globs: Sequence[str], option: str) -> pathspec.GitIgnoreSpec | None:
    """The globs of one option as one gitignore spec (None if there are none), each checked first.

    Each glob must mean something on its own: gitignore silently treats a blank line, a '#'
    comment or an unclosed '[' as no pattern at all, which here would hide a typo.
    """
    if isinstance(globs, str):
        raise TypeError(f"{option} must be a sequence of globs, not one string")
    example = "e.g. '*.py', 'docs/' or 'src/**/*.ts'"
    for glob in globs:
        if not glob.strip():
            raise InputError(f"an {option} glob is empty; remove it or give a pattern, {example}")
        if "\n" in glob or "\r" in glob:
            raise InputError(f"{option} glob {glob!r} spans lines; give each glob separately")
        if {".", ".."} & set(glob.removeprefix("!").split("/")):
            raise InputError(
                f"{option} glob {glob!r} has a '.' or '..' part, which never matches: globs are "
                "matched relative to the folder, so drop the ./ or ../"
            )
        try:
            patterns = pathspec.GitIgnoreSpec.from_lines([glob]).patterns
        except ValueError as err:  # pathspec's GitIgnorePatternError
            if glob.endswith("\\"):
                why = "a trailing \\ escapes nothing"
            elif glob.strip() == "!":
                why = "a lone ! negates nothing"
            else:
                why = one_line(err)
            message = f"{option} glob {glob!r} is malformed ({why}); fix it, {example}"
            raise InputError(message) from err
        if patterns[0].include is None:
            if glob.lstrip().startswith("#"):
                why = "a leading # makes it a comment; write \\# for a literal #"
            elif "[" in glob:
                why = "a [ without its ] makes it invalid"
            else:
                why = "it names no file or folder"
            raise InputError(f"{option} glob {glob!r} matches nothing ({why}); fix it, {example}")
    return pathspec.GitIgnoreSpec.from_lines(list(globs)) if globs else None
