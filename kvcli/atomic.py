"""Writing files the user asked for, or kvcli keeps under KVCLI_HOME: checked before anything slow
(`check_output`), written whole (`write_atomic`: a reader never sees a file half done), and any
error of the OS on the way (a read-only disk, a full disk) turned into one `OutputError` line
(`writing`)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import OutputError, shorten


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output(path: str | Path, flag: str, append: bool = False) -> Path:
    """`path`, where a command will write a file when its work is done, checked now: its folder
    exists and takes a new file (one is made and removed), and it is not a folder; with `append`,
    an existing file must also open for appending. `flag` names the option, for the message."""
    path = Path(path)
    where = f"{flag} {shorten(str(path))}"
    folder = path.parent
    # os.path's checks answer False where pathlib's raise (a name too long)
    if os.path.isdir(path):
        raise OutputError(f"{where} is a folder; give a file name")
    if not os.path.isdir(folder):
        if os.path.lexists(folder):
            raise OutputError(f"{where}: {shorten(str(folder))} is not a folder; choose another {flag}")
        raise OutputError(f"{where}: folder {shorten(str(folder))} does not exist; create it or choose another {flag}")
    with writing(f"{flag} {path}", f"choose another {flag}"):
        take_new_file(folder)
        if append and os.path.lexists(path):
            with open(path, "ab"):
                pass
    return path


def take_new_file(folder: str | Path) -> None:
    """Make and remove a file in `folder`, so the OS says now (an OSError) whether it takes new
    files: permissions alone do not tell (a read-only mount, root)."""
    fd, probe = tempfile.mkstemp(prefix=".kvcli-probe.", suffix=".tmp", dir=folder)
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def writing(what: str, fix: str):
    """Turn the OS's refusal while writing `what` (permissions, a read-only or full disk, a name
    too long) into an OutputError saying which file, why, and `fix`."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OutputError(f"cannot write {shorten(what)}: {reason}; {fix}") from None


def write_atomic(path: str | Path, data: bytes | str, durable: bool = False) -> int:
    """Write `data` to `path` through a temporary file in the same folder and a rename.

    The file gets the permissions a plain `open(path, "w")` would give (mkstemp's are
    owner-only). `durable` also syncs the bytes to disk before the rename. Returns the bytes
    written; the OS's refusal is an OutputError naming `path`, and leaves no temporary file.
    """
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with writing(str(path), "check the folder is writable and the disk has room"):
        # a name of its own length, not the target's plus a suffix: a target name near the OS's
        # limit passes check_output and must not fail here, after the work
        fd, tmp = tempfile.mkstemp(prefix=".kvcli-", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(raw)
                if durable:
                    handle.flush()
                    os.fsync(handle.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return len(raw)
