"""What people read on a terminal: the run report's layers (ranges of nearly equal layers, bars
only where they differ, every layer with --verbose), 80 columns for the report, inspect's profile
and plan, one progress bar over a chunked read (in a real pseudo-terminal), and the recorded
reading speed behind plan's time estimate."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pexpect
import pytest
from rich.console import Console
from test_models import save_tiny_llama
from typer.testing import CliRunner

from kvcli.cli import app
from kvcli.inspect import Profile, render_profile
from kvcli.speed import KEPT_MODELS, KEPT_READS, clock, measured_speed, record_read, speed_file
from kvcli.stats import RunStats, layer_runs, render

WIDTH = 80
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
runner = CliRunner()


def stats(counts: list[int], windows: list[int | None] | None = None) -> RunStats:
    """A report's statistics with these kept tokens per layer (the rest plausible, fixed)."""
    return RunStats(
        model="qwen2.5-coder-0.5b", method="evidencekv", method_params={"window_size": 8, "kernel_size": 7, "pooling": "avg"},
        ratio=0.05, budget=sum(counts) / len(counts), prompt_tokens=4612, compressed=True, note="", window_text=" with statement?",
        retained_per_layer=counts, kv_bytes_full=108 << 20, kv_bytes_kept=5 << 20, kv_bytes_peak=108 << 20,
        peak_memory_bytes=2680 << 20, load_s=1.7, prefill_s=32.6, ttft_s=32.7, decode_tokens=13, decode_s=2.0,
        stopped="end of sequence", layer_windows=windows or [],
    )


def shown(renderable, width: int = WIDTH) -> list[str]:
    """The lines `renderable` prints on a console `width` columns wide."""
    console = Console(width=width, record=True, file=open(os.devnull, "w"))
    console.print(renderable)
    return console.export_text().splitlines()


def layer_part(lines: list[str]) -> list[str]:
    """The report's lines from its layer part on."""
    start = next(i for i, line in enumerate(lines) if line.startswith("retained tokens per layer"))
    return lines[start:]


# --- the report's layers -------------------------------------------------------------------------


def test_equal_layers_are_one_line():
    """Layers that all kept the same count are one line naming the range and the count, no bars."""
    assert layer_part(shown(render(stats([231] * 24)))) == ["retained tokens per layer (window included): layers 0-23: 231 tokens each"]


def test_unequal_heads_are_counted_by_their_exact_mean():
    """Where a per-head split left a layer's KV heads unequal, the layer's count is their mean (said so), and the
    global layers' budget is the exact mean, not one of rounded layer counts."""
    counts = stats([134, 64])
    counts.budget = (133.5 + 64.5) / 2
    counts.extra = {"heads": {"min": 64, "max": 143, "per_layer": [[124, 143], [64, 65]]}}
    assert counts.global_budget == counts.budget == 99.0
    assert layer_part(shown(render(counts)))[0] == "retained tokens per layer (window included; a mean over KV heads):"


def test_nearly_equal_layers_are_one_range():
    """231 and 230 kept tokens (what a ratio rounds to) collapse into one range of counts."""
    assert layer_part(shown(render(stats([231] * 14 + [230] * 10)))) == [
        "retained tokens per layer (window included): layers 0-23: 230-231 tokens"]


def test_uneven_layers_get_a_bar_per_run():
    """Layers that differ get a bar per run of nearly equal layers, longer for more tokens."""
    lines = layer_part(shown(render(stats([512] * 4 + [231] * 14 + [230] * 6))))
    assert len(lines) == 4  # the title, the header, two runs
    first, second = lines[2], lines[3]
    assert first.split()[:2] == ["0-3", "512"] and second.split()[:2] == ["4-23", "230-231"]
    assert first.count("█") > second.count("█") > 0


