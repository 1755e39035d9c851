"""What this CPU says it can do: the flags of /proc/cpuinfo, read in one place for every choice
that depends on them (int8 weights need bfloat16 instructions, kvcli's int8 kernel AVX-512F)."""

from __future__ import annotations


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags /proc/cpuinfo lists for the first CPU; empty where there is none
    to read (macOS, Windows, a sandbox)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return frozenset(next((line for line in cpuinfo if line.startswith("flags")), "").split())
    except OSError:
        return frozenset()
