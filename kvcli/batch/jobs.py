"""The jobs file: one JSON object a line, each naming documents and the questions to ask about them.

    {"id": "contract-7", "documents": ["contracts/7.pdf"], "questions": ["Who signed it?", "When does it end?"]}
    {"id": "src", "documents": "src/", "question": "Where is the retry logic?", "method": "snapkv", "ratio": 0.05}
    {"documents": ["reports/*.pdf", "notes.md"], "question": "What changed in 2024?", "budget": 256}

`documents` is a path, a glob or a folder, or a list of them, relative to the current directory as
`kvcli ask`'s arguments are; `question` (one) or `questions` (a list); `id` (a string or a number,
default the line number) names the job in the answers; `method`, `ratio` and `budget` override the
command line's for this job. The whole file is checked before any model loads: a malformed line
is an error naming it, while a document that cannot be read is the job's error row at run time.
"""

from __future__ import annotations

import dataclasses
import glob
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, KvcliError
from ..ingest.jsonl import jsonl_records
from ..methods import Budget, Method, configure, make_method
from ..prompt import check_question
from ..reading import Options

FIELDS = ("id", "documents", "question", "questions", "method", "ratio", "budget")


@dataclass(frozen=True)
class Job:
    """One line of the jobs file, checked, with the method and options it runs with."""

    id: str
    line: int
    documents: tuple[str, ...]  # as written: paths, globs or folders
    questions: tuple[str, ...]
    method: Method
    options: Options
    sources: int | None = None  # --sources N: the answers carry their passages

    def settings(self) -> dict:
        """What an answer depends on besides the model, the documents and the question (for its key)."""
        options, sampling = self.options, self.options.sampling
        return {
            "method": self.method.name, "params": self.method.params(),
            "ratio": options.budget.ratio, "budget": options.budget.tokens, "min_keep": options.budget.min_keep,
            "chunk_size": options.chunk_size, "max_context": options.max_context, "fit": options.fit,
            "max_new_tokens": options.max_new_tokens, "system": options.system,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed,
        } | ({} if options.skim is None else {"skim": dataclasses.asdict(options.skim)}) | (
            {} if self.sources is None else {"sources": self.sources})  # without either: the keys of earlier answers files


def _strings(value, name: str, where: str, blank: bool = False) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(item, str) and (blank or item.strip()) for item in items):
        raise InputError(f"{where}: {name!r} must be a non-empty string or a list of them")
    return tuple(items)


def _number(record: dict, name: str, kind: type, where: str):
    value = record.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise InputError(f"{where}: {name!r} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def _parse(record, line: int, where: str) -> dict:
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object with documents and a question")
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise InputError(f"{where}: unknown field {unknown[0]!r}; a job has {', '.join(FIELDS)}")
    if "documents" not in record:
        raise InputError(f"{where}: no 'documents' (a path, a glob, a folder or a list of them)")
    if ("question" in record) == ("questions" in record):
        raise InputError(f"{where}: give 'question' (one) or 'questions' (a list)" + (", not both" if "question" in record else ""))
    job_id = record.get("id", line)
    if not isinstance(job_id, (str, int)) or isinstance(job_id, bool) or not str(job_id).strip():
        raise InputError(f"{where}: 'id' must be a non-empty string or a number")
    if "question" in record and not isinstance(record["question"], str):
        raise InputError(f"{where}: 'question' must be a string (use 'questions' for a list)")
    questions = _strings(record.get("question", record.get("questions")), "questions", where, blank=True)  # checked below
    for question in questions:
        try:
            check_question(question)
        except KvcliError as exc:
            raise InputError(f"{where}: {exc}") from None
    if len(set(questions)) != len(questions):
        raise InputError(f"{where}: a question is asked twice")
    method = record.get("method")
    if method is not None and not isinstance(method, str):
        raise InputError(f"{where}: 'method' must be a method name (`kvcli methods` lists them)")
    return {
        "id": str(job_id), "documents": _strings(record["documents"], "documents", where), "questions": questions,
        "method": method, "ratio": _number(record, "ratio", float, where), "budget": _number(record, "budget", int, where),
    }


def read_jobs(path: str | Path, method: str, params: list[str] | None, window: int, options: Options) -> list[Job]:
    """Every job of the JSONL file at `path`, checked: `method`, `params`, `window` and `options` are
    the command line's (a job's method, ratio or budget replaces theirs).

    A `--param` applies to the jobs whose method has the knob; it is an error only when no job's has.
    """
    parsed: list[tuple[dict, str, int]] = []
    seen: dict[str, int] = {}
    for record, line, where in jsonl_records(path, "jobs file"):
        fields = _parse(record, line, where)
        if fields["id"] in seen:
            raise InputError(f"{where}: id {fields['id']!r} repeats line {seen[fields['id']]}; job ids must be unique")
        seen[fields["id"]] = line
        parsed.append((fields, where, line))
    if not parsed:
        raise InputError(f"jobs file {path} has no jobs")
    for fields, where, _ in parsed:
        if fields["method"] is not None:
            try:
                make_method(fields["method"])
            except KvcliError as exc:
                raise InputError(f"{where}: {exc}") from None
    names = list(dict.fromkeys(fields["method"] or method for fields, _, _ in parsed))
    methods = dict(zip(names, configure(names, params, window)))
    jobs = []
    for fields, where, line in parsed:
        job_method = methods[fields["method"] or method]
        budget = options.budget
        if fields["ratio"] is not None or fields["budget"] is not None:
            try:
                budget = Budget(fields["ratio"], fields["budget"], options.budget.min_keep)  # --min-keep still holds
            except KvcliError as exc:
                raise InputError(f"{where}: {exc}") from None
        job_options = dataclasses.replace(options, budget=budget)
        try:
            job_options.check(job_method)
        except KvcliError as exc:
            raise InputError(f"{where}: {exc}") from None
        jobs.append(Job(fields["id"], line, fields["documents"], fields["questions"], job_method, job_options))
    return jobs


def expand(documents: tuple[str, ...]) -> list[str]:
    """The paths to read: each glob replaced by the files it matches (sorted), others as written."""
    paths: list[str] = []
    for entry in documents:
        if glob.has_magic(entry):
            matches = sorted(glob.glob(entry, recursive=True))
            if not matches:
                raise InputError(f"no files match {entry!r}")
            paths.extend(matches)
        else:
            paths.append(entry)
    return paths
