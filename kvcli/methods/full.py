"""`full`: no compression; the baseline every method is measured against."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method


@dataclass
class Full(Method):
    """Keep every token in every layer (the uncompressed KV cache)."""

    name = "full"
    summary = "keep every token (no compression)"
    compresses = False

    def params(self) -> dict:
        return {}
