"""How often `--sources`' first passage holds the planted fact, and what citing costs.

    python benchmarks/sources_check.py [--models qwen2.5-coder-0.5b smollm2-135m] [--cases 10]

Needle documents: CPython's reference prose (`pydoc_data.topics`, not samples/), each case
starting at another topic, with one of ten facts (benchmarks/reuse_check.py) at depth
(i + 0.5) / cases and a prompt of 1,500, 2,500 or 4,000 tokens in turn; and PDFs made here
(tests/pdfutil.py) of five pages with the fact on page 2, 3 or 4; with --facts-doc, one document
holding all ten facts, each asked for (the first source must hold that fact, not another). Each case is read as
`kvcli ask` reads it, under two settings: the default method at the default ratio, and
`--method full` (and, with `--settings ratio0.1`, the default method at an explicit `--ratio 0.1`,
which the `--min-keep` floor does not raise). Per setting it counts answers that hold the fact's key word, and, among
those and among all, how often the first source holds the needle sentence (text) or is on the
fact's page (PDF).

Scores compared (docs/methods.md#sources): `decode`, the attention the answer's tokens paid at
the profile's 8 retrieval heads (what --sources uses); `prefill`, the question window's
attention at the same heads (evidencekv's evidence score), taken from the full-cache read,
where it sees every token, its best case; `both`, the two normalised and summed. The three are
compared on the full-cache reads, where both exist; the default-ratio reads use `decode`.

Cost: each default-ratio answer is decoded twice from copies of its cache, without and with the
watch; the extra decode seconds are reported against the answer's whole time (read + decode).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from reuse_check import FACTS  # noqa: E402  (benchmarks/ is on sys.path when a script in it runs)

LENGTHS = (1500, 2500, 4000)
PDF_PAGES = 5
PDF_LINES = 36  # lines of about 90 characters per page: ~3,800 tokens for five pages
WINDOW = 8  # the question window the prefill score is taken over (the default --window)


def haystack(start: int) -> str:
    from pydoc_data.topics import topics

    names = sorted(topics)
    names = names[start % len(names):] + names[: start % len(names)]
    return "\n\n".join(topics[name] for name in names[:60])


def text_cases(tokenizer, count: int, workdir: Path) -> list[dict]:
    from kvcli.eval import niah_rows

    cases = []
    for i in range(count):
        fact, question, key = FACTS[i % len(FACTS)]
        depth = (i + 0.5) / count
        (row,) = niah_rows(haystack(7 * i + 3), fact, question, key, [LENGTHS[i % len(LENGTHS)]], [depth], tokenizer)
        path = workdir / f"needle-{i}.txt"
        path.write_text(row.context, encoding="utf-8")
        cases.append({"name": f"text {LENGTHS[i % len(LENGTHS)]} d={depth:.2f}", "path": path, "fact": fact, "question": question, "key": key, "page": None})
    return cases


def pdf_cases(count: int, workdir: Path) -> list[dict]:
    import textwrap

    from pdfutil import pdf_bytes

    cases = []
    for i in range(count):
        fact, question, key = FACTS[(i + 3) % len(FACTS)]
        page = 2 + i % 3
        lines = textwrap.wrap(haystack(11 * i + 5), 90)
        pages = [lines[p * PDF_LINES:(p + 1) * PDF_LINES] for p in range(PDF_PAGES)]
        at = PDF_LINES // 2 - 3 + 2 * i
        pages[page - 1] = pages[page - 1][:at] + textwrap.wrap(fact, 90) + pages[page - 1][at:]
        path = workdir / f"facts-{i}.pdf"
        path.write_bytes(pdf_bytes(pages))
        cases.append({"name": f"pdf p.{page}/{PDF_PAGES}", "path": path, "fact": fact, "question": question, "key": key, "page": page})
    return cases


def facts_cases(tokenizer, length: int, workdir: Path) -> list[dict]:
    """One document of about `length` tokens holding all ten facts (benchmarks/reuse_check.py), asked
    about each: the first source must hold the fact asked for, not one of the nine others."""
    ids = tokenizer(haystack(41), add_special_tokens=False)["input_ids"][:length]
    text = tokenizer.decode(ids)
    text = text[: text.rfind(". ") + 1]
    for i, (fact, _, _) in enumerate(FACTS):  # evenly spread, at sentence ends, as reuse_check.build_document does
        at = text.rfind(". ", 0, int(len(text) * (i + 0.5) / len(FACTS)))
        at = 0 if at < 0 else at + 2
        text = text[:at] + fact + " " + text[at:]
    path = workdir / f"ten-facts-{length}.txt"
    path.write_text(text, encoding="utf-8")
    return [{"name": f"ten facts {length}: fact {i + 1}", "path": path, "fact": fact, "question": question, "key": key, "page": None}
            for i, (fact, question, key) in enumerate(FACTS)]


def holds(passage, case) -> bool:
    """Whether a passage shows the planted fact: on its page (PDF), or holding its sentence."""
    if case["page"] is not None:
        return passage.page == case["page"]
    squash = lambda s: " ".join(s.split())  # noqa: E731
    return squash(case["fact"])[:40] in squash(passage.text)


def normalised(scores: dict[int, float]) -> dict[int, float]:
    total = sum(scores.values()) or 1.0
    return {k: v / total for k, v in scores.items()}


def run_case(reader, case, method, options, compare: bool, timing: bool) -> dict:
    from kvcli.attribution import AttentionAt, retrieval_heads
    from kvcli.generate import Prefill, forward, new_cache
    from kvcli.ingest import read_documents
    from kvcli.reading import Reading, answer
    from kvcli.reading.cite import SOURCE_HEADS, watcher
    from kvcli.reading.policy import choose
    from kvcli.sources import passages
    import torch

    doc = read_documents([str(case["path"])])
    mode = choose(reader, doc.text, options, method, [case["question"]])
    result = {"case": case["name"]}
    if compare:  # one full read by hand, watching the question window's attention at the heads as it goes
        heads = retrieval_heads(reader.profile(), reader.num_layers, SOURCE_HEADS)
        prompt = mode.prompt(case["question"])
        cache, window = new_cache(reader.model), AttentionAt(heads, len(prompt), rows=WINDOW)
        started = time.perf_counter()
        with reader.prefilling(), torch.inference_mode():
            logits = forward(reader.model, cache, prompt.ids.to(reader.device), 0, watch=window)
        reading = Reading(Prefill(cache, logits, len(prompt), time.perf_counter() - started), method, "query", prompt=prompt)
    else:
        reading = mode.read(case["question"], method)
    source_map = mode.source_map(reading, doc)
    read_s = reading.state.seconds
    if timing:  # the same answer without the watch, from a copy of the cache
        plain_state = dataclasses.replace(reading.state, cache=reading.state.cache.clone())
        began = time.perf_counter()
        answer(reader, dataclasses.replace(reading, state=plain_state), options)
        result["plain_decode_s"] = time.perf_counter() - began
    watch = watcher(reader, reading)
    began = time.perf_counter()
    said = answer(reader, reading, options, watch=watch)
    result["watched_decode_s"] = time.perf_counter() - began
    result["read_s"] = read_s
    result["answer"] = said.text
    result["right"] = case["key"].lower() in said.text.lower()
    scores = {"decode": watch.scores()}
    if compare:
        scores["prefill"] = window.scores()
        both = normalised(scores["decode"])
        for k, v in normalised(scores["prefill"]).items():
            both[k] = both.get(k, 0.0) + v
        scores["both"] = both
    for name, by_position in scores.items():
        cited = passages(doc, source_map.char_scores(by_position), 3)
        result[name] = bool(cited) and holds(cited[0], case)
        if name == "decode":
            result["first"] = cited[0].label if cited else "-"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["qwen2.5-coder-0.5b", "smollm2-135m"])
    parser.add_argument("--cases", type=int, default=10, help="needle text documents per setting")
    parser.add_argument("--pdfs", type=int, default=3, help="PDFs per setting")
    parser.add_argument("--facts-doc", type=int, default=0, metavar="TOKENS",
                        help="also ask each of ten facts hidden in one document of this many tokens (0: not)")
    parser.add_argument("--settings", nargs="+", default=["default", "full"], choices=["default", "full", "ratio0.1"])
    parser.add_argument("--rows", help="also write every case's result here, one JSON object a line")
    args = parser.parse_args()
    import json
    from kvcli.defaults import DEFAULT_METHOD
    from kvcli.methods import Budget, make_method
    from kvcli.models import load_model
    from kvcli.reading import Options, Reader

    workdir = Path(tempfile.mkdtemp(prefix="kvcli-sources-"))
    options = Options(max_new_tokens=32)
    print("| model | setting | cases | answer right | first source holds the fact: right answers | all answers | decode / prefill / both (full cache, all) | extra decode time with --sources |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        reader = Reader(load_model(name))
        cases = text_cases(reader.tokenizer, args.cases, workdir) + pdf_cases(args.pdfs, workdir)
        if args.facts_doc:
            cases += facts_cases(reader.tokenizer, args.facts_doc, workdir)
        for setting in args.settings:
            method = make_method("full" if setting == "full" else DEFAULT_METHOD)
            # "ratio0.1": the default method at an explicit --ratio 0.1 (no --min-keep floor), a tenth of the cache kept
            read_options = Options(max_new_tokens=32, budget=Budget(ratio=0.1)) if setting == "ratio0.1" else options
            rows = []
            for case in cases:
                row = run_case(reader, case, method, read_options, compare=setting == "full", timing=setting == "default")
                rows.append(row)
                if args.rows:
                    with open(args.rows, "a", encoding="utf-8") as out:
                        out.write(json.dumps({"model": name, "setting": setting, **row}) + "\n")
                print(f"  {name} {setting} {row['case']}: right={row['right']} first={row['first']} decode={row['decode']}"
                      + (f" prefill={row['prefill']} both={row['both']}" if "prefill" in row else "")
                      + f" answer={row['answer'][:60]!r}", file=sys.stderr, flush=True)
            right = [r for r in rows if r["right"]]
            compared = (f"{sum(r['decode'] for r in rows)} / {sum(r['prefill'] for r in rows)} / {sum(r['both'] for r in rows)} of {len(rows)}"
                        if "prefill" in rows[0] else "-")
            if "plain_decode_s" in rows[0]:
                extra = sum(r["watched_decode_s"] - r["plain_decode_s"] for r in rows)
                whole = sum(r["read_s"] + r["plain_decode_s"] for r in rows)
                cost = f"{extra:+.2f}s of {whole:.1f}s ({100 * extra / whole:+.1f}%)"
            else:
                cost = "-"
            kinds = f"{args.cases} text, {args.pdfs} PDF" + (", 10 on one ten-fact document" if args.facts_doc else "")
            print(f"| {name} | {setting} | {len(rows)} ({kinds}) | {len(right)} | "
                  f"{sum(r['decode'] for r in right)}/{len(right)} | {sum(r['decode'] for r in rows)}/{len(rows)} | {compared} | {cost} |", flush=True)


if __name__ == "__main__":
    main()
