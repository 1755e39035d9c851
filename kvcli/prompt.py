"""Prompt layout: the document first, the question last (so it lies in the observation window).

Also cuts a document that does not fit the context in the middle, keeping its head and tail,
and maps token positions back to character offsets in the document for `inspect`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a prompt is built: checking a question needs none of it
    import torch

from .errors import InputError, ModelError

log = logging.getLogger(__name__)

SUMMARY_LENGTHS = {"short": "in 2-3 sentences", "medium": "in one paragraph of about 150 words", "long": "in about 300 words, with the main points as a list"}


def summary_instruction(length: str = "medium", focus: str | None = None) -> str:
    """The question `summarize` asks."""
    if length not in SUMMARY_LENGTHS:
        raise InputError(f"--length must be one of {', '.join(SUMMARY_LENGTHS)}, got {length!r}")
    text = f"Summarize the document above {SUMMARY_LENGTHS[length]}."
    if focus:
        text += f" Focus on: {focus}."
    return text


@dataclass
class Prompt:
    """Token ids of a chat prompt and where the document lies inside it."""

    ids: torch.Tensor  # (1, prompt_len)
    text: str
    doc_start: int  # char offset of the document in `text`
    doc_text: str  # the document as it appears in the prompt (after any cut)
    token_starts: list[int]  # char offset in `text` where each token starts
    prefix_len: int  # tokens before the question: the part a saved cache holds
    dropped_tokens: int = 0  # document tokens cut from the middle
    cut_at: int | None = None  # char offset in the original document where the cut begins
    cut_len: int = 0  # chars of the original document removed

    def __len__(self) -> int:
        return self.ids.shape[1]

    @property
    def question_len(self) -> int:
        """Tokens from the question on (the chat template's closing included): what a query-aware read keeps whole."""
        return len(self) - self.prefix_len

    @property
    def doc_end(self) -> int:
        """Index of the first token after the document (where an instruction or the question starts)."""
        end = self.doc_start + len(self.doc_text)
        return next((i for i, start in enumerate(self.token_starts) if start >= end), len(self.token_starts))

    def doc_offset(self, position: int) -> int | None:
        """Char offset in the original document of the token at `position`, or None outside it."""
        char = self.token_starts[position] - self.doc_start
        if char < 0 or char >= len(self.doc_text):
            return None
        if self.cut_at is not None and char >= self.cut_at:
            marker_len = len(_cut_marker(self.dropped_tokens))
            if char < self.cut_at + marker_len:
                return None  # inside the "tokens omitted" marker
            return char - marker_len + self.cut_len
        return char


def _cut_marker(dropped: int) -> str:
    return f"\n\n[... {dropped} tokens omitted ...]\n\n"


REUSE_INSTRUCTION = "Read the document above carefully: questions about it follow."

_DOC = "\x00KVCLI_DOCUMENT\x00"
_QUESTION = "\x00KVCLI_QUESTION\x00"


def _chat_parts(tokenizer, document: str, question: str, instruction: str | None, system: str | None = None) -> tuple[str, str, int]:
    """(prefix, suffix, doc_start): the chat prompt split where the question begins.

    The prefix holds the template's opening (and `system`), the document and an optional
    instruction; the suffix holds the question and the template's closing. A compressed
    prefix can be saved and answered later by feeding only a suffix.
    """
    content = _DOC + (f"\n\n{instruction}" if instruction else "") + "\n\n" + _QUESTION
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    if getattr(tokenizer, "chat_template", None):
        templated = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        templated = (f"{system}\n\n" if system else "") + f"{content}\n\nAnswer: "
    split = templated.index(_QUESTION) - 2  # the blank line before the question starts the suffix
    prefix, suffix = templated[:split], templated[split:].replace(_QUESTION, question, 1)
    doc_start = prefix.index(_DOC)
    return prefix.replace(_DOC, document, 1), suffix, doc_start


def _encode(tokenizer, text: str) -> tuple[list[int], list[int]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [start for start, _ in enc["offset_mapping"]]


def check_question(question: str) -> None:
    """The one check every command's question goes through."""
    if not question.strip():
        raise InputError("the question is empty; pass a question in quotes")


def question_suffix(tokenizer, question: str, instruction: str | None = REUSE_INSTRUCTION, system: str | None = None) -> torch.Tensor:
    """Token ids `(1, n)` that ask `question` after a saved or reused document prefix."""
    check_question(question)
    import torch

    _, suffix, _ = _chat_parts(tokenizer, "", question, instruction, system)
    return torch.tensor([_encode(tokenizer, suffix)[0]], dtype=torch.long)


def build_prompt(
    tokenizer, document: str, question: str, max_context: int, reserve: int = 0,
    instruction: str | None = None, system: str | None = None,
) -> Prompt:
    """Tokenize the chat prompt; cut the document's middle if prompt + `reserve` exceeds `max_context`.

    `reserve` is room kept for the answer, so prompt + answer never pass `max_context`.
    `instruction` goes between the document and the question (used when the prefix is
    compressed once and reused for several questions); `system` is the system prompt.
    """
    check_question(question)
    empty_prefix, empty_suffix, _ = _chat_parts(tokenizer, "", question, instruction, system)
    overhead = len(_encode(tokenizer, empty_prefix)[0]) + len(_encode(tokenizer, empty_suffix)[0])
    limit = max_context - reserve
    if overhead + 16 > limit:
        raise InputError(
            f"the {max_context}-token context leaves no room for the document after the prompt ({overhead} tokens) "
            f"and the answer ({reserve} tokens); raise --max-context or lower --max-new-tokens"
        )
    doc_ids = tokenizer(document, add_special_tokens=False)["input_ids"]
    if not doc_ids and document.strip():
        raise ModelError(
            f"the model's tokenizer ({type(tokenizer).__name__}) makes no tokens of the document's {len(document):,} characters: "
            "its tokenizer files do not fit the tokenizer class transformers picked for this model; check the checkpoint's tokenizer")
    keep = len(doc_ids) if overhead + len(doc_ids) <= limit else limit - overhead - 16  # 16: room for the marker
    while True:
        prompt = _layout(tokenizer, document, doc_ids, keep, question, instruction, system)
        over = len(prompt) - limit
        if over <= 0:
            break
        # Decoding the head and tail and encoding them again can merge or split tokens at the
        # seams: cut more until the prompt itself fits, not only the count it was cut by.
        keep -= over
        if keep < 1:
            raise InputError(f"--max-context {max_context} leaves no room for the document; raise it")
    if prompt.dropped_tokens:
        log.warning("the document has %d tokens more than fit; cut from the middle", prompt.dropped_tokens)
    return prompt


def _layout(tokenizer, document: str, doc_ids: list[int], keep: int, question: str, instruction, system) -> Prompt:
    """The prompt with `keep` of the document's tokens: all of them, or its head and tail."""
    dropped, cut_at, cut_len = 0, None, 0
    doc_text = document
    if keep < len(doc_ids):
        head_n, tail_n = keep // 2, keep - keep // 2
        dropped = len(doc_ids) - keep
        head = tokenizer.decode(doc_ids[:head_n])
        tail = tokenizer.decode(doc_ids[len(doc_ids) - tail_n :])
        cut_at = len(head)
        cut_len = len(document) - len(head) - len(tail)
        doc_text = head + _cut_marker(dropped) + tail
    prefix, suffix, doc_start = _chat_parts(tokenizer, doc_text, question, instruction, system)
    prefix_ids, prefix_starts = _encode(tokenizer, prefix)
    suffix_ids, suffix_starts = _encode(tokenizer, suffix)
    import torch

    ids = torch.tensor([prefix_ids + suffix_ids], dtype=torch.long)
    starts = prefix_starts + [len(prefix) + s for s in suffix_starts]
    return Prompt(
        ids=ids, text=prefix + suffix, doc_start=doc_start, doc_text=doc_text, token_starts=starts,
        prefix_len=len(prefix_ids), dropped_tokens=dropped, cut_at=cut_at, cut_len=cut_len,
    )


def window_text(tokenizer, prompt: Prompt, window_size: int) -> str:
    """What the observation window covers: the prompt's last `window_size` tokens, as text."""
    return tokenizer.decode(prompt.ids[0, -window_size:].tolist())


__all__ = ["REUSE_INSTRUCTION", "Prompt", "build_prompt", "check_question", "question_suffix", "summary_instruction", "window_text"]
