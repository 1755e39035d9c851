"""Many questions over many documents, in this process or on Ray workers, resumable and fault tolerant.

- `jobs`: the JSONL jobs file (documents, questions, per-job method / ratio / budget), checked.
- `answers`: the answers file, which is also the resume log: one whole row per question, keyed by
  a hash of model, job, documents' text, question and settings; rows written in the jobs' order.
- `work`: what a worker does: `ModelSpec` (load the model once), `Worker`, and `AnswerJobs`
  (a job's questions answered as `kvcli ask -q ... -q ...` answers them).
- `runner`: the driver: `run_batch` over a pool (`LocalPool`: this process), `Counts`, `Outcome`.
- `ray_pool`: `RayPool`: the workers as Ray actors on a local Ray or a cluster; a worker that dies
  is replaced and its task run again, at most twice; a machine that leaves or joins the cluster is
  reported. `kvcli eval --ray` runs its rows on it too.

Ray is optional (the `ray` extra) and imported only when a `RayPool` is made. Nothing here prints.
"""

from __future__ import annotations

from .answers import AnswersFile, InOrder, answer_key, documents_digest
from .jobs import Job, expand, read_jobs
from .runner import Counts, LocalPool, Outcome, run_batch
from .work import AnswerJobs, JobTask, ModelSpec, Worker, identity, user_message

__all__ = [
    "AnswerJobs",
    "AnswersFile",
    "Counts",
    "InOrder",
    "Job",
    "JobTask",
    "LocalPool",
    "ModelSpec",
    "Outcome",
    "Worker",
    "answer_key",
    "documents_digest",
    "expand",
    "identity",
    "read_jobs",
    "run_batch",
    "user_message",
]
