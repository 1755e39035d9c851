"""scripts/gpu_check.sh --smoke: the GPU check's code path, on a tiny model on the CPU, so CI runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_smoke_runs_every_configuration(tmp_path):
    """The smoke run exits 0 with the table on stdout, progress on stderr, and a JSON row per length x method with the kept KV on budget."""
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--smoke", "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "smoke"
    rows = result["rows"]
    assert [(row["length"], row["method"], row["ratio"]) for row in rows] == [
        (length, method, ratio) for length in (1024, 2048) for method, ratio in (("full", None), ("dynamickv", 0.017), ("dynamickv", 0.1))
    ]
    for row in rows:
        assert "error" not in row
        assert row["prefill_s"] > 0 and row["decode_tokens_per_s"] > 0
        if row["ratio"] is None:
            assert row["kv_bytes_kept"] == row["kv_bytes_full"]
        else:
            assert abs(row["kv_vs_target"] - 1) <= 0.02
    assert "dynamickv@0.017" in done.stdout and "decode tok/s" in done.stdout
    assert "== benchmark" in done.stderr and "tokens full: prefill" in done.stderr
