"""How glibc's allocator treats the large buffers a prefill makes and frees (Linux only).

A prefill makes and frees hundreds of megabytes of activations per layer (a 4,243-token prompt
of the default model: ~650 MB per layer, in buffers of 1-30 MB). Below glibc's mmap threshold a
freed buffer goes back to the heap and the next one reuses it; above it, every buffer is a fresh
mapping whose pages fault in one by one and are returned on free. kvcli used to pin the
threshold at 128 KiB so that the process's resident memory followed its live tensors exactly;
on this project's 2-core virtual machine that cost ~3.9 million page faults and a fifth to a
quarter of the prefill (`python benchmarks/heap_policy.py`, docs/results.md "Session 10: the
allocator, and the same comparison again"): 17.5 s against 13.8 s for the same 3,977 tokens.

`tune()` sets the threshold to 32 MiB (glibc's own ceiling for its dynamic threshold: every
activation buffer of a prompt up to ~8K tokens is reused) and the trim threshold to 64 MiB (the
heap's free top is given back past that); `release()` gives back the heap's free pages after a
prefill (`malloc_trim`), so memory held between reads (a chat, a batch) is what is live. The
price is fragmentation while reading: the peak resident memory was 78-164 MiB higher in the
same measurements (4K and 8K tokens). Elsewhere (not glibc, not Linux) both are no-ops, and so is `tune()` where
the environment sets glibc's own `MALLOC_MMAP_THRESHOLD_` or `MALLOC_TRIM_THRESHOLD_` (the
person's choice: `MALLOC_MMAP_THRESHOLD_=131072` is the old behaviour).
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # bytes; buffers at least this large are mappings of their own
TRIM_THRESHOLD = 64 << 20  # bytes of free heap top kept before glibc gives it back


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # musl or another libc: its own allocator, left as it is
        return None


_LIBC = _libc()


def tune() -> bool:
    """Let freed activation buffers be reused (see the module's text); False where nothing was set."""
    if _LIBC is None or any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(_LIBC.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release() -> None:
    """Give the heap's free pages back to the system (after a prefill: its activations are gone)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
