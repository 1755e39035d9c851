"""Scoring compression methods on data, one idea per module.

- `metrics`: answer metrics (`contains`, `qa_f1`, `rouge_l`, `choice`) and `get_metric`.
- `data`: `Row`s from LongBench-style JSONL or a needle-in-a-haystack grid, the prompt each
  row reads, and `row_hash` (which row a logged sample was read from).
- `settings`: what is run, each method x budget or ratio x mode (`MODES`), as a `Setting`.
- `log`: the resumable JSONL progress log: its header, reading and checking it, appending.
- `results`: `EvalResult`, the mean per setting (`summarize`), NIAH grids, the JSON file.
- `render`: Rich tables of a result for the caller to print (nothing here prints).

- `runner`: `EvalConfig` and `run_eval`: one prefill per row and prompt, every setting derived
  from it through the reading modes `kvcli ask` uses (`kvcli/reading/`).
"""

from __future__ import annotations

from .data import Row, check_template, insert_needle, niah_id, niah_rows, parse_row, prompt_parts, read_rows, row_hash, sentence_starts
from .log import append_record, check_row, drop_half_line, log_header, log_path, read_log, resume_log
from .metrics import METRICS, Metric, choice, contains, get_metric, normalize_answer, qa_f1, rouge_l
from .render import render, render_niah, render_summary
from .results import EvalResult, niah_grids, summarize, write_json
from .runner import EvalConfig, run_eval
from .settings import MODES, REFERENCE_MODE, Setting, settings_for

__all__ = [
    "METRICS",
    "MODES",
    "REFERENCE_MODE",
    "EvalConfig",
    "EvalResult",
    "Metric",
    "Row",
    "Setting",
    "append_record",
    "check_row",
    "check_template",
    "choice",
    "contains",
    "drop_half_line",
    "get_metric",
    "insert_needle",
    "log_header",
    "log_path",
    "niah_grids",
    "niah_id",
    "niah_rows",
    "normalize_answer",
    "parse_row",
    "prompt_parts",
    "qa_f1",
    "read_log",
    "read_rows",
    "render",
    "render_niah",
    "render_summary",
    "resume_log",
    "rouge_l",
    "run_eval",
    "row_hash",
    "sentence_starts",
    "settings_for",
    "summarize",
    "write_json",
]
