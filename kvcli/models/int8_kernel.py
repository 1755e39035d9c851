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
import os
from functools import lru_cache
from pathlib import Path

import torch

from .. import native
from ..errors import ModelError

SOURCE = Path(__file__).with_name("int8_rows.c")
FLAGS = ("-O3", "-mavx512f", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")

KVCLI, TORCH = "kvcli", "torch"  # what the report and --json (`int8_kernel`) name each kernel


class KernelUnavailable(ModelError):
    """KVCLI_INT8_KERNEL=kvcli where kvcli's kernel cannot run: the one line says why."""


@lru_cache(maxsize=1)
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded kernel, '') or (None, why not)."""
    if os.environ.get("KVCLI_INT8_KERNEL", "").strip() == TORCH:
        return None, "KVCLI_INT8_KERNEL=torch"
    library, why = native.load(SOURCE, FLAGS)
    if library is None:
        return None, why
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
