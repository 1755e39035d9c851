"""The benchmark scripts' own helpers (the many-questions document, the matvec ceiling, the results
tables), and their kvcli side run on a tiny random model, so an API change breaks a test, not a
benchmark run."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from kvcli import decode_kernel
from test_models import save_tiny_llama

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))


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


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A two-layer random Llama folder with a word-level tokenizer: loads in milliseconds."""
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny_llama"))


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty KVCLI_HOME, so nothing here touches the machine's model cache."""
    monkeypatch.setenv("KVCLI_HOME", str(tmp_path / "kvcli_home"))


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_scripts_import_only_what_the_package_has(path):
    """Every `from kvcli... import name` in a script, those inside functions included, names a module and attribute that exist."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kvcli":
            module = importlib.import_module(node.module)
            missing = [alias.name for alias in node.names if not hasattr(module, alias.name)]
            assert not missing, f"{path.name}:{node.lineno}: {node.module} has no {', '.join(missing)}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "kvcli":
                    importlib.import_module(alias.name)


def test_bench_measures_each_configuration_on_a_tiny_model(tiny_model, home, one_thread):
    """run_config measures kvcli's full cache, a compressed cache at its ratio, and `generate`, on the same prompt."""
    bench = _script("bench")
    settings = bench.Settings(model=tiny_model, new_tokens=4, threads=1, repeats=1)
    rows = {config.label: bench.run_config(config, settings) for config in (
        bench.Config(64, "full"), bench.Config(64, "snapkv", 0.5), bench.Config(64, bench.GENERATE),
    )}
    for row in rows.values():
        assert row.error is None and row.decode_tokens_per_s > 0
    assert rows["full"].kv_bytes_kept == rows["full"].kv_bytes_full == rows["generate"].kv_bytes_kept
    assert rows["snapkv@0.5"].kv_bytes_kept == rows["full"].kv_bytes_full // 2
    assert rows["full"].prefill_s > 0 and rows["generate"].prefill_s is None


def test_profile_decode_profiles_a_compressed_cache(tiny_model, home, one_thread, capsys):
    """profile_decode prefills with the method at its ratio and lists the decode step's operators."""
    _script("bench")  # profile_decode takes its prompt from bench, beside it
    profile_decode = _script("profile_decode")
    assert profile_decode.main(["--model", tiny_model, "--length", "64", "--steps", "2", "--threads", "1", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dynamickv@0.05 on 64 tokens") and "(all operators)" in out


def test_needle_sweep_scores_every_variant_from_one_capture(tiny_model, home, one_thread, monkeypatch, capsys):
    """needle_sweep answers each fact x depth with every variant (knobs and a wider window included) and counts them."""
    _script("reuse_check")  # needle_sweep takes its facts from reuse_check, beside it
    _script("skim_filter")  # and the pydoc haystack from skim_filter
    needle_sweep = _script("needle_sweep")
    variants = "snapkv;h2o;full;dynamickv:max_multiple=5;snapkv:window_size=12"
    monkeypatch.setattr(sys, "argv", ["needle_sweep.py", "-m", tiny_model, "--length", "80", "--depths", "0.5",
                                      "--budgets", "16", "--max-new-tokens", "2", "--variants", variants])
    needle_sweep.main()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:3]] == ["niah-L80-d0.5"] * 3
    assert all(len(line.split()[2]) == 5 for line in lines[:3])  # one mark per variant
    counted = [line.split()[0] for line in lines if line.endswith("/3")]
    assert counted == variants.split(";")
    monkeypatch.setattr(sys, "argv", ["needle_sweep.py", "-m", tiny_model, "--length", "80", "--depths", "0.5", "--facts", "1",
                                      "--budgets", "16", "--max-new-tokens", "2", "--variants", "snapkv:head_split=global", "--distractor"])
    needle_sweep.main()
    summary = capsys.readouterr().out.splitlines()[-1].split()
    assert summary[0] == "snapkv:head_split=global" and summary[-3:-1] == ["the", "distractor"]


