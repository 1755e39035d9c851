"""Which filter heads, depth and span keep a needle among the tokens a skim reads through every layer.

    python benchmarks/skim_filter.py -m qwen2.5-coder-0.5b --lengths 4000,8000 --haystack DIR_OR_FILE

For each needle document (held-out prose: `--haystack`, default Python's pydoc topics read from the
end, which the retrieval-head profile never sampled), the prompt is read once through the deepest
filter layer any configuration uses, recording every head's pooled window score of every token (what a skim's
filter sums). Each configuration (depth, heads, span, tokens) then chooses its tokens from those
records, as `kvcli.skim.choose_tokens` does, and counts a hit when every token of the needle's
answer is chosen. Only the filter layers run, so the sweep costs a fraction of a prefill per document.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

import torch

from kvcli.attention import window_attention
from kvcli.eval import niah_rows
from kvcli.generate import forward, new_cache
from kvcli.methods.base import pool_scores
from kvcli.models import load_model
from kvcli.reading.reader import Reader
from kvcli.reading.skim import Skimming, _head, filter_heads, run_starts
from kvcli.prompt import build_prompt
from kvcli.skim import choose_tokens
from kvcli.step import FilterDone
from reuse_check import FACTS

ALL = [
    *[(fact, question, answer) for fact, question, answer in FACTS if re.search(rf"\b{re.escape(answer)}\b", fact)],
    ("The lighthouse keeper's logbook records that the storm of 1887 lasted exactly nineteen days.", "How many days did the storm of 1887 last, according to the logbook?", "nineteen"),
    ("The recipe calls for three spoons of cardamom, which the chef buys only from a shop in Valletta.", "Where does the chef buy cardamom?", "Valletta"),
]


class Recorder:
    """A skim filter that records every head's normalised pooled window scores up to `stop_layer`."""

    def __init__(self, stop_layer: int, window: int = 8, kernel: int = 7) -> None:
        self.stop_layer, self.window, self.kernel = stop_layer, window, kernel
        self.rows: dict[int, torch.Tensor] = {}  # layer -> (num_heads, k)

    def observe(self, cache, layer_idx, query, attn, probe_len) -> None:
        layer = cache.layers[layer_idx]
        if attn.sliding_window is not None:
            return
        keys, _ = layer.view()
        probs = window_attention(query, keys, self.window, attn).sum(dim=2)  # (num_kv_heads, group, k)
        pooled = pool_scores(probs, self.kernel, "avg").flatten(0, 1)  # (num_heads, k)
        self.rows[layer_idx] = pooled / pooled.sum(dim=1, keepdim=True).clamp_min(1e-12)


def haystack_text(path: str | None) -> str:
    if path:
        p = Path(path)
        if p.is_dir():
            return "\n\n".join(f.read_text(errors="replace") for f in sorted(p.rglob("*.txt")))
        if p.suffix == ".jsonl":  # L-Eval / LongBench rows: their documents, each once
            seen, out = set(), []
            for line in p.read_text().splitlines():
                ctx = json.loads(line)["context"].replace("NEWLINE_CHAR", "\n")
                if ctx not in seen:
                    seen.add(ctx)
                    out.append(ctx)
            return "\n\n".join(out)
        return p.read_text()
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics, reverse=True))


def needle_documents(text: str, lengths: list[int], depths: list[float], tokenizer, seed: int, facts: int = len(ALL)):
    """One needle document per (length, depth), lengths outermost: a fact drawn from the first
    `facts` of ALL, hidden at `depth` in `length` tokens of `text` from a drawn offset (the same
    draws for the same seed). Yields (length, depth, niah row, fact, question, expected answer)."""
    rng = random.Random(seed)
    for length in lengths:
        for depth in depths:
            fact, question, expected = ALL[rng.randrange(facts)]
            offset = rng.randrange(0, max(1, len(text) - 6 * length))
            (row,) = niah_rows(text[offset:], fact, question, expected, [length], [depth], tokenizer)
            yield length, depth, row, fact, question, expected


