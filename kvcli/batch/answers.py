"""The answers file: one JSON row per question, appended whole as jobs finish; it is also the resume log.

A row is `{"job", "documents", "question", "answer", "stats", "key"}` (or `"error"` in place of
`answer` and `stats`). Its `key` is a sha256 over what the answer depends on: the model (name,
architecture and weights), the job's id, the documents' text, the question, and the settings
(`Job.settings`). A rerun skips the questions whose key has an answer row, and asks again those
whose last try was an error (their old error rows are dropped first), so the file ends with one
row per question. Rows of other jobs or other settings are left where they are.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..atomic import check_output, write_atomic, writing
from ..errors import InputError

KEY_VERSION = 1


def documents_digest(text: str) -> str:
    """The sha256 of the text the model reads (a changed document gets new keys)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def answer_key(model: dict, job_id: str, documents: str | None, question: str, settings: dict) -> str:
    """The resume key of one question's row; `documents` is `documents_digest` of the documents'
    text (None when they could not be read)."""
    fields = [KEY_VERSION, model, job_id, documents, question, settings]
    return hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


class AnswersFile:
    """The JSONL file the driver alone writes: rows appended whole, read back to resume."""

    def __init__(self, path: str | Path) -> None:
        self.path = check_output(path, "--output", append=True)
        if self.path.exists() and not self.path.is_file():
            raise InputError(f"{self.path} is not a file; choose another --output")
        self.answered: set[str] = set()
        self.kept_foreign = 0  # rows of jobs not in this run's jobs file
        self.dropped_errors = 0

    def open(self, job_ids: set[str]) -> set[str]:
        """Read the rows already written and return the keys answered. Error rows of `job_ids` are
        dropped (they are asked again), as is a line cut short by a crash; the file is rewritten
        (atomically) only then."""
        if not self.path.exists():
            return self.answered
        raw = self.path.read_bytes()
        lines = raw.decode("utf-8", errors="replace").splitlines(keepends=True)
        kept: list[str] = []
        changed = False
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines) and not line.endswith("\n"):
                    changed = True  # a row cut short by a kill: it is asked again
                    continue
                raise InputError(f"{self.path}:{number}: not a kvcli batch answers file (invalid JSON); delete it or choose another --output") from None
            if not isinstance(row, dict) or not isinstance(row.get("key"), str) or "job" not in row:
                raise InputError(f"{self.path}:{number}: not a kvcli batch answers file (no job or key); delete it or choose another --output")
            if "answer" not in row and str(row["job"]) in job_ids:
                self.dropped_errors += 1
                changed = True
                continue
            if str(row["job"]) not in job_ids:
                self.kept_foreign += 1
            elif "answer" in row:
                self.answered.add(row["key"])
            kept.append(line if line.endswith("\n") else line + "\n")
        if changed:
            write_atomic(self.path, "".join(kept))
        return self.answered

    def append(self, rows: list[dict]) -> None:
        """Append `rows`, each as one line in one write: a reader (or a crash) never sees half a row."""
        if not rows:
            return
        with writing(str(self.path), "check the folder is writable and the disk has room; the rows written so far resume the batch"):
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                for row in rows:
                    data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
                    while data:
                        data = data[os.write(fd, data):]
            finally:
                os.close(fd)


class InOrder:
    """Writes each job's rows in the jobs file's order, whichever job finishes first.

    A job that finished early waits here for the ones before it; `close` writes whatever is
    waiting (out of order then), so nothing finished is lost on Ctrl-C or an error.
    """

    def __init__(self, answers: AnswersFile) -> None:
        self.answers = answers
        self.waiting: dict[int, list[dict]] = {}
        self.next = 0

    def put(self, index: int, rows: list[dict]) -> None:
        self.waiting[index] = rows
        while self.next in self.waiting:
            self.answers.append(self.waiting.pop(self.next))
            self.next += 1

    def close(self) -> None:
        for index in sorted(self.waiting):
            self.answers.append(self.waiting.pop(index))
