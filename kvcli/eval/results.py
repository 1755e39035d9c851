"""An eval's results: every sample, the mean per setting (and as a share of the full cache's), NIAH grids, the JSON."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import write_atomic
from .data import Row
from .settings import REFERENCE_MODE, Setting


@dataclass
class EvalResult:
    """Every sample, the summary per method x budget, NIAH grids, and where the time went."""

    model: str
    metric: str
    samples: list[dict]
    summary: list[dict]
    niah: list[dict] | None = None
    timing: dict = field(default_factory=dict)
    modes: list[str] = field(default_factory=lambda: ["query"])
    chunk_size: int | None = None
    method_params: dict = field(default_factory=dict)  # each method's knobs, as it scored ({name: params})

    def to_dict(self) -> dict:
        out = {
            "model": self.model, "metric": self.metric, "modes": self.modes, "chunk_size": self.chunk_size,
            "method_params": self.method_params, "summary": self.summary, "samples": self.samples, "timing": self.timing,
        }
        if self.niah is not None:
            out["niah"] = self.niah
        return out


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def summarize(samples: Sequence[dict], settings: Sequence[Setting]) -> list[dict]:
    """Mean score per setting, and that mean as a percentage of the full cache's on the same rows
    (read the same way: the reused prompt's full cache for `reuse`)."""
    groups: dict[tuple, list[dict]] = {s.key: [] for s in settings}
    for sample in samples:
        groups.setdefault(Setting.of(sample).key, []).append(sample)
    full = {(Setting.of(s).mode, s["id"]): s["score"] for s in samples if s["method"] == "full"}
    out = []
    for setting in settings:
        group = groups[setting.key]
        mean = _mean(s["score"] for s in group)
        ref = REFERENCE_MODE[setting.mode]
        paired = [s for s in group if (ref, s["id"]) in full]
        full_mean = _mean(full[(ref, s["id"])] for s in paired)
        out.append({
            "method": setting.method,
            "budget": setting.budget,
            "ratio": setting.ratio,
            "mode": setting.mode,
            "chunk_size": setting.chunk_size,
            "score": mean,
            "n": len(group),
            "pct_of_full": 100 * _mean(s["score"] for s in paired) / full_mean if paired and full_mean else None,
            "n_full_cache": sum(1 for s in group if not s.get("compressed", True)),
        })
    return out


def niah_grids(samples: Sequence[dict], rows: Sequence[Row], settings: Sequence[Setting]) -> list[dict]:
    """Per method x budget, the mean score in each length x depth cell (`scores[length][depth]`)."""
    where = {row.id: row.niah for row in rows if row.niah is not None}
    lengths = sorted({n[0] for n in where.values()})
    depths = sorted({n[1] for n in where.values()})
    out = []
    for setting in settings:
        cells: dict[tuple, list[float]] = {}
        for sample in samples:
            if Setting.of(sample) == setting and sample["id"] in where:
                cells.setdefault(where[sample["id"]], []).append(sample["score"])
        out.append({
            "method": setting.method, "budget": setting.budget, "ratio": setting.ratio, "mode": setting.mode,
            "chunk_size": setting.chunk_size, "lengths": lengths, "depths": depths,
            "scores": [[_mean(cells.get((length, depth), [])) for depth in depths] for length in lengths],
        })
    return out


def write_json(path: str | Path, result: EvalResult) -> None:
    """Write the result atomically: a temp file in the same folder, then a rename."""
    write_atomic(path, json.dumps(result.to_dict(), ensure_ascii=False, indent=1) + "\n")
