"""kvcli.eval.results and kvcli.eval.render: means and % of full on built samples, NIAH grids, the tables as text."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from kvcli.eval.data import Row
from kvcli.eval.render import render, render_niah
from kvcli.eval.results import EvalResult, niah_grids, summarize, write_json
from kvcli.eval.settings import Setting

FULL, FULL_REUSE = Setting("full"), Setting("full", mode="reuse")
SNAP64, SNAP128 = Setting("snapkv", budget=64), Setting("snapkv", budget=128)
SNAP64_REUSE, SNAP64_CHUNKED = Setting("snapkv", budget=64, mode="reuse"), Setting("snapkv", budget=64, mode="chunked", chunk_size=32)
SETTINGS = [FULL, SNAP64, SNAP128, FULL_REUSE, SNAP64_REUSE, SNAP64_CHUNKED]


def sample(setting: Setting, row_id: str, score: float, compressed: bool = True) -> dict:
    return {
        "id": row_id, "method": setting.method, "budget": setting.budget, "ratio": setting.ratio, "mode": setting.mode,
        "chunk_size": setting.chunk_size, "prediction": "", "score": score, "compressed": compressed and setting.method != "full",
    }


# Rows a and b have every setting; row c only snapkv at 64 (its full answer is missing).
SAMPLES = [
    sample(FULL, "a", 1.0), sample(FULL, "b", 0.5),
    sample(SNAP64, "a", 0.5), sample(SNAP64, "b", 0.25), sample(SNAP64, "c", 1.0),
    sample(SNAP128, "a", 1.0, compressed=False), sample(SNAP128, "b", 0.5),
    sample(FULL_REUSE, "a", 0.5), sample(FULL_REUSE, "b", 0.0),
    sample(SNAP64_REUSE, "a", 0.25), sample(SNAP64_REUSE, "b", 0.25),
    sample(SNAP64_CHUNKED, "a", 0.75), sample(SNAP64_CHUNKED, "b", 0.25),
]


def render_text(renderable, width: int = 120) -> str:
    """What a terminal `width` columns wide shows for `renderable`, without styles."""
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def table_cells(text: str) -> dict[str, list[str]]:
    """The rendered tables' header and body rows as {first cell: the other cells}."""
    out = {}
    for line in text.splitlines():
        bar = line[:1]
        if bar in ("│", "┃"):
            cells = [cell.strip() for cell in line.strip(bar).split(bar)]
            out[cells[0]] = cells[1:]
    return out


def test_summary_is_the_mean_and_its_percent_of_full_on_the_same_rows():
    """Each entry's mean is over its rows; % of full compares with the full cache's mean on those rows, read the same way."""
    summary = {Setting.of(entry): entry for entry in summarize(SAMPLES, SETTINGS)}
    assert list(summary) == SETTINGS
    expected = {
        FULL: (0.75, 2, 100.0, 0),
        SNAP64: (1.75 / 3, 3, 50.0, 3),  # % of full on rows a and b: 0.375 / 0.75
        SNAP128: (0.75, 2, 100.0, 1),
        FULL_REUSE: (0.25, 2, 100.0, 0),
        SNAP64_REUSE: (0.25, 2, 100.0, 2),  # against the reused prompt's full cache (0.25), not the query-aware one
        SNAP64_CHUNKED: (0.5, 2, 200 / 3, 2),  # chunked reads share the query-aware prompt's full cache (0.75)
    }
    for setting, (score, n, pct, n_compressed) in expected.items():
        entry = summary[setting]
        assert entry["score"] == pytest.approx(score) and entry["n"] == n, setting
        assert entry["pct_of_full"] == pytest.approx(pct), setting
        assert entry["n_full_cache"] == n - n_compressed, setting


def test_percent_of_full_is_none_without_a_full_score():
    """% of full is None when the full cache scored 0 on the rows, or was not run."""
    zero = summarize([sample(FULL, "a", 0.0), sample(SNAP64, "a", 0.5)], [FULL, SNAP64])
    assert [(e["score"], e["pct_of_full"]) for e in zero] == [(0.0, None), (0.5, None)]
    alone = summarize([sample(SNAP64, "a", 0.5)], [SNAP64])
    assert [(e["score"], e["n"], e["pct_of_full"]) for e in alone] == [(0.5, 1, None)]
    empty = summarize([], [SNAP64])
    assert [(e["score"], e["n"], e["pct_of_full"]) for e in empty] == [(None, 0, None)]


