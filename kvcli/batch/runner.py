"""The driver of `kvcli batch`: read each job's documents, skip what is answered, hand the rest to a
pool of workers, and write every row (the driver alone writes the answers file).

A pool (`LocalPool` here, `ray_pool.RayPool` across processes and machines) has `identity` (the
model its workers loaded) and `map(tasks)`, which takes `(tag, task)` pairs as workers free up and
yields `(tag, Outcome)` as they finish: `Outcome.result`, or `Outcome.lost` when the workers
running the task died every time it was tried. Nothing here prints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from ..ingest import read_documents
from .answers import AnswersFile, InOrder, answer_key, documents_digest
from .jobs import Job, expand
from .work import JobTask, identity, user_message


@dataclass
class Outcome:
    """How a task ended: its result, or why it was given up (`lost`), after `attempts` tries."""

    result: object = None
    lost: str | None = None
    attempts: int = 1


class LocalPool:
    """One worker: the command's own process, its model already loaded (no worker can die alone)."""

    workers = 1

    def __init__(self, reader, work) -> None:
        self.identity = identity(reader)
        self.work = work
        work.start(reader)

    def map(self, tasks: Iterable[tuple[object, object]]) -> Iterator[tuple[object, Outcome]]:
        for tag, task in tasks:
            yield tag, Outcome(self.work(task))

    def close(self) -> None:
        pass


@dataclass
class Counts:
    """Jobs so far: `done` (every question answered, `resumed` of them in an earlier run), `failed`
    (an error row for at least one question), and the `total` in the jobs file."""

    total: int
    done: int = 0
    failed: int = 0
    resumed: int = 0
    rows: int = 0  # rows written by this run
    retried: int = 0  # jobs tried again after their worker died

    @property
    def remaining(self) -> int:
        return self.total - self.done - self.failed


def run_batch(jobs: list[Job], pool, answers: AnswersFile, describe: Callable[[BaseException], str | None] = user_message,
              progress: Callable[[Counts], None] | None = None) -> Counts:
    """Answer every question of `jobs` not already in `answers`, through `pool`.

    A job whose documents cannot be read gets an error row per question (`describe(exc)`, the line
    `ask` prints) and the batch goes on. Rows are written in the jobs' order, each whole; on an
    error or Ctrl-C every job finished so far is written before it goes on up.
    """
    model = pool.identity
    answered = answers.open({job.id for job in jobs})
    counts = Counts(len(jobs))
    writer = InOrder(answers)
    report = progress or (lambda counts: None)
    running: dict[int, tuple[Job, list[str], list[tuple[str, str]], list[str]]] = {}  # job, files read, (question, key)s, warnings

    def finish(index: int, rows: list[dict], resumed: bool = False) -> None:
        writer.put(index, rows)
        counts.rows += len(rows)
        if any("error" in row for row in rows):
            counts.failed += 1
        else:
            counts.done += 1
            counts.resumed += resumed
        report(counts)

    def tasks():
        for index, job in enumerate(jobs):
            try:
                doc = read_documents(expand(job.documents))
            except Exception as exc:
                message = describe(exc)
                if message is None:
                    raise
                rows = [_row(job, list(job.documents), question, answer_key(model, job.id, None, question, job.settings()), {"error": message})
                        for question in job.questions]
                finish(index, rows)
                continue
            names = list(dict.fromkeys(source.name for source in doc.sources))
            digest = documents_digest(doc.text)
            keyed = [(question, answer_key(model, job.id, digest, question, job.settings())) for question in job.questions]
            todo = [(question, key) for question, key in keyed if key not in answered]
            if not todo:
                finish(index, [], resumed=True)
                continue
            running[index] = (job, names, todo, list(doc.warnings))
            yield index, JobTask(job.id, doc.text, [question for question, _ in todo], job.method, job.options, doc.sources)

    try:
        for index, outcome in pool.map(tasks()):
            job, names, todo, warnings = running.pop(index)
            if outcome.lost is not None:
                results = [{"error": outcome.lost}] * len(todo)
            else:
                results = outcome.result
            counts.retried += outcome.attempts > 1
            rows = [_row(job, names, question, key, result, warnings, outcome.attempts) for (question, key), result in zip(todo, results)]
            finish(index, rows)
    finally:
        writer.close()
    return counts


def _row(job: Job, documents: list[str], question: str, key: str, result: dict, warnings=(), attempts: int = 1) -> dict:
    row = {"job": job.id, "documents": documents, "question": question, **result, "key": key}
    if warnings:
        row["warnings"] = list(warnings)
    if attempts > 1:
        row["attempts"] = attempts  # its worker died and it was run again
    return row
