"""`kvcli batch` and the Ray backend on a tiny random Llama: the jobs file, resume keys, the answers
file, error rows, Ctrl-C, and on a local Ray (2 CPUs) `eval --ray` equal to a run here and a
worker killed mid-job."""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from pdfutil import pdf_bytes
from pypdf import PdfReader, PdfWriter
from test_cli_tiny import one_line_error, run, words
from test_models import save_tiny_llama

from kvcli.batch import AnswerJobs, AnswersFile, InOrder, LocalPool, ModelSpec, Outcome, Worker, answer_key, expand, read_jobs, run_batch
from kvcli.errors import InputError, KvcliError
from kvcli.methods import Budget
from kvcli.reading import Options

TINY = ["--method", "snapkv", "--ratio", "0.2", "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """A two-layer random Llama folder with 1,024 positions."""
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny", max_positions=1024))



@pytest.fixture
def docs(tmp_path) -> dict[str, Path]:
    folder = tmp_path / "docs"
    folder.mkdir()
    paths = {"a": folder / "a.txt", "b": folder / "b.txt", "c": folder / "c.txt"}
    for offset, path in enumerate(paths.values()):
        path.write_text(words(150 + 40 * offset, offset))
    return paths


def write_jobs(path: Path, jobs: list) -> Path:
    path.write_text("".join((job if isinstance(job, str) else json.dumps(job)) + "\n" for job in jobs))
    return path


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check(tmp_path, *jobs, method="snapkv", params=None, window=8, options=None):
    return read_jobs(write_jobs(tmp_path / "jobs.jsonl", list(jobs)), method, params, window, options or Options())


# --- the jobs file -----------------------------------------------------------------------------------


def test_jobs_take_their_own_method_and_budget(tmp_path):
    """A job's method, ratio or budget replaces the command line's; ids default to the line number."""
    jobs = check(
        tmp_path,
        {"documents": "a.txt", "question": "Q?"},
        {"id": 7, "documents": ["a.txt", "b/"], "questions": ["Q1?", "Q2?"], "method": "h2o", "ratio": 0.05},
        {"id": "x", "documents": "a.txt", "question": "Q?", "budget": 64},
        options=Options(budget=Budget(0.3)),
    )
    assert [job.id for job in jobs] == ["1", "7", "x"]
    assert [job.method.name for job in jobs] == ["snapkv", "h2o", "snapkv"]
    assert [(job.options.budget.ratio, job.options.budget.tokens) for job in jobs] == [(0.3, None), (0.05, None), (None, 64)]
    assert jobs[1].documents == ("a.txt", "b/") and jobs[1].questions == ("Q1?", "Q2?")


@pytest.mark.parametrize("line, words_in_error", [
    ("{not json", ["jobs.jsonl:1", "invalid JSON"]),
    ({"documents": "a.txt"}, ["jobs.jsonl:1", "'question'"]),
    ({"documents": "a.txt", "question": "Q?", "questions": ["R?"]}, ["not both"]),
    ({"question": "Q?"}, ["no 'documents'"]),
    ({"documents": [], "question": "Q?"}, ["'documents' must be"]),
    ({"documents": "a.txt", "question": "Q?", "ratoi": 0.1}, ["unknown field 'ratoi'"]),
    ({"documents": "a.txt", "question": "Q?", "method": "nope"}, ["jobs.jsonl:1", "unknown method 'nope'"]),
    ({"documents": "a.txt", "question": "Q?", "ratio": 2}, ["jobs.jsonl:1", "(0, 1]"]),
    ({"documents": "a.txt", "question": "Q?", "budget": 4}, ["jobs.jsonl:1", "observation window"]),
    ({"documents": "a.txt", "question": "Q?", "ratio": 0.1, "budget": 64}, ["not both"]),
    ({"documents": "a.txt", "questions": ["Q?", "Q?"]}, ["asked twice"]),
    ({"documents": "a.txt", "question": "  "}, ["question is empty"]),
])
def test_a_malformed_job_is_refused_with_its_line(tmp_path, line, words_in_error):
    """Each kind of malformed job line is an InputError naming the file and line, before any model loads."""
    with pytest.raises(InputError) as caught:
        check(tmp_path, line)
    for word in words_in_error:
        assert word in str(caught.value), str(caught.value)


def test_job_ids_must_be_unique(tmp_path):
    """Two jobs with one id are refused (their rows could not be told apart)."""
    with pytest.raises(InputError, match="id '1' repeats line 1"):
        check(tmp_path, {"id": 1, "documents": "a", "question": "Q?"}, {"id": "1", "documents": "b", "question": "Q?"})


def test_a_param_applies_to_the_jobs_whose_method_has_it(tmp_path):
    """--param sets the knob on the jobs whose method has it; a knob no job's method has is an error."""
    jobs = check(tmp_path, {"documents": "a", "question": "Q?"}, {"documents": "a", "question": "R?", "method": "dynamickv"},
                 params=["max_multiple=3"])
    assert "max_multiple" not in jobs[0].method.params() and jobs[1].method.params()["max_multiple"] == 3.0
    with pytest.raises(KvcliError, match="max_multiple"):
        check(tmp_path, {"documents": "a", "question": "Q?"}, params=["max_multiple=3"])


def test_globs_expand_sorted_and_a_glob_matching_nothing_is_an_error(tmp_path, monkeypatch):
    """A glob is replaced by the files it matches, sorted, relative to the current folder; one matching nothing is an InputError."""
    monkeypatch.chdir(tmp_path)
    for name in ("b.txt", "a.txt", "c.md"):
        (tmp_path / name).write_text("x")
    assert expand(("*.txt", "c.md", "folder/")) == ["a.txt", "b.txt", "c.md", "folder/"]
    with pytest.raises(InputError, match=r"no files match '\*\.pdf'"):
        expand(("*.pdf",))


# --- keys and the answers file -----------------------------------------------------------------------


def test_the_key_changes_with_everything_an_answer_depends_on():
    """A row's key differs when the model, job, documents' text, question or any setting differs."""
    base = ({"model": "m", "config_hash": "c", "weights": "w"}, "job", "digest", "Q?", {"method": "snapkv", "ratio": 0.1})
    changed = [
        ({"model": "m", "config_hash": "c", "weights": "other"}, *base[1:]),
        (base[0], "job2", *base[2:]),
        (*base[:2], "other digest", *base[3:]),
        (*base[:3], "R?", base[4]),
        (*base[:4], {"method": "snapkv", "ratio": 0.2}),
    ]
    keys = {answer_key(*base)} | {answer_key(*args) for args in changed}
    assert len(keys) == 1 + len(changed)
    assert answer_key(*base) == answer_key(*base)


def test_answers_file_resumes_and_repairs(tmp_path):
    """Opening the answers file returns the answered keys of this run's jobs, drops their error rows
    and a line cut short by a kill, keeps other jobs' rows, and rewrites the file only then."""
    path = tmp_path / "answers.jsonl"
    rows = [
        {"job": "a", "question": "Q?", "answer": "x", "key": "k1"},
        {"job": "a", "question": "R?", "error": "a.txt does not exist", "key": "k2"},
        {"job": "old", "question": "Q?", "answer": "y", "key": "k3"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"job": "a", "quest')
    answers = AnswersFile(path)
    assert answers.open({"a"}) == {"k1"}
    assert answers.dropped_errors == 1 and answers.kept_foreign == 1
    assert rows_of(path) == [rows[0], rows[2]]
    answers.append([{"job": "a", "question": "R?", "answer": "z", "key": "k2"}])
    assert [r["key"] for r in rows_of(path)] == ["k1", "k3", "k2"]


def test_answers_file_refuses_what_it_did_not_write(tmp_path):
    """A file that is not a kvcli batch answers file (or a missing folder) is refused, not overwritten."""
    other = tmp_path / "notes.jsonl"
    other.write_text('{"hello": 1}\n{"job": "a", "key": "k"}\n')
    with pytest.raises(InputError, match="notes.jsonl:1: not a kvcli batch answers file"):
        AnswersFile(other).open({"a"})
    assert other.read_text().startswith('{"hello"')
    with pytest.raises(InputError, match="does not exist"):
        AnswersFile(tmp_path / "no" / "answers.jsonl")


def test_rows_are_written_in_the_jobs_order():
    """Rows of jobs that finish out of order wait for the jobs before them; close writes what still waits."""
    written = []

    class Sink:
        def append(self, rows):
            written.extend(rows)

    writer = InOrder(Sink())
    writer.put(2, ["c"])
    writer.put(0, ["a"])
    assert written == ["a"]
    writer.put(1, ["b1", "b2"])
    writer.put(4, ["e"])
    assert written == ["a", "b1", "b2", "c"]
    writer.close()
    assert written == ["a", "b1", "b2", "c", "e"]


# --- batch in this process -------------------------------------------------------------------------


def test_batch_answers_as_ask_does(tiny, home, docs, tmp_path):
    """Each row holds the answer and kept tokens `ask --json` gives for that document and question,
    several questions about one document read it once, and the stats are ask's."""
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "two", "documents": str(docs["a"]), "questions": ["w1 w2?", "w30?"]},
        {"id": "one", "documents": [str(docs["b"]), str(docs["c"])], "question": "w5?"},
    ])
    out = tmp_path / "answers.jsonl"
    result = run("batch", jobs, "-o", out, "-m", tiny, *TINY)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert "2 jobs: 2 answered, 0 failed; 3 rows written" in result.stderr
    rows = rows_of(out)
    assert [(r["job"], r["question"]) for r in rows] == [("two", "w1 w2?"), ("two", "w30?"), ("one", "w5?")]
    assert rows[2]["documents"] == [str(docs["b"]), str(docs["c"])]
    assert [r["stats"]["read"] for r in rows] == ["once", "once", "query"]
    asked = {
        "two": json.loads(run("ask", docs["a"], "-q", "w1 w2?", "-q", "w30?", "-m", tiny, *TINY, "--json").stdout.splitlines()[0]),
        "one": json.loads(run("ask", docs["b"], docs["c"], "w5?", "-m", tiny, *TINY, "--json").stdout),
    }
    for row in (rows[0], rows[2]):
        alone = asked[row["job"]]
        assert row["answer"] == alone["answer"]
        assert row["stats"]["retained_per_layer"] == alone["stats"]["retained_per_layer"]
        assert row["stats"]["prompt_tokens"] == alone["stats"]["prompt_tokens"]
        assert set(row["stats"]) == set(alone["stats"])


