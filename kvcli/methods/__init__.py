"""Compression methods, registered by name."""

from __future__ import annotations

from ..errors import BudgetError
from .base import BudgetPlan, Compressor, LayerObservation, Method, plan_budget
from .dynamickv import DynamicKV
from .evidencekv import EvidenceKV
from .full import Full
from .h2o import H2O
from .pyramidkv import PyramidKV
from .snapkv import SnapKV
from .streamingllm import StreamingLLM

REGISTRY: dict[str, type[Method]] = {cls.name: cls for cls in (Full, StreamingLLM, H2O, SnapKV, PyramidKV, DynamicKV, EvidenceKV)}
DEFAULT_METHOD = "dynamickv"


def method_names() -> list[str]:
    return list(REGISTRY)


def make_method(name: str, **params) -> Method:
    """An instance of method `name`, taking only the knobs that method has."""
    cls = REGISTRY.get(name)
    if cls is None:
        raise BudgetError(f"unknown method {name!r}; choose one of: {', '.join(REGISTRY)} (see `kvcli methods`)")
    known = {f for f in cls.__dataclass_fields__}
    return cls(**{k: v for k, v in params.items() if k in known and v is not None})


__all__ = [
    "BudgetPlan",
    "Compressor",
    "DynamicKV",
    "EvidenceKV",
    "Full",
    "H2O",
    "LayerObservation",
    "Method",
    "PyramidKV",
    "REGISTRY",
    "SnapKV",
    "StreamingLLM",
    "make_method",
    "method_names",
    "plan_budget",
]
