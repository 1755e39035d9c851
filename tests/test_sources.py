"""`--sources`: positions mapped back to documents, pages and lines (pure), the retrieval heads'
attention computed exactly, and the command line on a tiny random model in every reading mode."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from pdfutil import pdf_bytes
from test_cli_tiny import one_line_error, run, tiny  # noqa: F401  (tiny is a fixture)

from kvcli.attention import LayerAttention, window_attention
from kvcli.attribution import AttentionAt, _probabilities
from kvcli.cli.sources import with_default_count
from kvcli.ingest import read_documents
from kvcli.sources import passages


def sentences(n: int, offset: int = 0) -> str:
    """`n` lines of two short 'sentences' of tiny-vocabulary words."""
    return "\n".join(f"w{(offset + i) % 60} w{(offset + 7 * i) % 60} w{(3 * i) % 60}. w{(5 * i + 1) % 60} w{(11 * i) % 60} w{(offset + 2) % 60}." for i in range(n))


def _scores_on(doc, needle: str) -> dict[int, float]:
    """A deterministic score: 1 on every character offset that starts a word of `needle`'s occurrence, 0.01 elsewhere."""
    at = doc.text.index(needle)
    scores = {m.start(): 0.01 for m in re.finditer(r"\S+", doc.text)}
    for m in re.finditer(r"\S+", needle):
        scores[at + m.start()] = 1.0
    return scores


