"""One document, many questions: query-aware vs --reuse vs chunked prefill vs a saved cache.

    python benchmarks/reuse_check.py -m smollm2-135m --length 2000 --ratio 0.1 --json out.json

On needle-in-a-haystack cases built from samples/haystack.txt (several facts hidden at
different depths, one question each) it measures, at the same ratio:
- accuracy of query-aware compression (one prefill per question, the question in the window),
  of `--reuse` (one question-agnostic compression, every question fed after it), and of
  chunked prefill (`--chunk-size`, the question as a probe after each chunk) vs one pass;
- wall time to answer all questions from one saved `.kvc` (compress once, then load and
  answer) vs one `ask` per question;
- peak KV bytes held during a chunked prefill vs one pass (measured after every layer).
Everything runs in this one process, side by side; report ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from kvcli.evaluate import niah_rows
from kvcli.methods import make_method
from kvcli.models import load_model
from kvcli.pipeline import Engine, Options, Prefix
from kvcli.store import load_cache, save_cache

FACTS = [
    ("The key to the archive room is kept under the blue ceramic owl on the librarian's desk.", "Where is the key to the archive room kept?", "owl"),
    ("Maria's favourite fruit, she once told the committee, has always been the persimmon.", "Which fruit does Maria like best?", "persimmon"),
    ("The secret passphrase for the vault is indigo-walrus-17.", "What is the secret passphrase for the vault?", "indigo-walrus-17"),
    ("The night train to Tromso leaves from platform nine at a quarter past eleven.", "Which platform does the night train to Tromso leave from?", "nine"),
    ("Our bakery's sourdough starter is named Clementine and is fed rye flour every morning.", "What is the bakery's sourdough starter called?", "clementine"),
]


def build_document(engine: Engine, length: int) -> str:
    """A haystack of about `length` tokens with every fact hidden at evenly spread depths."""
    haystack = (Path(__file__).resolve().parent.parent / "samples" / "haystack.txt").read_text()
    (row,) = niah_rows(haystack, "Nothing here.", "?", "-", [length], [0.0], engine.tokenizer)
    text = row.context
    for i, (fact, _, _) in enumerate(FACTS):
        depth = (i + 0.5) / len(FACTS)
        at = text.rfind(". ", 0, int(len(text) * depth))
        at = 0 if at < 0 else at + 2
        text = text[:at] + fact + " " + text[at:]
    return text


def answer(engine: Engine, state, options: Options) -> str:
    from kvcli.generate import decode

    tokens = list(decode(engine.model, state, options.max_new_tokens, engine.eos_ids))
    return engine.tokenizer.decode(tokens, skip_special_tokens=True)


def peak_kv(engine: Engine, ids, method, options: Options, probe=None) -> int:
    """Most KV bytes held at once during one prefill."""
    state, _ = engine.read(ids, method, options, probe_ids=probe)
    return state.cache.peak_nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--method", default="dynamickv")
    parser.add_argument("--length", type=int, default=2000)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    engine = Engine(load_model(args.model))
    method = engine.prepare(make_method(args.method))
    text = build_document(engine, args.length)
    one_pass = Options(ratio=args.ratio, max_new_tokens=args.max_new_tokens)
    chunked = Options(ratio=args.ratio, max_new_tokens=args.max_new_tokens, chunk_size=args.chunk_size)
    results: dict = {"model": engine.lm.name, "method": method.name, "ratio": args.ratio, "length": args.length, "chunk_size": args.chunk_size}

    # Query-aware (one prefill per question) and chunked, one question at a time.
    scores = {"full": [], "query_aware": [], "chunked": [], "reuse": [], "saved_cache": []}
    full = make_method("full")
    for fact, question, expected in FACTS:
        prompt = engine.prompt(text, question, one_pass)
        state, _ = engine.read(prompt.ids, full, one_pass)
        scores["full"].append(expected in answer(engine, state, one_pass).lower())
    started = time.perf_counter()
    for fact, question, expected in FACTS:
        prompt = engine.prompt(text, question, one_pass)
        state, _ = engine.read(prompt.ids, method, one_pass)
        scores["query_aware"].append(expected in answer(engine, state, one_pass).lower())
    separate_s = time.perf_counter() - started
    for fact, question, expected in FACTS:
        prompt = engine.prompt(text, question, chunked)
        state, _ = engine.read(prompt.ids, method, chunked, probe_ids=prompt.ids[:, prompt.prefix_len :])
        scores["chunked"].append(expected in answer(engine, state, chunked).lower())

    # --reuse: one question-agnostic compression, each question fed after a copy of it.
    prompt, prefix = engine.compress_prefix(text, method, one_pass)
    for fact, question, expected in FACTS:
        scores["reuse"].append(expected in answer(engine, engine.answer_after(prefix, question), one_pass).lower())

    # A saved cache: compress once, write, read back, answer every question.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "doc.kvc"
        started = time.perf_counter()
        _, made = engine.compress_prefix(text, method, one_pass)
        save_cache(path, made.state.cache, {"model": engine.lm.name, "config_hash": engine.lm.config_hash, "method": method.name, "method_params": method.params(), "prompt_tokens": made.state.prompt_len})
        saved = load_cache(path, engine.lm.config_hash, engine.lm.name)
        loaded = Prefix.saved(saved.cache, saved.prompt_tokens, "", "")
        for fact, question, expected in FACTS:
            scores["saved_cache"].append(expected in answer(engine, engine.answer_after(loaded, question), one_pass).lower())
        cached_s = time.perf_counter() - started
        results["cache_file_bytes"] = path.stat().st_size

    prompt = engine.prompt(text, FACTS[0][1], one_pass)
    results["peak_kv_bytes_one_pass"] = peak_kv(engine, prompt.ids, method, one_pass)
    results["peak_kv_bytes_chunked"] = peak_kv(engine, prompt.ids, method, chunked, probe=prompt.ids[:, prompt.prefix_len :])
    results["prompt_tokens"] = len(prompt)
    results["questions"] = len(FACTS)
    results["accuracy"] = {k: sum(v) / len(v) for k, v in scores.items()}
    results["seconds_separate_asks"] = round(separate_s, 2)
    results["seconds_saved_cache"] = round(cached_s, 2)
    results["speedup_saved_cache"] = round(separate_s / cached_s, 2)
    results["chunked_peak_vs_one_pass"] = round(results["peak_kv_bytes_chunked"] / results["peak_kv_bytes_one_pass"], 3)
    text_out = json.dumps(results, indent=2)
    print(text_out)
    if args.json:
        Path(args.json).write_text(text_out)


if __name__ == "__main__":
    main()
