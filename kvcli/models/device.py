"""Where and how a model runs: the device, the compute dtype and the attention kernel."""

from __future__ import annotations

import re
from importlib.util import find_spec

import torch

from ..errors import ModelError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """Turn 'auto', 'cpu', 'cuda' or 'cuda:N' into a device that exists on this machine."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise ModelError(f"unknown device '{device}': use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ModelError(f"device '{device}' was requested but CUDA is not available: use --device cpu")
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise ModelError(
            f"device '{device}' does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """Pick the compute dtype: 'auto' is float32 on CPU (bf16 matmuls are ~3.5x slower there), bf16 on CUDA."""
    device = torch.device(device)
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype '{dtype}': use auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def default_attn_implementation(device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """Attention kernel to use when the caller does not choose one."""
    device = torch.device(device)
    half = dtype is None or dtype in (torch.float16, torch.bfloat16)
    # flash-attn only runs fp16/bf16 on CUDA; everywhere else sdpa is the fastest built-in kernel.
    if device.type == "cuda" and half and find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"
