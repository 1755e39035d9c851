"""Prompt layout: the document first, the question last (so it lies in the observation window).

Also cuts a document that does not fit the context in the middle, keeping its head and tail,
and maps token positions back to character offsets in the document for `inspect`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .errors import InputError

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
    dropped_tokens: int = 0  # document tokens cut from the middle
    cut_at: int | None = None  # char offset in the original document where the cut begins
    cut_len: int = 0  # chars of the original document removed

    def __len__(self) -> int:
        return self.ids.shape[1]

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


def _chat_text(tokenizer, document: str, question: str) -> tuple[str, int]:
    """The chat-formatted prompt and the char offset of the document in it."""
    sentinel = "\x00KVCLI_DOCUMENT\x00"
    content = f"{sentinel}\n\n{question}"
    messages = [{"role": "user", "content": content}]
    if getattr(tokenizer, "chat_template", None):
        templated = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        templated = f"{content}\n\nAnswer: "
    doc_start = templated.index(sentinel)
    return templated.replace(sentinel, document, 1), doc_start


def build_prompt(tokenizer, document: str, question: str, max_context: int, reserve: int = 0) -> Prompt:
    """Tokenize the chat prompt; cut the document's middle if prompt + `reserve` exceeds `max_context`."""
    if not question.strip():
        raise InputError("the question is empty; pass a question in quotes after the files")
    text, doc_start = _chat_text(tokenizer, document, question)
    overhead = len(tokenizer(_chat_text(tokenizer, "", question)[0], add_special_tokens=False)["input_ids"])
    limit = max_context - reserve
    if overhead + 16 > limit:
        raise InputError(f"--max-context {max_context} leaves no room for the document; raise it")
    doc_ids = tokenizer(document, add_special_tokens=False)["input_ids"]
    dropped, cut_at, cut_len = 0, None, 0
    doc_text = document
    if overhead + len(doc_ids) > limit:
        keep = limit - overhead - 16  # room for the marker
        head_n, tail_n = keep // 2, keep - keep // 2
        dropped = len(doc_ids) - keep
        head = tokenizer.decode(doc_ids[:head_n])
        tail = tokenizer.decode(doc_ids[len(doc_ids) - tail_n :])
        cut_at = len(head)
        cut_len = len(document) - len(head) - len(tail)
        doc_text = head + _cut_marker(dropped) + tail
        text, doc_start = _chat_text(tokenizer, doc_text, question)
        log.warning("the document has %d tokens more than fit; cut from the middle", dropped)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor([enc["input_ids"]], dtype=torch.long)
    starts = [start for start, _ in enc["offset_mapping"]]
    return Prompt(ids=ids, text=text, doc_start=doc_start, doc_text=doc_text, token_starts=starts, dropped_tokens=dropped, cut_at=cut_at, cut_len=cut_len)


def window_text(tokenizer, prompt: Prompt, window_size: int) -> str:
    """What the observation window covers: the prompt's last `window_size` tokens, as text."""
    return tokenizer.decode(prompt.ids[0, -window_size:].tolist())


def positions_to_doc_offsets(prompt: Prompt, positions: list[int]) -> list[int | None]:
    """Document char offset for each token position (None for template or question tokens)."""
    return [prompt.doc_offset(p) for p in positions]


__all__ = ["Prompt", "build_prompt", "summary_instruction", "window_text", "positions_to_doc_offsets"]
