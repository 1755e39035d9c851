"""Short and mid-size documents at the default ratio: does a floor of kept tokens stop wrong answers?

    python benchmarks/short_docs.py                       # both embedded models, every length (docs/results.md
                                                          # splits it by model and length to run side by side)
    python benchmarks/short_docs.py -m smollm2-135m --lengths 60,1000 --facts 2

Each case is one generated fact (a code word, a date, a name, a number: words the haystack does
not hold) placed at a different depth in a different stretch of CPython's own reference prose
(`pydoc_data.topics`), sized so the whole prompt is about `--lengths` tokens (the shortest is a
note: the fact and a sentence or two). The prompt is captured once and every setting is derived
from it (the machinery `kvcli eval` uses, tested equal to a live read): the default method at
the default ratio with no floor (`--min-keep 0`), with each floor of `--floors`, and the full
cache. A setting agrees when its greedy answer is the full cache's, word for word, and is right
when it contains the fact's answer. Settings that keep the same tokens share one decode.
"""

from __future__ import annotations

import argparse
import time

from pydoc_data.topics import topics

from kvcli import threads
from kvcli.errors import InputError
from kvcli.eval import niah_rows
from kvcli.methods import DEFAULT_METHOD, DEFAULT_RATIO, Budget, make_method
from kvcli.models import load_model
from kvcli.reading import Options, QueryAware, Reader, answer

# (fact, question, what a right answer contains); none of these words occur in the haystack
FACTS = [
    ("The code word is PELICAN.", "What is the code word?", "pelican"),
    ("The shipment from Rotterdam arrived on 17 March 2011.", "On what date did the shipment from Rotterdam arrive?", "17 march"),
    ("The head gardener at Ashcombe Hall is called Winifred Tallis.", "Who is the head gardener at Ashcombe Hall?", "tallis"),
    ("The combination of the harbour office safe is 4-7-2-9.", "What is the combination of the harbour office safe?", "4-7-2-9"),
    ("Our team's mascot is a ginger cat named Marmalade.", "What is the team mascot's name?", "marmalade"),
    ("The ferry to Skye was delayed by exactly 95 minutes.", "By how many minutes was the ferry to Skye delayed?", "95"),
    ("The violin in the glass case was made in Cremona.", "Where was the violin in the glass case made?", "cremona"),
    ("The treasurer's password is saffron-otter-63.", "What is the treasurer's password?", "saffron-otter-63"),
]
FILLER = [  # the shortest notes: the fact among a few plain sentences
    "Please read this note before the meeting.", "The kitchen will be closed on Friday.",
    "Remember to water the plants.", "Bring your own cup.", "The printer on the second floor is fixed.",
]


def haystack(start: int) -> str:
    """CPython's reference prose from topic `start` on (each fact reads a different stretch)."""
    names = sorted(topics)
    return "\n\n".join(topics[name].strip() for name in names[start:] + names[:start])


def note(fact: str, question: str, length: int, reader: Reader, options: Options) -> str:
    """A short note around `fact` whose prompt is about `length` tokens (at least the fact and one sentence)."""
    lines = [fact]
    for sentence in FILLER:
        if len(reader.prompt(" ".join(lines + [sentence]), question, options)) > length:
            break
        lines.insert(len(lines) // 2 + 1, sentence)
    if len(lines) == 1:
        lines.append(FILLER[0])
    return " ".join(lines)


def cases(reader: Reader, length: int, n_facts: int, options: Options):
    """(document, question, answer) for the first `n_facts` facts at `length` tokens."""
    for index, (fact, question, expected) in enumerate(FACTS[:n_facts]):
        depth = (index + 0.5) / n_facts
        try:
            row = niah_rows(haystack(7 * index), fact, question, expected, [length], [depth], reader.tokenizer)[0]
            yield row.context, question, expected
        except InputError:  # too short for a haystack: a note
            yield note(fact, question, length, reader, options), question, expected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--models", default="qwen2.5-coder-0.5b,smollm2-135m")
    parser.add_argument("--lengths", default="60,250,1000,2000,4000,6000", help="prompt lengths in tokens")
    parser.add_argument("--floors", default="256,512,1024", help="--min-keep values to compare with no floor")
    parser.add_argument("--facts", type=int, default=3, help="cases per length (facts, each at its own depth)")
    parser.add_argument("--method", default=DEFAULT_METHOD)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", default="auto", help="as kvcli's --threads (auto: the cores other processes leave free)")
    args = parser.parse_args()
    plan = threads.plan_threads(args.threads)  # the Reader prefills and decodes on it, as kvcli does

    lengths = [int(n) for n in args.lengths.split(",")]
    floors = [int(f) for f in args.floors.split(",")]
    settings = [("no floor", Budget(min_keep=0))] + [(f"min-keep {f}", Budget(min_keep=f)) for f in floors]
    method, full = make_method(args.method), make_method("full")
    options = Options(max_new_tokens=args.max_new_tokens)
    names = [name for name, _ in settings]
    print(f"{args.method} at ratio {DEFAULT_RATIO:g}; per setting: answers equal to the full cache's / right "
          "(mean tokens kept per layer)", flush=True)
    rows = ["| model | prompt tokens | full cache right | " + " | ".join(names) + " |",
            "| --- | ---: | ---: | " + " | ".join("---:" for _ in names) + " |"]
    began = time.perf_counter()
    for model in args.models.split(","):
        reader = Reader(load_model(model), threads=plan)
        for length in lengths:
            tally = {name: [0, 0, 0.0] for name, _ in settings}
            full_right = n = tokens = 0
            for document, question, expected in cases(reader, length, args.facts, options):
                started = time.perf_counter()
                mode = QueryAware(reader, document, options)
                captured = mode.capture(question, method.window_size, method.needs_accumulated)
                prompt_len = len(mode.prompt(question))
                said = {None: answer(reader, mode.derive(captured, question, full, Budget()), options).text}  # plan total (None: all) -> answer
                full_right += expected in said[None].lower()
                tokens += prompt_len
                marks = []
                for name, budget in settings:
                    compression, _ = reader.compression(method, budget, prompt_len)
                    key = None if compression is None else compression.plan.total
                    if key not in said:
                        said[key] = answer(reader, mode.derive(captured, question, method, budget), options).text
                    agree, right = said[key] == said[None], expected in said[key].lower()
                    tally[name][0] += agree
                    tally[name][1] += right
                    tally[name][2] += prompt_len if compression is None else compression.plan.average
                    marks.append(("=" if agree else "x") + ("Y" if right else "."))
                n += 1
                print(f"{model} {length:>5} {expected:>16} full={'Y' if expected in said[None].lower() else '.'} "
                      f"{' '.join(marks)}  ({time.perf_counter() - started:.1f}s)", flush=True)
            cells = [f"{a}/{n} / {r}/{n} ({kept / n:.0f})" for a, r, kept in (tally[name] for name in names)]
            rows.append(f"| {model} | {tokens / n:,.0f} | {full_right}/{n} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
        del reader
    print(f"\n{time.perf_counter() - began:.0f}s in all\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
