"""What one read gathers for the user: warnings, the files it skipped, and the messages about them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import InputError


@dataclass
class Log:
    """Warnings, and what was skipped per folder argument, gathered while reading."""

    warnings: list[str] = field(default_factory=list)
    binary: dict[str, list[str]] = field(default_factory=dict)
    generated: dict[str, list[str]] = field(default_factory=dict)  # lock and minified files
    # per folder argument: 'unmatched' files, 'excluded' files, 'excluded_folders'
    filtered: dict[str, Counter[str]] = field(default_factory=dict)


def skip_warnings(log: Log) -> list[str]:
    """One warning per folder argument for the binary files, then for the generated files, it skipped."""
    warnings = []
    for folder, names in log.binary.items():
        warnings.append(f"{folder}: skipped {_files(names, 'binary')} ({_some(names)})")
    for folder, names in log.generated.items():
        warnings.append(
            f"{folder}: skipped {_files(names, 'lock or minified')} ({_some(names)}); "
            "add an include glob that matches them to read them"
        )
    return warnings


def no_readable_files(folder: str, log: Log) -> InputError:
    """The error for a folder argument that gave no text, naming what globs and skips removed."""
    filtered = log.filtered.get(folder, Counter())
    removed = [
        _count(filtered[key], noun) + " " + what
        for key, noun, what in (
            ("unmatched", "file", "matching no include glob"),
            ("excluded", "file", "matching an exclude glob"),
            ("excluded_folders", "folder", "matching an exclude glob"),
        )
        if filtered[key]
    ]
    generated = log.generated.get(folder, [])
    if not removed and not generated:
        return InputError(
            f"{folder} has no readable text files; point kvcli at text, source code or PDFs"
        )
    reasons, fixes = [], []
    if removed:
        reasons.append(f"the include/exclude globs left out {', '.join(removed)}")
        fixes.append("loosen the globs")
    if generated:
        skipped = f"{_files(generated, 'lock or minified')} ({_some(generated)})"
        reasons.append(f"the default skips left out {skipped}")
        fixes.append("add an include glob for the skipped files or name them directly")
    return InputError(
        f"{folder} has no readable text files: {'; '.join(reasons)}; {' or '.join(fixes)}"
    )


def one_line(err: Exception) -> str:
    """An exception's message squeezed onto one line."""
    return " ".join(str(err).split()) or type(err).__name__


def _count(n: int, noun: str) -> str:
    """'1 file' or '3 files'."""
    return f"{n} {noun}{'s' if n != 1 else ''}"


def _files(names: Sequence[str], what: str) -> str:
    """'1 binary file' or '3 binary files'."""
    return f"{len(names)} {what} file{'s' if len(names) != 1 else ''}"


def _some(names: Sequence[str]) -> str:
    """The first three names, then '...' if there are more."""
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