def encrypted_pdf(path: Path) -> Path:
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf_bytes([["Hidden text."]]))))
    writer.encrypt("s3cret", "owner")
    buffer = io.BytesIO()
    writer.write(buffer)
    path.write_bytes(buffer.getvalue())
    return path


def test_a_bad_document_gets_the_error_row_ask_would_print(tiny, home, docs, tmp_path):
    """A missing file, an encrypted PDF and a glob matching nothing each give an error row per question
    with the line `ask` prints, and the other jobs are answered; the exit code is 0."""
    secret = encrypted_pdf(tmp_path / "secret.pdf")
    missing = tmp_path / "missing.txt"
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "missing", "documents": str(missing), "questions": ["w1?", "w2?"]},
        {"id": "ok", "documents": str(docs["a"]), "question": "w1?"},
        {"id": "secret", "documents": str(secret), "question": "w1?"},
        {"id": "glob", "documents": str(tmp_path / "*.nothing"), "question": "w1?"},
    ])
    out = tmp_path / "answers.jsonl"
    result = run("batch", jobs, "-o", out, "-m", tiny, *TINY)
    assert result.exit_code == 0, result.stderr
    assert "4 jobs: 1 answered, 3 failed" in result.stderr
    rows = rows_of(out)
    assert [r["job"] for r in rows] == ["missing", "missing", "ok", "secret", "glob"]
    for row, path in ((rows[0], missing), (rows[3], secret)):
        said = one_line_error(run("ask", path, "w1?", "-m", tiny, *TINY))
        assert "answer" not in row and "stats" not in row
        assert said == f"kvcli: error: {row['error']}"
    assert "no files match" in rows[4]["error"] and "answer" in rows[2]


