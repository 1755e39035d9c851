"""kvcli's C kernels (kvcli/models/int8_rows.c, kvcli/attend_rows.c): compiled with the machine's C
compiler (`$CC`, else `cc`/`gcc`/`clang`) the first time they are needed, into
`$KVCLI_HOME/kernels/` (a temporary folder where that cannot be written), and loaded with ctypes.
Each caller decides where its kernel runs and falls back to torch where it cannot be built; this
module only builds, loads and says why not. Base layer: the models layer (int8 products) and the
engine (decode attention) both use it."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path


class _BuildFailed(Exception):
    """A kernel that cannot be built here (caught by `load`, which says why in one line; the
    models layer's `int8_kernel.KernelUnavailable` is the user-facing error)."""


def kvcli_home() -> Path:
    """Root of kvcli's on-disk cache: `$KVCLI_HOME`, else `~/.cache/kvcli`."""
    return Path(os.environ.get("KVCLI_HOME") or Path.home() / ".cache" / "kvcli").expanduser()


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags /proc/cpuinfo lists for the first CPU; empty where there is none
    to read (macOS, Windows, a sandbox)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return frozenset(next((line for line in cpuinfo if line.startswith("flags")), "").split())
    except OSError:
        return frozenset()


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def x86_linux(*flags: str) -> str:
    """'' where a kernel needing these CPU flags runs (x86-64 Linux whose CPU has them), else why not."""
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"built for x86-64 Linux only (this is {sys.platform} {platform.machine()})"
    missing = [_FLAG_NAMES.get(flag, flag) for flag in flags if flag not in cpu_flags()]
    return f"this CPU has no {', '.join(missing)}" if missing else ""


_FLAG_NAMES = {"avx512f": "AVX-512F", "avx512bw": "AVX-512BW", "avx512_bf16": "AVX512-BF16"}


def build(source: Path, flags: tuple[str, ...], cc: str) -> Path:
    """The shared library of `source`, compiled into KVCLI_HOME/kernels (a temporary folder if that
    cannot be written), named by a hash of the source, the flags and the compiler, so a change
    rebuilds it."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(source.read_bytes() + " ".join(flags).encode() + cc.encode() + version.encode()).hexdigest()[:16]
    name = f"{source.stem}-{key}.so"
    shared = Path(tempfile.gettempdir()) / f"kvcli-kernels-{os.getuid()}"
    for folder in (kvcli_home() / "kernels", shared):
        built = folder / name
        try:
            if folder == shared and not _private(folder):
                continue  # a folder anyone could have planted a library in: never load from it
            if built.is_file():
                return built
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as scratch:  # compiled beside, then renamed in: never half a file
                partial = Path(scratch) / name
                done = subprocess.run([cc, *flags, str(source), "-o", str(partial)], capture_output=True, text=True, timeout=120)
                if done.returncode != 0:
                    last = (done.stderr.strip().splitlines() or ["no message"])[-1]
                    raise _BuildFailed(f"{Path(cc).name} could not build {source.name}: {last}")
                os.replace(partial, built)
            return built
        except OSError:
            continue
    raise _BuildFailed("no writable folder for the built kernel (KVCLI_HOME or the temporary folder)")


def _private(folder: Path) -> bool:
    """Whether `folder` (made now if missing, mode 0700) is this user's and no one else can write it."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        status = folder.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(status.st_mode) and status.st_uid == os.getuid() and not status.st_mode & 0o022


def load(source: Path, flags: tuple[str, ...], cpu: tuple[str, ...] = ("avx512f",)) -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library of `source`, '') or (None, why it cannot run here); `cpu`: the CPU flags
    its instructions need."""
    why = x86_linux(*cpu)
    if why:
        return None, why
    cc = compiler()
    if cc is None:
        return None, "no C compiler (cc, gcc or clang; or $CC)"
    try:
        return ctypes.CDLL(str(build(source, flags, cc))), ""
    except subprocess.TimeoutExpired as error:
        return None, f"{Path(cc).name} did not finish building {source.name} in {error.timeout:g} s"
    except (_BuildFailed, OSError, subprocess.SubprocessError) as error:
        return None, str(error)
