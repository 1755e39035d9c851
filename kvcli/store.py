"""Saved caches (`.kvc`): safetensors tensors plus JSON metadata, checked on load.

A `.kvc` file holds a document prefix (the prompt up to the question), of one of two kinds
(`meta["kind"]`): `compressed` (`kvcli compress`: the kept keys, values and original positions
per layer, chosen without the questions) or `full` (`kvcli read`: every entry, plus each
layer's last queries, so each later question is compressed query-aware, exactly as one pass
would). Metadata says which model made it, with which method, from which sources. Loading refuses a file made with another model (another
architecture, or other weights of the same one such as a fine-tune) or format version, and one
whose bytes do not match the checksum written with it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .atomic import write_atomic
from .cache import KVCache
from .errors import InputError

# 2: the metadata must hold `weights_fingerprint` (format 1 files only had the config hash).
FORMAT_VERSION = 2
_MAGIC = "kvcli-kv-cache"


KINDS = ("compressed", "full")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SavedCache:
    """A saved document prefix and what it was made from."""

    cache: KVCache
    meta: dict  # kind, model, config_hash, weights_fingerprint, dtype, method, method_params, prompt_tokens, sources, ...
    extras: dict[str, list[torch.Tensor]] | None = None  # full prefixes: per layer `tail_queries` (and `accumulated`)

    @property
    def prompt_tokens(self) -> int:
        return int(self.meta["prompt_tokens"])

    @property
    def kind(self) -> str:
        return self.meta.get("kind", "compressed")


def storage_dtype(name: str | None) -> torch.dtype | None:
    """`--dtype` for saved tensors: None keeps the model's; float16/bfloat16 halve a float32 file."""
    if name is None or name == "auto":
        return None
    if name not in _DTYPES:
        raise InputError(f"unknown --dtype {name!r} for the saved cache; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _tensors(cache: KVCache, dtype: torch.dtype | None = None, extras: dict[str, list[torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    tensors = {}
    for i, layer in enumerate(cache.layers):
        keys, values = layer.view()
        if dtype is not None:
            keys, values = keys.to(dtype), values.to(dtype)
        tensors[f"layer.{i}.keys"] = keys.contiguous().cpu()
        tensors[f"layer.{i}.values"] = values.contiguous().cpu()
        tensors[f"layer.{i}.positions"] = layer.kept_positions().to(torch.int32).contiguous().cpu()  # int64 in memory
        if layer.rope is not None:  # a prefix read past the context: where RoPE now places each entry
            tensors[f"layer.{i}.rope"] = layer.rope_positions().to(torch.int32).contiguous().cpu()
    for name, per_layer in (extras or {}).items():
        for i, tensor in enumerate(per_layer):
            if dtype is not None and name == "tail_queries":
                tensor = tensor.to(dtype)
            tensors[f"layer.{i}.{name}"] = tensor.contiguous().cpu()
    return tensors


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].view(torch.uint8).numpy().tobytes() if tensors[name].numel() else b"")
    return digest.hexdigest()


def save_cache(path: str | Path, cache: KVCache, meta: dict, dtype: torch.dtype | None = None,
               extras: dict[str, list[torch.Tensor]] | None = None) -> int:
    """Write `cache` and `meta` to `path` atomically (temp file, then rename); return bytes written.

    `meta` must hold the model's `weights_fingerprint` (`LoadedModel.weights_fingerprint`) and
    its `kind`; `dtype` stores keys and values in another precision (the metadata records it);
    `extras` are per-layer tensors a full prefix needs (`tail_queries`, `accumulated`).
    """
    path = Path(path)
    if meta.get("kind", "compressed") not in KINDS:
        raise ValueError(f"save_cache: kind must be one of {KINDS}")
    if not meta.get("weights_fingerprint"):
        raise ValueError("save_cache needs meta['weights_fingerprint'] (LoadedModel.weights_fingerprint)")
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a file name such as doc.kvc")
    if not path.parent.exists():
        raise InputError(f"folder {path.parent} does not exist; create it or choose another -o path")
    tensors = _tensors(cache, dtype, extras)
    if dtype is not None:
        meta = dict(meta, storage_dtype=str(dtype).removeprefix("torch."))
    header = dict(meta, format=_MAGIC, format_version=FORMAT_VERSION, num_layers=cache.num_layers, payload_sha256=_checksum(tensors))
    data = st_save(tensors, metadata={"kvcli": json.dumps(header, ensure_ascii=False)})
    return write_atomic(path, data, durable=True)


