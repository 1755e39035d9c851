"""Saved caches (`.kvc`): safetensors tensors plus JSON metadata, checked on load.

A `.kvc` file holds a document prefix (the prompt up to the question), of one of two kinds
(`meta["kind"]`): `compressed` (`kvcli compress`: the kept keys, values and original positions
per layer, chosen without the questions) or `full` (`kvcli read`: every entry, plus each
layer's last queries, so each later question is compressed query-aware, exactly as one pass
would). Metadata says which model made it, with which method, from which sources, and each
layer's sliding window (`layer_windows`; files written before it are read with every layer global
until a model gives its windows). Loading refuses a file made with another model (another
architecture, or other weights of the same one such as a fine-tune) or an older format version
than 3, and one whose bytes do not match the checksum written with it. A layer whose KV heads hold
different numbers of entries (a per-head split) is stored packed, with no padding (format 4).

The checksum (`sha256` in the metadata) covers everything the loader reads: the metadata itself
(every field but the checksum, as canonical JSON), and each tensor's name, dtype, shape and
bytes, so a file whose metadata was edited by one digit is refused as damaged. Loading reads
the tensors one at a time straight into their own storage (no copy of the whole file), so the
peak is about the file's size (benchmarks/kvc_load_peak.py; docs/results.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from .atomic import write_atomic
from .cache import KVCache
from .errors import InputError

# 2: the metadata must hold `weights_fingerprint` (format 1 files only had the config hash).
# 3: the checksum covers the metadata and each tensor's dtype and shape (format 2's covered the tensors' bytes only).
# 4: a layer whose KV heads hold different numbers of entries (a per-head split) is stored packed:
#    `layer.{i}.head_lengths` (num_kv_heads,) and every head's entries one after another, keys and
#    values `(sum of lengths, head_dim)`, positions (and rope) `(sum of lengths,)`. Dense layers are
#    written as in format 3, so a format 3 file reads as a format 4 one without packed layers.
FORMAT_VERSION = 4
_READABLE = (3, FORMAT_VERSION)
_MAGIC = "kvcli-kv-cache"
_OLDER = {
    1: "which does not record the model's weights",
    2: "whose checksum does not cover its metadata",
}
# safetensors' dtype names, for the tensors kvcli writes
_FILE_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "I64": torch.int64, "U8": torch.uint8}


KINDS = ("compressed", "full")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SavedCache:
    """A saved document prefix and what it was made from."""

    cache: KVCache
    meta: dict  # kind, model, config_hash, weights_fingerprint, dtype, method, method_params, prompt_tokens, sources, ...
    extras: dict[str, list[torch.Tensor]] | None = None  # full prefixes: per layer `tail_queries` (and `accumulated`)
    # tensors beside the layers' (names without the `layer.` prefix), such as what maps positions
    # back to the documents (`sources.offsets`, `sources.text`); a file written without them loads with none
    attached: dict[str, torch.Tensor] | None = None

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
        if layer.packed:
            tensors.update(_packed_tensors(i, layer, dtype))
            continue
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


def _packed_tensors(i: int, layer, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """A packed layer's tensors: its heads' entries one after another, and each head's length."""
    entries = [layer.head_entries(h) for h in range(layer.num_kv_heads)]
    keys = torch.cat([e[0][0, 0] for e in entries])  # (sum of head lengths, head_dim)
    values = torch.cat([e[1][0, 0] for e in entries])
    if dtype is not None:
        keys, values = keys.to(dtype), values.to(dtype)
    tensors = {
        f"layer.{i}.keys": keys.contiguous().cpu(),
        f"layer.{i}.values": values.contiguous().cpu(),
        f"layer.{i}.positions": torch.cat([e[2] for e in entries]).to(torch.int32).contiguous().cpu(),
        f"layer.{i}.head_lengths": torch.tensor(layer.head_lengths(), dtype=torch.int32),
    }
    if layer.reindexed:
        tensors[f"layer.{i}.rope"] = torch.cat([e[3] for e in entries]).to(torch.int32).contiguous().cpu()
    return tensors


