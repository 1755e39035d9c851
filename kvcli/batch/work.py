"""What a worker does: load the model once, then answer the jobs (or score the eval rows) it is given.

The same `Worker` runs in the command's own process and, as a Ray actor, in a process of its
own; the work it does is an object handed to it (`AnswerJobs` here, `eval.runner.ScoreRows`
for `kvcli eval`) with `start(reader)`, called once the model is loaded, and `__call__(task)`.
Tasks carry the documents' text, not their paths, so workers need no shared filesystem.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import KvcliError
from ..methods import Method
from ..ingest import Document
from ..reading import Options, Reader, add_answer, answer, run_stats
from ..reading.cite import cite, watcher


@dataclass(frozen=True)
class ModelSpec:
    """How each worker loads the model (the command line's model options, the default resolved)."""

    model: str
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    threads: int | None = None  # torch's CPU threads in this worker (None: torch's default)
    device_map: str | None = None  # --device-map, within what the worker is given (Ray: its one GPU, then the CPU)

    @classmethod
    def of(cls, model: str | None, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
           threads: int | None = None, device_map: str | None = None) -> ModelSpec:
        from ..models import DEFAULT_MODEL

        # resolved here, on the driver: a worker's environment may name another model
        return cls(model or os.environ.get("KVCLI_MODEL") or DEFAULT_MODEL, device, dtype, trust_remote_code, threads, device_map)

    def load(self) -> Reader:
        from ..models import load_model

        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)
        return Reader(load_model(self.model, device=self.device, dtype=self.dtype, trust_remote_code=self.trust_remote_code,
                                 device_map=self.device_map))


def identity(reader: Reader) -> dict:
    """What names the model an answer came from: every worker must report the same."""
    lm = reader.lm
    return {"model": lm.name, "config_hash": lm.config_hash, "weights": lm.weights_fingerprint}


class Worker:
    """Loads the model once and runs `work` on each task. A model that cannot be loaded (a user
    error) is reported by `ready()` instead of killing the worker, so it is not retried."""

    def __init__(self, spec: ModelSpec, work) -> None:
        self.work = work
        self.error: str | None = None
        try:
            self.reader = spec.load()
            work.start(self.reader)
        except KvcliError as exc:
            self.error = str(exc)

    def ready(self) -> dict:
        if self.error is not None:
            return {"error": self.error}
        return {"identity": identity(self.reader), "pid": os.getpid(), "device": str(self.reader.device)}

    def run(self, task):
        if self.error is not None:
            raise KvcliError(self.error)
        return self.work(task)


@dataclass
class JobTask:
    """One job as a worker gets it: the documents' text and the questions still to answer."""

    job_id: str
    text: str
    questions: list[str]
    method: Method
    options: Options
    spans: tuple = ()  # the documents' `ingest.Source` spans in `text`, for --sources


def user_message(exc: BaseException) -> str | None:
    """The one line `ask` prints for a user error, or None for anything else (a bug: raised)."""
    return str(exc) if isinstance(exc, KvcliError) else None


class AnswerJobs:
    """Answers a job's questions as `kvcli ask DOCS -q Q1 -q Q2 ...` does: read once when there are
    several (the same caches and answers as one pass each), query-aware for one.

    `describe(exc)` gives the one-line message of a question that failed (None: a bug, raised);
    each question's result is `{"answer", "stats"}` or `{"error"}`.
    """

    def __init__(self, describe: Callable[[BaseException], str | None] = user_message, sources: int | None = None) -> None:
        self.describe = describe
        self.sources = sources  # --sources: each result also has "sources", the passages its answer drew on

    def start(self, reader: Reader) -> None:
        self.reader = reader

    def __call__(self, task: JobTask) -> list[dict]:
        from ..reading.policy import choose

        try:
            mode = choose(self.reader, task.text, task.options, task.method, task.questions)
        except Exception as exc:  # a document the job's options cannot read (no room left in the context): error rows, not a stop
            message = self.describe(exc)
            if message is None:
                raise
            return [{"error": message} for _ in task.questions]
        results = []
        for question in task.questions:
            try:
                results.append(self._answer(mode, question, task.method, task.options, len(task.questions), task))
            except Exception as exc:
                message = self.describe(exc)
                if message is None:
                    raise
                results.append({"error": message})
        return results

    def _answer(self, mode, question: str, method: Method, options: Options, questions: int, task: JobTask) -> dict:
        began = time.perf_counter()
        mode.check(question, method)
        mode.prepare()
        reading = mode.read(question, method)
        stats = run_stats(self.reader, reading)
        if "prefix" in stats.extra:
            stats.extra["prefix"]["questions"] = questions
        watch = watcher(self.reader, reading) if self.sources else None
        result = answer(self.reader, reading, options, started=began, watch=watch)
        add_answer(stats, self.reader, result)
        out = {"answer": result.text, "stats": stats.to_dict()}
        if self.sources:
            source_map = mode.source_map(reading, Document(task.text, tuple(task.spans)))
            out["sources"] = [passage.to_dict() for passage in cite(source_map, watch, self.sources)]
        return out
