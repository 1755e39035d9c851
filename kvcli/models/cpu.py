"""What this CPU says it can do: the flags of /proc/cpuinfo, read in one place for every choice
that depends on them (int8 weights need bfloat16 instructions, kvcli's kernels AVX-512F); defined
in kvcli/native.py (the base layer), named here for the models layer."""

from __future__ import annotations

from ..native import cpu_flags

__all__ = ["cpu_flags"]