def _load_packed(layer, path: Path, i: int, lengths: torch.Tensor, keys, values, positions, rope) -> None:
    """Give `layer` the packed entries read from the file, split into its heads by `lengths`."""
    sizes = [int(n) for n in lengths.tolist()]
    total = sum(sizes)
    shapes_ok = (lengths.dim() == 1 and min(sizes, default=-1) >= 0 and keys.dim() == 2 and values.dim() == 2
                 and keys.shape[0] == values.shape[0] == total and positions.shape == (total,)
                 and (rope is None or rope.shape == (total,)))
    if not shapes_ok:
        raise InputError(f"{path} is corrupted (layer {i}'s heads do not add up); compress the documents again")
    split = lambda t: [part[None, None] for part in t.split(sizes)]  # noqa: E731  (1, 1, n_h, head_dim) per head
    layer.load_heads(split(keys), split(values), list(positions.to(torch.long).split(sizes)),
                     None if rope is None else list(rope.to(torch.long).split(sizes)))


class _Checksum:
    """sha256 of a .kvc's metadata (as canonical JSON, the checksum left out), then of each tensor,
    in name order: its name, safetensors dtype and shape, then its bytes."""

    def __init__(self, meta: dict) -> None:
        unchecked = {key: value for key, value in meta.items() if key != "sha256"}
        self.digest = hashlib.sha256(json.dumps(unchecked, sort_keys=True, ensure_ascii=False).encode() + b"\n")

    def add(self, name: str, file_dtype: str, tensor: torch.Tensor) -> None:
        self.digest.update(json.dumps([name, file_dtype, list(tensor.shape)]).encode() + b"\n")
        if tensor.numel():
            self.digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # hashed in place, not copied

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


def save_cache(path: str | Path, cache: KVCache, meta: dict, dtype: torch.dtype | None = None,
               extras: dict[str, list[torch.Tensor]] | None = None, attached: dict[str, torch.Tensor] | None = None) -> int:
    """Write `cache` and `meta` to `path` atomically (temp file, then rename); return bytes written.

    `meta` must hold the model's `weights_fingerprint` (`LoadedModel.weights_fingerprint`) and
    its `kind`; `dtype` stores keys and values in another precision (the metadata records it);
    `extras` are per-layer tensors a full prefix needs (`tail_queries`, `accumulated`);
    `attached` are tensors of the whole file (not named `layer.*`), covered by the checksum too.
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
    for name, tensor in (attached or {}).items():
        if name.startswith("layer."):
            raise ValueError(f"save_cache: attached tensor {name!r} may not be named like a layer's")
        tensors[name] = tensor.contiguous().cpu()
    if dtype is not None:
        meta = dict(meta, storage_dtype=str(dtype).removeprefix("torch."))
    # the layers' sliding windows, so that a file read without its model (`kvcli inspect FILE.kvc`) knows them
    header = dict(meta, format=_MAGIC, format_version=FORMAT_VERSION, num_layers=cache.num_layers, layer_windows=cache.windows)
    header = json.loads(json.dumps(header, ensure_ascii=False))  # as the loader will read it back (tuples are lists)
    checksum = _Checksum(header)
    names = {dtype: name for name, dtype in _FILE_DTYPES.items()}
    for name in sorted(tensors):
        checksum.add(name, names[tensors[name].dtype], tensors[name])
    header["sha256"] = checksum.hexdigest()
    data = st_save(tensors, metadata={"kvcli": json.dumps(header, ensure_ascii=False)})
    return write_atomic(path, data, durable=True)


def _read_header(handle, path: Path) -> tuple[dict, dict, int]:
    """(the kvcli metadata, the tensors' safetensors entries, where their data starts) of an open .kvc."""
    file_size = os.fstat(handle.fileno()).st_size
    first = handle.read(8)
    if len(first) < 8:
        raise InputError(f"{path} is not a kvcli cache (too short); make one with `kvcli read` or `kvcli compress`")
    size = int.from_bytes(first, "little")
    if size <= 0 or 8 + size > file_size:
        raise InputError(f"{path} is truncated or not a kvcli cache; make it again with `kvcli read` or `kvcli compress`")
    try:
        header = json.loads(handle.read(size))
        meta = json.loads(header.pop("__metadata__")["kvcli"])
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):  # RecursionError: a header nested past the parser's depth
        raise InputError(f"{path} is not a kvcli cache (no kvcli metadata); make one with `kvcli read` or `kvcli compress`") from None
    if not isinstance(meta, dict) or meta.get("format") != _MAGIC:
        raise InputError(f"{path} is not a kvcli cache; make one with `kvcli read` or `kvcli compress`")
    return meta, header, 8 + size


