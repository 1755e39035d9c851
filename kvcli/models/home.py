"""Where kvcli keeps what it makes on disk (converted models, profiles, built kernels): one place
(kvcli/native.py, the base layer, as the engine's kernel needs it too), named here for the models layer."""

from __future__ import annotations

from ..native import kvcli_home

__all__ = ["kvcli_home"]
