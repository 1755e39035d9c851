"""Load a model from an embedded name, a local checkpoint folder, a `.gguf` file or a hub id.

GGUF files are dequantized once into a safetensors checkpoint under `$KVCLI_HOME/models/`
(default `~/.cache/kvcli`), in the form they run in (int8 weights on a CPU with bfloat16
instructions, float32 on other CPUs, bfloat16 on CUDA); later
loads read that checkpoint in about a second instead of re-parsing the GGUF (~50 s for the
default model on two CPU cores).

One idea per module:

- `load`: `load_model` and the `LoadedModel` it returns.
- `embedded`: `EmbeddedModel`, the `EMBEDDED` models (GGUFs in pip packages) and `DEFAULT_MODEL`.
- `checkpoints`: the converted-checkpoint cache under `kvcli_home()`, one conversion per GGUF.
- `convert`: a GGUF dequantized into a safetensors checkpoint.
- `weights`: int8 weights for CPUs (stored once; decode on the int8 kernel, prefill in bfloat16).
- `device`: the device, compute dtype and attention kernel a model runs with; device maps.
- `hub`: a hub model fetched into the Hugging Face cache, with progress and one-line refusals.
- `identity`: `config_hash` and `weights_fingerprint`, which saved caches are checked against.
- `catalog`: `list_models` and its `ModelEntry`s, what `kvcli models` shows.
"""

from __future__ import annotations

from ..errors import ModelError
from .catalog import ModelEntry, list_models
from .checkpoints import CONVERSION_FORMAT, kvcli_home
from .device import default_attn_implementation, resolve_device, resolve_dtype, resolve_precision, resolve_weights
from .embedded import DEFAULT_MODEL, EMBEDDED, EmbeddedModel
from .identity import config_hash, weights_fingerprint
from .load import LoadedModel, _looks_like_path, load_model  # noqa: F401 (private, importable as before)

__all__ = [
    "CONVERSION_FORMAT",
    "DEFAULT_MODEL",
    "EMBEDDED",
    "EmbeddedModel",
    "LoadedModel",
    "ModelEntry",
    "ModelError",
    "config_hash",
    "default_attn_implementation",
    "kvcli_home",
    "list_models",
    "load_model",
    "resolve_device",
    "resolve_dtype",
    "resolve_precision",
    "resolve_weights",
    "weights_fingerprint",
]
