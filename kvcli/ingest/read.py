"""`read_documents`: every path the user gave, read in order into one Document."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from ..errors import InputError
from .document import Document, Part, assemble
from .entry import read_entry
from .globs import Filters, compile_globs
from .log import Log, no_readable_files, skip_warnings
from .walk import collect


def read_documents(
    paths: Sequence[str],
    stdin: TextIO | None = None,
    progress: Callable[[int, int], None] | None = None,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> Document:
    """Read files, folders (recursively, honouring .gitignore) and `-` (stdin) into one Document.

    `include` and `exclude` are gitignore-style globs that choose which files of a folder are read
    (see the `kvcli.ingest` docstring for the rules); files named directly are always read.
    `progress(done, total)` is called after each file. Raises InputError for anything the user
    has to fix: a missing path, an empty, binary, encrypted or scanned file, an empty folder,
    an empty or malformed glob.
    """
    filters = Filters(compile_globs(include, "include"), compile_globs(exclude, "exclude"))
    if not paths:
        raise InputError("no input given; pass a file, a folder, or - to read stdin")
    log = Log()
    entries, folders = collect(paths, log, filters)
    parts: list[Part] = []
    files_with_text: set[Path | None] = set()  # resolved paths; None stands for stdin
    for done, entry in enumerate(entries, start=1):
        new_parts = read_entry(entry, stdin if stdin is not None else sys.stdin, log)
        if new_parts:
            parts.extend(new_parts)
            files_with_text.add(entry.path.resolve() if entry.path is not None else None)
        if progress is not None:
            progress(done, len(entries))

    for folder, files in folders.items():
        if not files & files_with_text:
            raise no_readable_files(folder, log)
    log.warnings.extend(skip_warnings(log))
    return assemble(parts, with_headers=len(files_with_text) > 1, warnings=log.warnings)