def test_kvpress_crosscheck_kvcli_side_keeps_kvpress_counts(tiny_model, home, one_thread):
    """The kvcli side prefills kvpress's token ids under kvpress's per-layer counts, in both question modes."""
    crosscheck = _script("kvpress_crosscheck")
    rng = random.Random(0)
    context = [rng.randrange(3, 64) for _ in range(90)]
    question = [rng.randrange(3, 64) for _ in range(6)]

    def run(config: str, mode: str, counts: list[int]) -> dict:
        n = len(context) + (len(question) if mode == "prompt" else 0)
        kept = [[sorted(rng.sample(range(n), count)) for _ in range(2)] for count in counts]
        return {"config": config, "ratio": 0.5, "mode": mode, "kept": kept, "answer": "", "how": "pipeline",
                "tokens": [] if mode == "prompt" else None}

    runs = [run("full", "prompt", [96, 96]), run("full", "context", [90, 90]), run("snapkv", "prompt", [70, 70]),
            run("pyramidkv-w8", "context", [60, 30]), run("streamingllm", "context", [45, 45])]
    spec = {"model": tiny_model, "threads": 1, "max_new_tokens": 3, "configs": crosscheck.CONFIGS}
    rows = crosscheck.kvcli_side(spec, {"context_ids": context, "question_ids": question, "runs": runs})
    assert [(row["config"], row["mode"]) for row in rows] == [(r["config"], r["mode"]) for r in runs]
    for row in rows:
        if row["config"] != "pyramidkv-w8":  # its own allocation differs, then kvpress's counts are imposed
            assert row["counts_kvcli"] == row["counts_kvpress"]
        if row["mode"] == "context":  # the question fed after the context is not among the kept positions
            assert max(p for layer in row["kept_kvcli"] for head in layer for p in head) < len(context)
    assert rows[0]["jaccard_mean"] == rows[1]["jaccard_mean"] == 1.0
    assert "same_counts" in rows[3]


def test_sources_check_scores_a_case_with_every_score(tiny_model, home, one_thread, tmp_path):
    """sources_check reads a case as ask does, answers it watched, and judges the decode, prefill and combined scores (full) and the watch's cost (compressed)."""
    from kvcli.methods import make_method
    from kvcli.models import load_model
    from kvcli.reading import Options, Reader

    _script("reuse_check")  # sources_check takes its facts from reuse_check, beside it
    sources_check = _script("sources_check")
    path = tmp_path / "doc.txt"
    path.write_text(". ".join(f"w{i % 60} w{(7 * i) % 60}" for i in range(60)) + ".")
    case = {"name": "tiny", "path": path, "fact": "w1 w7", "question": "w1?", "key": "w7", "page": None}
    reader = Reader(load_model(tiny_model))
    full = sources_check.run_case(reader, case, make_method("full"), Options(max_new_tokens=3), compare=True, timing=False)
    assert {"decode", "prefill", "both", "right", "first"} <= set(full) and full["first"].startswith(str(path))
    compressed = sources_check.run_case(reader, case, make_method("snapkv"), Options(max_new_tokens=3), compare=False, timing=True)
    assert "prefill" not in compressed and compressed["plain_decode_s"] > 0 and compressed["watched_decode_s"] > 0


def test_peer_llamacpp_feeds_the_prompt_kvcli_ask_reads(tiny_model, home, tmp_path):
    """peer_llamacpp builds, from kvcli's own code, token ids as many as `kvcli ask --json` reports reading, and cuts the document to about the asked length."""
    import argparse

    peer = _script("peer_llamacpp")
    described, eos_ids = peer.load_text_side(tiny_model)
    assert eos_ids and all(isinstance(token, int) for token in eos_ids)
    document = tmp_path / "doc.txt"
    text = "\n".join(" ".join(f"w{(7 * i + j) % 60}" for j in range(8)) for i in range(60))

    def measure(head: str) -> int:
        document.write_text(head)
        return len(peer.prompt_ids(described, document, "w1 w7?", 2))

    document.write_text(peer.cut_document(described.tokenizer, text, measure, 90))  # the tiny model reads 128 positions
    ids = peer.prompt_ids(described, document, "w1 w7?", 2)
    assert abs(len(ids) - 90) <= 8
    args = argparse.Namespace(kvcli_python=sys.executable, question="w1 w7?", model=tiny_model, threads=1, max_new_tokens=2,
                              kvcli_args="--method full")
    row = peer.with_rates(peer.run_kvcli(args, document))
    assert row["prompt_tokens"] == len(ids)
    assert row["peak_rss_bytes"] > 0 and row["prefill_tokens_per_s"] > 0