def test_code_folder_lines_point_at_the_right_file_and_lines(tmp_path):
    """In a folder of code, a score on one line of the second file cites that file, that line with two each side, line 1 being the file's first."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("".join(f"a = {i}\n" for i in range(30)))
    body = "".join(f"def f{i}():\n    return {i}\n" for i in range(20))
    (tmp_path / "src" / "b.py").write_text(body)
    doc = read_documents([str(tmp_path / "src")])
    cited = passages(doc, _scores_on(doc, "return 13"), 2)
    first = cited[0]
    assert first.document.endswith("b.py") and first.page is None
    line = body.splitlines().index("    return 13") + 1  # 28
    assert first.lines == (line - 2, line + 2)
    assert first.text.splitlines() == [s.strip() if k == 0 else s for k, s in enumerate(body.splitlines()[line - 3 : line + 2])]
    assert first.label == f"{first.document}:{line - 2}-{line + 2}"
    assert "return" in [first.text[a:b] for a, b in first.highlights]
    assert not (cited[1].start < first.end and first.start < cited[1].end)  # never overlapping


def test_prose_is_cut_at_sentences_and_pdf_pages_are_cited(tmp_path):
    """In a PDF, a score on a sentence of page 2 cites page 2 with that sentence whole, its lines counted within the page."""
    pages = [["First page holds nothing of note. It goes on."],
             ["Second page opens here. The vault code is 4417 and nobody knows it.", "Another line follows. And one more."],
             ["Third page."]]
    path = tmp_path / "doc.pdf"
    path.write_bytes(pdf_bytes(pages))
    doc = read_documents([str(path)])
    first = passages(doc, _scores_on(doc, "vault code is 4417"), 1)[0]
    assert first.page == 2 and first.label.endswith("page 2")
    assert first.text == "The vault code is 4417 and nobody knows it."
    assert first.lines == (1, 1)
    assert first.to_dict() == {"document": str(path), "page": 2, "lines": [1, 1], "text": first.text, "score": round(first.score, 4)}
    assert 0 < first.score <= 1


def test_no_score_on_documents_cites_nothing(tmp_path):
    """Scores that fall outside every document (template, question) give no passages, and a count of 0 none either."""
    (tmp_path / "a.txt").write_text(sentences(5))
    doc = read_documents([str(tmp_path / "a.txt")])
    assert passages(doc, {}, 3) == []
    assert passages(doc, {0: 1.0}, 0) == []


def test_retrieval_head_probabilities_are_the_layers_attention():
    """The few heads' probabilities computed for --sources equal the layer's attention rows, with softcapping, sinks and a window."""
    torch.manual_seed(0)
    query, keys = torch.randn(1, 6, 5, 8), torch.randn(1, 2, 20, 8)
    heads = torch.tensor([1, 4, 5])
    for attn in (LayerAttention(0.3), LayerAttention(0.3, softcap=2.0, sinks=torch.randn(6), sliding_window=6)):
        expected = window_attention(query, keys, 3, attn).reshape(6, 3, 20)[heads]
        got = _probabilities(query[0, heads, -3:] @ keys[0, heads // 3].transpose(1, 2), attn, heads)
        assert torch.allclose(got, expected, atol=1e-6)


def test_attention_is_summed_per_original_position():
    """A watched step adds each chosen head's attention to the entries' original positions, whatever order they are stored in; positions past the prompt drop out."""
    from kvcli.cache import KVCache

    cache = KVCache(1)
    torch.manual_seed(1)
    keys = torch.randn(1, 1, 4, 8)
    cache.layers[0].load(keys, keys.clone(), torch.tensor([[9, 2, 5, 7]]))
    watch = AttentionAt([(0, 0), (0, 1)], size=10)
    query = torch.randn(1, 2, 1, 8)
    watch.observe(0, query, cache, LayerAttention(0.5))
    probs = (query[0, :, 0] @ keys[0, 0].T * 0.5).softmax(-1).sum(0)
    scores = watch.scores()
    assert sorted(scores) == [2, 5, 7, 9]
    assert [scores[p] for p in (9, 2, 5, 7)] == pytest.approx(probs.tolist())
    assert watch.steps == 1
    short = AttentionAt([(0, 0), (0, 1)], size=8)  # position 9 lies past the prompt (an answer token): dropped
    short.observe(0, query, cache, LayerAttention(0.5))
    assert short.scores() == pytest.approx({p: scores[p] for p in (2, 5, 7)})


def test_sources_without_a_number_is_the_default_count():
    """`--sources` that no number follows gets 3; a number after it, or anything after `--`, is left alone."""
    assert with_default_count(["doc.txt", "--sources", "q?"]) == ["doc.txt", "--sources", "3", "q?"]
    assert with_default_count(["doc.txt", "q?", "--sources"]) == ["doc.txt", "q?", "--sources", "3"]
    assert with_default_count(["--sources", "5", "doc.txt"]) == ["--sources", "5", "doc.txt"]
    assert with_default_count(["--", "--sources"]) == ["--", "--sources"]


# --- the command line on a tiny random model ---------------------------------------------


@pytest.fixture
def lines_doc(tmp_path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text(sentences(40))
    return path


def _sources(result) -> list[list[dict]]:
    assert result.exit_code == 0, (result.stderr, result.exception)
    return [json.loads(line)["sources"] for line in result.stdout.splitlines()]


def _same(a: list[dict], b: list[dict]) -> None:
    assert [(s["document"], s["page"], s["lines"], s["text"]) for s in a] == [(s["document"], s["page"], s["lines"], s["text"]) for s in b]
    assert [s["score"] for s in a] == pytest.approx([s["score"] for s in b], abs=2e-3)


def test_json_sources_have_the_documented_keys(tiny, home, lines_doc):  # noqa: F811
    """`ask --json --sources` carries the passages with exactly the keys docs/json.md lists, each text a stretch of the document at its lines."""
    (cited,) = _sources(run("ask", lines_doc, "w1 w8?", "-m", tiny, "--method", "snapkv", "--max-new-tokens", "4", "--json", "--sources"))
    assert 1 <= len(cited) <= 3
    documented = re.search(r'"sources": \[\{(.*?)\}\]', Path("docs/json.md").read_text()).group(1)
    assert sorted(re.findall(r'"(\w+)":', documented)) == sorted(cited[0])
    lines = lines_doc.read_text().splitlines()
    for source in cited:
        first, last = source["lines"]
        assert source["text"] in "\n".join(lines[first - 1 : last])
    assert len(_sources(run("ask", lines_doc, "w1?", "-m", tiny, "--max-new-tokens", "4", "--json", "--sources", "1"))[0]) == 1


def test_sources_are_printed_on_stderr_after_the_answer(tiny, home, lines_doc):  # noqa: F811
    """On a terminal-less run the answer alone is on stdout; the sources, with their document and lines, are on stderr."""
    result = run("ask", lines_doc, "w1 w8?", "-m", tiny, "--method", "snapkv", "--max-new-tokens", "4", "--sources", "2")
    assert result.exit_code == 0, result.stderr
    assert "Sources:" not in result.stdout and "Sources:" in result.stderr
    assert re.search(r"1\. .*notes\.txt:\d+", result.stderr)


def test_sources_count_below_one_is_refused(tiny, home, lines_doc):  # noqa: F811
    """`--sources 0` is a one-line error."""
    one_line_error(run("ask", lines_doc, "w1?", "-m", tiny, "--sources", "0"), "--sources")


@pytest.mark.parametrize("method", ["snapkv", "full"])
def test_read_once_and_saved_caches_cite_as_one_pass(tiny, home, lines_doc, tmp_path, method):  # noqa: F811
    """Sources after a document read once (-q twice) and from a `kvcli read` .kvc equal those of one pass, for a compressing method and full."""
    common = ["-m", tiny, "--method", method, "--ratio", "0.3", "--max-new-tokens", "5", "--json", "--sources"]
    (one_pass,) = _sources(run("ask", lines_doc, "w1 w8?", *common))
    once = _sources(run("ask", lines_doc, "-q", "w1 w8?", "-q", "w2?", *common))
    _same(once[0], one_pass)
    saved = tmp_path / "notes.kvc"
    assert run("read", lines_doc, "-o", saved, "-m", tiny).exit_code == 0
    (from_file,) = _sources(run("ask", "--cache", saved, "w1 w8?", *common))
    _same(from_file, one_pass)


def test_compressed_cache_cites_as_reuse(tiny, home, lines_doc, tmp_path):  # noqa: F811
    """A `kvcli compress` .kvc cites what --reuse of the same documents cites."""
    common = ["-m", tiny, "--method", "snapkv", "--ratio", "0.3", "--scorer", "instruction"]
    saved = tmp_path / "notes.kvc"
    assert run("compress", lines_doc, "-o", saved, *common).exit_code == 0
    (reused,) = _sources(run("ask", lines_doc, "w1 w8?", "--reuse", *common, "--max-new-tokens", "5", "--json", "--sources"))
    (from_file,) = _sources(run("ask", "--cache", saved, "w1 w8?", "-m", tiny, "--max-new-tokens", "5", "--json", "--sources"))
    _same(from_file, reused)


def test_pages_map_back_past_the_context(tiny, home, tmp_path):  # noqa: F811
    """A PDF read past the model's positions (re-indexed) cites real pages, each passage's text on its page."""
    pages = [[sentences(1, 10 * p + k) for k in range(12)] for p in range(6)]
    path = tmp_path / "long.pdf"
    path.write_bytes(pdf_bytes(pages))
    result = run("ask", path, "w1 w8?", "-m", tiny, "--method", "snapkv", "--max-context", "300", "--max-new-tokens", "6", "--json", "--sources", "3")
    (cited,) = _sources(result)
    assert json.loads(result.stdout.splitlines()[0])["stats"]["read"] == "reindexed"
    assert cited
    doc = read_documents([str(path)])
    for source in cited:
        page = next(s for s in doc.sources if s.page == source["page"])
        assert source["text"] in doc.text[page.start : page.end]


def test_old_cache_without_a_map_is_refused_in_one_line(tiny, home, lines_doc, tmp_path, monkeypatch):  # noqa: F811
    """--sources on a .kvc saved without the map back to the documents says to save it again, in one line."""
    import sys

    monkeypatch.setattr(sys.modules["kvcli.cli.read"], "source_map_tensors", lambda *a: ({}, None))
    saved = tmp_path / "old.kvc"
    assert run("read", lines_doc, "-o", saved, "-m", tiny).exit_code == 0
    one_line_error(run("ask", "--cache", saved, "w1?", "-m", tiny, "--max-new-tokens", "2", "--sources"), "read or compress them again")


def test_chat_sources_after_an_answer_equal_ask_sources(tiny, home, lines_doc):  # noqa: F811
    """In chat, /sources after an answer (fed again, watched) cites what `ask --sources` cites, and `chat --sources` cites it after every answer."""
    common = ["-m", tiny, "--method", "snapkv", "--ratio", "0.3", "--max-new-tokens", "5", "--json"]
    (asked,) = _sources(run("ask", lines_doc, "w1 w8?", *common, "--sources"))
    later = run("chat", lines_doc, *common, input="w1 w8?\n/sources\n/sources 1\n")
    assert later.exit_code == 0, later.stderr
    objects = [json.loads(line) for line in later.stdout.splitlines()]
    assert "sources" not in objects[0]
    _same(objects[1]["sources"], asked)
    assert len(objects[2]["sources"]) == 1
    (every,) = [o["sources"] for o in (json.loads(line) for line in run("chat", lines_doc, *common, "--sources", input="w1 w8?\n").stdout.splitlines())]
    _same(every, asked)


def test_chat_sources_before_any_answer_is_a_one_line_error(tiny, home, lines_doc):  # noqa: F811
    """/sources before any question says to ask one first, and the session goes on."""
    result = run("chat", lines_doc, "-m", tiny, "--method", "snapkv", input="/sources\n")
    assert result.exit_code == 0 and "ask a question first" in result.stderr


def test_batch_rows_carry_the_sources_ask_gives(tiny, home, lines_doc, tmp_path):  # noqa: F811
    """`batch --sources 2` writes in each answer row the passages `ask --json --sources 2` gives for the same question, and does not take a row answered without --sources for one."""
    common = ["-m", tiny, "--method", "snapkv", "--ratio", "0.3", "--max-new-tokens", "5"]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"documents": str(lines_doc), "questions": ["w1 w8?", "w2?"]}) + "\n")
    out = tmp_path / "answers.jsonl"
    plain = run("batch", jobs, "-o", out, *common)
    assert plain.exit_code == 0, plain.stderr
    result = run("batch", jobs, "-o", out, *common, "--sources", "2")  # rows without passages are not its answers
    assert result.exit_code == 0 and "1 answered, 0 failed; 2 rows written" in result.stderr, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines() if "sources" in json.loads(line)]
    assert len(rows) == 2
    (asked,) = _sources(run("ask", lines_doc, "w1 w8?", *common, "--json", "--sources", "2"))
    _same(next(row["sources"] for row in rows if row["question"] == "w1 w8?"), asked)


def test_inspect_shows_the_most_kept_passage_of_each_page(tiny, home, tmp_path):  # noqa: F811
    """`inspect --json` lists a most-kept passage per page (at most --passages), each text on its page; --passages 0 lists none."""
    pages = [[sentences(1, 10 * p + k) for k in range(6)] for p in range(4)]
    path = tmp_path / "doc.pdf"
    path.write_bytes(pdf_bytes(pages))
    result = run("inspect", path, "-m", tiny, "--method", "snapkv", "--ratio", "0.2", "--min-keep", "0", "-q", "w1?", "--json", "--passages", "3")
    assert result.exit_code == 0, result.stderr
    kept = json.loads(result.stdout)["profile"]["passages"]
    assert 1 <= len(kept) <= 3 and len({p["page"] for p in kept}) == len(kept)
    doc = read_documents([str(path)])
    for passage in kept:
        page = next(s for s in doc.sources if s.page == passage["page"])
        assert passage["text"] in doc.text[page.start : page.end]
    none = run("inspect", path, "-m", tiny, "--method", "snapkv", "-q", "w1?", "--json", "--passages", "0")
    assert json.loads(none.stdout)["profile"]["passages"] == []


def test_abbreviations_and_initials_do_not_end_a_sentence(tmp_path):
    """A stop after 'Dr.', 'e.g.' or an initial stays inside the cited sentence; a stop after a word ends it."""
    (tmp_path / "a.txt").write_text("It rained. Dr. Okafor grew it from a seed, e.g. one found by J. Smith in Madagascar. Then it bloomed.")
    doc = read_documents([str(tmp_path / "a.txt")])
    first = passages(doc, _scores_on(doc, "Madagascar"), 1)[0]
    assert first.text == "Dr. Okafor grew it from a seed, e.g. one found by J. Smith in Madagascar."
