"""A packed layer's decode-step attention on CPU in one call (kvcli/attend_rows.c).

One new token attends over a few hundred entries per KV head: the work is ~10 microseconds and
torch's SDPA costs several per call. A dense layer makes one SDPA call; a packed layer (KV heads
of unequal lengths, kvcli/cache.py) made one per KV head, plus each head's views, so unequal heads
decoded slower than equal ones (1.45x a dense layer's cache work per step,
`benchmarks/packed_step.py`). The kernel reads the layer's pool (each head's rows from its own
start) and attends every query head over its own KV head's rows in one call: products summed
in float32 by AVX-512 BF16 dot products (sixteen keys at a time, transposed once for all of a KV
head's query heads), a float32 softmax, its weights rounded to bfloat16 for the values' sum, the
output rounded once; on torch's threads each takes a share of every head's rows, and the shares'
softmax sums are merged (as flash-decoding splits a long cache), so an output can differ in its
last bfloat16 bit between thread counts.
docs/results.md ("Decode with unequal heads") has the measurements.

It runs where it builds (x86-64 Linux with AVX-512F, AVX-512BW and AVX512-BF16, and a C compiler;
kvcli/native.py) on bfloat16 caches whose head dims are multiples of 32 up to 512 (kvcli's CPU
default: int8 weights, a bfloat16 cache). Anywhere else `attend_pool` returns None and the layer
is attended with SDPA per KV head as before. Dense layers keep SDPA. `KVCLI_ATTENTION_KERNEL=sdpa`
uses SDPA for packed layers too (for comparisons).
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from pathlib import Path

import torch

from . import native

SOURCE = Path(__file__).with_name("attend_rows.c")
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-fopenmp", "-pthread", "-shared", "-fPIC", "-std=gnu11")
CPU = ("avx512f", "avx512bw", "avx512_bf16")
KVCLI, SDPA = "kvcli", "sdpa"


@lru_cache(maxsize=1)
def _kernel():
    """(the kernel's entry point, '') or (None, why SDPA is used)."""
    if os.environ.get("KVCLI_ATTENTION_KERNEL", "").strip() == SDPA:
        return None, "KVCLI_ATTENTION_KERNEL=sdpa"
    library, why = native.load(SOURCE, FLAGS, CPU)
    if library is None:
        return None, why
    function = library.kvcli_attend_decode
    function.restype = ctypes.c_int
    function.argtypes = ([ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 4 + [ctypes.c_float]
                         + [ctypes.c_void_p, ctypes.c_int])
    return function, ""


def name() -> str:
    """What attends a packed layer's CPU decode steps here: KVCLI or SDPA."""
    return KVCLI if _kernel()[0] is not None else SDPA


def why_not() -> str:
    """Why kvcli's kernel is not used here ('' where it is)."""
    return _kernel()[1]


def takes(dtype: torch.dtype, head_dim: int, v_dim: int) -> bool:
    """Whether the kernel takes a cache of `dtype` with these key and value head dims (the C code's
    own limits: multiples of 32 up to 512)."""
    return dtype == torch.bfloat16 and all(dim % 32 == 0 and 0 < dim <= 512 for dim in (head_dim, v_dim))


def attend_pool(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: list[int], lengths: list[int],
                scaling: float) -> torch.Tensor | None:
    """One new token's attention over a packed layer's pool (kvcli/cache.py `_Pool`): query
    `(1, num_heads, 1, head_dim)`; keys and values `(1, 1, total, head_dim)`, KV head h's entries
    the `lengths[h]` rows from row `starts[h]`. Returns `(1, 1, num_heads, v_dim)`, or None where
    the kernel does not run (no kernel here, off CPU, not bfloat16, a head dim it does not take,
    an empty head): the caller attends as before."""
    function = _kernel()[0]
    batch, num_heads, q_len, head_dim = query.shape
    key_batch, key_heads, rows, key_dim = keys.shape
    value_batch, value_heads, value_rows, v_dim = values.shape
    num_kv_heads = len(lengths)
    if (function is None or not takes(query.dtype, head_dim, v_dim) or keys.dtype != query.dtype or values.dtype != query.dtype
            or query.device.type != "cpu" or keys.device.type != "cpu" or values.device.type != "cpu"
            or batch != 1 or q_len != 1 or key_batch != 1 or key_heads != 1 or value_batch != 1 or value_heads != 1
            or value_rows != rows or key_dim != head_dim or not num_kv_heads or len(starts) != num_kv_heads or num_heads % num_kv_heads
            or query.stride(3) != 1 or query.stride(1) != head_dim or keys.stride(3) != 1 or values.stride(3) != 1):
        return None  # (each head within the rows: checked by the kernel)
    array = _arrays(num_kv_heads)
    out = torch.empty((1, 1, num_heads, v_dim), dtype=torch.bfloat16)
    status = function(query.data_ptr(), keys.data_ptr(), values.data_ptr(), array(*starts), array(*lengths), rows,
                      keys.stride(2), values.stride(2), num_kv_heads, num_heads // num_kv_heads, head_dim, v_dim, scaling,
                      out.data_ptr(), torch.get_num_threads())
    if status == -1:
        raise MemoryError("kvcli's decode attention could not allocate its scratch")
    return out if status == 0 else None


@lru_cache(maxsize=None)
def _arrays(n: int):
    return ctypes.c_int64 * n
