"""The resumable progress log: a JSONL file of header lines and finished samples, appended as they come.

A header records the settings a stored prediction depends on; a rerun checks every header in
the log against its own and refuses a log written for another model or other settings. Each
sample carries its row's hash, and `check_row` refuses one read from other data under the
same id. The samples that pass are skipped on the rerun.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from ..atomic import writing
from ..errors import InputError
from ..methods import Method
from .settings import Setting

log = logging.getLogger(__name__)

_START_OVER = "delete it or write to another --output file"


def log_header(
    model_name: str,
    config_hash: str,
    methods: Sequence[Method],
    max_new_tokens: int,
    template: str | None,
    max_context: int | None,
    fit: str = "reindex",
    min_keep: int | None = None,
) -> dict:
    """What must match for a log's predictions to be reused (each sample's row is checked by its `row_hash`)."""
    return {
        "kvcli_eval": 1,
        "model": model_name,
        "config_hash": config_hash,
        "max_new_tokens": max_new_tokens,
        "template": template,
        "max_context": max_context,
        "fit": fit,  # a row past the context is read whole in chunks or cut in the middle: the predictions differ
        "methods": {m.name: m.params() for m in methods},
        **({} if min_keep is None else {"min_keep": min_keep}),  # absent when not given: older logs still resume
    }


def log_path(json_path: str | Path) -> Path:
    """The progress log kept beside an `--output` file, used to resume."""
    return Path(str(json_path) + ".partial.jsonl")


def read_log(path: Path, header: dict) -> tuple[dict[tuple, dict], dict | None]:
    """Samples already in the log `{(id, *setting.key): sample}` and its last header.

    Refuses a log written for another model or other settings (`check_row` checks the data).
    """
    done: dict[tuple, dict] = {}
    last_header = None
    if not path.exists():
        return done, last_header
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                log.warning("%s: ignoring a half-written last line", path)
                continue
            raise InputError(f"{path}:{number}: invalid JSON in the progress log; delete the file to start over") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}:{number}: not a kvcli eval progress log; {_START_OVER}")
        if "kvcli_eval" in record:
            _check_header(path, record, header)
            last_header = record
            continue
        try:
            done[(record["id"], *Setting.of(record).key)] = record
        except KeyError:
            raise InputError(f"{path}:{number}: not a kvcli eval progress log; {_START_OVER}") from None
    return done, last_header


def _check_header(path: Path, old: dict, new: dict) -> None:
    for key in ("model", "config_hash", "max_new_tokens", "template", "max_context", "fit"):
        if old.get(key) != new.get(key):
            raise InputError(f"{path} was written with {key}={old.get(key)!r}, not {new.get(key)!r}; {_START_OVER}")
    for name, params in new["methods"].items():
        if name in old.get("methods", {}) and old["methods"][name] != params:
            raise InputError(f"{path} was written with {name} parameters {old['methods'][name]}, not {params}; {_START_OVER}")


def check_row(path: Path, sample: dict, row_hash: str) -> None:
    """Refuse a logged sample read from another row under the same id (ids default to line numbers)."""
    if sample.get("row_hash") != row_hash:
        raise InputError(f"{path} holds row {sample.get('id')!r} read from other data (or before kvcli recorded which); {_START_OVER}")


def drop_half_line(path: Path) -> None:
    """Cut a line left half-written by an interrupted run, so new lines start on their own."""
    if not path.exists():
        return
    with path.open("r+b") as handle:
        data = handle.read()
        if data and not data.endswith(b"\n"):
            handle.truncate(data.rfind(b"\n") + 1)


def append_record(path: Path, record: dict) -> None:
    """Append one header or sample as a line, flushed at once so a kill loses at most that line."""
    with writing(str(path), "check the folder is writable and the disk has room; the samples logged so far resume the run"):
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()


def resume_log(path: Path, header: dict) -> dict[tuple, dict]:
    """Open the log for this run: check it, cut a half line, record `header`, and return the samples done."""
    done, last_header = read_log(path, header)
    drop_half_line(path)
    if last_header != header:
        # every header is checked on resume, so a method added later keeps its knobs too
        append_record(path, header)
    return done
