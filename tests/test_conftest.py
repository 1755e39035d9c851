"""tests/conftest.py: a missing embedded model skips a real-model test on a laptop and fails it in CI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent

# A real-model test whose model cannot be found: its package is named as one that is not installed.
PROBE = '''
import dataclasses

from kvcli.models import EMBEDDED

EMBEDDED["smollm2-135m"] = dataclasses.replace(EMBEDDED["smollm2-135m"], parts=(("kvcli_no_such_model_package", "model.gguf"),))


def test_needs_the_small_model(smollm):
    assert smollm is not None
'''


def run_probe(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    """Run PROBE under a copy of tests/conftest.py in a fresh pytest, with CI set to `ci` (None: unset)."""
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "test_probe.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_a_missing_embedded_model_fails_the_run_in_ci(tmp_path):
    """With CI=true, a real-model test whose embedded model is not installed fails (exit 1) naming the model, never skips."""
    result = run_probe(tmp_path, "true")
    assert result.returncode == 1, result.stdout + result.stderr
    assert ("1 error" in result.stdout or "1 failed" in result.stdout) and "skipped" not in result.stdout  # a fixture's failure is an error
    assert "embedded model 'smollm2-135m' is not installed" in result.stdout


def test_a_missing_embedded_model_skips_outside_ci(tmp_path):
    """Without CI in the environment, the same test is skipped with the reason, and the run passes."""
    result = run_probe(tmp_path, None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout and "embedded model 'smollm2-135m' is not installed" in result.stdout
