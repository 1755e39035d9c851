"""scripts/gpu_check.sh --smoke: the GPU check's code path, on tiny models of its three architectures on the CPU, so CI runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("llama-3-8b", "qwen2.5-7b", "gemma-3-12b")
METHODS = ("full", "streamingllm", "snapkv", "snapkv:head_split=adaptive", "pyramidkv", "dynamickv", "evidencekv",
           "evidencekv:head_split=profile", "evidencekv (one pass)", "h2o")


def test_gpu_check_smoke_runs_every_configuration(tmp_path):
    """The smoke run exits 0 with the tables on stdout, progress on stderr, and a JSON row per model x length x method with its speeds and KV bytes, and an attention comparison per length."""
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--smoke", "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "smoke"
    rows = result["rows"]
    assert [(row["model"], row["length"], row["method"]) for row in rows] == [
        (model, length, method) for model in MODELS for length in (512, 1024) for method in METHODS
    ]
    for row in rows:
        assert "error" not in row, row
        assert row["prefill_s"] > 0 and row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
        assert row["kv_bytes_kept"] <= row["kv_bytes_peak"] <= row["kv_bytes_full"]
        if row["method"] == "full":
            assert row["kv_bytes_kept"] == row["kv_bytes_full"] and row["kv_excess_layers"] == 0
        else:
            assert row["kv_bytes_kept"] < row["kv_bytes_full"]
        assert row["flash_calls"] == 0  # the CPU never runs flash-attn
        if ":head_split=" in row["method"]:  # unequal heads, packed, at the bytes of the method's equal split
            equal = next(r for r in rows if (r["model"], r["length"], r["method"]) == (row["model"], row["length"], row["method"].split(":")[0]))
            assert row["packed_layers"] > 0 and row["head_min"] < row["head_max"] and equal["packed_layers"] == 0
            assert row["kv_bytes_kept"] == equal["kv_bytes_kept"] and row["decode_vs_equal"] > 0
    steps = [(row["model"], row["length"], row["step"]) for row in result["attention_rows"]]
    assert steps == [(model, length, step) for model in MODELS for length in (512, 1024) for step in ("prefill", "chunk", "decode")]
    assert all("not CUDA" in row["flash_reason"] for row in result["attention_rows"])
    assert "decode tok/s" in done.stdout and "flash-attn vs SDPA" in done.stdout and "gemma-3-12b" in done.stdout
    assert "== benchmark" in done.stderr and "contention" not in done.stderr  # the contention step runs on the GPU machine only


def test_gpu_check_fit_needs_no_gpu(tmp_path):
    """--fit prints, from the configurations alone, the weights, the KV cache and the sum a GPU must hold for each model and length."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--fit", "--lengths", "32768,131072"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("| llama-3-8b")]
    assert len(lines) == 2 and "14.96 GiB" in lines[0]  # 8.03e9 parameters in bf16
    assert "| 131,072 | 14.96 GiB | 16.00 GiB |" in lines[1]  # 32 layers x 8 KV heads x 128 dims x K and V x 2 bytes x 131,072
    for model in MODELS:
        assert f"| {model} |" in done.stdout


def test_contention_ratios_are_against_alone_and_torchs_default():
    """contention.py's summary divides each median by the same setting alone and by torch's default at the same busy level."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("contention", ROOT / "benchmarks" / "contention.py")
    contention = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(contention)
    samples = [
        {"setting": setting, "busy": busy, "decode_tokens_per_s": rate, "prefill_tokens_per_s": 100.0, "decode_threads": 1, "prefill_threads": 2}
        for setting, busy, rate in [("torch", 0, 16.0), ("torch", 1, 4.0), ("torch", 1, 6.0), ("kvcli", 0, 12.0), ("kvcli", 1, 10.0)]
    ]
    table = {(row["setting"], row["busy"]): row for row in contention.summarize(samples, ["torch", "kvcli"], [0, 1])}
    assert table[("torch", 1)]["decode_tokens_per_s"] == 5.0 and table[("torch", 1)]["decode_vs_alone"] == 5.0 / 16.0
    assert table[("kvcli", 1)]["decode_vs_torch"] == 2.0 and table[("kvcli", 0)]["decode_vs_torch"] == 0.75
    assert "| 1 | kvcli | 2/1 | 10.0 | 0.83x | 2.00x |" in contention.render({**{"model": "m", "prompt_tokens": 1, "new_tokens": 2, "cores": 2, "busy_threads": 2, "rounds": 1}, "table": list(table.values())})