def test_a_question_that_cannot_be_read_gets_asks_error_and_the_rest_go_on(tiny, home, docs, tmp_path):
    """A job whose question cannot be read as asked (the full cache past --max-context) gets the error row
    `ask` prints for it, and the next job is answered."""
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "full", "documents": str(docs["a"]), "questions": ["w1?", "w2?"], "method": "full"},
        {"id": "ok", "documents": str(docs["a"]), "question": "w1?"},
    ])
    out = tmp_path / "answers.jsonl"
    args = ["-m", tiny, "--method", "snapkv", "--max-context", "100", "--max-new-tokens", "4"]
    result = run("batch", jobs, "-o", out, *args)
    assert result.exit_code == 0, result.stderr
    rows = rows_of(out)
    said = one_line_error(run("ask", docs["a"], "w1?", *args, "--method", "full"))
    assert [r.get("error") for r in rows[:2]] == [said.removeprefix("kvcli: error: ")] * 2
    assert rows[2]["job"] == "ok" and rows[2]["stats"]["read"] == "reindexed"


def test_a_question_too_long_for_the_context_is_an_error_row_and_the_rest_go_on(tiny, home, docs, tmp_path):
    """A job whose longest question leaves no room in --max-context gets error rows for its questions, and the next job is answered (not a stop)."""
    long_question = " ".join(["w1"] * 150) + "?"
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "long", "documents": str(docs["a"]), "questions": [long_question, "w2?"]},
        {"id": "ok", "documents": str(docs["a"]), "question": "w1?"},
    ])
    out = tmp_path / "answers.jsonl"
    result = run("batch", jobs, "-o", out, "-m", tiny, "--max-context", "100", "--max-new-tokens", "4")
    assert result.exit_code == 0, result.stderr
    rows = rows_of(out)
    assert [r["job"] for r in rows] == ["long", "long", "ok"]
    assert "error" in rows[0] and "answer" in rows[2]


