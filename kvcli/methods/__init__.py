"""Compression methods, registered by name."""

from __future__ import annotations

import dataclasses

from ..defaults import DEFAULT_METHOD
from ..errors import BudgetError
from .base import DEFAULT_MIN_KEEP, DEFAULT_RATIO, Budget, BudgetPlan, Compression, Compressor, LayerObservation, Method, plan_budget, question_kept_whole, question_plan
from .dynamickv import DynamicKV
from .evidencekv import EvidenceKV
from .full import Full
from .h2o import H2O
from .pyramidkv import PyramidKV
from .snapkv import SnapKV
from .streamingllm import StreamingLLM

REGISTRY: dict[str, type[Method]] = {cls.name: cls for cls in (Full, StreamingLLM, H2O, SnapKV, PyramidKV, DynamicKV, EvidenceKV)}


def method_names() -> list[str]:
    return list(REGISTRY)


def make_method(name: str, **params) -> Method:
    """An instance of method `name`, taking only the knobs that method has."""
    cls = REGISTRY.get(name)
    if cls is None:
        raise BudgetError(f"unknown method {name!r}; choose one of: {', '.join(REGISTRY)} (see `kvcli methods`)")
    known = {f for f in cls.__dataclass_fields__}
    return cls(**{k: v for k, v in params.items() if k in known and v is not None})


def parse_params(items: list[str]) -> dict[str, str]:
    """`["beta=20", "n_sink=4"]` -> `{"beta": "20", "n_sink": "4"}`."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BudgetError(f"--param {item!r} should look like KEY=VALUE, e.g. --param beta=20")
        params[key.strip().replace("-", "_")] = value.strip()
    return params


def apply_params(method: Method, params: dict[str, str], strict: bool) -> Method:
    """Set knobs from strings, converted to each knob's type; a knob the method lacks fails when `strict`."""
    knobs = method.params()
    changes = {}
    for key, raw in params.items():
        if key not in knobs:
            if strict:
                raise BudgetError(f"method {method.name} has no knob {key!r}; its knobs: {', '.join(knobs) or 'none'} (see `kvcli methods`)")
            continue
        changes[key] = _convert(key, raw, type(getattr(method, key)))
    return dataclasses.replace(method, **changes) if changes else method


def _convert(key: str, raw: str, kind: type):
    if kind is type(None):  # optional integer knobs such as h2o.recent_size
        kind = int
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        return kind(raw)
    except ValueError:
        raise BudgetError(f"--param {key}={raw}: expected a {kind.__name__}") from None


def configure(names: list[str], params: list[str] | None = None, window: int | None = None) -> list[Method]:
    """Methods `names` with `--window` and `--param KEY=VALUE` applied.

    One method: every knob must be one of its own. Several (eval): a knob applies to the
    methods that have it, and is an error only when none of them has it.
    """
    parsed = parse_params(params or [])
    if window is not None:
        parsed = {"window_size": str(window), **parsed}
    methods = [make_method(name) for name in names]
    if len(methods) == 1:
        given = {k: v for k, v in parsed.items() if k != "window_size" or methods[0].compresses}
        return [apply_params(methods[0], given, strict=True)]
    for key in parsed:
        if key != "window_size" and not any(key in m.params() for m in methods):
            raise BudgetError(f"no method in --methods has the knob {key!r} (see `kvcli methods`)")
    return [apply_params(m, parsed, strict=False) for m in methods]


__all__ = [
    "DEFAULT_MIN_KEEP",
    "DEFAULT_RATIO",
    "Budget",
    "Compression",
    "BudgetPlan",
    "Compressor",
    "DynamicKV",
    "EvidenceKV",
    "Full",
    "H2O",
    "LayerObservation",
    "Method",
    "apply_params",
    "configure",
    "parse_params",
    "PyramidKV",
    "REGISTRY",
    "SnapKV",
    "StreamingLLM",
    "make_method",
    "method_names",
    "plan_budget",
    "question_kept_whole",
    "question_plan",
]
