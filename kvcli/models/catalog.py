"""What `kvcli models` lists: the embedded models, then the converted checkpoints on disk."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import ModelError
from .checkpoints import META_FILE, embedded_target, is_complete, kvcli_home
from .embedded import EMBEDDED


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
        target = embedded_target(embedded, home)
        converted = is_complete(target)
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
        if folder.name in listed or not is_complete(folder):
            continue
        meta = json.loads((folder / META_FILE).read_text())
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
