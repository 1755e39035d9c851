"""Score compression methods on a dataset: one prefill per row, every method x budget derived from it.

During prefill every layer attends over its full KV whatever the method, so `capture` reads
each row's prompt once and `Capture.derive` builds the cache each method would have kept
(the same cache as the live path). A row then costs one prefill plus, per method x budget,
a cheap derive and a greedy decode. Finished samples are appended to a JSONL log as they
come, so an interrupted run keeps them and a rerun skips them. Nothing here prints.

Three ways of reading a row (`MODES`), so `kvcli ask`'s options can be scored side by side:
`query` (the question in the observation window: one capture serves every setting), `reuse`
(the document compressed with a generic instruction in the window, the question fed after
it, as `ask --reuse` and saved caches do: one capture of the prefix serves every setting),
and `chunked` (`ask --chunk-size`: the prompt read in chunks, compressing after each; a
chunk's compression changes what later chunks attend to, so every setting pays its own prefill).
"""

from __future__ import annotations

import bisect
import json
import logging
import re
import string
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Group
from rich.table import Table
from rich.text import Text

from .atomic import write_atomic
from .errors import BudgetError, InputError
from .generate import Sampling, capture, decode, prefill
from .methods import Method, plan_budget
from .pipeline import Options
from .prompt import build_prompt, summary_instruction

log = logging.getLogger(__name__)

# --- metrics ---------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """LongBench's normalization: lowercase, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)


def contains(prediction: str, answers: Sequence[str]) -> float:
    """1 if any answer appears in the prediction (case-insensitive), else 0."""
    lowered = prediction.lower()
    return float(any(answer.lower() in lowered for answer in answers if answer))


def _token_f1(prediction: str, answer: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, answers: Sequence[str]) -> float:
    """LongBench's token F1 between the normalized prediction and the best answer."""
    return max((_token_f1(prediction, answer) for answer in answers), default=0.0)


