"""Expanding the user's arguments into the files to read: folder walks, .gitignore, the globs.

Which files a walk keeps is spelled out in the `kvcli.ingest` docstring; the default skips of lock
and minified files are applied later, when each file is read (`entry.py`).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import pathspec

from ..errors import InputError, shorten
from .entry import STDIN_NAME, Entry
from .globs import Filters
from .log import Log

logger = logging.getLogger(__name__)


def collect(
    paths: Sequence[str], log: Log, filters: Filters
) -> tuple[list[Entry], dict[str, set[Path]]]:
    """Expand the user's arguments into files to read, in order, each file at most once.

    Also returns, for each folder argument, the resolved paths of all the files found in it.
    """
    entries: list[Entry] = []
    folders: dict[str, set[Path]] = {}
    seen: dict[Path, Entry] = {}
    stdin_seen = False
    for arg in paths:
        if arg == "-":
            if stdin_seen:
                raise InputError("- (stdin) is given more than once; pass it once")
            stdin_seen = True
            entries.append(Entry(None, STDIN_NAME))
            continue
        path = Path(arg)
        _check_exists(path, arg)
        if path.is_dir():
            walked = _walk(path, arg, log, filters)
            candidates = [Entry(file, name, arg, wanted) for file, name, wanted in walked]
            folders.setdefault(arg, set()).update(e.path.resolve() for e in candidates)
        else:
            candidates = [Entry(path, os.path.normpath(arg))]
        for entry in candidates:
            key = entry.path.resolve()
            if key not in seen:
                seen[key] = entry
                entries.append(entry)
            elif entry.folder is None:
                seen[key].wanted = True  # named directly after a folder walk found it: always read
    return entries, folders


def _check_exists(path: Path, arg: str) -> None:
    """An InputError naming `arg` when there is nothing there to read, or it cannot be looked at
    (a name too long, a folder on the way that cannot be searched)."""
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise InputError(f"{shorten(arg)} does not exist; check the path") from None
    except OSError as exc:
        raise InputError(f"{shorten(arg)} cannot be read: {exc.strerror or exc}; check the path") from None
    except ValueError:  # a NUL in the name
        raise InputError(f"{arg!r} is not a path; check it") from None


def _walk(
    root: Path, shown: str, log: Log, filters: Filters
) -> Iterator[tuple[Path, str, bool]]:
    """(path, name, wanted) for files under `root` in sorted order, filtered as `kvcli.ingest` says.

    Each .gitignore applies to its own folder and below; a deeper file overrides a shallower one.
    Symlinked folders are not followed, so links cannot make the walk loop. `wanted` is True
    when an include glob matched the file.
    """
    filtered: Counter[str] = Counter()

    def visit(folder: Path, specs: list[tuple[Path, pathspec.GitIgnoreSpec]]):
        try:
            gitignore = folder / ".gitignore"
            if gitignore.is_file():
                lines = gitignore.read_text(encoding="utf-8", errors="replace").splitlines()
                specs = specs + [(folder, pathspec.GitIgnoreSpec.from_lines(lines))]
            children = sorted(folder.iterdir(), key=lambda p: p.name)
        except OSError as err:
            log.warnings.append(f"skipped folder {folder}: {err.strerror or err}")
            return
        for child in children:
            if child.name.startswith("."):
                continue
            is_dir = child.is_dir()
            if _ignored(child, is_dir, specs):
                logger.debug("ignored by .gitignore: %s", child)
                continue
            # include/exclude globs see the path below the folder argument, not below a .gitignore
            relative = child.relative_to(root).as_posix() + ("/" if is_dir else "")
            if is_dir and not child.is_symlink():
                if filters.exclude is not None and filters.exclude.match_file(relative):
                    filtered["excluded_folders"] += 1
                    continue
                yield from visit(child, specs)
            elif not is_dir and child.is_file():
                # an include glob is checked first, so a file both globs reject counts as unmatched
                if filters.include is not None and not filters.include.match_file(relative):
                    filtered["unmatched"] += 1
                    continue
                if filters.exclude is not None and filters.exclude.match_file(relative):
                    filtered["excluded"] += 1
                    continue
                name = os.path.normpath(os.path.join(shown, relative))
                yield child, name, filters.include is not None

    yield from visit(root, [])
    if filtered:
        log.filtered[shown] = filtered  # a folder given twice is walked the same way twice


def _ignored(path: Path, is_dir: bool, specs: list[tuple[Path, pathspec.GitIgnoreSpec]]) -> bool:
    """Whether the deepest .gitignore with a matching pattern ignores `path`."""
    for base, spec in reversed(specs):
        relative = path.relative_to(base).as_posix() + ("/" if is_dir else "")
        result = spec.check_file(relative)
        if result.include is not None:
            return bool(result.include)
    return False
