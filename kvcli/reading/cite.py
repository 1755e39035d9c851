"""`--sources`: the passages an answer drew on, scored by where the model's retrieval heads looked.

While the answer is decoded, an `attribution.AttentionAt` watches the retrieval heads of the
model's profile (the heads evidencekv takes its evidence from) and sums the attention each
answer token paid to each cached entry per original prompt position; `sources.passages` maps
those positions back through a `SourceMap` to documents, pages, lines and sentences. Why decode
attention rather than the prefill's evidence score: docs/methods.md#sources.

A saved `.kvc` carries its `SourceMap` as two attached tensors and one metadata entry
(`map_tensors`, `saved_source_map`), so answers from it cite as a one-pass read does.
"""

from __future__ import annotations

import torch

from ..attribution import AttentionAt, retrieval_heads
from ..defaults import DEFAULT_SOURCES
from ..ingest.document import Document, Source
from ..sources import Passage, SourceMap, passages
from .reader import Reader

SOURCE_HEADS = 8  # retrieval heads watched (evidencekv's default number)


def watcher(reader: Reader, reading) -> AttentionAt:
    """What to hand `answer(reader, reading, ..., watch=)` so that its attention can be cited afterwards."""
    return AttentionAt(retrieval_heads(reader.profile(), reader.num_layers, SOURCE_HEADS), reading.state.prompt_len)


def cite(source_map: SourceMap, watch: AttentionAt, count: int = DEFAULT_SOURCES) -> list[Passage]:
    """The `count` passages the watched answer's attention fell on most."""
    return passages(source_map.document, source_map.char_scores(watch.scores()), count)


def map_tensors(source_map: SourceMap) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata entry, attached tensors) that save `source_map` in a `.kvc`: each position's
    character offset (int32) and the documents' text (UTF-8 bytes); the sources' spans in the metadata."""
    spans = [[s.name, s.kind, s.start, s.end, s.page, s.sha256] for s in source_map.document.sources]
    tensors = {
        "sources.offsets": torch.tensor(source_map.offsets, dtype=torch.int32),
        "sources.text": torch.frombuffer(bytearray(source_map.document.text.encode("utf-8")), dtype=torch.uint8),
    }
    return {"source_spans": spans}, tensors


def saved_source_map(saved) -> SourceMap | None:
    """The `SourceMap` a `.kvc` (`store.SavedCache`) was saved with, or None (made before kvcli saved it)."""
    attached = saved.attached or {}
    if "sources.offsets" not in attached or "sources.text" not in attached or "source_spans" not in saved.meta:
        return None
    text = bytes(attached["sources.text"].cpu().numpy()).decode("utf-8")
    sources = tuple(Source(name, kind, int(start), int(end), page, sha) for name, kind, start, end, page, sha in saved.meta["source_spans"])
    return SourceMap(Document(text, sources), attached["sources.offsets"].cpu().tolist())




def rewatch(reader: Reader, reading, answer) -> AttentionAt:
    """The watch `answer` (a `reading.Answer`) would have filled had it been decoded watched from
    `reading` (a fresh one, not decoded from yet): the tokens its decoding fed, fed again in one
    step, each query attending causally as it did one token at a time (chat's /sources)."""
    from ..generate import forward
    from .answer import STOP_LIMIT

    fed = answer.tokens[:-1] if answer.stopped == STOP_LIMIT else answer.tokens  # the last token is fed only before an EOS
    watch = AttentionAt(retrieval_heads(reader.profile(), reader.num_layers, SOURCE_HEADS), reading.state.prompt_len, rows=max(1, len(fed)))
    if not fed:
        return watch
    state = reading.state
    ids = torch.tensor([fed], device=state.logits.device if state.logits is not None else reader.device)
    with reader.prefilling(), torch.inference_mode():
        if state.next_position is None:
            forward(reader.model, state.cache, ids, state.prompt_len, watch=watch)
        else:  # re-indexed: the answer goes where RoPE left off, its tokens counted from the prompt's end
            forward(reader.model, state.cache, ids, state.next_position, original_start=state.prompt_len, watch=watch)
    return watch


__all__ = ["DEFAULT_SOURCES", "cite", "map_tensors", "rewatch", "saved_source_map", "watcher"]
