"""Real prose for model tests: CPython's own reference documentation (PSF License)."""

from __future__ import annotations

from pydoc_data.topics import topics


def prose(tokenizer, n_tokens: int, start_topic: str = "assignment") -> str:
    """About `n_tokens` model tokens of real English reference prose, cut at a sentence end."""
    names = sorted(topics)
    names = names[names.index(start_topic) :] + names[: names.index(start_topic)]
    text = "\n\n".join(topics[name] for name in names)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    body = tokenizer.decode(ids)
    return body[: body.rfind(". ") + 1]


def with_needle(text: str, needle: str, depth: float) -> str:
    """`text` with `needle` inserted at the sentence boundary nearest `depth` (0 start, 1 end)."""
    at = text.rfind(". ", 0, int(len(text) * depth))
    at = 0 if at < 0 else at + 2
    return text[:at] + needle + " " + text[at:]
