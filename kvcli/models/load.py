"""`load_model`: one model spec (embedded name, folder, `.gguf` or hub id) to a `LoadedModel`."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..errors import ModelError
from .checkpoints import embedded_checkpoint, gguf_checkpoint
from .convert import first_line
from .device import default_attn_implementation, resolve_device, resolve_dtype
from .embedded import DEFAULT_MODEL, EMBEDDED
from .identity import config_hash, weights_fingerprint

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready for inference, with where it came from and what loading it cost."""

    model: PreTrainedModel  # in eval mode
    tokenizer: PreTrainedTokenizerBase
    name: str  # what the user asked for: embedded name, hub id, folder or .gguf path
    device: torch.device
    dtype: torch.dtype
    load_s: float  # wall time of this load, conversion included
    converted: bool  # True if this call converted a GGUF
    config_hash: str  # identifies the model architecture; saved KV caches are checked against it
    # identifies the weights (a fine-tune of the same architecture differs); see weights_fingerprint()
    weights_fingerprint: str = ""


def load_model(
    spec: str | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    progress: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Load `spec` (embedded name, checkpoint folder, .gguf file or hub id), converting GGUF once."""
    start = time.perf_counter()
    spec = spec or os.environ.get("KVCLI_MODEL") or DEFAULT_MODEL
    report = progress or (lambda message: None)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)

    converted = False
    from_hub = False
    if spec in EMBEDDED:
        folder, converted = embedded_checkpoint(EMBEDDED[spec], report)
        source = str(folder)
    else:
        path = Path(spec).expanduser()
        if path.exists():
            if path.is_dir():
                if not (path / "config.json").is_file():
                    raise ModelError(
                        f"model folder {spec} has no config.json: pass a Hugging Face checkpoint "
                        "folder or a .gguf file"
                    )
                source = str(path)
            elif path.suffix.lower() == ".gguf":
                folder, converted = gguf_checkpoint(path, report)
                source = str(folder)
            else:
                raise ModelError(f"model path {spec} is not a folder or a .gguf file")
        elif _looks_like_path(spec):
            raise ModelError(f"model path {spec} does not exist")
        elif "/" not in spec:
            # Most likely a mistyped embedded name; asking the hub would hang ~45 s offline first.
            raise ModelError(
                f"unknown model '{spec}': use an embedded model ({', '.join(EMBEDDED)}), "
                "a hub id like org/name, a checkpoint folder or a .gguf file"
            )
        else:
            source = spec  # a hub id, perhaps already in the Hugging Face cache
            from_hub = True

    report("loading")
    extra = {"trust_remote_code": True} if trust_remote_code else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=torch_dtype,
            attn_implementation=attn_implementation
            or default_attn_implementation(torch_device, torch_dtype),
            **extra,
        )
    except OSError as err:
        if not from_hub:
            raise ModelError(f"cannot load model {spec} from {source}: {first_line(err)}") from err
        raise ModelError(
            f"model '{spec}' is not a local path and could not be found in the Hugging Face cache "
            f"or downloaded ({first_line(err)}): pass a local folder or .gguf file, "
            f"or an embedded model ({', '.join(EMBEDDED)})"
        ) from err
    except (ValueError, ImportError) as err:
        raise ModelError(f"cannot load model {spec}: {first_line(err)}") from err
    model.to(torch_device)
    model.eval()

    load_s = time.perf_counter() - start
    logger.info("loaded %s on %s as %s in %.1f s (converted: %s)", spec, torch_device, torch_dtype, load_s, converted)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=spec,
        device=torch_device,
        dtype=torch_dtype,
        load_s=load_s,
        converted=converted,
        config_hash=config_hash(model.config),
        weights_fingerprint=weights_fingerprint(model),
    )


def _looks_like_path(spec: str) -> bool:
    """A spec meant as a local path: hub ids are `org/name`, never `./x`, `/x`, `a/b/c` or `*.gguf`."""
    return (
        spec.startswith((".", "/", "~"))
        or "\\" in spec
        or spec.count("/") > 1
        or spec.lower().endswith(".gguf")
    )