def test_the_floor_is_part_of_an_answers_settings():
    """Answers made with another --min-keep are not resumed as this run's: the floor is in the settings their key hashes."""
    import dataclasses

    from kvcli.batch.jobs import Job
    from kvcli.methods import make_method

    job = Job("j", 1, ("a.txt",), ("Q?",), make_method("snapkv"), Options(budget=Budget(min_keep=0)))
    assert job.settings() != dataclasses.replace(job, options=Options(budget=Budget())).settings()


def test_describe_error_words_user_errors_and_memory_as_ask_does():
    """describe_error gives a KvcliError's text and ask's out-of-memory line, and None for a bug (which is raised)."""
    from kvcli.cli.batch import describe_error
    from kvcli.cli.output import out_of_memory

    assert describe_error(InputError("x.pdf is encrypted; decrypt it first")) == "x.pdf is encrypted; decrypt it first"
    oom = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4294967296 bytes")
    assert describe_error(oom) == out_of_memory(oom) and "--chunk-size" in describe_error(oom)
    assert describe_error(ValueError("a bug")) is None


def test_rerun_skips_what_is_answered_and_asks_what_failed_again(tiny, home, docs, tmp_path):
    """A rerun writes nothing for answered questions; a job added, a fixed document and a changed
    setting are answered; the file ends with one row per question of the jobs file."""
    jobs_path = tmp_path / "jobs.jsonl"
    late = tmp_path / "late.txt"
    write_jobs(jobs_path, [{"id": "a", "documents": str(docs["a"]), "questions": ["w1?", "w2?"]},
                           {"id": "late", "documents": str(late), "question": "w3?"}])
    out = tmp_path / "answers.jsonl"
    assert run("batch", jobs_path, "-o", out, "-m", tiny, *TINY).exit_code == 0
    first = rows_of(out)
    assert "error" in first[2]
    again = run("batch", jobs_path, "-o", out, "-m", tiny, *TINY)
    assert "0 rows written" not in again.stderr and "1 rows written" in again.stderr  # only the failed one, failing again
    assert rows_of(out)[:2] == first[:2]
    late.write_text(words(80))
    write_jobs(jobs_path, [{"id": "a", "documents": str(docs["a"]), "questions": ["w1?", "w2?", "w9?"]},
                           {"id": "late", "documents": str(late), "question": "w3?"},
                           {"id": "b", "documents": str(docs["b"]), "question": "w1?", "ratio": 0.3}])
    result = run("batch", jobs_path, "-o", out, "-m", tiny, *TINY)
    assert result.exit_code == 0, result.stderr
    assert "asked again 1 question that had failed" in result.stderr
    rows = rows_of(out)
    assert sorted((r["job"], r["question"]) for r in rows) == [("a", "w1?"), ("a", "w2?"), ("a", "w9?"), ("b", "w1?"), ("late", "w3?")]
    assert all("answer" in r for r in rows) and len({r["key"] for r in rows}) == 5
    assert run("batch", jobs_path, "-o", out, "-m", tiny, *TINY, "--ratio", "0.3").exit_code == 0
    assert len(rows_of(out)) == 5 + 4  # the jobs that took --ratio are asked again at 0.3; b already was


