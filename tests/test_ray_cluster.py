"""`kvcli batch` on a local multi-node Ray cluster (Ray's `Cluster`: several nodes on this machine),
on a tiny random Llama: a node removed mid-batch loses no job and answers no question twice, the
driver says so once, and nodes that join mid-batch take work. Each node declares one GPU (Ray only
counts it: the workers run on the CPU), so the pool runs one worker per GPU as on a GPU cluster."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest
from test_batch import check, rows_of
from test_cli_tiny import run, tiny, words  # noqa: F401 (tiny: the module's fixture)

from kvcli.batch import AnswerJobs, AnswersFile, ModelSpec, Worker, run_batch
from kvcli.reading import Options


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head with no CPUs or GPUs (so no worker runs there) and two nodes of 1 CPU and 1 GPU; the driver joins it.
    Nodes inherit this process's environment, so workers see its KVCLI_HOME."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    saved = os.environ.get("KVCLI_HOME")
    os.environ["KVCLI_HOME"] = str(tmp_path_factory.mktemp("cluster_home"))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.ERROR)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    if saved is None:
        os.environ.pop("KVCLI_HOME", None)
    else:
        os.environ["KVCLI_HOME"] = saved


def recording_worker(folder: Path, first_nodes: set[str], joining: int):
    """A Worker that appends `job node pid` to folder/started and folder/ran as it starts and finishes
    each task. On job `held` (its first try) it writes its node to folder/held and waits there for
    that node to be removed; from then on every task waits until `joining` workers off the
    `first_nodes` have started one, so each of those is sure to find work (tiny jobs take
    milliseconds). Made in a function so Ray pickles it by value."""

    def log(name: str, job_id: str, node: str) -> None:
        with (folder / name).open("a") as file:
            file.write(f"{job_id} {node} {os.getpid()}\n")

    def joined_workers() -> int:
        lines = (folder / "started").read_text().splitlines()
        return len({pid for _, node, pid in (line.split() for line in lines) if node not in first_nodes})

    class Recording(Worker):
        def run(self, task):
            import ray

            node = ray.get_runtime_context().get_node_id()
            log("started", task.job_id, node)
            held = folder / "held"
            if task.job_id == "held" and not held.exists():
                held.write_text(node)
                time.sleep(120)  # its node is removed long before this ends
            deadline = time.monotonic() + 30
            while held.exists() and joined_workers() < joining and time.monotonic() < deadline:
                time.sleep(0.05)
            result = super().run(task)
            log("ran", task.job_id, node)
            return result

    return Recording


def test_a_node_lost_mid_batch_loses_no_job_and_nodes_joining_take_work(cluster, tiny, tmp_path):
    """One worker per GPU on two nodes: removing the node of a busy worker mid-batch reports the loss in
    one line, runs that job again elsewhere, and writes every question exactly once; a node with two
    GPUs added then is reported once and gets two workers (the lost one's replacement and one for the
    new GPU), which both answer jobs."""
    from kvcli.batch.ray_pool import RayPool
    from kvcli.cli.batch import describe_error

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"{i}.txt").write_text(words(120 + 30 * i, i))
    specs = [{"id": f"j{i}", "documents": str(docs / f"{i % 3}.txt"), "questions": [f"w{i}?", "w50?"] if i % 2 else [f"w{i}?"]}
             for i in range(8)]
    specs.insert(2, {"id": "held", "documents": str(docs / "1.txt"), "questions": ["w4?", "w5?"]})
    jobs = check(tmp_path, *specs, options=Options(max_new_tokens=3))
    lines: list[str] = []
    first_nodes = {node.node_id for node in cluster.worker_nodes}

    def held_node():
        held = tmp_path / "held"
        deadline = time.monotonic() + 30
        while not held.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return next(node for node in cluster.worker_nodes if node.node_id == held.read_text())

    out = tmp_path / "answers.jsonl"
    done: dict = {}
    pool = RayPool(ModelSpec.of(tiny), AnswerJobs(describe_error), worker_class=recording_worker(tmp_path, first_nodes, joining=2), report=lines.append)
    assert pool.workers == 2 and pool.grow
    # the batch runs in a thread: Ray adds and removes nodes only from the main thread
    batch = threading.Thread(target=lambda: done.update(counts=run_batch(jobs, pool, AnswersFile(out), describe_error)), daemon=True)
    try:
        batch.start()
        cluster.remove_node(held_node())
        cluster.add_node(num_cpus=2, num_gpus=2)
        batch.join(timeout=120)
    finally:
        pool.close()
    counts = done["counts"]

    rows = rows_of(out)
    assert [(r["job"], r["question"]) for r in rows] == [(job.id, q) for job in jobs for q in job.questions]
    assert all("answer" in r for r in rows), [r.get("error") for r in rows]
    assert [r.get("attempts") for r in rows if r["job"] == "held"] == [2, 2]
    assert (counts.done, counts.failed, counts.retried) == (len(jobs), 0, 1)
    lost = [line for line in lines if line.startswith("lost Ray node")]
    removed = (tmp_path / "held").read_text()
    assert len(lost) == 1 and removed[:8] in lost[0] and "\n" not in lost[0], lines
    ran = [line.split() for line in (tmp_path / "ran").read_text().splitlines()]
    joined = {node for _, node, _ in ran} - first_nodes
    assert len(joined) == 1, ran
    assert len({pid for _, node, pid in ran if node in joined}) == 2, ran
    said = [line for line in lines if "joined" in line]
    assert len(said) == 1 and next(iter(joined))[:8] in said[0], lines
    assert pool.workers == 3
    assert [job for job, _, _ in ran].count("held") == 1  # answered once: the first try never finished


def test_the_batch_command_prints_what_the_pool_reports_as_one_line(tiny, home, tmp_path, monkeypatch):
    """What the Ray pool reports mid-batch (a node lost or joined) reaches stderr as one `kvcli:` line."""
    import kvcli.batch.ray_pool
    from kvcli.batch import LocalPool
    from kvcli.cli.session import load
    from kvcli.cli.options import RunOptions
    from kvcli.cli.output import Screen

    class Reporting(LocalPool):
        resources = {"num_cpus": 1}

        def __init__(self, spec, work, workers=None, address=None, report=None):
            super().__init__(load(RunOptions(model=spec.model), Screen(quiet=True)), work)
            self.workers, self.report = 1, report

        def map(self, tasks):
            self.report("lost Ray node 10.0.0.7 (66657fe2) with 1 worker on it; the jobs they were running are run again on other workers")
            yield from super().map(tasks)

    monkeypatch.setattr(kvcli.batch.ray_pool, "RayPool", Reporting)
    monkeypatch.setattr(kvcli.batch.ray_pool, "import_ray", lambda: None)
    document = tmp_path / "a.txt"
    document.write_text(words(100))
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"documents": str(document), "question": "w1?"}) + "\n")
    result = run("batch", jobs, "-o", tmp_path / "answers.jsonl", "-m", tiny, "--ray", "--max-new-tokens", "2")
    assert result.exit_code == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if "lost Ray node" in line]
    assert said == ["kvcli: lost Ray node 10.0.0.7 (66657fe2) with 1 worker on it; the jobs they were running are run again on other workers"]


def test_a_retried_job_waits_for_a_worker_off_the_node_where_workers_died():
    """A job whose worker died goes to an idle worker on a node where none died, waits while only such suspects are free and others work, and takes a suspect only when nothing else runs."""
    from kvcli.batch.ray_pool import RayPool

    pool = object.__new__(RayPool)  # the slot choice alone: no Ray
    pool.node_of, pool.suspects, pool.in_flight, pool.starting = {0: "dying", 1: "sound"}, {"dying": (1, 0.0)}, {"ref": ()}, {}
    pool.idle = [1, 0]
    assert pool._take_idle(retrying=True) == 1 and pool.idle == [0]
    assert pool._take_idle(retrying=True) is None and pool.idle == [0]  # another worker is busy: wait for it
    assert pool._take_idle() == 0  # a new job may still start there
    pool.idle, pool.in_flight = [0], {}
    assert pool._take_idle(retrying=True) == 0  # nothing else runs: the suspect it is