def test_runs_never_drift_and_never_mix_sliding_layers():
    """A run spans at most 2% (or one token) however slowly counts drift, and sliding-window layers run apart."""
    runs = layer_runs(list(range(300, 200, -1)))
    assert all(run.high - run.low <= max(1, run.high // 50) for run in runs) and len(runs) > 10
    runs = layer_runs([231, 231, 511, 511, 231], [None, None, 512, 512, None])
    assert [(run.layers, run.kept, run.sliding) for run in runs] == [("0-1", "231", False), ("2-3", "511", True), ("4", "231", False)]


def test_every_layer_shows_each_layer():
    """With every_layer (--verbose) each of 24 equal layers has its own numbered row."""
    lines = layer_part(shown(render(stats([231] * 24), every_layer=True)))
    numbers = {int(cell) for line in lines[2:] for cell in re.findall(r"(\d+)\s+231 ", line)}
    assert numbers == set(range(24))


@pytest.mark.parametrize(
    ("counts", "windows", "every_layer"),
    [
        ([231] * 24, None, False),
        ([231] * 24, None, True),
        (list(range(700, 100, -20)), None, False),  # 30 layers, all different
        ([100 + 37 * i for i in range(36)], None, True),
        ([1717] * 6 + [511] * 2 + [1717] * 6, [None] * 6 + [512] * 2 + [None] * 6, False),
        ([123456] * 3 + [9] * 3, None, True),
    ],
)
def test_report_fits_80_columns(counts, windows, every_layer):
    """Every line of the report, layers included, fits 80 columns."""
    lines = shown(render(stats(counts, windows), every_layer=every_layer))
    assert max(len(line) for line in lines) <= WIDTH, "\n".join(lines)


@pytest.mark.parametrize("groups", [3, 10, 60, 300])
def test_inspect_profile_is_one_line_per_layer_in_80_columns(groups):
    """inspect's profile shows every layer, each on one line of at most 80 columns, however many pages and however long their names."""
    labels = [f"a_rather_long_report_name.pdf p.{page}" for page in range(groups)] + ["prompt (template, question)"]
    per_layer = [[float((layer * 7 + g * 3) % 11) for g in range(len(labels))] for layer in range(24)]
    profile = Profile(labels, [20] * len(labels), [None] * len(labels), per_layer, [231] * 24, "page", [None] * 22 + [512] * 2)
    lines = shown(render_profile(profile))
    rows = lines[next(i for i, line in enumerate(lines) if line.startswith("layer")) + 1:]
    assert [int(line.split()[0]) for line in rows] == list(range(24)), "\n".join(lines)  # no row wraps
    assert max(len(line) for line in lines) <= WIDTH, "\n".join(lines)


# --- the recorded speed and plan's estimate ------------------------------------------------------


def test_speed_is_recorded_per_model_device_and_dtype(tmp_path):
    """Recorded reads give all tokens over all seconds, for their model, device and dtype only."""
    assert measured_speed(tmp_path, "m", "cpu", "float32") is None
    record_read(tmp_path, "m", "cpu", "float32", 1000, 4.0)
    record_read(tmp_path, "m", "cpu", "float32", 3000, 6.0)
    record_read(tmp_path, "m", "cuda", "bfloat16", 5000, 1.0)
    speed = measured_speed(tmp_path, "m", "cpu", "float32")
    assert speed.reads == 2 and speed.tokens_per_s == pytest.approx(400.0)
    assert speed.seconds(2000) == pytest.approx(5.0)
    assert "2 reads of this model on this machine (cpu, float32) at ~400 tokens/s" == speed.basis()
    assert measured_speed(tmp_path, "other", "cpu", "float32") is None


def test_speed_file_stays_tiny(tmp_path):
    """Only the last reads of each model and the most recent models are kept; short reads are not timed."""
    for i in range(KEPT_READS + 5):
        record_read(tmp_path, "m", "cpu", "float32", 1000, 1.0 + i)
    assert measured_speed(tmp_path, "m", "cpu", "float32").reads == KEPT_READS
    record_read(tmp_path, "m", "cpu", "float32", 10, 0.001)  # a few tokens time the overhead, not the model
    assert measured_speed(tmp_path, "m", "cpu", "float32").reads == KEPT_READS
    for i in range(KEPT_MODELS + 3):
        record_read(tmp_path, f"model{i}", "cpu", "float32", 1000, 1.0)
    data = json.loads(speed_file(tmp_path).read_text())
    assert len(data) == KEPT_MODELS and "model0" not in " ".join(data)


def test_unwritable_or_damaged_home_never_fails_a_read(tmp_path):
    """Recording into a home that is a file, or over a damaged record, raises nothing; a damaged record reads as none."""
    blocker = tmp_path / "home"
    blocker.write_text("not a folder")
    record_read(blocker, "m", "cpu", "float32", 1000, 1.0)
    speed_file(tmp_path).write_text("{damaged")
    assert measured_speed(tmp_path, "m", "cpu", "float32") is None
    speed_file(tmp_path).write_text(json.dumps({"m | cpu | float32": 5, "n | cpu | float32": [[1, 2, 3], "x", [100, 0]]}))
    assert measured_speed(tmp_path, "m", "cpu", "float32") is None and measured_speed(tmp_path, "n", "cpu", "float32") is None
    record_read(tmp_path, "m", "cpu", "float32", 1000, 1.0)
    assert measured_speed(tmp_path, "m", "cpu", "float32").reads == 1


def test_read_only_home_never_fails_a_read(tmp_path, monkeypatch):
    """A home that refuses new files (a read-only mount: root ignores permissions, so the OS's EROFS is mocked) records nothing and raises nothing."""
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    record_read(tmp_path, "m", "cpu", "float32", 1000, 1.0)
    assert not speed_file(tmp_path).exists()


def test_clock():
    """Seconds read as a clock: minutes:seconds, hours when there are any."""
    assert [clock(s) for s in (0.4, 45, 80, 3723)] == ["0:00", "0:45", "1:20", "1:02:03"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A two-layer random Llama with 128 positions and a word-level tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny_llama")


@pytest.fixture
def doc(tmp_path) -> Path:
    """104 prompt tokens of words the tiny model knows, in a folder with a long path (plan lists it)."""
    folder = tmp_path / ("a_folder_with_a_long_name_" * 3)
    folder.mkdir()
    path = folder / "notes.txt"
    path.write_text(" ".join(f"w{i % 60}" for i in range(100)))
    return path


def test_plan_estimates_the_read_from_recorded_reads(tiny, doc, home):
    """Without records plan says none are recorded; after two reads it estimates the time from them, labelled an estimate; every line fits 80 columns."""
    plan = ["plan", str(doc), "-m", str(tiny), "--method", "snapkv", "--ratio", "0.5", "--max-new-tokens", "2"]
    before = runner.invoke(app, plan)
    assert before.exit_code == 0, before.stderr
    assert "no reads of this model recorded on this machine yet" in " ".join(before.stdout.split())
    assert json.loads(runner.invoke(app, plan + ["--json"]).stdout)["read_estimate"] is None
    for _ in range(2):
        read = runner.invoke(app, ["ask", str(doc), "w1?", "-m", str(tiny), "--method", "snapkv", "--ratio", "0.5", "--max-new-tokens", "2"])
        assert read.exit_code == 0, read.stderr
    after = runner.invoke(app, plan)
    text = " ".join(after.stdout.split())
    assert re.search(r"time ~\d+:\d\d to read the prompt, an estimate based on 2 reads of this model on this machine \(cpu, float32\) at ~[\d,]+ tokens/s", text), text
    estimate = json.loads(runner.invoke(app, plan + ["--json"]).stdout)["read_estimate"]
    assert estimate["reads"] == 2 and estimate["seconds"] == pytest.approx(104 / estimate["tokens_per_s"], abs=0.1)
    assert max(len(line) for line in before.stdout.splitlines() + after.stdout.splitlines()) <= WIDTH, after.stdout


def test_plan_verbose_lists_every_source(tiny, tmp_path, home):
    """plan lists the first 20 sources and counts the rest; --verbose lists every one."""
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(25):
        (folder / f"f{i:02d}.txt").write_text(f"w{i} w{i + 1}")
    plan = ["plan", str(folder), "-m", str(tiny), "--method", "snapkv", "--ratio", "0.5", "--max-new-tokens", "2"]
    brief, every = runner.invoke(app, plan).stdout, runner.invoke(app, plan + ["--verbose"]).stdout
    assert "f19.txt" in brief and "f20.txt" not in brief and "5 more" in brief
    assert all(f"f{i:02d}.txt" in every for i in range(25)) and "5 more" not in every


# --- progress from the engine's prefill -----------------------------------------------------------


class Heard:
    """An `on_layer` callback with a `chunk` method: records what the prefill told it, in order."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def chunk(self, index: int, count: int, start: int, stop: int, prompt_len: int) -> None:
        self.events.append(("chunk", index, count, start, stop, prompt_len))

    def __call__(self, layer_idx: int) -> None:
        self.events.append(("layer", layer_idx))


def test_prefill_names_each_chunk_before_its_layers():
    """A chunked prefill tells a progress callback each chunk (index, count, token range) before that chunk's layers, in order; a plain function still hears every layer."""
    import torch

    from kvcli.generate import prefill
    from kvcli.methods import make_method, plan_budget
    from methodutil import squeeze, tiny_llama

    model, method = tiny_llama(3), make_method("snapkv")
    prompt = torch.randint(0, 128, (1, 80), generator=torch.Generator().manual_seed(1))
    compression = squeeze(method, plan_budget(80, 3, window_size=method.window_size, ratio=0.25))
    heard = Heard()
    prefill(model, prompt, compression, chunk_size=24, probe_ids=prompt[:, -4:], on_layer=heard)
    bounds = [0, 24, 48, 72, 80]
    expected = [event for k in range(4) for event in [("chunk", k, 4, bounds[k], bounds[k + 1], 80)] + [("layer", i) for i in range(3)]]
    assert heard.events == expected
    layers: list[int] = []
    prefill(model, prompt, compression, chunk_size=24, on_layer=layers.append)
    assert layers == [0, 1, 2] * 4


# --- progress over a chunked read, in a real terminal -------------------------------------------


def test_chunked_read_shows_one_bar_with_its_chunks(tiny, doc, home):
    """In a terminal, a read in chunks shows one bar over the prompt's tokens that says chunk k of N
    for every chunk in order, never goes back, and has an ETA, on lines of at most 80 columns; no bar shows a total of None."""
    env = dict(os.environ, KVCLI_HOME=str(home), PYTHONPATH=os.pathsep.join(sys.path))
    child = pexpect.spawn(sys.executable, ["-m", "kvcli", "ask", str(doc), "w1?", "-m", str(tiny), "--method", "snapkv", "--ratio", "0.5",
                                           "--chunk-size", "16", "--max-new-tokens", "2"],
                          env=env, encoding="utf-8", dimensions=(24, WIDTH), timeout=120)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    screen = ESCAPES.sub("", child.before)
    seen = [tuple(int(n.replace(",", "")) for n in match)
            for match in re.findall(r"prefill ([\d,]+)/([\d,]+) tokens, chunk (\d+) of (\d+)", screen)]
    assert seen, screen
    done, totals, chunks, counts = zip(*seen)
    assert set(totals) == {104} and set(counts) == {7}  # 104 prompt tokens in chunks of 16
    assert sorted(set(chunks)) == list(range(1, 8)) and list(chunks) == sorted(chunks)
    assert list(done) == sorted(done) and done[-1] == 104  # one bar: it never restarts
    assert "ETA" in screen
    assert "/None" not in screen  # the files bar before it knows how many: "0/?"
    bar_lines = [line for part in screen.split("\r") for line in part.split("\n") if "tokens, chunk" in line]
    assert max(len(line.rstrip()) for line in bar_lines) <= WIDTH


def test_plan_estimate_benchmark_runs_on_a_tiny_model(tiny, tmp_path, home, capsys):
    """benchmarks/plan_estimate.py reads at each length, estimates every read after the first from the ones before, and writes its rows."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_estimate", Path(__file__).resolve().parent.parent / "benchmarks" / "plan_estimate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    document = tmp_path / "doc.txt"
    document.write_text(" ".join(f"w{i % 60}" for i in range(200)))
    out = tmp_path / "rows.json"
    script.main(["--model", str(tiny), "--document", str(document), "--lengths", "70,90,80", "--max-new-tokens", "4", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [row["based_on"] for row in rows] == [0, 1, 2] and rows[0]["estimate_s"] is None
    assert all(row["estimate_s"] > 0 for row in rows[1:]) and all(row["read_s"] > 0 for row in rows)
