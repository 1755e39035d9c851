"""JSON Lines files (a jobs file, a data file): one record a line, blank lines skipped, and the
file's and a line's problems as one-line errors that name the file and the line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from ..errors import InputError


def jsonl_records(path: str | Path, kind: str) -> Iterator[tuple[object, int, str]]:
    """(record, line number from 1, "path:line") for each non-blank line of the file at `path`;
    `kind` names the file in errors ("jobs file", "data file")."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{kind} {path} does not exist" if not path.exists() else f"{kind} {path} is not a file")
    with path.open(encoding="utf-8") as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            where = f"{path}:{line}"
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: invalid JSON ({exc.msg})") from None
            yield record, line, where


__all__ = ["jsonl_records"]
