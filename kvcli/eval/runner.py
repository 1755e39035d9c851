"""Running an evaluation: every method x budget x mode on every row, as few prefills as possible.

During prefill every layer attends over its full KV whatever the method, so a row's prompt is
captured once and each setting's cache is derived from the capture (the same cache the live
path keeps, tested). Rows are read through the same modes `kvcli ask` uses
(`kvcli/reading/`): query-aware and reused settings derive from one capture per prompt (the
repeat scorer's settings from one repeat of the reused prefix); chunked settings prefill on their own, since compressing a chunk changes what later chunks
attend to. Finished samples are appended to the log as they come. With a pool (`kvcli eval
--ray`) each row's settings run on one of its workers, and the samples are logged in the rows'
order, as a run here logs them. Nothing here prints.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import BudgetError, InputError, KvcliError
from ..generate import Sampling
from ..methods import Budget, Method
from ..reading import Options, QueryAware, Reused, answer
from ..reading.policy import one_capture_serves
from ..reading.skim import Skim, Skimming
from .data import Row, check_template, prompt_parts, row_hash
from .log import append_record, check_row, log_header, resume_log
from .metrics import get_metric
from .results import EvalResult, niah_grids, summarize
from .settings import REFERENCE_MODE, Setting, settings_for


@dataclass(frozen=True)
class EvalConfig:
    """What an evaluation runs: methods x budgets (or ratios) x modes, and how it answers."""

    methods: Sequence[Method]
    budgets: Sequence[int] | None
    ratios: Sequence[float] | None
    metric: str
    max_new_tokens: int = 64
    template: str | None = None
    max_context: int | None = None
    modes: Sequence[str] = ("query",)
    chunk_size: int | None = None
    fit: str = "reindex"  # a row longer than the context: read whole in chunks, or "cut" in the middle
    min_keep: int | None = None  # --min-keep: the fewest tokens per layer each of --ratios keeps
    skim: object | None = None  # how --modes skim reads (`reading.skim.Skimming`); None: its defaults

    def settings(self) -> list[Setting]:
        """Every setting, checked (bad settings fail before a model loads)."""
        get_metric(self.metric)
        if self.template is not None:
            check_template(self.template)
        Options(max_new_tokens=self.max_new_tokens, max_context=self.max_context)  # the same checks as ask
        Budget(min_keep=self.min_keep)  # a negative --min-keep is refused here
        return settings_for(self.methods, self.budgets, self.ratios, self.modes, self.chunk_size)

    def options(self) -> Options:
        # greedy: scores must not depend on a seed
        return Options(max_new_tokens=self.max_new_tokens, max_context=self.max_context, sampling=Sampling(), fit=self.fit)


def run_eval(reader, rows: Sequence[Row], config: EvalConfig, log: Path | None = None,
             progress: Callable[[int, int], None] | None = None, pool=None) -> EvalResult:
    """Score every setting of `config` on every row; `log` is the JSONL progress log (resumed).

    Samples already in the log are skipped (their predictions rescored with the metric);
    `progress(done, total)` is called after each sample. With a `pool` (`kvcli.batch`'s, whose
    workers run `ScoreRows(config)`) the rows are scored on its workers, one row per task, and
    `reader` is not used: the samples, the log and the result are those of a run here.
    """
    score = get_metric(config.metric)
    settings = config.settings()
    by_name = {m.name: m for m in config.methods}
    model = pool.identity if pool is not None else {"model": reader.lm.name, "config_hash": reader.lm.config_hash}
    done: dict[tuple, dict] = {}
    if log is not None:
        log = Path(log)
        header = log_header(model["model"], model["config_hash"], config.methods, config.max_new_tokens, config.template,
                            config.max_context, fit=config.fit, min_keep=config.min_keep)
        done = resume_log(log, header)
    digests = {row.id: row_hash(row) for row in rows}
    for key, sample in done.items():  # other data under the same ids is refused before any row is read
        if key[0] in digests:
            check_row(log, sample, digests[key[0]])
    total = len(rows) * len(settings)
    finished = resumed = 0
    samples: dict[tuple, dict] = {}
    timing_rows = []
    row_reader = _RowReader(reader, config) if pool is None else None
    distributed = []  # (row, settings to run, full predictions logged earlier), with a pool

    def record(sample: dict) -> None:
        nonlocal finished
        samples[(sample["id"], *Setting.of(sample).key)] = sample
        if log is not None:
            append_record(log, sample)
        finished += 1
        if progress is not None:
            progress(finished, total)

    for row in rows:
        digest = digests[row.id]
        todo = []
        for setting in settings:
            key = (row.id, *setting.key)
            if key in done:
                samples[key] = {**done[key], "score": score(done[key]["prediction"], row.answers)}
                finished += 1
                resumed += 1
            else:
                todo.append(setting)
        if progress is not None:
            progress(finished, total)
        if not todo:
            continue
        earlier = {}
        for ref in set(REFERENCE_MODE.values()):
            logged = done.get((row.id, *Setting("full", mode=ref).key))
            if logged is not None:
                earlier[ref] = logged["prediction"]
        if pool is not None:
            distributed.append((row, todo, earlier))
            continue
        timing_rows.append(score_row(row_reader, row, todo, earlier, digest, by_name, score, on_sample=record))
    if distributed:
        timing_rows.extend(_score_on(pool, distributed, digests, record))

    ordered = [samples[(row.id, *s.key)] for row in rows for s in settings]
    result = EvalResult(
        model=model["model"], metric=config.metric, samples=ordered, summary=summarize(ordered, settings),
        timing={
            "capture_s": round(sum(t["capture_s"] for t in timing_rows), 3),
            "derive_s": round(sum(t["derive_s"] for t in timing_rows), 3),
            "decode_s": round(sum(t["decode_s"] for t in timing_rows), 3),
            **({"repeat_s": round(sum(t["repeat_s"] for t in timing_rows), 3),
                "repeat_prefill_s": round(sum(t["repeat_prefill_s"] for t in timing_rows), 3)}
               if "reuse-repeat" in config.modes else {}),
            "resumed_samples": resumed,
            "rows": timing_rows,
        },
        modes=list(config.modes),
        chunk_size=config.chunk_size if "chunked" in config.modes else None,
        method_params={m.name: m.params() for m in config.methods},
    )
    if any(row.niah is not None for row in rows):
        result.niah = niah_grids(ordered, rows, settings)
    return result


def score_row(row_reader: _RowReader, row: Row, todo: Sequence[Setting], earlier: dict[str, str], digest: str,
              by_name: dict[str, Method], score, on_sample: Callable[[dict], None]) -> dict:
    """Answer `row` in each setting of `todo`, passing each sample to `on_sample` as it is done;
    `earlier` holds full-cache predictions logged by an earlier run. Returns the row's timing."""
    row_reader.start(row)
    row_reader.full_predictions.update(earlier)
    for setting in todo:
        prediction, compressed = row_reader.answer(setting, by_name[setting.method])
        on_sample({
            "id": row.id, "method": setting.method, "budget": setting.budget, "ratio": setting.ratio,
            "mode": setting.mode, "chunk_size": setting.chunk_size,
            "prediction": prediction, "score": score(prediction, row.answers), "compressed": compressed,
            "row_hash": digest,
        })
    return {"id": row.id, **row_reader.finish(), "runs": len(todo)}


