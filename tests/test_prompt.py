"""kvcli/prompt.py on a real (word-level) tokenizer: layout, the seam where questions follow a
saved prefix, the middle cut and the map back to the document."""

from __future__ import annotations

import pytest
from test_models import save_tiny_llama
from transformers import AutoTokenizer

from kvcli.errors import InputError
from kvcli.prompt import REUSE_INSTRUCTION, build_prompt, question_suffix, summary_instruction, window_text


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(str(save_tiny_llama(tmp_path_factory.mktemp("tok") / "tiny")))


def doc(n: int) -> str:
    return " ".join(f"w{3 + i % 57}" for i in range(n))


def test_question_comes_last_and_prefix_ends_where_it_starts(tokenizer):
    """The question is the prompt's tail (in the observation window); prefix_len counts the tokens before it."""
    prompt = build_prompt(tokenizer, "w3 w4 w5", "w7 w8?", max_context=500)
    assert prompt.text.rstrip().endswith("Answer:")
    assert tokenizer.decode(prompt.ids[0, prompt.prefix_len :]).startswith("w7 w8")
    assert tokenizer.decode(prompt.ids[0, : prompt.prefix_len]) == "w3 w4 w5"
    assert window_text(tokenizer, prompt, 4) == tokenizer.decode(prompt.ids[0, -4:])


def test_a_saved_prefix_plus_the_question_suffix_is_the_one_pass_prompt(tokenizer):
    """The reused prompt's prefix ids followed by question_suffix are exactly the one-pass prompt's ids."""
    prompt = build_prompt(tokenizer, doc(50), "w7 w8?", max_context=500, instruction=REUSE_INSTRUCTION)
    suffix = question_suffix(tokenizer, "w7 w8?", REUSE_INSTRUCTION)
    assert prompt.ids[0, prompt.prefix_len :].tolist() == suffix[0].tolist()


def test_doc_offset_maps_tokens_back_to_the_document(tokenizer):
    """Every document token maps to the character where it starts in the document; template tokens map to None."""
    text = doc(40)
    prompt = build_prompt(tokenizer, text, "w1?", max_context=500)
    mapped = [prompt.doc_offset(p) for p in range(len(prompt))]
    inside = [m for m in mapped if m is not None]
    assert len(inside) == 40
    assert [text[m : m + 2] for m in inside] == [word[:2] for word in text.split()]
    assert mapped[-1] is None
    assert prompt.doc_end == next(p for p in range(len(prompt)) if p > 0 and mapped[p] is None and mapped[p - 1] is not None)


def test_the_middle_cut_keeps_head_and_tail_and_maps_around_the_marker(tokenizer):
    """A document past the context keeps its first and last tokens, says how many were cut, and maps the tail to its original offsets."""
    text = doc(400)
    prompt = build_prompt(tokenizer, text, "w1?", max_context=200, reserve=20)
    assert prompt.dropped_tokens > 0 and len(prompt) + 20 <= 200
    assert f"[... {prompt.dropped_tokens} tokens omitted ...]" in prompt.text
    offsets = [o for o in (prompt.doc_offset(p) for p in range(len(prompt))) if o is not None]
    assert offsets[0] == 0
    assert text[offsets[-1] :] == text.split()[-1]


def test_prompt_refuses_a_context_without_room(tokenizer):
    """A context too small for the template and the answer is one InputError naming both flags."""
    with pytest.raises(InputError, match="--max-context.*--max-new-tokens"):
        build_prompt(tokenizer, doc(10), "w1?", max_context=30, reserve=20)


@pytest.mark.parametrize("length", ["short", "medium", "long"])
def test_summary_instruction(length):
    """The summary question names its length and focus; an unknown length is refused."""
    text = summary_instruction(length, focus="the budget")
    assert text.startswith("Summarize the document above") and "the budget" in text
    with pytest.raises(InputError):
        summary_instruction("huge")
