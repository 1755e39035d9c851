"""flash-attn for kvcli's attention on CUDA: when it is called, and which of its kernels each call uses.

kvcli attends with its own function (`attention.kvcli_attention`), so loading a model with
`attn_implementation="flash_attention_2"` alone never calls flash-attn. `attend` here takes the
same arguments and returns the same `(1, q_len, num_heads, head_dim)` as `attention.attend`, or
None when flash-attn cannot compute that call exactly; the caller then attends with SDPA.

flash-attn is used when the tensors are fp16 or bf16 on a CUDA GPU of compute capability 8.0 or
later (Ampere and newer: what flash-attn 2 runs on), flash-attn 2.6 or later is importable, the
head dims are equal and at most 256, the layer has no attention sinks (gpt-oss: flash-attn 2 has
none), and neither `KVCLI_FLASH=0` nor `use_flash(False)` turned it off.

How kvcli's calls map onto flash-attn's kernels (one sequence, batch size 1):

- prefill (`q_len == k_len`) and the multi-token steps after a cache (a chunk, a probe, a
  question after a read-once prefix: `q_len < k_len`) call `flash_attn_func(causal=True)`, whose
  causal mask is aligned to the bottom right of the attention matrix: query i sits at position
  `k_len - q_len + i`, exactly kvcli's `causal_mask`;
- decoding (`q_len == 1`) calls `flash_attn_with_kvcache` over the layer's live keys and values.
  Each layer's cache holds its own number of tokens (the same in every KV head of the layer),
  and each layer attends on its own, so every call is one sequence of its layer's length; the
  varlen kernels would serve batches of sequences of different lengths, which kvcli does not run;
- a sliding-window layer passes `window_size=(sliding_window - 1, 0)` (a query sees itself and
  the `sliding_window - 1` keys before it), softcapping passes `softcap`, the layer's scaling
  `softmax_scale`; grouped-query heads are passed as they are (flash-attn shares each KV head
  among its query heads, never repeating the keys).

The window scores a method ranks tokens by stay computed apart, for the window's queries only
(`attention.window_attention`): flash-attn never returns its probabilities.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from dataclasses import dataclass
from importlib.util import find_spec

import torch

DTYPES = frozenset({torch.float16, torch.bfloat16})
MAX_HEAD_DIM = 256
MIN_VERSION = (2, 6)  # softcap arrived in 2.6; bottom-right causal alignment in 2.1
MIN_CAPABILITY = (8, 0)

_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar("kvcli_flash", default=True)


@dataclass(frozen=True)
class FlashCall:
    """One call of a flash-attn kernel: which, and with what."""

    kernel: str  # "func": flash_attn_func (prefill, multi-token steps); "kvcache": flash_attn_with_kvcache (one new token)
    softmax_scale: float
    window_size: tuple[int, int] = (-1, -1)  # (left, right); -1: unlimited
    softcap: float = 0.0  # 0: none
    causal: bool = True


@contextlib.contextmanager
def use_flash(enabled: bool):
    """Allow (True) or forbid (False) flash-attn for the calls made inside, e.g. to compare it with SDPA."""
    token = _enabled.set(enabled)
    try:
        yield
    finally:
        _enabled.reset(token)


def _version(text: str) -> tuple[int, ...]:
    numbers = []
    for part in text.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers)


@functools.lru_cache(maxsize=1)
def installed() -> str | None:
    """Why flash-attn cannot be used on this machine at all, or None when a recent one is importable."""
    if find_spec("flash_attn") is None:
        return "flash-attn is not installed"
    try:
        import flash_attn
    except Exception as err:  # a build for another torch or CUDA fails to import in many ways
        return f"flash-attn does not import ({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''})"
    version = getattr(flash_attn, "__version__", "0")
    if _version(version) < MIN_VERSION:
        return f"flash-attn {version} is older than {'.'.join(map(str, MIN_VERSION))}"
    return None


def _kernels():
    """flash-attn's `flash_attn_func` and `flash_attn_with_kvcache` (imported when first needed)."""
    from flash_attn import flash_attn_func, flash_attn_with_kvcache

    return flash_attn_func, flash_attn_with_kvcache


def _device_reason(tensor: torch.Tensor) -> str | None:
    """Why `tensor`'s device cannot run flash-attn 2, or None."""
    if tensor.device.type != "cuda":
        return f"the model runs on {tensor.device.type}, not CUDA"
    capability = torch.cuda.get_device_capability(tensor.device)
    if capability < MIN_CAPABILITY:
        return f"the GPU's compute capability {capability[0]}.{capability[1]} is below 8.0"
    return None


def why_not(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn) -> str | None:
    """Why flash-attn would not compute this call exactly (SDPA does it instead), or None.

    query `(1, num_heads, q_len, head_dim)`, key/value `(1, num_kv_heads, k_len, head_dim)`;
    `attn` is the layer's `attention.LayerAttention` (scaling, softcap, sinks, sliding_window).
    """
    if not _enabled.get() or os.environ.get("KVCLI_FLASH", "1") == "0":
        return "flash-attn is turned off (KVCLI_FLASH=0 or use_flash(False))"
    reason = _device_reason(query)
    if reason:
        return reason
    if query.dtype not in DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"flash-attn runs fp16 or bf16, not {str(query.dtype).removeprefix('torch.')}"
    reason = installed()
    if reason:
        return reason
    if query.shape[0] != 1:
        return "kvcli attends one sequence at a time"
    head_dim = query.shape[-1]
    if key.shape[-1] != head_dim or value.shape[-1] != head_dim:
        return "flash-attn needs the same head dim for queries, keys and values"
    if head_dim > MAX_HEAD_DIM:
        return f"flash-attn 2 takes head dims up to {MAX_HEAD_DIM}, not {head_dim}"
    if query.shape[1] % key.shape[1]:
        return "the query heads are not a multiple of the KV heads"
    if getattr(attn, "sinks", None) is not None:
        return "flash-attn 2 has no attention sinks"
    return None


def plan_call(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn) -> FlashCall | None:
    """The flash-attn call that computes kvcli's attention of `query` over `key`/`value`, or None (use SDPA)."""
    if why_not(query, key, value, attn) is not None:
        return None
    q_len, k_len = query.shape[2], key.shape[2]
    window = getattr(attn, "sliding_window", None)
    softcap = getattr(attn, "softcap", None)
    return FlashCall(
        kernel="kvcache" if q_len == 1 else "func",
        softmax_scale=float(attn.scaling),
        # a window that every query's keys fit in hides nothing: no window, as attention.attend does
        window_size=(int(window) - 1, 0) if window is not None and k_len > window else (-1, -1),
        softcap=float(softcap) if softcap else 0.0,
    )


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn) -> torch.Tensor | None:
    """`attention.attend` through flash-attn: `(1, q_len, num_heads, head_dim)`, or None when
    flash-attn cannot compute this call exactly (the caller attends with SDPA)."""
    call = plan_call(query, key, value, attn)
    if call is None:
        return None
    flash_attn_func, flash_attn_with_kvcache = _kernels()
    # flash-attn's layout is (batch, seq, heads, head_dim); these transposes are views, the last dim stays contiguous
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    options = {"softmax_scale": call.softmax_scale, "causal": call.causal, "window_size": call.window_size, "softcap": call.softcap}
    if call.kernel == "kvcache":
        return flash_attn_with_kvcache(q, k, v, **options)
    return flash_attn_func(q, k, v, **options)
