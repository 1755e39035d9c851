"""kvcli's int8 decode products (kvcli/models/int8_rows.c): built once per machine, used where they run.

A decode step's time on CPU is mostly its weight products at batch one (~35 of ~46 ms per token
for Qwen2.5-0.5B on this project's 2-core EPYC with torch's kernel), and torch's int8 kernel read
the weights there at 9-14 GB/s, against the ~28-33 GB/s at which the machine reads them without
multiplying. The C kernel reads a weight as one stream: loaded, each int8 weight whose shape is a
multiple of 16 is reordered in place into blocks of 16 output channels (`to_blocked`,
`Int8Linear.block_for_decode`, part of the report's load time), which the kernel reads front to
back; other shapes are read row-major, row by row. `python benchmarks/int8_kernel.py` times both
against torch's per shape (docs/results.md, "Session 12"). The numbers are torch's kernel's: the
int8 weight widened to float32, summed in float32 (in another order), rounded once to bfloat16.

It is compiled with the machine's C compiler (`$CC`, else `cc`/`gcc`/`clang`) into
`$KVCLI_HOME/kernels/` the first time an int8 model loads (a fraction of a second), and used only
on x86-64 Linux CPUs with AVX-512F. Anywhere else, or when the build fails (no compiler; a
read-only home builds in a temporary folder instead), torch's `_weight_int8pack_mm` computes the
products as before, the weights stay row-major, and the report and `--json` say which kernel ran.
`KVCLI_INT8_KERNEL=torch` forces torch's kernel (for comparisons); `KVCLI_INT8_KERNEL=kvcli`
fails in one line instead of falling back.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import ModelError
from .cpu import cpu_flags
from .home import kvcli_home

SOURCE = Path(__file__).with_name("int8_rows.c")
FLAGS = ("-O3", "-mavx512f", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")

KVCLI, TORCH = "kvcli", "torch"  # what the report and --json (`int8_kernel`) name each kernel


class KernelUnavailable(ModelError):
    """KVCLI_INT8_KERNEL=kvcli where kvcli's kernel cannot run: the one line says why."""


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(compiler: str) -> Path:
    """The shared library, compiled into KVCLI_HOME/kernels (a temporary folder if that cannot be
    written), named by a hash of the source, the flags and the compiler, so a change rebuilds it."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + compiler.encode() + version.encode()).hexdigest()[:16]
    name = f"int8_rows-{key}.so"
    for folder in (kvcli_home() / "kernels", Path(tempfile.gettempdir()) / f"kvcli-kernels-{os.getuid()}"):
        built = folder / name
        if built.is_file():
            return built
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as scratch:  # compiled beside, then renamed in: never half a file
                partial = Path(scratch) / name
                done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(partial)], capture_output=True, text=True, timeout=120)
                if done.returncode != 0:
                    last = (done.stderr.strip().splitlines() or ["no message"])[-1]
                    raise KernelUnavailable(f"{Path(compiler).name} could not build {SOURCE.name}: {last}")
                os.replace(partial, built)
            return built
        except OSError:
            continue
    raise KernelUnavailable("no writable folder for the built kernel (KVCLI_HOME or the temporary folder)")


@lru_cache(maxsize=1)
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded kernel, '') or (None, why not)."""
    if os.environ.get("KVCLI_INT8_KERNEL", "").strip() == TORCH:
        return None, "KVCLI_INT8_KERNEL=torch"
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"built for x86-64 Linux only (this is {sys.platform} {platform.machine()})"
    if "avx512f" not in cpu_flags():
        return None, "this CPU has no AVX-512F"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler (cc, gcc or clang; or $CC)"
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (KernelUnavailable, OSError, subprocess.SubprocessError) as error:
        return None, str(error)
    for function in (library.kvcli_int8_rows, library.kvcli_int8_blocked):
        function.restype = ctypes.c_int
        function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    return library, ""