class ScoreRows:
    """The work of a pool's worker in `run_eval`: one row's settings per task, one capture per prompt."""

    def __init__(self, config: EvalConfig) -> None:
        self.config = config

    def start(self, reader) -> None:
        self.row_reader = _RowReader(reader, self.config)
        self.score = get_metric(self.config.metric)
        self.by_name = {m.name: m for m in self.config.methods}

    def __call__(self, task) -> tuple[list[dict], dict]:
        row, todo, earlier, digest = task
        new: list[dict] = []
        timing = score_row(self.row_reader, row, todo, earlier, digest, self.by_name, self.score, on_sample=new.append)
        return new, timing


def _score_on(pool, distributed, digests: dict[str, str], record: Callable[[dict], None]) -> list[dict]:
    """Score the rows on `pool`'s workers; their samples are recorded in the rows' order (a row
    done early waits for those before it), so the log is the one a run here writes. On an error
    or Ctrl-C the rows that finished are recorded first."""
    waiting: dict[int, tuple[list[dict], dict]] = {}
    timing_rows: list[dict] = []
    next_index = 0
    tasks = ((index, (row, todo, earlier, digests[row.id])) for index, (row, todo, earlier) in enumerate(distributed))
    try:
        for index, outcome in pool.map(tasks):
            if outcome.lost is not None:
                raise KvcliError(f"row {distributed[index][0].id}: {outcome.lost}; the samples finished so far are in the log, run again to resume")
            waiting[index] = outcome.result
            while next_index in waiting:
                new, timing = waiting.pop(next_index)
                for sample in new:
                    record(sample)
                timing_rows.append(timing)
                next_index += 1
    finally:
        for index in sorted(waiting):
            for sample in waiting.pop(index)[0]:
                record(sample)
    return timing_rows