def test_ctrl_c_keeps_every_finished_job_and_the_rerun_completes(tiny, home, docs, tmp_path):
    """Ctrl-C after the second job leaves exactly the finished jobs' rows, whole; the rerun answers the
    rest, and every question ends in the file exactly once."""
    from kvcli.cli.batch import describe_error
    from kvcli.cli.session import load
    from kvcli.cli.options import RunOptions
    from kvcli.cli.output import Screen

    jobs = check(tmp_path, *({"id": f"j{i}", "documents": str(docs["abc"[i % 3]]), "questions": [f"w{i}?", "w50?"]} for i in range(5)))
    reader = load(RunOptions(model=tiny), Screen(quiet=True))
    out = tmp_path / "answers.jsonl"

    def interrupt(counts):
        if counts.done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(jobs, LocalPool(reader, AnswerJobs(describe_error)), AnswersFile(out), describe_error, progress=interrupt)
    assert [r["job"] for r in rows_of(out)] == ["j0", "j0", "j1", "j1"]
    counts = run_batch(jobs, LocalPool(reader, AnswerJobs(describe_error)), AnswersFile(out), describe_error)
    assert (counts.done, counts.resumed, counts.rows) == (5, 2, 6)
    assert sorted((r["job"], r["question"]) for r in rows_of(out)) == sorted((f"j{i}", q) for i in range(5) for q in (f"w{i}?", "w50?"))