def name() -> str:
    """The kernel int8 decode products run on here: KVCLI or TORCH. With KVCLI_INT8_KERNEL=kvcli,
    a kernel that cannot run raises `KernelUnavailable` instead of falling back."""
    chosen = os.environ.get("KVCLI_INT8_KERNEL", "").strip()
    if chosen not in ("", "auto", KVCLI, TORCH):
        raise KernelUnavailable(f"KVCLI_INT8_KERNEL={chosen} is not a kernel: use kvcli, torch or auto (or unset it)")
    library, why = _library()
    if library is None and chosen == KVCLI:
        raise KernelUnavailable(f"KVCLI_INT8_KERNEL=kvcli, but kvcli's int8 kernel cannot run here: {why}")
    return KVCLI if library is not None else TORCH


def why_not() -> str:
    """Why kvcli's kernel is not used here ('' where it is)."""
    return _library()[1]


def rows_product(rows: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, blocked: bool = False) -> torch.Tensor | None:
    """`rows` (M, K) bfloat16 times `qweight` (N, K) int8 scaled by `scale` (N,) bfloat16, as
    (M, N) bfloat16; None where kvcli's kernel is not used (the caller uses torch's). `blocked`:
    `qweight` is in the blocked layout (`to_blocked`)."""
    library = _library()[0]
    if library is None or rows.device.type != "cpu":
        return None
    out = torch.empty((rows.shape[0], qweight.shape[0]), dtype=torch.bfloat16)
    function = library.kvcli_int8_blocked if blocked else library.kvcli_int8_rows
    status = function(rows.data_ptr(), qweight.data_ptr(), scale.data_ptr(), out.data_ptr(),
                      rows.shape[0], qweight.shape[0], qweight.shape[1], torch.get_num_threads())
    if status == -1:
        raise MemoryError(f"kvcli's int8 kernel could not allocate {rows.numel() * 4} bytes for its rows")
    if status != 0:
        raise RuntimeError(f"internal: kvcli's int8 kernel refused a {tuple(qweight.shape)} weight as {'blocked' if blocked else 'row-major'} (status {status})")
    return out


# The blocked layout (int8_rows.c): each block of BLOCK output channels as K / BLOCK tiles of
# BLOCK rows x BLOCK columns, one after another, so a block's weights are one stream in memory.
BLOCK = 16


def can_block(qweight: torch.Tensor) -> bool:
    """Whether kvcli's kernel runs here and takes `qweight`'s shape in the blocked layout."""
    out_features, in_features = qweight.shape
    return _library()[0] is not None and out_features % BLOCK == 0 and in_features % BLOCK == 0 and qweight.device.type == "cpu"


def _tiles(qweight: torch.Tensor) -> torch.Tensor:
    """The blocked layout's memory as (blocks, tiles, BLOCK rows, BLOCK columns)."""
    out_features, in_features = qweight.shape
    return qweight.view(out_features // BLOCK, in_features // BLOCK, BLOCK, BLOCK)


def to_blocked(qweight: torch.Tensor, rows_at_once: int = 1024) -> None:
    """Reorder the row-major `qweight` (N, K) into the blocked layout, in place (its shape stays
    (N, K); its bytes are permuted), `rows_at_once` rows at a time so the copy stays small."""
    out_features, in_features = qweight.shape
    step = max(BLOCK, rows_at_once // BLOCK * BLOCK)
    for start in range(0, out_features, step):
        part = qweight[start : start + step]
        part.copy_(part.reshape(-1, BLOCK, in_features // BLOCK, BLOCK).transpose(1, 2).reshape(part.shape))


def from_blocked(qweight: torch.Tensor) -> torch.Tensor:
    """A row-major copy (N, K) of a blocked `qweight`."""
    return _tiles(qweight).transpose(1, 2).reshape(qweight.shape)


def blocked_rows(qweight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (any shape) of a blocked `qweight`, row-major: (*ids.shape, K)."""
    flat = ids.reshape(-1)
    picked = _tiles(qweight)[flat // BLOCK, :, flat % BLOCK, :]  # (len, tiles, BLOCK)
    return picked.reshape(*ids.shape, qweight.shape[1])