class _RowReader:
    """Answers one row in every setting, through the reading modes, one capture per prompt.

    A setting whose budget keeps every token answers as the full cache of its reference
    prompt did (the same cache and greedy decoding).
    """

    def __init__(self, reader, config: EvalConfig) -> None:
        self.reader = reader
        self.config = config
        self.options = config.options()
        compressing = [m for m in config.methods if m.compresses]
        self.window_size = max((m.window_size for m in compressing), default=1)
        self.accumulated = any(m.needs_accumulated for m in compressing)

    def start(self, row: Row) -> None:
        self.row = row
        self.document, self.question = prompt_parts(row, self.config.template)
        self.modes = {"query": QueryAware(self.reader, self.document, self.options)}
        self.captures: dict[str, object] = {}
        self.full_predictions: dict[str, str] = {}
        self.timing = {"prompt_tokens": None, "dropped_tokens": 0, "capture_s": 0.0, "derive_s": 0.0, "decode_s": 0.0}
        if "reuse-repeat" in self.config.modes:
            # the repeat's own prefill and its repeat pass (both in capture_s too), for their ratio
            self.timing.update(repeat_prefill_s=0.0, repeat_s=0.0)

    def finish(self) -> dict:
        self.captures.clear()  # free the full caches before the next row
        return {key: round(value, 4) if isinstance(value, float) else value for key, value in self.timing.items()}

    def _mode(self, ref: str):
        if ref not in self.modes:
            self.modes[ref] = Reused(self.reader, self.document, self.options, scorer="instruction")  # reuse-repeat: .repeat()
        mode = self.modes[ref]
        if self.timing["prompt_tokens"] is None:
            prompt = mode.prompt(self.question) if ref == "query" else mode.prompt
            self.timing["prompt_tokens"], self.timing["dropped_tokens"] = len(prompt), prompt.dropped_tokens
        return mode

    def _capture(self, kind: str, mode):
        """The capture settings of mode `kind` derive from (the reused prefix's repeat for reuse-repeat)."""
        if kind not in self.captures:
            self.captures.clear()  # settings come grouped by mode: hold one full cache at a time
            if kind == "query":
                captured = mode.capture(self.question, self.window_size, self.accumulated)
            elif kind == "reuse-repeat":
                # measured at once where a method weighs by it, never where none does: no hidden states held
                captured = mode.repeat(surprisal=any(m.surprisal for m in self.config.methods if m.compresses))
                self.timing["repeat_prefill_s"] += captured.state.seconds
                self.timing["repeat_s"] += captured.repeat_s
            else:
                captured = mode.capture(self.window_size, self.accumulated)
            self.captures[kind] = captured
            self.timing["capture_s"] += captured.seconds
        return self.captures[kind]

    def answer(self, setting: Setting, method: Method) -> tuple[str, bool]:
        """The greedy answer in `setting`, and whether its cache was compressed."""
        ref = REFERENCE_MODE[setting.mode]
        mode = self._mode(ref)
        budget = Budget(setting.ratio, setting.budget, self.config.min_keep)
        try:
            if setting.mode == "skim":  # a read of its own per setting, as `kvcli ask --skim` does
                reading = Skim(self.reader, mode, self.config.skim or Skimming()).read(self.question, method, budget)
                self.timing["skim_s"] = self.timing.get("skim_s", 0.0) + reading.state.seconds
            elif ref == "query" and not one_capture_serves(mode, self.question, method, budget, setting.chunk_size):
                # reads in chunks (asked, or chosen by the method) and past the model's positions (one full
                # capture cannot hold such a prompt) pay a prefill per setting, as `kvcli ask` does
                reading = mode.read(self.question, method, budget, chunk_size=setting.chunk_size)
                if reading.state.compressed:
                    self.timing["capture_s"] += reading.state.seconds
            else:
                # a chunked setting whose chunks hold the whole prompt reads in one pass: the query capture serves it
                captured = self._capture(ref if ref == "query" else setting.mode, mode)
                started = time.perf_counter()
                if ref == "query":
                    reading = mode.derive(captured, self.question, method, budget)
                else:
                    prefix = mode.derive(captured, method, budget)
                    prefix.charged = True  # the capture's time is counted once, above
                    reading = prefix.ask(self.reader, self.question, self.options)
                self.timing["derive_s"] += time.perf_counter() - started
        except (BudgetError, InputError) as exc:
            raise type(exc)(f"row {self.row.id}: {exc}") from None
        compressed = reading.state.compressed
        if not compressed and ref in self.full_predictions:
            return self.full_predictions[ref], False
        started = time.perf_counter()
        prediction = answer(self.reader, reading, self.options).text
        self.timing["decode_s"] += time.perf_counter() - started
        if not compressed:
            self.full_predictions[ref] = prediction
        return prediction, compressed


__all__ = ["EvalConfig", "ScoreRows", "run_eval", "score_row"]