def test_peer_llamacpp_ratios_are_kvcli_medians_over_llama_medians():
    """The summary takes each engine's median per metric and divides kvcli's by llama.cpp's; the table ends with that ratio row."""
    peer = _script("peer_llamacpp")

    def row(engine: str, prefill_s: float, decode_s: float, peak: int) -> dict:
        return peer.with_rates({"engine": engine, "prompt_tokens": 100, "prefill_s": prefill_s, "ttft_s": prefill_s,
                                "decode_tokens": 11, "decode_s": decode_s, "peak_rss_bytes": peak, "load_s": 1.0})

    rows = [row("kvcli", 1.0, 2.0, 3000), row("llama.cpp", 2.0, 1.0, 1000), row("kvcli", 2.0, 4.0, 3000),
            row("llama.cpp", 2.0, 1.0, 1000), row("kvcli", 1.0, 2.0, 9000), row("llama.cpp", 4.0, 0.5, 1000)]
    summary = peer.summarize(rows)
    assert summary["ratios"]["prefill_tokens_per_s"] == 2.0  # 100 against 50 tokens/s
    assert summary["ratios"]["decode_tokens_per_s"] == 0.5  # 5 against 10 tokens/s
    assert summary["ratios"]["peak_rss_bytes"] == 3.0 and summary["ratios"]["prompt_tokens"] == 1.0
    assert peer.table(rows, summary).splitlines()[-1].startswith("| kvcli / llama.cpp | | 1.00 | 2.00x | 0.50x |")


def test_head_split_asks_every_setting_from_one_repeat(tiny_model, home, one_thread):
    """head_split derives every (method, split, ratio) cache from one repeat and asks each question after it, the full prefix first."""
    from kvcli.models import load_model
    from kvcli.reading import Reader

    _script("reuse_check")  # head_split takes its facts from reuse_check, beside it
    head_split = _script("head_split")
    reader = Reader(load_model(tiny_model))
    document = ". ".join(f"w{i % 60} w{(7 * i) % 60}" for i in range(80)) + "."
    facts = [("", "w1?", "w7"), ("", "w2?", "w14")]
    settings = head_split.parse_settings("snapkv:equal,snapkv:global")
    result = head_split.run(reader, document, facts, settings, [0.3], max_new_tokens=2)
    assert [row["setting"] for row in result["rows"]] == ["full (reused prefix)", "snapkv:equal", "snapkv:global"]
    full, equal, split = result["rows"]
    assert full["kv_bytes_kept"] == result["kv_bytes_full"] > equal["kv_bytes_kept"]
    assert equal["packed_layers"] == 0 and len(equal["answers"]) == 2
    assert split["kv_bytes_kept"] == equal["kv_bytes_kept"]  # the same budget's bytes, however the heads split it
    assert "| `snapkv:global` |" in head_split.table(result, [0.3])
    # the reference: which facts a query-aware read at the same ratio finds, and the count of those each setting found
    asked = head_split.query_aware_found(reader, document, facts, "snapkv", [0.3], max_new_tokens=2)
    assert list(asked) == [0.3] and len(asked[0.3]) == 2 and all(isinstance(found, bool) for found in asked[0.3])
    asked[0.3] = [True, False]
    result["query_aware"] = {"method": "snapkv", "found": {"0.3": asked[0.3]}}
    equal["found_facts"] = [True, True]
    table = head_split.table(result, [0.3])
    assert "| query-aware reads (`kvcli ask --ratio R --method snapkv`) | 1 |" in table
    assert f"| `snapkv:equal` | {equal['found']} [1 of 1] (" in table
    # a setting weighed by surprisal: the repeat measures it at once (as `kvcli compress` does), the same bytes kept
    weighed = head_split.run(reader, document, facts, head_split.parse_settings("snapkv:equal:surprisal=0.5"), [0.3], max_new_tokens=2)
    assert weighed["rows"][1]["kv_bytes_kept"] == equal["kv_bytes_kept"]