class _Scratch:
    """One uint8 buffer, replaced by a larger one when a tensor needs more, reused tensor after tensor."""

    def __init__(self) -> None:
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def take(self, nbytes: int) -> torch.Tensor:
        if self.buffer.numel() < nbytes:
            self.buffer = torch.empty(nbytes, dtype=torch.uint8)
        return self.buffer[:nbytes]


def _read_tensor(handle, path: Path, name: str, entry, data_start: int,
                 scratch: _Scratch | None = None) -> tuple[str, torch.Tensor]:
    """One tensor read from the open file straight into its own storage: (its safetensors dtype, the tensor).

    With `scratch` it is read into that reused buffer instead, for a tensor converted or moved
    right after: a fresh buffer per such tensor left the allocator holding about the whole file
    (1.5x the loaded cache, docs/results.md).
    """
    try:
        file_dtype, shape, (start, stop) = entry["dtype"], [int(n) for n in entry["shape"]], entry["data_offsets"]
        dtype = _FILE_DTYPES[file_dtype]
        nbytes = int(stop) - int(start)
        if min(shape, default=0) < 0 or nbytes != math.prod(shape) * dtype.itemsize or int(start) < 0:
            raise ValueError
    except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: int() of an infinite number in the header
        raise InputError(f"{path} is corrupted (tensor {name} is not one kvcli writes); compress the documents again") from None
    if data_start + int(stop) > os.fstat(handle.fileno()).st_size:  # checked before memory is set aside for it
        raise InputError(f"{path} is truncated (tensor {name} is cut short); compress the documents again")
    buffer = torch.empty(nbytes, dtype=torch.uint8) if scratch is None else scratch.take(nbytes)
    handle.seek(data_start + int(start))
    if nbytes and handle.readinto(buffer.numpy()) != nbytes:
        raise InputError(f"{path} is truncated (tensor {name} is cut short); compress the documents again")
    return file_dtype, buffer.view(dtype).view(shape)


