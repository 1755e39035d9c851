"""`kvcli batch` in this process against `--ray --workers N`, and a Ray worker killed mid-run.

Writes a jobs file of `--jobs` jobs over the sample documents (samples/: the text, the PDF, the
README; a third of the jobs ask two questions, read once), then runs, each as its own `kvcli`
process into a fresh answers file:

1. in-process;
2. `--ray --workers N` (a local Ray is started and stopped by the command);
3. `--ray --workers N` again, SIGKILLing one busy worker process once the first rows are written;
4. `nodes`: `--ray-address` to a local cluster of N nodes (Ray's `cluster_utils.Cluster`: a head
   with no CPUs and N nodes sharing the cores, all on this machine), `--workers N`;
5. `nodes_lost`: the same, removing one node once the first rows are written (its processes
   SIGKILLed, as a machine that fails; its worker is busy: every worker always is) and adding a new
   one at once.

For each run it reports the wall time, the time until the first row was written (model load and,
on Ray, starting the workers; the first run ever also converts the embedded model), the rows, the
machine's load average before and after, and whether the answers equal the in-process run's. The
kill run also says whether every question is in the file exactly once and which job was run again.
Times on a shared machine are only comparable within one run of this script.
`--in-process-threads 1 --runs in_process` is the control for the CPU case: one process with one
torch thread, against N Ray workers with one core each. Answers are compared with the first run's.

    python benchmarks/batch_bench.py --model smollm2-135m --jobs 20 --workers 2
    python benchmarks/batch_bench.py --model smollm2-135m --jobs 20 --runs in_process --in-process-threads 1
    python benchmarks/batch_bench.py --model smollm2-135m --jobs 20 --workers 2 --runs ray,nodes,nodes_lost
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = {
    "samples/python_exceptions.txt": ["Which PEP describes the with statement?", "What does a bare raise re-raise?",
                                      "What is the exception attribute that holds the traceback?"],
    "samples/python_exceptions.pdf": ["What happens when an exception is not handled?", "What does raise from do?"],
    "samples/README.md": ["Under which licence are the samples used?", "Which script regenerates the PDF?"],
}


def make_jobs(n: int) -> list[dict]:
    """`n` jobs cycling over the documents; every third asks two questions."""
    jobs = []
    names = list(DOCUMENTS)
    for i in range(n):
        path = names[i % len(names)]
        questions = DOCUMENTS[path]
        first = questions[(i // len(names)) % len(questions)]
        asked = [first] if i % 3 else [first, questions[(i // len(names) + 1) % len(questions)]]
        jobs.append({"id": f"job{i:02d}", "documents": str(ROOT / path), "questions": asked})
    return jobs


def rows_of(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def busy_ray_workers() -> list[int]:
    """Processes of Ray actors running a task right now (Ray titles them `ray::Worker.run`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::Worker.run"):
            found.append(int(entry.name))
    return found


def local_cluster(nodes: int):
    """A Ray cluster of `nodes` nodes on this machine, the cores shared among them (the head has none)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(nodes):
        cluster.add_node(num_cpus=max(1, (os.cpu_count() or 1) // nodes))
    cluster.wait_for_nodes()
    return cluster


def run_batch(jobs_file: Path, out: Path, args, ray: bool, kill: bool = False, cluster=None) -> dict:
    command = [sys.executable, "-m", "kvcli", "batch", str(jobs_file), "-o", str(out), "-m", args.model,
               "--ratio", str(args.ratio), "--max-new-tokens", str(args.max_new_tokens)]
    if cluster is not None:
        command += ["--ray-address", cluster.address, "--workers", str(args.workers)]
    elif ray:
        command += ["--ray", "--workers", str(args.workers)]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    first_row = None
    killed = None
    env = dict(os.environ)
    if not ray and args.in_process_threads:
        env["OMP_NUM_THREADS"] = str(args.in_process_threads)  # torch's CPU threads in the one process
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    while process.poll() is None:
        time.sleep(0.1)
        if first_row is None and out.exists() and out.stat().st_size:
            first_row = time.perf_counter() - started
        if kill and killed is None and first_row is not None and cluster is not None:
            node = next(iter(cluster.worker_nodes))
            at = round(time.perf_counter() - started, 1)
            cluster.remove_node(node, allow_graceful=False)  # as a machine that fails: its processes SIGKILLed
            cluster.add_node(num_cpus=max(1, (os.cpu_count() or 1) // args.workers))
            killed = {"node": node.node_id[:8], "at_s": at, "rows_then": len(rows_of(out)), "node_added_s": round(time.perf_counter() - started, 1)}
        elif kill and killed is None and first_row is not None:
            busy = busy_ray_workers()
            if busy:
                os.kill(busy[0], signal.SIGKILL)
                killed = {"pid": busy[0], "at_s": round(time.perf_counter() - started, 1), "rows_then": len(rows_of(out))}
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - started
    rows = rows_of(out)
    return {
        "command": " ".join(command[1:]), "exit_code": process.returncode, "wall_s": round(wall, 1),
        "first_row_s": round(first_row, 1) if first_row is not None else None, "rows": len(rows),
        "load_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "errors": sum("error" in row for row in rows), "retried": sorted({row["job"] for row in rows if row.get("attempts", 1) > 1}),
        "killed": killed, "summary": stderr.strip().splitlines()[-1] if stderr.strip() else "", "_rows": rows,
        "ray_nodes_said": [line for line in stderr.splitlines() if "Ray node" in line],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--in-process-threads", type=int, default=None,
                        help="torch threads of the in-process run [default: torch's own, one per core]; each Ray worker gets its share of the cores")
    parser.add_argument("--runs", default="in_process,ray,ray_killed",
                        help="which runs, comma-separated, in this order: in_process, ray, ray_killed, nodes, nodes_lost (answers are compared with the first run's)")
    args = parser.parse_args()
    chosen = args.runs.split(",")

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        jobs = make_jobs(args.jobs)
        jobs_file = folder / "jobs.jsonl"
        jobs_file.write_text("".join(json.dumps(job) + "\n" for job in jobs))
        expected = sorted((job["id"], q) for job in jobs for q in job["questions"])
        results = {}
        for name, ray, kill in (("in_process", False, False), ("ray", True, False), ("ray_killed", True, True)):
            if name in chosen:
                results[name] = run_batch(jobs_file, folder / f"{name}.jsonl", args, ray, kill)
        for name, kill in (("nodes", False), ("nodes_lost", True)):
            if name in chosen:
                cluster = local_cluster(args.workers)
                try:
                    results[name] = run_batch(jobs_file, folder / f"{name}.jsonl", args, True, kill, cluster=cluster)
                finally:
                    cluster.shutdown()
        first = next(iter(results), None)
        answers = {(r["job"], r["question"]): r.get("answer") for r in results[first]["_rows"]} if first else None
        for name, result in results.items():
            rows = result.pop("_rows")
            if name != first:
                result[f"same_answers_as_{first}"] = {(r["job"], r["question"]): r.get("answer") for r in rows} == answers
            result["every_question_once"] = sorted((r["job"], r["question"]) for r in rows) == expected
        report = {
            "model": args.model, "jobs": len(jobs), "questions": len(expected), "workers": args.workers,
            "in_process_threads": args.in_process_threads, "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()], "runs": results,
        }
        if "in_process" in results and "ray" in results:
            report["ray_speedup"] = round(results["in_process"]["wall_s"] / results["ray"]["wall_s"], 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