class AnswerTally:
    """Per setting (a dtype, a skim variant), over the needle documents: answers holding the
    expected word, answers word for word those of the document's first setting (the reference),
    and the prefills' seconds. `case()` starts a document; `add` counts one setting's answer."""

    def __init__(self, names: list[str]) -> None:
        self.right = {name: 0 for name in names}
        self.same = {name: 0 for name in names}
        self.seconds: dict[str, list[float]] = {name: [] for name in names}
        self.cases = 0
        self._reference: str | None = None

    def case(self) -> None:
        self.cases += 1
        self._reference = None

    def add(self, name: str, said: str, expected: str, seconds: float) -> None:
        self._reference = said if self._reference is None else self._reference
        self.right[name] += expected.lower() in said.lower()
        self.same[name] += said == self._reference
        self.seconds[name].append(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--haystack", default=None, help="a text file, a folder of .txt files or a .jsonl of rows")
    parser.add_argument("--lengths", default="4000,8000")
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--facts", type=int, default=len(ALL))
    parser.add_argument("--tokens", default="512,1024,2048")
    parser.add_argument("--spans", default="1,8,16,32", help="run lengths centred on each chosen token; 0: sentences and lines (as ask --skim)")
    parser.add_argument("--filter-depths", default="auto,0.15,0.25,0.4,0.5")
    parser.add_argument("--heads", default="4,8,16")
    parser.add_argument("--json", default=None, help="write every hit here")
    args = parser.parse_args()
    lm = load_model(args.model)
    reader = Reader(lm)
    profile = reader.profile()
    compressed = reader.attention.compressed_layers
    text = haystack_text(args.haystack)
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    configs = [(d, h, s, t) for d in args.filter_depths.split(",") for h in map(int, args.heads.split(","))
               for s in map(int, args.spans.split(",")) for t in map(int, args.tokens.split(","))]
    hits = {c: 0 for c in configs}
    cases = 0
    deepest = max(layer for d, h, _, _ in configs
                  for layer, _ in filter_heads(profile, compressed, Skimming(depth=None if d == "auto" else float(d), heads=h)))
    for length, depth, row, fact, question, answer in needle_documents(text, lengths, depths, lm.tokenizer, seed=0, facts=args.facts):
        prompt = build_prompt(lm.tokenizer, row.context, question, max_context=1 << 30)
        at = row.context.index(fact)
        start = at + re.search(rf"\b{re.escape(answer)}\b", fact).start()
        offsets = [prompt.doc_offset(p) for p in range(len(prompt))]
        needle = [p for p in range(len(prompt) - 1) if offsets[p] is not None and offsets[p + 1] is not None
                  and offsets[p] < start + len(answer) and offsets[p + 1] > start]
        if not needle:
            raise SystemExit(f"internal: the answer {answer!r} has no tokens in the prompt")
        rec = Recorder(deepest)
        cache = new_cache(lm.model)
        with torch.inference_mode():
            try:
                forward(lm.model, cache, prompt.ids, 0, skim=rec)
            except FilterDone:
                pass
        n, tail, head = len(prompt), len(prompt) - prompt.prefix_len, _head(prompt)
        starts = run_starts(prompt)
        cases += 1
        for config in configs:
            d, h, s, t = config
            heads = filter_heads(profile, compressed, Skimming(depth=None if d == "auto" else float(d), heads=h))
            scores = sum(rec.rows[layer][head_] for layer, head_ in heads)
            chosen = set(choose_tokens(scores, head, tail, t, s, starts if s == 0 else None).tolist())
            hits[config] += all(p in chosen for p in needle)
        print(f"{length} tokens, depth {depth}: needle tokens {needle[:3]}..", file=sys.stderr, flush=True)
    print(f"model {lm.name}; {cases} needle documents ({args.lengths} tokens x depths {args.depths}); "
          f"haystack {args.haystack or 'pydoc topics'}")
    print("| filter depth | layers read | heads | span | tokens | needle chosen |")
    print("| --- | --- | --- | --- | --- | --- |")
    for config in configs:
        d, h, s, t = config
        heads = filter_heads(profile, compressed, Skimming(depth=None if d == "auto" else float(d), heads=h))
        layers = max(layer for layer, _ in heads) + 1
        print(f"| {d} | {layers}/{lm.model.config.num_hidden_layers} | {h} | {s} | {t} | {hits[config]}/{cases} |")
    if args.json:
        Path(args.json).write_text(json.dumps({str(k): v for k, v in hits.items()}))


if __name__ == "__main__":
    main()
