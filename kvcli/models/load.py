"""`load_model`: one model spec (embedded name, folder, `.gguf` or hub id) to a `LoadedModel`."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from ..errors import ModelError
from .checkpoints import embedded_checkpoint, gguf_checkpoint
from .convert import first_line
from .device import (
    default_attn_implementation,
    execution_device,
    fingerprint,
    placement,
    placement_kwargs,
    precision_name,
    resolve_device,
    resolve_device_map,
    resolve_precision,
)
from .embedded import DEFAULT_MODEL, EMBEDDED
from .identity import config_hash
from . import int8_kernel
from .weights import block_for_decode, cast_floats, is_quantized, load_quantized, mlp_in_blocks, quantize_model, saved_fingerprint

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
    # decoder layers per device when a device map split the model ({'cuda:0': 20, 'cpu': 12}); empty otherwise
    placement: dict[str, int] = field(default_factory=dict)
    # how the linear layers' weights are stored when not in `dtype`: 'int8' (kvcli/models/weights.py); None: in `dtype`
    weights: str | None = None

    @property
    def precision(self) -> str:
        """What the report calls the model's numbers: 'float32', or 'int8 weights, bfloat16'."""
        return precision_name(self.dtype, self.weights)


def load_model(
    spec: str | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    progress: Callable[[str], None] | None = None,
    device_map: str | dict | None = None,
) -> LoadedModel:
    """Load `spec` (embedded name, checkpoint folder, .gguf file or hub id), converting GGUF once
    (in the dtype it runs in). `device_map` ('auto', ...: accelerate's; or a dict of module names
    to devices) splits the model over the GPUs, the CPU and disk instead of moving it to `device`."""
    start = time.perf_counter()
    spec = spec or os.environ.get("KVCLI_MODEL") or DEFAULT_MODEL
    report = progress or (lambda message: None)
    device_map = resolve_device_map(device_map, device)
    torch_device = resolve_device(device)
    torch_dtype, weights = resolve_precision(dtype, torch_device, device_map)
    if weights is not None:
        int8_kernel.name()  # builds kvcli's int8 kernel once; KVCLI_INT8_KERNEL=kvcli where it cannot run: one line, before any weight loads

    converted = False
    from_hub = False
    if spec in EMBEDDED:
        folder, converted = embedded_checkpoint(EMBEDDED[spec], report, weights or torch_dtype)
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
                folder, converted = gguf_checkpoint(path, report, weights or torch_dtype)
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
            from .hub import fetch, hub_offline

            fetch(spec, report, trust_remote_code)  # with progress; a gated model says how to log in

    report("loading")
    extra = {"trust_remote_code": True} if trust_remote_code else {}
    if not from_hub:
        _check_folder(Path(source), spec, trust_remote_code)
    try:
        # the config first: a model kvcli cannot run is refused before its weights are read
        attn_implementation = attn_implementation or _attention_for(
            AutoConfig.from_pretrained(source, **extra), spec, default_attn_implementation(torch_device, torch_dtype), trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        quantized = weights is not None and is_quantized(Path(source))  # already int8 on disk
        if quantized:
            model = load_quantized(Path(source), torch_dtype)  # a converted GGUF: never holds float weights
            model.set_attn_implementation(attn_implementation)
        else:
            # int8 weights are made from bfloat16 ones (half a float32 load's peak), then the rest is cast back
            model = AutoModelForCausalLM.from_pretrained(
                source,
                dtype=torch_dtype if weights is None else torch.bfloat16,
                attn_implementation=attn_implementation,
                **placement_kwargs(device_map),
                **extra,
            )
    except OSError as err:
        if not from_hub:
            raise ModelError(f"cannot load model {spec} from {source}: {first_line(err)}") from err
        if hub_offline():
            raise ModelError(
                f"model '{spec}' could not be found in the Hugging Face cache, and HF_HUB_OFFLINE is set: unset it to "
                f"download the model, or pass -m a local folder or .gguf file, or an embedded model ({', '.join(EMBEDDED)})"
            ) from err
        raise ModelError(
            f"model '{spec}' is not a local path and could not be found in the Hugging Face cache "
            f"or downloaded ({first_line(err)}): pass a local folder or .gguf file, "
            f"or an embedded model ({', '.join(EMBEDDED)})"
        ) from err
    except (ValueError, ImportError) as err:
        raise ModelError(f"cannot load model {spec}: {first_line(err)}") from err
    if device_map is None:
        model.to(torch_device)
    else:
        torch_device = execution_device(model)  # where the input ids go: the embedding's device
    model.eval()
    # the fingerprint is the checkpoint's float weights', whatever form they are kept in
    fingerprint_of = saved_fingerprint(Path(source)) if quantized else fingerprint(model)
    if weights is not None:
        if not quantized:
            quantize_model(model)
            cast_floats(model, torch_dtype)  # the norms, biases and any untied embedding
        mlp_in_blocks(model)
        block_for_decode(model)  # where kvcli's int8 kernel runs: its fastest layout, in place

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
        weights_fingerprint=fingerprint_of,
        placement=placement(model),
        weights=weights,
    )


# What a Hugging Face checkpoint folder needs besides config.json: weights, and a tokenizer.
_WEIGHTS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")
_TOKENIZER = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tekken.json", "*.tiktoken")


def _check_folder(folder: Path, spec: str, trust_remote_code: bool) -> None:
    """Refuse a checkpoint folder that lacks its weights or its tokenizer, naming what is missing."""
    missing = []
    if not any(any(folder.glob(pattern)) for pattern in _WEIGHTS):
        missing.append("weights (model.safetensors, model-*.safetensors with their index, or pytorch_model.bin)")
    if not trust_remote_code and not any(any(folder.glob(pattern)) for pattern in _TOKENIZER):
        missing.append("tokenizer (tokenizer.json, tokenizer.model, or vocab.json and merges.txt)")
    if missing:
        raise ModelError(f"model folder {spec} has no {' and no '.join(missing)}: pass a complete Hugging Face checkpoint folder or a .gguf file")


def _attention_for(config, spec: str, preferred: str, trust_remote_code: bool) -> str:
    """The attention kernel to load `config`'s model with: `preferred`, unless its class cannot run
    it (Gemma 2 and gpt-oss have no SDPA path), then eager. kvcli swaps in its own function once
    loaded; this only decides what the model could be loaded with. Refuses a config that is not
    a causal language model, before any weights are read."""
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is None:
        if trust_remote_code:
            return preferred  # a remote-code class is not in transformers' table
        raise ModelError(f"model {spec} is a '{config.model_type}' model, not a causal language model kvcli can generate with")
    supported = {"sdpa": model_class._supports_sdpa, "flash_attention_2": model_class._supports_flash_attn}
    return preferred if supported.get(preferred, True) else "eager"


def _looks_like_path(spec: str) -> bool:
    """A spec meant as a local path: hub ids are `org/name`, never `./x`, `/x`, `a/b/c` or `*.gguf`."""
    return (
        spec.startswith((".", "/", "~"))
        or "\\" in spec
        or spec.count("/") > 1
        or spec.lower().endswith(".gguf")
    )