def test_a_job_given_up_by_the_pool_is_an_error_row(tmp_path, docs):
    """A job whose workers died twice comes back as an error row per question; the batch goes on."""
    jobs = check(tmp_path, {"id": "a", "documents": str(docs["a"]), "questions": ["w1?", "w2?"]},
                 {"id": "b", "documents": str(docs["b"]), "question": "w1?"})

    class Pool:
        identity = {"model": "fake"}

        def map(self, tasks):
            for tag, task in tasks:
                if task.job_id == "a":
                    yield tag, Outcome(lost="the worker died 2 times while on this job (killed); not tried again", attempts=2)
                else:
                    yield tag, Outcome([{"answer": "yes", "stats": {}}])

    out = tmp_path / "answers.jsonl"
    counts = run_batch(jobs, Pool(), AnswersFile(out))
    rows = rows_of(out)
    assert (counts.done, counts.failed) == (1, 1)
    assert [r.get("error", "")[:22] for r in rows] == ["the worker died 2 time"] * 2 + [""]
    assert [r.get("attempts") for r in rows] == [2, 2, None]


def test_a_worker_loads_the_model_with_the_command_lines_threads_and_device_map(tiny, monkeypatch):
    """Ray workers load through ModelSpec: --threads and --device-map reach load_model and torch, not only the in-process run."""
    import kvcli.models

    seen = {}
    monkeypatch.setattr(kvcli.models, "load_model", lambda model, **kwargs: seen.update(model=model, **kwargs) or (_ for _ in ()).throw(RuntimeError("stop")))
    spec = ModelSpec.of(tiny, device="cpu", threads=1, device_map="sequential")
    before = torch.get_num_threads()
    try:
        with pytest.raises(RuntimeError, match="stop"):
            spec.load()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert seen["model"] == tiny and seen["device"] == "cpu" and seen["device_map"] == "sequential"


def test_batch_refuses_bad_options_in_one_line(tiny, home, docs, tmp_path, monkeypatch):
    """--workers without --ray, a malformed jobs file and --ray without Ray installed are one-line errors."""
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"documents": str(docs["a"]), "question": "w1?"}])
    out = tmp_path / "answers.jsonl"
    one_line_error(run("batch", jobs, "-o", out, "-m", tiny, "--workers", "2"), "--workers is for --ray")
    one_line_error(run("batch", write_jobs(tmp_path / "bad.jsonl", ["[1]"]), "-o", out, "-m", tiny), "bad.jsonl:1")
    one_line_error(run("batch", jobs, "-o", jobs, "-m", tiny), "is the jobs file")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if it were not installed
    one_line_error(run("batch", jobs, "-o", out, "-m", tiny, "--ray"), "pip install 'kvcli[ray]'")
    one_line_error(run("eval", "--data", jobs, "-m", tiny, "--ray"), "pip install 'kvcli[ray]'")
    assert not out.exists()


