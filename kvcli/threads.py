"""How many CPU threads torch computes with, chosen so that a busy machine slows kvcli down
instead of stalling it (`--threads`, KVCLI_THREADS).

torch splits every operation over its threads and waits for the last one to finish. A decode
step is hundreds of small operations, so when another process holds one of the cores, every
operation waits for the thread the scheduler put aside: measured on a 2-core machine (issue #13),
SmolLM2 decoded 5.6 tokens/s with torch's default of one thread per core beside one busy
2-thread process and 10.1 with one thread, and 0.3 tokens/s beside two busy jobs where it ran
~16 alone. Prefill's operations are large matrix products that keep more of their speed.

`auto` (the default) therefore prefills on the cores other processes leave free, counted again
at the start of each prefill, and decodes on at most half of the machine's cores (one on a 2-core
machine), counting again each time an answer starts. `--threads N` uses N for both. Measured in
docs/results.md ("CPU threads beside busy processes"): a prefill that kept the 2 threads it was
started with ran at 103 tokens/s beside one busy process where one thread ran 243.
`benchmarks/contention.py` measures these settings against torch's default.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field

from .errors import InputError


@dataclass
class ThreadPlan:
    """The threads torch uses to prefill and to decode, and why (for `--json` and logs). The
    command line makes one and hands it to the `reading.Reader`, which prefills inside
    `prefilling(plan)` and decodes inside `decoding(plan)`; the engine itself never changes threads."""

    prefill: int
    decode: int
    why: str
    auto: bool = False  # count the free cores again before each prefill and each decode
    last_prefill: int | None = field(default=None, compare=False)  # the threads the last prefill ran on (benchmarks/contention.py)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and `taskset` narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _running_tasks() -> int | None:
    """Threads runnable on the whole machine now, from /proc/loadavg (Linux); None elsewhere."""
    try:
        with open("/proc/loadavg") as loadavg:
            return int(loadavg.read().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return None


def _own_running_threads() -> int:
    """This process's threads that are runnable now (torch's own threads finishing a step count here, not as others)."""
    count = 0
    try:
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):
                with open(f"/proc/self/task/{task}/stat") as stat:
                    if stat.read().rpartition(")")[2].split()[0] == "R":
                        count += 1
    except OSError:
        return 1
    return max(1, count)


def busy_elsewhere(samples: int = 3, interval_s: float = 0.01) -> float | None:
    """How many cores other processes keep busy right now: runnable threads on the machine less
    this process's own, the median of a few samples; None where the system does not say (not Linux)."""
    counts = []
    for index in range(samples):
        running = _running_tasks()
        if running is None:
            return None
        counts.append(max(0, running - _own_running_threads()))
        if index + 1 < samples:
            time.sleep(interval_s)
    return float(sorted(counts)[len(counts) // 2])


def parse_threads(value: str | int | None) -> int | None:
    """`--threads`: 'auto' (or None) is None; otherwise a positive count."""
    if value is None or value == "auto":
        return None
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise InputError(f"--threads must be auto or a positive number of threads, got {value!r}") from None
    if count < 1:
        raise InputError(f"--threads must be auto or a positive number of threads, got {value!r}")
    return count


def plan_threads(requested: str | int | None = "auto", cores: int | None = None, busy: float | None = None) -> ThreadPlan:
    """The threads for `--threads requested` on a machine with `cores` usable cores, `busy` of them
    taken by other processes (both measured when not given)."""
    count = parse_threads(requested)
    if count is not None:
        return ThreadPlan(count, count, f"--threads {count}")
    cores = usable_cores() if cores is None else cores
    if busy is None:
        busy = busy_elsewhere() or 0.0
    free = max(1, min(cores, cores - round(busy)))
    decode = decode_threads(cores, free)
    return ThreadPlan(free, decode, f"auto: {cores} cores, {free} free", auto=True)


def decode_threads(cores: int, free: int) -> int:
    """Decode on the free cores, but on at most half of the machine's: a step's small operations
    each wait for their slowest thread, so headroom for other processes keeps them from stalling."""
    return max(1, min(free, cores // 2))


@contextlib.contextmanager
def kept():
    """Put torch's thread count back as it was when the block ends, however it ends (one command's
    --threads, as tests run many commands in one process).

    Only where torch was imported before the block: a command that imports it itself runs in its
    own process, and an argument error or `--help` must not pay seconds to import it."""
    before = sys.modules.get("torch")
    count = before.get_num_threads() if before is not None else None
    try:
        yield
    finally:
        if count is not None and before.get_num_threads() != count:
            before.set_num_threads(count)


def _free_now(plan: ThreadPlan) -> int:
    """The free cores now (for `auto`), else the plan's prefill threads."""
    if plan.auto:
        busy = busy_elsewhere()
        if busy is not None:
            cores = usable_cores()
            return max(1, min(cores, cores - round(busy)))
    return plan.prefill


@contextlib.contextmanager
def _running_on(threads: int):
    import torch  # here, not at the top: `kept` runs for every command, --help and argument errors too

    before = torch.get_num_threads()
    if threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@contextlib.contextmanager
def prefilling(plan: ThreadPlan | None):
    """Prefill on `plan`'s threads, the free cores counted again under `auto` (another process
    may have started since the command did), then go back; nothing changes without a plan."""
    if plan is None:
        yield
        return
    plan.last_prefill = _free_now(plan)
    with _running_on(plan.last_prefill):
        yield


@contextlib.contextmanager
def decoding(plan: ThreadPlan | None):
    """Decode with `plan`'s decode threads (free cores counted again under `auto`), then go back;
    nothing changes without a plan (kvcli used as a library)."""
    if plan is None:
        yield
        return
    threads = plan.decode
    if plan.auto:
        busy = busy_elsewhere(samples=1)
        if busy is not None:
            cores = usable_cores()
            threads = decode_threads(cores, max(1, min(cores, cores - round(busy))))
    with _running_on(threads):
        yield
