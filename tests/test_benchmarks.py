"""The benchmark scripts' own helpers: the many-questions document, the matvec ceiling, the results tables."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.mark.model
def test_many_questions_document_holds_every_fact_in_order(smollm):
    """build_document hides all ten facts, in depth order, in about the requested number of tokens."""
    reuse_check = _script("reuse_check")
    text = reuse_check.build_document(smollm.tokenizer, 1500)
    where = [text.find(fact) for fact, _, _ in reuse_check.FACTS]
    assert all(at >= 0 for at in where) and where == sorted(where)
    n_tokens = len(smollm.tokenizer(text, add_special_tokens=False)["input_ids"])
    facts_tokens = sum(len(smollm.tokenizer(f)["input_ids"]) for f, _, _ in reuse_check.FACTS)
    assert 1300 <= n_tokens - facts_tokens <= 1510
    assert len({q for _, q, _ in reuse_check.FACTS}) == len(reuse_check.FACTS)


def test_matvec_ceiling_times_every_linear_layer():
    """matvec_tokens_per_s runs one product per linear layer and returns a finite positive rate."""
    bench = _script("bench")
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    rate = bench.matvec_tokens_per_s(model, repeats=2)
    assert 0 < rate < float("inf")


def test_results_tables_name_rows_by_mode():
    """Eval summaries with several modes give one table row per method and mode, full once per prompt."""
    tables = _script("results_tables")
    summary = [
        {"method": "full", "budget": None, "ratio": None, "mode": "query", "chunk_size": None, "score": 1.0, "n": 2, "pct_of_full": 100.0},
        {"method": "full", "budget": None, "ratio": None, "mode": "reuse", "chunk_size": None, "score": 0.5, "n": 2, "pct_of_full": 100.0},
        {"method": "snapkv", "budget": None, "ratio": 0.1, "mode": "query", "chunk_size": None, "score": 1.0, "n": 2, "pct_of_full": 100.0},
        {"method": "snapkv", "budget": None, "ratio": 0.1, "mode": "reuse", "chunk_size": None, "score": 0.0, "n": 2, "pct_of_full": 0.0},
        {"method": "snapkv", "budget": None, "ratio": 0.1, "mode": "chunked", "chunk_size": 512, "score": 0.5, "n": 2, "pct_of_full": 50.0},
    ]
    lines = tables.table({"summary": summary}).splitlines()
    names = [line.split("|")[1].strip() for line in lines[2:]]
    assert names == ["full", "full (reuse)", "snapkv", "snapkv (reuse)", "snapkv (chunked 512)"]
    assert "0.000 (0%)" in lines[5] and "0.500 (50%)" in lines[6]
