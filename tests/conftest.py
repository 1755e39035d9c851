"""Shared fixtures: embedded models loaded once per session, from the machine's kvcli cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kvcli.errors import ModelError

# `--dtype auto` on a CPU is int8 weights under bfloat16 where the CPU has bfloat16 instructions
# (kvcli/models/weights.py), float32 elsewhere. The tiny-model tests check bytes and numbers that
# must be the same on every machine, so they take the CPU as one without (float32), subprocesses
# and Ray workers included; the embedded-model fixtures load as this CPU would (`_engine`), and
# tests/test_weights.py checks the int8 forms themselves.
os.environ["KVCLI_CPU_BF16"] = "0"


def _model_home() -> Path:
    # Real-model tests reuse the machine's converted checkpoints (conversion is atomic and
    # deterministic), so CI converts each embedded model once per machine, not once per run.
    return Path(os.environ.get("KVCLI_HOME") or Path.home() / ".cache" / "kvcli").expanduser()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads; on a shared machine two threads can run far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty KVCLI_HOME for one test, and none of the user's KVCLI_* choices (a module may define its own)."""
    monkeypatch.setenv("KVCLI_HOME", str(tmp_path / "home"))
    for name in ("KVCLI_METHOD", "KVCLI_MODEL", "KVCLI_DEVICE", "KVCLI_DEVICE_MAP", "KVCLI_THREADS"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "home"


@pytest.fixture(scope="session")
def model_home() -> Path:
    """The KVCLI_HOME that the real-model tests share."""
    return _model_home()


def in_ci() -> bool:
    """Whether the run is a CI run (`CI=true`, as GitHub Actions and most CI services set it)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def embedded_parts(name: str) -> list[Path]:
    """The embedded model's part files. Where its packages are missing the test is skipped, but in
    CI it fails: a CI run must not pass with its real-model tests silently left out."""
    from kvcli.models import EMBEDDED

    try:
        return EMBEDDED[name].part_paths()
    except ModelError as err:
        if in_ci():
            pytest.fail(f"CI is set and {err}", pytrace=False)
        pytest.skip(str(err))


def _engine(name: str, dtype: str = "auto"):
    from kvcli.models import load_model
    from kvcli.reading import Reader

    embedded_parts(name)
    os.environ.setdefault("KVCLI_HOME", str(_model_home()))
    pinned = os.environ.pop("KVCLI_CPU_BF16")  # loaded as a user's run on this CPU loads it
    try:
        return Reader(load_model(name, dtype=dtype))
    finally:
        os.environ["KVCLI_CPU_BF16"] = pinned


@pytest.fixture(scope="session")
def qwen():
    """The default embedded model (Qwen2.5-Coder-0.5B-Instruct), loaded once."""
    return _engine("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def qwen_float32():
    """The default embedded model with float32 weights, for tests that compare two computations
    of the same numbers exactly (in bfloat16, two kernels may round a near-tie apart)."""
    return _engine("qwen2.5-coder-0.5b", "float32")


@pytest.fixture(scope="session")
def smollm_float32():
    """SmolLM2 with float32 weights (see qwen_float32)."""
    return _engine("smollm2-135m", "float32")


@pytest.fixture(scope="session")
def smollm():
    """The small embedded model (SmolLM2-135M-Instruct), loaded once."""
    return _engine("smollm2-135m")


@pytest.fixture(scope="module")
def tokenizer(smollm):
    """SmolLM2's tokenizer, for prompt lengths (a module may define its own)."""
    return smollm.tokenizer


@pytest.fixture(scope="module")
def haystack(tokenizer):
    """About 2,500 tokens of real prose to hide needles in and cut rows from."""
    from helpers_text import prose

    return prose(tokenizer, 2500)
