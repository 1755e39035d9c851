"""Atomic whole-file writes: content, permissions, and nothing left behind on failure."""

from __future__ import annotations

import os
import stat

import pytest

from kvcli.atomic import check_output, write_atomic
from kvcli.errors import OutputError


def test_write_atomic_replaces_whole_file_with_umask_permissions(tmp_path):
    """The file holds exactly the new bytes, with the permissions open() would give, and no temp file stays."""
    path = tmp_path / "out.json"
    path.write_text("old content that is longer")
    old = os.umask(0o022)
    try:
        assert write_atomic(path, "new") == 3
    finally:
        os.umask(old)
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_write_atomic_leaves_no_temp_file_when_the_rename_fails(tmp_path):
    """A failed write removes its temporary file and leaves the target as it was."""
    target = tmp_path / "folder"
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(OutputError, match="cannot write"):
        write_atomic(target, b"data", durable=True)  # a non-empty folder cannot be replaced by a file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_a_name_check_output_accepts_is_written(tmp_path):
    """A file name near the OS's limit that check_output accepts is also written: the temporary file's name does not grow with it."""
    target = tmp_path / ("a" * (os.pathconf(tmp_path, "PC_NAME_MAX") - 4) + ".kvc")
    check_output(target, "--output")
    assert write_atomic(target, b"cache") == 5 and target.read_bytes() == b"cache"