# --- on a local Ray ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """A local Ray with 2 CPUs for this module; workers see its KVCLI_HOME (they inherit ray.init's environment)."""
    ray = pytest.importorskip("ray")
    import logging

    saved = os.environ.get("KVCLI_HOME")
    os.environ["KVCLI_HOME"] = str(tmp_path_factory.mktemp("ray_home"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()
    if saved is None:
        os.environ.pop("KVCLI_HOME", None)
    else:
        os.environ["KVCLI_HOME"] = saved


def test_eval_on_ray_writes_the_json_and_log_of_a_run_here(ray_local, tiny, home, tmp_path):
    """`eval --ray --workers 2` gives the same results JSON (timings aside) and the same progress log,
    line for line, as a single-process run on the same rows."""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"_id": f"r{i}", "context": words(120 + 30 * i, i), "input": f"w{i}?", "answers": [f"w{i + 7}"]}) + "\n"
                            for i in range(4)))
    args = ["eval", "--data", data, "-m", tiny, "--methods", "full,snapkv,h2o", "--budgets", "16,32", "--max-new-tokens", "3", "--json"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each Ray worker (2 CPUs, 2 workers): the same arithmetic
    try:
        here = run(*args, "-o", tmp_path / "here.json")
    finally:
        torch.set_num_threads(threads)
    assert here.exit_code == 0, here.stderr
    there = run(*args, "-o", tmp_path / "ray.json", "--ray", "--workers", "2")
    assert there.exit_code == 0, there.stderr
    assert "2 Ray workers" in there.stderr
    a, b = json.loads(here.stdout), json.loads(there.stdout)
    timing_a, timing_b = a.pop("timing"), b.pop("timing")
    assert a == b
    assert [r["id"] for r in timing_a["rows"]] == [r["id"] for r in timing_b["rows"]] == ["r0", "r1", "r2", "r3"]
    assert (tmp_path / "here.json.partial.jsonl").read_text() == (tmp_path / "ray.json.partial.jsonl").read_text()
    assert json.loads((tmp_path / "ray.json").read_text())["samples"] == b["samples"]


def faulty_worker(folder: Path):
    """A Worker that dies on some jobs: `slow` waits mid-job for the test to SIGKILL its process (first try
    only), `doomed` kills its own process every time. Made in a function so Ray pickles it by value."""

    class Faulty(Worker):
        def run(self, task):
            if task.job_id == "doomed":
                os.kill(os.getpid(), signal.SIGKILL)
            started = folder / "slow.pid"
            if task.job_id == "slow" and not started.exists():
                started.write_text(str(os.getpid()))
                time.sleep(120)  # killed long before this ends
            return super().run(task)

    return Faulty


def test_a_worker_killed_mid_job_is_replaced_and_no_job_is_lost(ray_local, tiny, home, docs, tmp_path):
    """On Ray with 2 workers: a worker SIGKILLed mid-job is replaced and its job answered on the second try;
    a job that kills its worker twice is an error row; every question is in the output exactly once, and
    the other answers are those of a run here."""
    from kvcli.batch.ray_pool import RayPool
    from kvcli.cli.batch import describe_error
    from kvcli.cli.options import RunOptions
    from kvcli.cli.output import Screen
    from kvcli.cli.session import load

    specs = [{"id": f"j{i}", "documents": str(docs["abc"[i % 3]]), "questions": [f"w{i}?", "w50?"]} for i in range(6)]
    specs.insert(2, {"id": "slow", "documents": str(docs["b"]), "questions": ["w4?", "w5?"]})
    specs.insert(5, {"id": "doomed", "documents": str(docs["c"]), "question": "w6?"})
    jobs = check(tmp_path, *specs, options=Options(max_new_tokens=4))

    def kill_when_started():
        pid_file = tmp_path / "slow.pid"
        deadline = time.monotonic() + 90
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)

    killer = threading.Thread(target=kill_when_started, daemon=True)
    pool = RayPool(ModelSpec.of(tiny), AnswerJobs(describe_error), workers=2, worker_class=faulty_worker(tmp_path))
    try:
        killer.start()
        out = tmp_path / "ray.jsonl"
        counts = run_batch(jobs, pool, AnswersFile(out), describe_error)
    finally:
        pool.close()
    killer.join(timeout=1)
    assert pool.deaths == 3  # slow once, doomed twice
    rows = rows_of(out)
    assert [(r["job"], r["question"]) for r in rows] == [(job.id, q) for job in jobs for q in job.questions]
    by_job = {r["job"]: r for r in rows}
    assert by_job["slow"]["attempts"] == 2 and "answer" in by_job["slow"]
    assert "died 2 times" in by_job["doomed"]["error"] and "answer" not in by_job["doomed"]
    assert (counts.done, counts.failed, counts.retried) == (len(jobs) - 1, 1, 2)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reader = load(RunOptions(model=tiny), Screen(quiet=True))
        here = tmp_path / "here.jsonl"
        run_batch([j for j in jobs if j.id != "doomed"], LocalPool(reader, AnswerJobs(describe_error)), AnswersFile(here), describe_error)
    finally:
        torch.set_num_threads(threads)
    same = lambda r: (r["job"], r["question"], r["answer"], r["key"], r["stats"]["retained_per_layer"])  # noqa: E731
    assert [same(r) for r in rows_of(here)] == [same(r) for r in rows if r["job"] != "doomed"]