def _read_header(raw: bytes, path: Path) -> dict:
    """The metadata of a .kvc file, without loading its tensors."""
    if len(raw) < 8:
        raise InputError(f"{path} is not a kvcli cache (too short); make one with `kvcli read` or `kvcli compress`")
    size = int.from_bytes(raw[:8], "little")
    if size <= 0 or 8 + size > len(raw):
        raise InputError(f"{path} is truncated or not a kvcli cache; make it again with `kvcli read` or `kvcli compress`")
    try:
        header = json.loads(raw[8 : 8 + size])
        meta = json.loads(header["__metadata__"]["kvcli"])
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{path} is not a kvcli cache (no kvcli metadata); make one with `kvcli read` or `kvcli compress`") from None
    if meta.get("format") != _MAGIC:
        raise InputError(f"{path} is not a kvcli cache; make one with `kvcli read` or `kvcli compress`")
    return meta


def load_cache(
    path: str | Path,
    config_hash: str,
    model_name: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    weights_fingerprint: str | None = None,
) -> SavedCache:
    """Read a `.kvc` file, refusing one made with another model or format, or damaged.

    With `weights_fingerprint` (`LoadedModel.weights_fingerprint`), a file made with other weights
    of the same architecture is refused too; `dtype` is the dtype the model was loaded in.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"cache file {path} does not exist; make one with `kvcli read FILES -o {path}` (answers query-aware) or `kvcli compress`")
    raw = path.read_bytes()
    meta = _read_header(raw, path)
    version = meta.get("format_version")
    if version == 1:
        raise InputError(f"{path} was written by an older kvcli in cache format 1, which does not record the model's weights; compress the documents again")
    if version != FORMAT_VERSION:
        raise InputError(f"{path} was written in cache format {version}, this kvcli reads format {FORMAT_VERSION}; compress the documents again")
    if meta.get("config_hash") != config_hash:
        raise InputError(f"{path} was made with model {meta.get('model')!r}, not {model_name!r}; pass -m {meta.get('model')} or compress again with this model")
    stored = meta.get("weights_fingerprint")
    if not stored:
        raise InputError(f"{path} does not record which weights made it; compress the documents again")
    if weights_fingerprint is not None and stored != weights_fingerprint:
        raise InputError(_weights_mismatch(path, model_name, meta.get("dtype"), dtype))
    try:
        tensors = st_load(raw)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise InputError(f"{path} is corrupted ({str(exc).splitlines()[0]}); compress the documents again") from None
    if _checksum(tensors) != meta.get("payload_sha256"):
        raise InputError(f"{path} is corrupted (its checksum does not match); compress the documents again")
    num_layers = int(meta["num_layers"])
    cache = KVCache(num_layers)
    for i in range(num_layers):
        try:
            keys, values, positions = (tensors[f"layer.{i}.{n}"] for n in ("keys", "values", "positions"))
        except KeyError:
            raise InputError(f"{path} is corrupted (layer {i} is missing); compress the documents again") from None
        if dtype is not None:
            keys, values = keys.to(dtype), values.to(dtype)
        rope = tensors.get(f"layer.{i}.rope")
        cache.layers[i].load(keys.to(device), values.to(device), positions.to(torch.long), None if rope is None else rope.to(torch.long))
    extras = {}
    for name in ("tail_queries", "accumulated"):
        if f"layer.0.{name}" in tensors:
            extras[name] = [tensors[f"layer.{i}.{name}"].to(device) for i in range(num_layers)]
    if meta.get("kind", "compressed") == "full" and "tail_queries" not in extras:
        raise InputError(f"{path} is corrupted (a full prefix without its queries); read the documents again")
    if dtype is not None and "tail_queries" in extras:
        extras["tail_queries"] = [t.to(dtype) for t in extras["tail_queries"]]
    return SavedCache(cache=cache, meta=meta, extras=extras or None)


def _weights_mismatch(path: Path, model_name: str, saved_dtype: str | None, dtype: torch.dtype | None) -> str:
    """Why the weights fingerprints differ, as one line."""
    loaded = str(dtype).removeprefix("torch.") if dtype is not None else None
    # float16 rounds float32 weights differently from bfloat16, so the fingerprints of two loads of
    # the same weights differ when only one of them is in float16 (models.weights_fingerprint).
    if saved_dtype and loaded and saved_dtype != loaded and "float16" in (saved_dtype, loaded):
        return (
            f"{path} was made with the model loaded in {saved_dtype}, not {loaded}; float16 rounds weights "
            f"differently, so kvcli cannot check they are the same weights: pass --dtype {saved_dtype} "
            "or compress the documents again"
        )
    return (
        f"{path} was made with other weights of the same architecture than {model_name!r} (a fine-tune?); "
        "compress the documents again with this model"
    )


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