def test_heap_policy_document_is_the_haystacks_start_in_whole_lines(tmp_path):
    """heap_policy's documents: the haystack's first lines, about the asked tokens' characters."""
    heap_policy = _script("heap_policy")
    text = heap_policy.document(500, tmp_path).read_text(encoding="utf-8")
    haystack = heap_policy.HAYSTACK.read_text(encoding="utf-8")
    assert haystack.startswith(text) and text.endswith("\n")
    assert 0.8 * 500 * heap_policy.CHARS_PER_TOKEN < len(text) <= 500 * heap_policy.CHARS_PER_TOKEN


def test_cpu_products_fbgemm_form_multiplies_the_int8_weight():
    """cpu_products' int8xint8 column: fbgemm's packed weight times a row is the int8 weight's
    product within its input's 8-bit rounding, and unpacks to the same int8 values."""
    cpu_products = _script("cpu_products")
    torch.manual_seed(0)
    weight = torch.randn(64, 32)
    scale = weight.abs().amax(dim=1) / 127
    qweight = (weight / scale[:, None]).round().to(torch.int8)
    packed = cpu_products.fbgemm_pack(qweight, scale)
    row = torch.randn(1, 32)
    exact = row @ (qweight.float() * scale[:, None]).T
    out = torch.ops.quantized.linear_dynamic(row, packed, False)
    assert ((out - exact).norm() / exact.norm()).item() < 0.03
    assert torch.equal(torch.ops.quantized.linear_unpack(packed)[0].int_repr(), qweight)
    # the _int_mm column: each row quantized on its own, the weight as kvcli stores it
    rows = torch.randn(3, 32)
    out = cpu_products.int_mm(rows.bfloat16(), qweight, scale.bfloat16()).float()
    exact = rows.bfloat16().float() @ (qweight.float() * scale.bfloat16().float()[:, None]).T
    assert out.shape == (3, 64) and ((out - exact).norm() / exact.norm()).item() < 0.03


def test_head_split_settings_take_a_floor_and_other_knobs():
    """head_split's METHOD:SPLIT[:FLOOR][:KEY=VALUE] settings; a knob the method lacks fails as --param does."""
    _script("reuse_check")
    head_split = _script("head_split")
    assert head_split.parse_settings("snapkv:global:0.5:kernel_size=31,evidencekv") == [
        ("snapkv", "global", 0.5, {"kernel_size": "31"}), ("evidencekv", "equal", 0.0, {})]
    assert head_split.parse_settings("dynamickv:adaptive:pooling=max")[0] == ("dynamickv", "adaptive", 0.0, {"pooling": "max"})
    assert head_split.label_of("snapkv", "global", 0.5, {"kernel_size": "31"}) == "snapkv:global, floor 0.5, kernel_size=31"
    assert head_split.holds("The treasurer keeps a TIN box.", "tin") and head_split.holds("walrus: indigo-walrus-17", "indigo-walrus-17")
    assert not head_split.holds("The spare minutes of every meeting", "tin")


def test_needle_sweep_puts_the_distractor_after_a_sentence_end():
    """needle_sweep's distractor goes in whole, right after the first sentence end past the asked place; at the end when none follows."""
    _script("reuse_check")
    _script("skim_filter")
    needle_sweep = _script("needle_sweep")
    text = needle_sweep.with_distractor("One. Two three. Four.", "Decoy here.", 5)
    assert text == "One. Two three. Decoy here. Four."
    assert needle_sweep.with_distractor("No end", "Decoy.", 0) == "No end Decoy.\n"
    assert set(needle_sweep.DISTRACTORS) == {expected for _, _, expected in needle_sweep.FACTS}


