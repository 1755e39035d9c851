"""`kvcli plan`: a plan made from a model's config and tokenizer alone counts the tokens, the
chunks and the KV bytes that a real read of the loaded model does, never loads weights, and
refuses bad input in one line."""

from __future__ import annotations

import base64
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_cli_tiny import one_line_error
from test_models import save_tiny_llama
from typer.testing import CliRunner

from kvcli.cli import app
from kvcli.ingest import read_documents
from kvcli.methods import Budget, make_method
from kvcli.models import load_model
from kvcli.models.describe import BYTES_PER_TOKEN, TokenEstimate, describe_model
from kvcli.reading import Options, QueryAware, Reader, answer
from kvcli.reading.layout import Layout
from kvcli.reading.plan import KVBytes, make_plan

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


def words(n: int, offset: int = 0) -> str:
    return " ".join(f"w{(offset + 7 * i) % 60}" for i in range(n))


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def short(tmp_path_factory) -> Path:
    """A two-layer random Llama with 128 positions, so a few hundred words are past its window."""
    return save_tiny_llama(tmp_path_factory.mktemp("short") / "tiny", max_positions=128)


@pytest.fixture(scope="module")
def short_reader(short) -> Reader:
    return Reader(load_model(str(short)))


@pytest.fixture
def docs(tmp_path) -> list[str]:
    """Two text files, read together as two sources."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(words(230))
    b.write_text(words(170, offset=3))
    return [str(a), str(b)]


def plan_of(folder: Path, paths: list[str], question: str, options: Options, method_name: str):
    described = describe_model(str(folder))
    doc = read_documents(paths)
    return make_plan(Layout(described.config, described.tokenizer), doc, question, options, make_method(method_name), torch.float32), doc


# --- the same numbers as a real read ---------------------------------------------------------------


def test_token_counts_are_the_tokenizers_and_the_readers(short, short_reader, docs):
    """Per-file tokens sum to the document's, which are what the tokenizer makes of it; the prompt has exactly the tokens the Reader's prompt has."""
    options = Options(budget=Budget(tokens=24), max_new_tokens=4)
    plan, doc = plan_of(short, docs, "w1 w2?", options, "snapkv")
    tokenizer = short_reader.tokenizer
    assert plan.document_tokens == len(tokenizer(doc.text, add_special_tokens=False)["input_ids"])
    assert [s.label for s in plan.sources] == [doc.label(s) for s in doc.sources]
    assert sum(s.tokens for s in plan.sources) == plan.document_tokens
    # a word-level tokenizer merges nothing across files: each file's count is its own text's
    alone = [len(tokenizer(doc.text[s.start : s.end], add_special_tokens=False)["input_ids"]) for s in doc.sources]
    assert [s.tokens for s in plan.sources] == alone and alone[0] > 230 and alone[1] > 170
    assert plan.prompt_tokens == len(QueryAware(short_reader, doc.text, options).prompt("w1 w2?"))


@pytest.mark.parametrize(("method", "budget", "chunk_size", "question"), [
    ("snapkv", 24, None, "w1 w2?"), ("pyramidkv", 30, None, "w1 w2?"), ("dynamickv", 16, None, "w1 w2?"), ("snapkv", 24, 40, "w1 w2?"),
    ("snapkv", 24, None, "w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14?")])
def test_chunks_past_the_window_are_what_the_reader_reads(short, short_reader, docs, method, budget, chunk_size, question):
    """Past a 128-position window, the plan's mode, chunk count, chunk size, budget and kept bytes equal what QueryAware.read does on the loaded model, and the KV the engine held at its largest (prefill and answer) is no more than the plan's peak."""
    options = Options(budget=Budget(tokens=budget), max_new_tokens=4, chunk_size=chunk_size)
    plan, doc = plan_of(short, docs, question, options, method)
    reading = QueryAware(short_reader, doc.text, options).read(question, make_method(method))
    assert (reading.state.compression.kept_whole > 0) == (question != "w1 w2?")  # the long question is kept whole
    assert reading.mode == plan.mode == "reindexed"
    assert plan.chunks == len(reading.state.chunks) == reading.past["chunks"] and plan.chunks > 3
    assert plan.chunk_size == reading.past["chunk_size"]
    assert plan.budget == reading.state.compression.plan
    assert plan.kv_kept == reading.state.cache.nbytes()
    answer(short_reader, reading, options)
    assert reading.state.cache.kv_peak_nbytes <= plan.kv_peak  # the plan's peak bounds what the engine held


def test_dynamickv_past_a_small_window_holds_less_in_one_layer_instead_of_being_refused(short, short_reader, docs):
    """At 24 tokens per layer dynamickv may let one layer keep 10x the mean, more than the 128 positions: past the
    window it reads with max_multiple lowered (said in the note and the method's params), as the plan says."""
    options = Options(budget=Budget(tokens=24), max_new_tokens=4)
    plan, doc = plan_of(short, docs, "w1 w2?", options, "dynamickv")
    reading = QueryAware(short_reader, doc.text, options).read("w1 w2?", make_method("dynamickv"))
    assert reading.mode == plan.mode == "reindexed" and plan.chunks == len(reading.state.chunks) > 3
    assert "max_multiple lowered from 10 to" in reading.note and reading.note == plan.budget_note
    multiple = reading.method.params()["max_multiple"]
    assert 1 <= multiple < 10 and reading.state.compression.method.max_multiple == multiple
    assert plan.most_kept == reading.method.most_kept(reading.state.compression.plan) <= 128 - plan.chunk_size
    answer(short_reader, reading, options)
    assert max(reading.state.cache.retained_per_layer()) <= 128 and reading.state.cache.kv_peak_nbytes <= plan.kv_peak


@pytest.mark.parametrize("chunk_size", [None, 64, 100])
def test_reading_within_the_window_matches_the_reader(tmp_path, short_reader, chunk_size):
    """Within the window, one pass or --chunk-size chunks: the plan's chunk count and its full and kept KV bytes equal the real cache's, and its peak bounds the KV the engine held."""
    folder = save_tiny_llama(tmp_path / "wide", max_positions=1024)
    reader = Reader(load_model(str(folder)))
    doc = tmp_path / "doc.txt"
    doc.write_text(words(300))
    options = Options(budget=Budget(tokens=24), max_new_tokens=4, chunk_size=chunk_size)
    long_question = " ".join(f"w{i}" for i in range(10, 40)) + "?"  # kept whole beside the budget (methods.base.Compression)
    for method, question in (("full", "w1?"), ("snapkv", "w1?"), ("snapkv", long_question)):
        plan, document = plan_of(folder, [str(doc)], question, options, method)
        reading = QueryAware(reader, document.text, options).read(question, make_method(method))
        assert plan.mode == reading.mode and plan.chunks == len(reading.state.chunks)
        assert (reading.state.compressed and reading.state.compression.kept_whole > 0) == (question == long_question)
        assert plan.kv_kept == reading.state.cache.nbytes()
        assert plan.budget_note == reading.note
        if plan.budget is not None:  # what `kvcli plan` prints per layer is what each layer keeps, the question's tokens included
            kept = reading.state.cache.retained_per_layer()
            assert plan.tokens_per_layer == pytest.approx(sum(kept) / len(kept)) and plan.most_kept >= max(kept)
            assert plan.to_dict()["budget"]["tokens_per_layer"] == plan.tokens_per_layer
        answer(reader, reading, options)
        assert reading.state.cache.kv_peak_nbytes <= plan.kv_peak
        if method == "full":
            assert plan.kv_full == plan.kv_kept


def test_evidencekv_chunks_long_prompts_as_the_reader_does(tmp_path):
    """A prompt past CHUNK_FROM_TOKENS within the window: with the model's profile, the plan reads
    evidencekv in the chunks QueryAware.read picks; without one it plans one pass, says the real read
    may chunk, and its peak still bounds what the engine held."""
    from kvcli.methods.evidencekv import CHUNK_FROM_TOKENS
    from kvcli.profile import RetrievalProfile

    folder = save_tiny_llama(tmp_path / "deep", max_positions=CHUNK_FROM_TOKENS + 1024, layers=6)
    reader = Reader(load_model(str(folder)))
    # the best heads in layer 3 of 6 (its deepest choice): evidencekv holds 4 layers whole until then, so it chunks
    reader._profile = RetrievalProfile(scores=[[float(layer == 3)] * 4 for layer in range(6)], model="deep")
    doc = tmp_path / "doc.txt"
    doc.write_text(words(CHUNK_FROM_TOKENS + 200))
    options = Options(budget=Budget(ratio=0.1), max_new_tokens=2)
    described = describe_model(str(folder))
    document = read_documents([str(doc)])
    layout = Layout(described.config, described.tokenizer)
    method = make_method("evidencekv")
    reading = QueryAware(reader, document.text, options).read("w1?", method)
    planned = make_plan(layout, document, "w1?", options, method, torch.float32, profile=reader.profile())
    assert reading.mode == planned.mode == "chunked" and planned.chunks == len(reading.state.chunks) > 2
    assert planned.chunk_size == reading.state.chunks[0][1] - reading.state.chunks[0][0]
    unprofiled = make_plan(layout, document, "w1?", options, method, torch.float32)
    assert unprofiled.chunks == 1 and "may read this prompt in chunks" in unprofiled.budget_note
    answer(reader, reading, options)
    assert reading.state.cache.kv_peak_nbytes <= planned.kv_peak <= unprofiled.kv_peak


def test_a_read_the_reader_refuses_is_refused_with_its_message(short, short_reader, docs):
    """--method full past the window: the plan carries the Reader's own error message, and the CLI prints the plan, then that one line, exit 2."""
    options = Options(budget=Budget(tokens=24), max_new_tokens=4)
    plan, doc = plan_of(short, docs, "w1 w2?", options, "full")
    with pytest.raises(Exception) as raised:
        QueryAware(short_reader, doc.text, options).check("w1 w2?", make_method("full"))
    assert plan.refused == str(raised.value) and plan.chunks == 0 and plan.kv_kept is None
    result = run("plan", *docs, "-q", "w1 w2?", "-m", short, "--method", "full", "--max-new-tokens", "4")
    assert "refused" in result.stdout and "tokens" in result.stdout
    one_line_error(result, "--method full", "--cut-middle")


def test_cut_middle_plans_the_cut(short, docs):
    """--cut-middle: one pass that fits the positions, the dropped tokens counted."""
    options = Options(budget=Budget(tokens=24), max_new_tokens=4, fit="cut")
    plan, _ = plan_of(short, docs, "w1?", options, "snapkv")
    assert plan.mode == "query" and plan.chunks == 1 and plan.dropped_tokens > 0
    assert plan.prompt_tokens + plan.answer_tokens <= 128


# --- no weights ------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["garbage", "absent"])
def test_plans_without_reading_weights(tmp_path, home, short, docs, monkeypatch, weights):
    """A folder whose weights file is garbage or absent still plans (parameters from the config); no model is ever loaded."""
    folder = tmp_path / "model"
    shutil.copytree(short, folder)
    if weights == "garbage":
        (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    else:
        (folder / "model.safetensors").unlink()
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("kvcli plan loaded weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    reference = sum(p.numel() for p in transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(short)).parameters())
    result = run("plan", *docs, "-m", folder, "--method", "snapkv", "--budget", "24", "--max-new-tokens", "4", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["weights"]["params"] == reference and data["weights"]["params_from"].startswith("the config")
    assert data["weights"]["bytes"] == 4 * reference


def test_weights_come_from_the_safetensors_headers(short, docs, home):
    """With readable safetensors, the parameters are the headers' element counts and the disk bytes the file's size."""
    data = json.loads(run("plan", *docs, "-m", short, "--json").stdout)
    state = load_model(str(short)).model.state_dict()
    assert data["weights"]["params"] == sum(t.numel() for t in state.values())
    assert data["weights"]["disk_bytes"] == (short / "model.safetensors").stat().st_size
    assert data["weights"]["params_from"] == "the safetensors headers" and data["weights"]["stored_as"] == "F32"


def test_int8_weights_are_planned_at_a_byte_each(short, docs, home):
    """`plan --dtype int8` counts a byte per parameter, says the weights are int8, and plans the KV in bfloat16, as the int8 load computes."""
    data = json.loads(run("plan", *docs, "-m", short, "--dtype", "int8", "--json").stdout)
    assert data["weights"]["dtype"] == "int8" and data["weights"]["bytes"] == data["weights"]["params"]
    assert data["plan"]["dtype"] == "bfloat16"
    assert load_model(str(short), dtype="int8").dtype is torch.bfloat16


# --- tokenizers: none, tiktoken ---------------------------------------------------------------------


def test_without_a_tokenizer_counts_are_labelled_estimates(tmp_path, home, short):
    """A folder with only config.json plans with counts of one token per 4 UTF-8 bytes, and says they are estimated."""
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(short / "config.json", folder / "config.json")
    doc = tmp_path / "doc.txt"
    text = "Grüße aus Köln, " * 50 + "end"
    doc.write_text(text)
    described = describe_model(str(folder))
    assert isinstance(described.tokenizer, TokenEstimate) and not described.exact_tokens
    result = run("plan", doc, "-m", folder, "--method", "snapkv", "--max-new-tokens", "4", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert not data["tokens_exact"] and any("estimated" in note for note in data["notes"])
    tokens, size = data["plan"]["document_tokens"], len(text.encode())
    assert math.ceil(size / BYTES_PER_TOKEN) <= tokens <= math.ceil(size / (BYTES_PER_TOKEN - 1))
    assert "ESTIMATED" in run("plan", doc, "-m", folder, "--max-new-tokens", "4").stdout


def test_estimate_decodes_what_it_encodes():
    """The estimating tokenizer's pieces decode back to the text, so a prompt cut in the middle stays text."""
    estimate = TokenEstimate()
    text = "naïve café — 東京 " * 7
    encoded = estimate(text, return_offsets_mapping=True)
    assert estimate.decode(encoded["input_ids"]) == text
    assert all(0 < len(text[a:b].encode()) <= BYTES_PER_TOKEN for a, b in encoded["offset_mapping"])


def test_a_tiktoken_format_tokenizer_counts_as_tiktoken_does(tmp_path, home, short):
    """A model whose tokenizer ships as a tiktoken BPE file (`tokenizer.model`, as Llama 3's original checkpoints do) is read through tiktoken: the plan's token counts equal tiktoken's own encoding of the same ranks."""
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {bytes([i]): i for i in range(256)}
    for merge in (b"th", b"he", b"the", b" the", b"in", b" in", b"an", b"and", b" and", b"at", b" c", b" h"):
        ranks[merge] = len(ranks)
    folder = tmp_path / "tiktoken-model"
    folder.mkdir()
    shutil.copy(short / "config.json", folder / "config.json")
    (folder / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    from transformers.convert_slow_tokenizer import TikTokenConverter

    encoding = tiktoken.Encoding("test", pat_str=TikTokenConverter().pattern, mergeable_ranks=ranks, special_tokens={})
    text = "the cat and the hat sat in the band, then thin ants ran and ran"
    doc = tmp_path / "doc.txt"
    doc.write_text(text)
    data = json.loads(run("plan", doc, "-m", folder, "--json").stdout)
    assert data["tokens_exact"]
    assert data["plan"]["document_tokens"] == len(encoding.encode(text)) < len(text)


# --- the config's arithmetic ----------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 64])
def test_sliding_window_layers_are_planned_as_the_engine_keeps_them(tmp_path, chunk_size):
    """A Gemma 2 layout (sliding and global layers alternating): the plan's full and kept bytes, its budget over the global layers and its chunks equal what a real read keeps, and its peak bounds what the engine held."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    folder = save_tiny_llama(tmp_path / "slide", max_positions=1024)  # its word-level tokenizer
    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, max_position_embeddings=1024, sliding_window=16)
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).save_pretrained(folder)
    doc = tmp_path / "doc.txt"
    doc.write_text(words(300))
    options = Options(budget=Budget(tokens=24), max_new_tokens=4, chunk_size=chunk_size)
    plan, document = plan_of(folder, [str(doc)], "w1?", options, "snapkv")
    reader = Reader(load_model(str(folder)))
    reading = QueryAware(reader, document.text, options).read("w1?", make_method("snapkv"))
    cache = reading.state.cache
    assert plan.sliding.layers == 2 and plan.sliding.windows == [16] and plan.compressed_layers == 2
    assert plan.budget == reading.state.compression.plan and plan.chunks == len(reading.state.chunks)
    assert (plan.kv_full, plan.kv_kept) == (cache.full_nbytes(reading.state.prompt_len), cache.nbytes())
    answer(reader, reading, options)
    assert cache.kv_peak_nbytes <= plan.kv_peak


def test_kv_bytes_per_token_come_from_the_config():
    """Keys and values once per KV head: 2 x layers x kv heads x head_dim x dtype bytes per token."""
    config = SimpleNamespace(num_hidden_layers=24, num_key_value_heads=2, num_attention_heads=14, hidden_size=896)
    kv = KVBytes.of(config, torch.bfloat16)
    assert kv.head_dim == 64 and kv.every_layer(1) == 2 * 24 * 2 * 64 * 2


# --- the command --------------------------------------------------------------------------------


def test_text_plan_says_how_it_reads(short, docs, home):
    """The text plan goes to stdout and names the sources, the chunks past the positions and the expected peak."""
    result = run("plan", *docs, "-m", short, "--method", "snapkv", "--budget", "24", "--max-new-tokens", "4")
    assert result.exit_code == 0, result.stderr
    out = " ".join(result.stdout.split())  # lines wrap at 80 columns
    assert "a.txt" in out and "b.txt" in out and "positions re-indexed" in out and "chunks" in out
    assert "peak" in out and "estimate" in out and "weights" in out


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["-m", "/nonexistent/model"], ["does not exist"]),
        (["-m", "nosuchmodel"], ["unknown model"]),
        (["--ratio", "2"], ["--ratio"]),
        (["--budget", "4", "--method", "snapkv"], ["--budget 4"]),
        (["--chunk-size", "3", "--method", "snapkv"], ["--chunk-size"]),
        (["--max-new-tokens", "0"], ["--max-new-tokens"]),
        (["--method", "nosuch"], ["nosuch"]),
        (["--device", "tpu"], ["unknown device"]),
    ],
)
def test_bad_input_is_one_line(short, docs, home, args, fragments):
    """A bad model, budget, chunk size, method or device is one line on stderr and exit 2, before any model is read."""
    full = ["-m", short, *args] if "-m" not in args else args
    one_line_error(run("plan", *docs, *full), *fragments)


def test_bad_models_and_documents_are_one_line(tmp_path, home, short, docs):
    """A folder without config.json, a garbage config, a hub id not in the local cache, a missing document, no documents and an empty question are one line each."""
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(run("plan", *docs, "-m", empty), "no config.json")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    one_line_error(run("plan", *docs, "-m", broken), "cannot read the config")
    one_line_error(run("plan", *docs, "-m", "someone/not-cached"), "not in the local Hugging Face cache")
    one_line_error(run("plan", tmp_path / "missing.txt", "-m", short))
    one_line_error(run("plan", "-m", short), "no documents given")
    one_line_error(run("plan", *docs, "-m", short, "-q", "  "), "question is empty")


# --- the embedded model, not converted yet -----------------------------------------------------------


@pytest.mark.model
def test_the_embedded_default_plans_from_its_gguf_without_converting(tmp_path, monkeypatch, model_home):
    """With no converted checkpoint, the default model is planned from its GGUF's metadata: the same tokens and positions as its converted checkpoint gives, nothing converted, and a note saying the first run converts it."""
    from kvcli.models import DEFAULT_MODEL, EMBEDDED
    from kvcli.models.checkpoints import embedded_target, is_complete

    if not is_complete(embedded_target(EMBEDDED[DEFAULT_MODEL], model_home)):
        pytest.skip("the default embedded model is not converted on this machine")
    monkeypatch.setenv("KVCLI_HOME", str(model_home))
    converted = json.loads(run("plan", "samples/python_exceptions.txt", "--json").stdout)
    monkeypatch.setenv("KVCLI_HOME", str(tmp_path / "fresh"))
    result = run("plan", "samples/python_exceptions.txt", "--json")
    assert result.exit_code == 0, result.stderr
    fresh = json.loads(result.stdout)
    assert any("not converted yet" in note for note in fresh["notes"])
    assert fresh["plan"]["prompt_tokens"] == converted["plan"]["prompt_tokens"]
    assert fresh["plan"]["trained_positions"] == converted["plan"]["trained_positions"] == 32768
    assert fresh["weights"]["params"] == converted["weights"]["params"]
    assert not (tmp_path / "fresh" / "models").exists() or not any((tmp_path / "fresh" / "models").iterdir())
