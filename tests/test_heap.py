"""kvcli/heap.py: after `tune()` a freed prefill-sized buffer is reused instead of mapped and
faulted in again; glibc's own environment variables win; `release()` gives freed pages back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# In a fresh interpreter: twenty times, make and touch a 16 MiB and a 12 MiB tensor (a prefill's
# activations), free both; count the page faults of the last five rounds (the heap takes a few
# rounds to reach its size: measured, the faults stop by the ninth).
PROBE = """
import json, resource, sys
import torch
from kvcli import heap
tuned = heap.tune() if sys.argv[1] == "tune" else False
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    first = torch.empty(1 << 24, dtype=torch.uint8).fill_(1)
    second = torch.empty(3 << 20, dtype=torch.float32).fill_(1)
    del first, second
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
heap.release()
print(json.dumps({"tuned": tuned, "faults": sum(faults[-5:])}))
"""

glibc_linux = pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                                 reason="glibc's allocator only")


def probe(mode: str, **env: str) -> dict:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")} | env
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, cwd=ROOT, env=clean, timeout=120, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@glibc_linux
def test_tuned_heap_reuses_freed_buffers():
    pages = (28 << 20) // os.sysconf("SC_PAGE_SIZE")  # one round's buffers
    tuned = probe("tune")
    assert tuned["tuned"] is True
    assert tuned["faults"] < pages  # five rounds in less than one round's pages: the buffers are reused
    before = probe("none", MALLOC_MMAP_THRESHOLD_="131072")  # kvcli's old setting: each buffer a new mapping
    assert before["faults"] >= 4 * pages


@glibc_linux
def test_environment_settings_are_left_alone():
    assert probe("tune", MALLOC_MMAP_THRESHOLD_="131072")["tuned"] is False
    assert probe("tune", MALLOC_TRIM_THRESHOLD_="0")["tuned"] is False