def test_answer_tally_counts_right_and_same_as_each_documents_first_setting():
    """skim_filter.AnswerTally (dtype_answers, skim_answers): right = the expected word in the answer,
    same = the answer word for word the document's first setting's, per document."""
    _script("reuse_check")
    tally = _script("skim_filter").AnswerTally(["a", "b"])
    tally.case()
    tally.add("a", "The Owl.", "owl", 1.0)
    tally.add("b", "a frog", "owl", 2.0)
    tally.case()
    tally.add("a", "no idea", "owl", 3.0)
    tally.add("b", "no idea", "owl", 4.0)
    assert (tally.cases, tally.right, tally.same) == (2, {"a": 1, "b": 0}, {"a": 2, "b": 1})
    assert tally.seconds == {"a": [1.0, 3.0], "b": [2.0, 4.0]}


def test_dtype_answers_int8_torch_multiplies_on_torch_s_kernel(monkeypatch):
    """`--dtypes int8:torch` loads `--dtype int8` and, while it reads and answers, kvcli's int8
    kernel declines every product (torch's computes them); other dtypes leave it in place."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    dtype_answers = _script("dtype_answers")
    from kvcli.models import int8_kernel

    qweight = torch.randint(-127, 128, (16, 32), dtype=torch.int8)
    row, scale = torch.randn(1, 32).bfloat16(), torch.ones(16).bfloat16()
    with dtype_answers.on_kernel("int8:torch"):
        assert int8_kernel.rows_product(row, qweight, scale) is None
    with dtype_answers.on_kernel("int8"):
        assert (int8_kernel.rows_product(row, qweight, scale) is None) == (int8_kernel.name() == int8_kernel.TORCH)
    assert "int8:torch".removesuffix(dtype_answers.TORCH_KERNEL) == "int8" and dtype_answers.kernel_name("int8:torch") == "torch"


def test_packed_step_times_every_layout_at_the_same_mean(capsys):
    """packed_step's layouts keep the same mean entries per KV head (the same bytes), the packed ones
    spread as the splits spread them, and each is timed as a decode step appends and attends."""
    packed_step = _script("packed_step")
    for kind in ("dense", "adaptive", "global"):
        for kv_heads in (2, 8):
            lengths = packed_step.head_lengths(kind, kv_heads, 230)
            assert len(lengths) == kv_heads and sum(lengths) == 230 * kv_heads
            assert (len(set(lengths)) == 1) == (kind == "dense")
    assert packed_step.main(["--rounds", "2", "--steps", "3", "--kept", "20", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "dense     heads 20-20" in out and "adaptive  heads 8-32" in out and "global    heads 5-35" in out
    assert "packed layers attended by sdpa per KV head" in out  # float32: not the kernel's
    assert packed_step.packed_attention(torch.bfloat16, 64) == (
        "kvcli's kernel, one call per layer" if decode_kernel.name() == decode_kernel.KVCLI else f"sdpa per KV head ({decode_kernel.why_not()})")


def test_heldout_table_counts_each_setting_among_the_references_facts(tmp_path, capsys):
    """heldout_table counts a setting's facts only among those the query-aware read found, marks a cell meeting
    the goal (8 in 10 at 0.1, 9 in 10 at 0.2) and totals found, of, and cells met."""
    heldout_table = _script("heldout_table")
    reference = {"0.1": [True] * 9 + [False], "0.2": [True] * 10}
    rows = [{"setting": "full", "ratio": None, "found_facts": [True] * 10}]
    for setting, at_01, at_02 in (("a", [True] * 7 + [False, False, True], [True] * 9 + [False]),
                                  ("b", [False] * 2 + [True] * 8, [False] * 2 + [True] * 8)):
        rows += [{"setting": setting, "ratio": 0.1, "found_facts": at_01}, {"setting": setting, "ratio": 0.2, "found_facts": at_02}]
    path = tmp_path / "doc-1.json"
    path.write_text(json.dumps({"prompt_tokens": 4220, "rows": rows, "query_aware": {"found": reference}}))
    assert heldout_table.main([str(path)]) == 0
    out = capsys.readouterr().out
    # a: at 0.1 the tenth fact (not in the reference) does not count: 7 of 9, below 8 in 10; at 0.2 9 of 10 meets it
    assert "| doc-1 (4,220) | 9 / 10 | 7 of 9 / 9 of 10* | 7 of 9 / 8 of 10 |" in out
    assert "| all 1 | | 7 of 9 (0 met) / 9 of 10 (1 met) | 7 of 9 (0 met) / 8 of 10 (0 met) |" in out
