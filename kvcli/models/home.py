"""Where kvcli keeps what it makes on disk (converted models, profiles, built kernels): one place,
with no imports from the rest of kvcli, so any module of the models layer can name it."""

from __future__ import annotations

import os
from pathlib import Path


def kvcli_home() -> Path:
    """Root of kvcli's on-disk cache: `$KVCLI_HOME`, else `~/.cache/kvcli`."""
    return Path(os.environ.get("KVCLI_HOME") or Path.home() / ".cache" / "kvcli").expanduser()
