"""Dequantizing a GGUF file into a safetensors checkpoint, in the dtype the model will run in, that from_pretrained can read."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import ModelError


def convert_gguf(gguf: Path, out_dir: Path, dtype: torch.dtype | str = torch.float32) -> None:
    """Dequantize a GGUF into a safetensors checkpoint folder of `dtype` weights that plain
    from_pretrained can read; `dtype` "int8": float32 weights rounded to int8 per output channel
    (kvcli/models/weights.py), which `weights.load_quantized` reads.

    `dtype` is what the model will run in: float32 on a CPU, where dequantized Q4 weights stay
    exact (in bf16 ~70% of SmolLM2's q_proj values change, ~25% in fp16); bfloat16 on CUDA, where
    they are rounded at load anyway, so the file is half the size (an 8B model: ~16 GB, not ~32 GB).
    transformers casts each tensor as it dequantizes it, so the conversion holds `dtype` weights too.
    """
    quantized = dtype == "int8"
    dtype = torch.float32 if quantized else dtype
    folder, name = str(gguf.parent), gguf.name
    try:
        with _quiet_gguf_progress():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    except (ValueError, KeyError, NotImplementedError, OSError, RuntimeError) as err:
        # what transformers raises for GGUFs it cannot parse or map onto a model class
        raise ModelError(_gguf_error(gguf, err)) from err

    # A model loaded from GGUF carries a gguf quantization_config and cannot be saved as is:
    # rebuild it from a clean config (on the meta device, so no memory or init time is spent).
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict({key: value.to(dtype) for key, value in gguf_model.state_dict().items()}, assign=True, strict=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    del gguf_model

    out_dir.mkdir(parents=True)
    if quantized:
        from .identity import weights_fingerprint
        from .weights import quantize_model, save_quantized

        fingerprint = weights_fingerprint(model)
        quantize_model(model)
        save_quantized(model, out_dir, fingerprint)
    else:
        model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (transformers' run to many lines), or its type."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextlib.contextmanager
def _quiet_gguf_progress():
    """Silence transformers' GGUF de-quantization bar, which ignores its progress-bar switch
    and would break the CLI's own status line; kvcli reports the conversion itself."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original


def _gguf_error(gguf: Path, err: Exception) -> str:
    """One line explaining why transformers could not load a GGUF, naming its architecture."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(gguf)).fields.get("general.architecture")
        arch = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    except Exception:
        return f"{gguf.name} is not a readable GGUF file ({first_line(err)})"
    import transformers

    return (
        f"cannot convert {gguf.name}: transformers {transformers.__version__} cannot load GGUF "
        f"architecture '{arch}' ({first_line(err)}); pass a Hugging Face checkpoint folder instead"
    )