def load_cache(
    path: str | Path,
    config_hash: str | None,
    model_name: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    weights_fingerprint: str | None = None,
) -> SavedCache:
    """Read a `.kvc` file, refusing one made with another model or format, or damaged.

    With `weights_fingerprint` (`LoadedModel.weights_fingerprint`), a file made with other weights
    of the same architecture is refused too; `config_hash` None reads a file of any model (`kvcli
    inspect FILE.kvc` shows what a file holds without loading one); `dtype` is the dtype the model was loaded in. Each
    tensor is read into its own storage and moved to `device` and `dtype` before the next is
    read, so loading holds about the file's size at its peak, not a copy of the file besides.
    """
    path = Path(path)
    if not os.path.isfile(path):  # False for a name the system cannot look up (too long), as for a missing file
        raise InputError(f"cache file {path} does not exist; make one with `kvcli read FILES -o {path}` (answers query-aware) or `kvcli compress`")
    with open(path, "rb") as handle:
        meta, entries, data_start = _read_header(handle, path)
        _check_made_with(meta, path, config_hash, model_name, dtype, weights_fingerprint)
        checksum = _Checksum(meta)
        tensors = {}
        scratch = _Scratch()  # what is read only to be converted or moved
        on_cpu = torch.device(device).type == "cpu"
        for name in sorted(entries):
            entry = entries[name]
            stored = _FILE_DTYPES.get(entry.get("dtype")) if isinstance(entry, dict) else None
            floating = stored is not None and stored.is_floating_point
            # keys, values and queries take the model's dtype; `accumulated` stays as saved (float32)
            wanted = dtype if floating and dtype is not None and not name.endswith(".accumulated") else stored
            copied = floating and (wanted != stored or not on_cpu)
            file_dtype, tensor = _read_tensor(handle, path, name, entry, data_start, scratch if copied else None)
            checksum.add(name, file_dtype, tensor)
            tensors[name] = tensor.to(device=device, dtype=wanted, copy=True) if copied else tensor
    if checksum.hexdigest() != meta.get("sha256"):
        raise InputError(f"{path} is corrupted (its checksum does not match); compress the documents again")
    num_layers = int(meta["num_layers"])
    cache = KVCache(num_layers)
    for i in range(num_layers):
        try:
            keys, values, positions = (tensors.pop(f"layer.{i}.{n}") for n in ("keys", "values", "positions"))
        except KeyError:
            raise InputError(f"{path} is corrupted (layer {i} is missing); compress the documents again") from None
        rope = tensors.pop(f"layer.{i}.rope", None)
        lengths = tensors.pop(f"layer.{i}.head_lengths", None)
        if lengths is not None:
            _load_packed(cache.layers[i], path, i, lengths, keys, values, positions, rope)
            continue
        cache.layers[i].load(keys, values, positions.to(torch.long), None if rope is None else rope.to(torch.long))
    windows = meta.get("layer_windows")  # files written before kvcli recorded them: the model's, when it answers
    if isinstance(windows, list) and len(windows) == num_layers and all(w is None or isinstance(w, int) for w in windows):
        cache.adopt_windows(windows)
    extras = {}
    for name in ("tail_queries", "accumulated"):
        if f"layer.0.{name}" in tensors:
            try:
                extras[name] = [tensors[f"layer.{i}.{name}"] for i in range(num_layers)]
            except KeyError:
                raise InputError(f"{path} is corrupted (a layer's {name} is missing); compress the documents again") from None
    if meta.get("kind", "compressed") == "full" and "tail_queries" not in extras:
        raise InputError(f"{path} is corrupted (a full prefix without its queries); read the documents again")
    attached = {name: tensor for name, tensor in tensors.items() if not name.startswith("layer.")}
    return SavedCache(cache=cache, meta=meta, extras=extras or None, attached=attached or None)


def _check_made_with(meta: dict, path: Path, config_hash: str, model_name: str, dtype: torch.dtype | None,
                     weights_fingerprint: str | None) -> None:
    """Refuse a file of another format version or made with another model, before its tensors are read."""
    version = meta.get("format_version")
    if isinstance(version, int) and version in _OLDER:
        raise InputError(f"{path} was written by an older kvcli in cache format {version}, {_OLDER[version]}; compress the documents again")
    if version not in _READABLE:
        raise InputError(f"{path} was written in cache format {version}, this kvcli reads format {FORMAT_VERSION}; compress the documents again")
    if config_hash is None:  # any model's file (read without one)
        return
    if meta.get("config_hash") != config_hash:
        raise InputError(f"{path} was made with model {meta.get('model')!r}, not {model_name!r}; pass -m {meta.get('model')} or compress again with this model")
    stored = meta.get("weights_fingerprint")
    if not stored:
        raise InputError(f"{path} does not record which weights made it; compress the documents again")
    if weights_fingerprint is not None and stored != weights_fingerprint:
        raise InputError(_weights_mismatch(path, model_name, meta.get("dtype"), dtype))


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