NIAH_ROWS = [Row(f"L{n}-d{d}", "...", "q", ["x"], niah=(n, d)) for n in (250, 350) for d in (0.0, 1.0)] + [Row("other", "...", "q", ["x"])]


def test_niah_grids_hold_the_mean_per_length_and_depth():
    """A grid per setting, scores[length][depth] the mean in that cell, None where no sample fell; rows without a cell are left out."""
    samples = [
        sample(FULL, "L250-d0.0", 1.0), sample(FULL, "L250-d1.0", 1.0), sample(FULL, "L350-d0.0", 1.0), sample(FULL, "other", 0.0),
        sample(SNAP64, "L250-d0.0", 1.0), sample(SNAP64, "L250-d1.0", 0.0), sample(SNAP64, "L350-d1.0", 1.0),
    ]
    grids = niah_grids(samples, NIAH_ROWS, [FULL, SNAP64])
    assert [(g["method"], g["budget"], g["lengths"], g["depths"]) for g in grids] == [("full", None, [250, 350], [0.0, 1.0]), ("snapkv", 64, [250, 350], [0.0, 1.0])]
    assert grids[0]["scores"] == [[1.0, 1.0], [1.0, None]]
    assert grids[1]["scores"] == [[1.0, 0.0], [None, 1.0]]


def built_result(**fields) -> EvalResult:
    samples = fields.pop("samples", SAMPLES)
    settings = fields.pop("settings", SETTINGS)
    return EvalResult(model="tiny", metric="qa_f1", samples=samples, summary=summarize(samples, settings), **fields)


def test_render_shows_each_method_row_with_its_means_and_percent_of_full():
    """The table has a column per budget and a row per method and mode, each cell the mean and its % of full ('-' when not run)."""
    result = built_result(modes=["query", "reuse", "chunked"], chunk_size=32)
    text = render_text(render(result))
    assert text.splitlines()[0] == "qa_f1 on 3 samples, model tiny, read query / reuse / chunked"
    assert table_cells(text) == {
        "method": ["budget 64", "budget 128"],
        "full": ["0.75", "0.75"],  # full does not depend on the budget
        "snapkv": ["0.58 (50%)", "0.75 (100%)"],
        "full (reuse)": ["0.25", "0.25"],
        "snapkv (reuse)": ["0.25 (100%)", "-"],
        "snapkv (chunked 32)": ["0.50 (67%)", "-"],
    }
    assert "needle" not in text


def test_render_by_ratio_and_full_alone():
    """Ratios head their columns as 'ratio R'; a run of full alone is one score column."""
    ratio = Setting("snapkv", ratio=0.25)
    by_ratio = built_result(samples=[sample(FULL, "a", 0.5), sample(ratio, "a", 0.25)], settings=[FULL, ratio])
    assert table_cells(render_text(render(by_ratio))) == {"method": ["ratio 0.25"], "full": ["0.50"], "snapkv": ["0.25 (50%)"]}
    alone = built_result(samples=[sample(FULL, "a", 0.5)], settings=[FULL])
    assert table_cells(render_text(render(alone))) == {"method": ["score"], "full": ["0.50"]}


def test_render_niah_draws_a_grid_per_setting():
    """Each NIAH setting gets a titled length x depth grid of its cell means, '-' for an empty cell."""
    samples = [sample(FULL, row.id, 1.0) for row in NIAH_ROWS[:4]] + [sample(SNAP64, "L250-d0.0", 1.0), sample(SNAP64, "L350-d1.0", 0.0)]
    result = built_result(samples=samples, settings=[FULL, SNAP64])
    result.niah = niah_grids(samples, NIAH_ROWS, [FULL, SNAP64])
    tables = render_niah(result)
    assert [title for title, _ in tables] == ["needle found: full", "needle found: snapkv at budget 64"]
    assert table_cells(render_text(tables[1][1])) == {"length \\ depth": ["0", "1"], "250": ["1.00", "-"], "350": ["-", "0.00"]}
    shown = render_text(render(result))
    assert "needle found: full" in shown and "needle found: snapkv at budget 64" in shown


def test_write_json_writes_the_result_dict(tmp_path):
    """write_json writes to_dict() as JSON, with niah only when there are grids."""
    result = built_result()
    write_json(tmp_path / "r.json", result)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data == json.loads(json.dumps(result.to_dict())) and "niah" not in data
    assert list(data) == ["model", "metric", "modes", "chunk_size", "method_params", "summary", "samples", "timing"]
    result.niah = []
    assert result.to_dict()["niah"] == []