def _lcs_len(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, in O(len(a) * len(b)) time and O(len(b)) memory."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(row[j], row[j - 1])
            diagonal = above
    return row[-1]


def _rouge_l(prediction: str, answer: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    lcs = _lcs_len(pred, gold) if pred and gold else 0
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(gold)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, answers: Sequence[str]) -> float:
    """ROUGE-L F1 over whitespace tokens after normalization, against the best answer."""
    return max((_rouge_l(prediction, answer) for answer in answers), default=0.0)


_LETTER = re.compile(r"\b([ABCD])\b")


def _first_letter(text: str) -> str | None:
    # A standalone capital (as in "B", "(B)", "B." or "answer: B"), so "Answer" is not an A.
    match = _LETTER.search(text)
    return match.group(1) if match else None


def choice(prediction: str, answers: Sequence[str]) -> float:
    """1 if the first standalone A/B/C/D in the prediction is the answer letter, else 0."""
    letter = _first_letter(prediction)
    return float(letter is not None and any(letter == (_first_letter(a.strip().upper()) or a.strip()) for a in answers))


Metric = Callable[[str, Sequence[str]], float]
METRICS: dict[str, Metric] = {"contains": contains, "qa_f1": qa_f1, "rouge_l": rouge_l, "choice": choice}


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise InputError(f"unknown metric {name!r}; choose one of: {', '.join(METRICS)}")
    return METRICS[name]


# --- rows --------------------------------------------------------------------------------------


@dataclass
class Row:
    """One sample in LongBench's layout; `niah` is (length, depth) for needle-in-a-haystack rows."""

    id: str
    context: str
    input: str  # the question; empty for summarization
    answers: list[str]
    niah: tuple[int, float] | None = None


def _text_field(record: dict, key: str, where: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise InputError(f"{where}: {key!r} must be a string")
    return value.replace("NEWLINE_CHAR", "\n")  # LongBench's multi_news spells line breaks this way


def parse_row(record, index: int, where: str) -> Row:
    """A `Row` from one decoded JSON object; `where` names its place for errors."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object with context, input and answers")
    context = _text_field(record, "context", where)
    question = _text_field(record, "input", where, required=False)
    answers = record.get("answers")
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise InputError(f"{where}: 'answers' must be a non-empty list of strings")
    row_id = record.get("_id", index)
    if not isinstance(row_id, (str, int)) or isinstance(row_id, bool):
        raise InputError(f"{where}: '_id' must be a string or a number")
    return Row(id=str(row_id), context=context, input=question, answers=[a.replace("NEWLINE_CHAR", "\n") for a in answers])


def read_rows(path: str | Path, limit: int | None = None) -> list[Row]:
    """Rows from a LongBench-style JSONL file; blank lines are skipped, ids must be unique."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {path} does not exist" if not path.exists() else f"data file {path} is not a file")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    rows: list[Row] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{index + 1}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: invalid JSON ({exc.msg})") from None
            row = parse_row(record, index, where)
            if row.id in seen:
                raise InputError(f"{where}: _id {row.id!r} repeats line {seen[row.id]}; ids must be unique")
            seen[row.id] = index + 1
            rows.append(row)
    if not rows:
        raise InputError(f"data file {path} has no rows")
    return rows


def prompt_parts(row: Row, template: str | None = None) -> tuple[str, str]:
    """(document, question) for `build_prompt`.

    Without a template: the context, then the input (or kvcli's summary instruction). With
    one, the filled template is the whole user message: it is split right after `{context}`,
    so build_prompt can cut a long context in its middle while the template's tail (the
    question) stays last, in the observation window. build_prompt joins the two halves with
    a blank line, which replaces the whitespace the template had at that seam.
    """
    question = row.input or summary_instruction()
    if template is None:
        return row.context, question
    check_template(template)
    head, tail = template.split("{context}", 1)
    fill = lambda text: text.replace("{input}", row.input).replace("{context}", row.context)  # noqa: E731
    return fill(head) + row.context, fill(tail).strip()


def check_template(template: str) -> None:
    if "{context}" not in template:
        raise InputError("--template must contain {context}")
    if not template.split("{context}", 1)[1].strip():
        raise InputError("--template needs text after {context} (the question): methods score the document from the prompt's last tokens")


# --- needle in a haystack ---------------------------------------------------------------------

# After a sentence's closing punctuation (and quotes or brackets), or at a blank line (headings, lists).
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n\s*\n")


def sentence_starts(text: str) -> list[int]:
    """Char offsets where a sentence may be inserted: 0, each sentence or paragraph start, and the end."""
    return [0] + [m.end() for m in _SENTENCE_END.finditer(text)] + [len(text)]


def insert_needle(text: str, needle: str, depth: float) -> str:
    """`text` with `needle` at the sentence boundary nearest `depth` (0 start, 1 end)."""
    starts = sentence_starts(text)
    target = depth * len(text)
    at = min(starts, key=lambda s: abs(s - target))
    if at == len(text):
        return text.rstrip() + " " + needle
    return text[:at] + needle + " " + text[at:]


def niah_id(length: int, depth: float) -> str:
    return f"niah-L{length}-d{depth:g}"


def niah_rows(
    haystack_text: str,
    needle: str,
    question: str,
    answer: str,
    lengths: Sequence[int],
    depths: Sequence[float],
    tokenizer,
) -> list[Row]:
    """A row per length x depth: a haystack prefix sized so the whole prompt is about `length` tokens.

    The prefix ends at a sentence end when one lies within 2% of the length (else mid-sentence,
    to keep the length), and the needle goes at the sentence boundary nearest each relative
    depth; depth 1 puts it after the whole prefix.
    """
    if not needle.strip() or not question.strip() or not answer.strip():
        raise InputError("--needle, --question and --answer must not be empty")
    if not lengths or not depths:
        raise InputError("give at least one --lengths and one --depths value")
    if any(not 0 <= d <= 1 for d in depths):
        raise InputError(f"--depths must lie in [0, 1], got {', '.join(f'{d:g}' for d in depths)}")
    empty = build_prompt(tokenizer, "", question, max_context=1 << 30)
    needle_len = len(tokenizer(" " + needle, add_special_tokens=False)["input_ids"])
    overhead = len(empty) + needle_len
    encoded = tokenizer(haystack_text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    token_starts = [start for start, _ in offsets]
    ends = sentence_starts(haystack_text)[1:-1]
    rows = []
    for length in lengths:
        n_doc = length - overhead
        if n_doc < 16:
            raise InputError(f"--lengths {length} leaves no room for a haystack: the prompt and needle alone take {overhead} tokens")
        if n_doc > len(offsets):
            raise InputError(
                f"the haystack has {len(offsets)} tokens, but --lengths {max(lengths)} needs about {max(lengths) - overhead}; "
                "give a longer --haystack or shorter --lengths"
            )
        cut = offsets[n_doc - 1][1]
        # End on the sentence end nearest the cut, unless that moves the length by over 2%.
        i = bisect.bisect_left(ends, cut)
        nearest = min(ends[max(i - 1, 0) : i + 1], key=lambda e: abs(e - cut), default=cut)
        if abs(bisect.bisect_left(token_starts, nearest) - n_doc) <= 0.02 * length:
            cut = nearest
        body = haystack_text[:cut].rstrip()
        for depth in depths:
            rows.append(Row(id=niah_id(length, depth), context=insert_needle(body, needle, depth), input=question, answers=[answer], niah=(length, depth)))
    return rows


# --- running -------------------------------------------------------------------------------------


MODES = ("query", "reuse", "chunked")
# The full cache a mode's scores are compared with: chunking only applies when compressing,
# so chunked reads share the query-aware prompt's full cache.
REFERENCE_MODE = {"query": "query", "reuse": "reuse", "chunked": "query"}


@dataclass(frozen=True)
class Setting:
    """One method at one budget or ratio, read in one mode; `full` has no budget or ratio."""

    method: str
    budget: int | None = None
    ratio: float | None = None
    mode: str = "query"
    chunk_size: int | None = None  # chunked mode only

    @property
    def key(self) -> tuple:
        return (self.method, self.budget, self.ratio, self.mode, self.chunk_size)

    @classmethod
    def of(cls, record: dict) -> Setting:
        """The setting a sample or summary entry belongs to (logs from before modes are `query`)."""
        return cls(record["method"], record["budget"], record["ratio"], record.get("mode", "query"), record.get("chunk_size"))

    @property
    def row_label(self) -> str:
        """The method, with how it read the prompt unless query-aware."""
        if self.mode == "chunked":
            return f"{self.method} (chunked {self.chunk_size})"
        return self.method if self.mode == "query" else f"{self.method} ({self.mode})"

    @property
    def label(self) -> str:
        if self.budget is not None:
            return str(self.budget)
        if self.ratio is not None:
            return f"{self.ratio:g}"
        return "full"


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

    def to_dict(self) -> dict:
        out = {
            "model": self.model, "metric": self.metric, "modes": self.modes, "chunk_size": self.chunk_size,
            "summary": self.summary, "samples": self.samples, "timing": self.timing,
        }
        if self.niah is not None:
            out["niah"] = self.niah
        return out


def settings_for(
    methods: Sequence[Method],
    budgets: Sequence[int] | None,
    ratios: Sequence[float] | None,
    modes: Sequence[str] = ("query",),
    chunk_size: int | None = None,
) -> list[Setting]:
    """Every method at every budget (or ratio) in every mode; `full` once per prompt it is read with."""
    if not modes:
        raise InputError("--modes is empty; give query, reuse and/or chunked")
    for mode in modes:
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if len(set(modes)) != len(modes):
        raise InputError(f"--modes lists a mode twice: {', '.join(modes)}")
    if budgets is not None and ratios is not None:
        raise BudgetError("give --budgets or --ratios, not both")
    if not methods:
        raise InputError("no methods to evaluate; give --methods")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise InputError(f"--methods lists a method twice: {', '.join(names)}")
    if budgets is None and ratios is None:
        raise BudgetError("give --budgets or --ratios")
    levels = list(budgets if budgets is not None else ratios)
    if not levels:
        raise BudgetError("--budgets/--ratios is empty")
    for method in methods:
        if not method.compresses:
            continue
        for budget in budgets or []:
            if budget <= method.window_size:
                raise BudgetError(f"--budgets {budget} is not larger than {method.name}'s observation window ({method.window_size} tokens); use budgets above {method.window_size} or a smaller --window")
        for ratio in ratios or []:
            if not 0 < ratio <= 1:
                raise BudgetError(f"--ratios must lie in (0, 1], got {ratio}")
        if "chunked" in modes and (chunk_size is None or chunk_size < 2 * method.window_size):
            raise InputError(f"--chunk-size must be at least twice {method.name}'s window ({2 * method.window_size} tokens) for chunked mode, got {chunk_size}")
    out: list[Setting] = []
    for mode in modes:
        for method in methods:
            if not method.compresses:
                full = Setting(method.name, mode=REFERENCE_MODE[mode])
                if full not in out:
                    out.append(full)
                continue
            chunk = chunk_size if mode == "chunked" else None
            for level in levels:
                if budgets is not None:
                    out.append(Setting(method.name, budget=level, mode=mode, chunk_size=chunk))
                else:
                    out.append(Setting(method.name, ratio=level, mode=mode, chunk_size=chunk))
    return out


def _header(engine, methods: Sequence[Method], max_new_tokens: int, template: str | None, max_context: int | None) -> dict:
    """What must match for a log's predictions to be reused."""
    return {
        "kvcli_eval": 1,
        "model": engine.lm.name,
        "config_hash": engine.lm.config_hash,
        "max_new_tokens": max_new_tokens,
        "template": template,
        "max_context": max_context,
        "methods": {m.name: m.params() for m in methods},
    }


def read_log(path: Path, header: dict) -> tuple[dict[tuple, dict], dict | None]:
    """Samples already in the log `{(id, *setting.key): sample}` and its last header.

    Refuses a log written for another model or other settings.
    """
    done: dict[tuple, dict] = {}
    last_header = None
    if not path.exists():
        return done, last_header
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                log.warning("%s: ignoring a half-written last line", path)
                continue
            raise InputError(f"{path}:{number}: invalid JSON in the progress log; delete the file to start over") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}:{number}: not a kvcli eval progress log; delete it or write to another --json file")
        if "kvcli_eval" in record:
            _check_header(path, record, header)
            last_header = record
            continue
        try:
            done[(record["id"], *Setting.of(record).key)] = record
        except KeyError:
            raise InputError(f"{path}:{number}: not a kvcli eval progress log; delete it or write to another --json file") from None
    return done, last_header


def _check_header(path: Path, old: dict, new: dict) -> None:
    for key in ("model", "config_hash", "max_new_tokens", "template", "max_context"):
        if old.get(key) != new.get(key):
            raise InputError(f"{path} was written with {key}={old.get(key)!r}, not {new.get(key)!r}; delete it or write to another --json file")
    for name, params in new["methods"].items():
        if name in old.get("methods", {}) and old["methods"][name] != params:
            raise InputError(f"{path} was written with {name} parameters {old['methods'][name]}, not {params}; delete it or write to another --json file")


def _drop_half_line(path: Path) -> None:
    """Cut a line left half-written by an interrupted run, so new lines start on their own."""
    if not path.exists():
        return
    with path.open("r+b") as handle:
        data = handle.read()
        if data and not data.endswith(b"\n"):
            handle.truncate(data.rfind(b"\n") + 1)


def _append(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()


def run_eval(
    engine,
    rows: Sequence[Row],
    methods: Sequence[Method],
    budgets: Sequence[int] | None,
    ratios: Sequence[float] | None,
    metric: str,
    max_new_tokens: int,
    out_path: Path | None,
    progress: Callable[[int, int], None] | None = None,
    *,
    template: str | None = None,
    max_context: int | None = None,
    modes: Sequence[str] = ("query",),
    chunk_size: int | None = None,
) -> EvalResult:
    """Score every method x budget (or ratio) x mode on every row, one prefill per row and prompt.

    `out_path` is the JSONL progress log: each finished sample is appended at once, and the
    samples it already holds are skipped (their predictions are rescored with `metric`).
    `progress(done, total)` is called after each sample.
    """
    score = get_metric(metric)
    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    settings = settings_for(methods, budgets, ratios, modes, chunk_size)
    if template is not None:
        check_template(template)
    by_name = {m.name: m for m in methods}
    reader = _RowReader(engine, methods, Options(max_context=max_context, max_new_tokens=max_new_tokens))

    done: dict[tuple, dict] = {}
    if out_path is not None:
        out_path = Path(out_path)
        header = _header(engine, methods, max_new_tokens, template, max_context)
        done, last_header = read_log(out_path, header)
        _drop_half_line(out_path)
        if last_header != header:
            # every header is checked on resume, so a method added later keeps its knobs too
            _append(out_path, header)
    total = len(rows) * len(settings)
    finished = resumed = 0
    samples: dict[tuple, dict] = {}
    timing_rows = []

    for row in rows:
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
        reader.start(row, *prompt_parts(row, template))
        for ref in set(REFERENCE_MODE.values()):
            earlier = done.get((row.id, *Setting("full", mode=ref).key))
            if earlier is not None:
                reader.full_predictions[ref] = earlier["prediction"]
        for setting in todo:
            prediction, compressed = reader.answer(setting, by_name[setting.method])
            sample = {
                "id": row.id, "method": setting.method, "budget": setting.budget, "ratio": setting.ratio,
                "mode": setting.mode, "chunk_size": setting.chunk_size,
                "prediction": prediction, "score": score(prediction, row.answers), "compressed": compressed,
            }
            samples[(row.id, *setting.key)] = sample
            if out_path is not None:
                _append(out_path, sample)
            finished += 1
            if progress is not None:
                progress(finished, total)
        timing_rows.append({"id": row.id, **reader.finish(), "runs": len(todo)})

    ordered = [samples[(row.id, *s.key)] for row in rows for s in settings]
    result = EvalResult(
        model=engine.lm.name,
        metric=metric,
        samples=ordered,
        summary=summarize(ordered, settings),
        timing={
            "capture_s": round(sum(t["capture_s"] for t in timing_rows), 3),
            "derive_s": round(sum(t["derive_s"] for t in timing_rows), 3),
            "decode_s": round(sum(t["decode_s"] for t in timing_rows), 3),
            "resumed_samples": resumed,
            "rows": timing_rows,
        },
        modes=list(modes),
        chunk_size=chunk_size if "chunked" in modes else None,
    )
    if any(row.niah is not None for row in rows):
        result.niah = niah_grids(ordered, rows, settings)
    return result


class _RowReader:
    """Answers one row in every setting, reading its prompt as few times as the modes allow.

    Query-aware and reused settings derive from one capture per prompt (the capture of the
    reused prompt covers the document prefix only; the question is fed after each derived
    cache). Chunked settings prefill on their own. A setting whose budget keeps every token
    answers as the full cache of its reference prompt did.
    """

    def __init__(self, engine, methods: Sequence[Method], options: Options) -> None:
        self.engine = engine
        self.options = options
        self.sampling = Sampling()  # greedy: scores must not depend on a seed
        compressing = [m for m in methods if m.compresses]
        self.window_size = max((m.window_size for m in compressing), default=1)
        self.accumulated = any(m.needs_accumulated for m in compressing)
        for method in methods:
            engine.prepare(method)

    def start(self, row: Row, document: str, question: str) -> None:
        self.row, self.document, self.question = row, document, question
        self.prompts: dict[str, object] = {}
        self.captures: dict[str, object] = {}
        self.full_predictions: dict[str, str] = {}
        self.timing = {"prompt_tokens": None, "dropped_tokens": 0, "capture_s": 0.0, "derive_s": 0.0, "decode_s": 0.0}

    def finish(self) -> dict:
        self.captures.clear()  # free the full caches before the next row
        return {key: round(value, 4) if isinstance(value, float) else value for key, value in self.timing.items()}

    def _prompt(self, ref: str):
        """The prompt `ref` reads and the ids it prefills (the reused prompt: up to the question)."""
        if ref not in self.prompts:
            if ref == "reuse":
                prompt = self.engine.reuse_prompt(self.document, self.options)
                ids = prompt.ids[:, : prompt.prefix_len]
            else:
                prompt = self.engine.prompt(self.document, self.question, self.options)
                ids = prompt.ids
            self.prompts[ref] = (prompt, ids.to(self.engine.lm.device))
            if self.timing["prompt_tokens"] is None:
                self.timing["prompt_tokens"] = len(prompt)
                self.timing["dropped_tokens"] = prompt.dropped_tokens
        return self.prompts[ref]

    def answer(self, setting: Setting, method: Method) -> tuple[str, bool]:
        """The greedy answer in `setting`, and whether its cache was compressed."""
        ref = REFERENCE_MODE[setting.mode]
        prompt, ids = self._prompt(ref)
        plan = None
        if method.compresses:
            try:
                plan = plan_budget(ids.shape[1], self.engine.num_layers, window_size=method.window_size, ratio=setting.ratio, budget=setting.budget)
            except BudgetError as exc:
                raise BudgetError(f"row {self.row.id}: {exc}") from None
        if plan is None and ref in self.full_predictions:
            return self.full_predictions[ref], False  # the same full cache and greedy decoding
        engine = self.engine
        if setting.mode == "chunked" and plan is not None:
            probe = ids[:, prompt.prefix_len :]  # the question scores each chunk, then is dropped
            state = prefill(engine.model, ids, method, plan, chunk_size=setting.chunk_size, probe_ids=probe)
            self.timing["capture_s"] += state.seconds
        else:
            if ref not in self.captures:
                self.captures.clear()  # settings come grouped by prompt: hold one full cache at a time
                self.captures[ref] = capture(engine.model, ids, self.window_size, accumulated=self.accumulated)
                self.timing["capture_s"] += self.captures[ref].seconds
            started = time.perf_counter()
            state = self.captures[ref].derive(method, plan)
            if ref == "reuse":
                state = engine.extend(state.cache, state.prompt_len, engine.suffix(self.question), copy=False)
            self.timing["derive_s"] += time.perf_counter() - started
        started = time.perf_counter()
        tokens = list(decode(engine.model, state, self.options.max_new_tokens, engine.eos_ids, self.sampling))
        self.timing["decode_s"] += time.perf_counter() - started
        prediction = engine.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        if plan is None:
            self.full_predictions[ref] = prediction
        return prediction, plan is not None


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


def log_path(json_path: str | Path) -> Path:
    """The progress log kept beside a `--json` output, used to resume."""
    return Path(str(json_path) + ".partial.jsonl")


# --- rendering -------------------------------------------------------------------------------------


def _cell(value: float | None) -> Text:
    if value is None:
        return Text("-", style="dim")
    style = "green" if value >= 0.8 else "yellow" if value >= 0.4 else "red"
    return Text(f"{value:.2f}", style=style)


def render(result: EvalResult) -> Group:
    """Mean score per method x budget (with % of full), then NIAH grids if any."""
    n = max((e["n"] for e in result.summary), default=0)
    read = "" if result.modes == ["query"] else f", read {' / '.join(result.modes)}"
    parts: list = [Text(f"{result.metric} on {n} samples, model {result.model}{read}", style="bold"), render_summary(result)]
    for title, table in render_niah(result):
        parts += [Text(""), Text(title, style="bold"), table]
    return Group(*parts)


def render_summary(result: EvalResult) -> Table:
    entries = result.summary
    levels = list(dict.fromkeys(Setting.of(e).label for e in entries if e["method"] != "full"))
    by_ratio = any(e["ratio"] is not None for e in entries)
    table = Table()
    table.add_column("method")
    for level in levels:
        table.add_column(f"ratio {level}" if by_ratio else f"budget {level}", justify="right")
    if not levels:
        table.add_column("score", justify="right")
    rows: dict[str, dict[str, dict]] = {}
    for entry in entries:
        rows.setdefault(Setting.of(entry).row_label, {})[Setting.of(entry).label] = entry
    for name, cells in rows.items():
        if "full" in cells:
            entry = cells["full"]
            # full does not depend on the budget: the same reference under every column
            table.add_row(Text(name, style="bold"), *[_cell(entry["score"]) for _ in (levels or [None])])
            continue
        row = [Text(name, style="bold")]
        for level in levels:
            entry = cells.get(level)
            text = _cell(entry["score"] if entry else None)
            if entry and entry["pct_of_full"] is not None:
                text.append(f" ({entry['pct_of_full']:.0f}%)", style="dim")
            row.append(text)
        table.add_row(*row)
    return table


def render_niah(result: EvalResult) -> list[tuple[str, Table]]:
    """A (title, length x depth grid) per method at each budget."""
    tables = []
    for grid in result.niah or []:
        setting = Setting.of(grid)
        title = setting.row_label if setting.label == "full" else f"{setting.row_label} at {'ratio' if grid['ratio'] is not None else 'budget'} {setting.label}"
        table = Table()
        table.add_column("length \\ depth", justify="right")
        for depth in grid["depths"]:
            table.add_column(f"{depth:g}", justify="right")
        for length, scores in zip(grid["lengths"], grid["scores"]):
            table.add_row(str(length), *[_cell(s) for s in scores])
        tables.append((f"needle found: {title}", table))
    return tables


__all__ = [
    "METRICS",
    "MODES",
    "EvalResult",
    "Row",
    "Setting",
    "choice",
    "contains",
    "insert_needle",
    "log_path",
    "niah_rows",
    "normalize_answer",
    "prompt_parts",
    "qa_f1",
    "read_rows",
    "render",
    "rouge_l",
    "run_eval",
    "write_json",
]
