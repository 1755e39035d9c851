"""`kvcli read`: read documents once and save their full cache; questions asked later with
`kvcli ask --cache` are each compressed query-aware, exactly as a one-pass `ask` would."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import __version__
from ..errors import InputError
from .ask import ExcludeOpt, IncludeOpt
from .options import MODEL, OUTPUT, RunOptions, shared
from .output import err, print_json, user_errors
from .session import start, warn_prompt

def check_target(output: str, flag: str = "--output") -> Path:
    """The .kvc path to write, checked before anything slow (it can be written there); `flag`
    names where it came from."""
    from ..atomic import check_output

    if Path(output).suffix != ".kvc":
        raise InputError(f"{flag} {output} should end in .kvc")
    return check_output(output, flag)


def save_full_prefix(target: Path, reader, once, doc, system: str | None, save_dtype: str | None = None) -> int:
    """Write `once`'s full prefix (a `reading.ReadOnce` that has read it) to `target`; bytes written."""
    from ..store import save_cache, storage_dtype

    prefix = once.read_prefix()
    lm = reader.lm
    meta = {
        "kind": "full",
        "kvcli_version": __version__,
        "model": lm.name,
        "config_hash": lm.config_hash,
        "weights_fingerprint": lm.weights_fingerprint,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "system": system,
        "prompt_tokens": prefix.state.prompt_len,
        "window_size": once.window_size,
        "all_query_scores": prefix.accumulated is not None,
        "tail_ids": once.tail_ids,
        "sources": [{"name": s.name, "page": s.page, "sha256": s.sha256} for s in doc.sources] if doc is not None else [],
    }
    extras = {"tail_queries": prefix.tail_queries}
    if prefix.accumulated is not None:
        extras["accumulated"] = prefix.accumulated
    attached = None
    if doc is not None and once.prompt is not None:  # for --sources: the map back to the documents
        entry, attached = source_map_tensors(doc, once.prompt, prefix.state.prompt_len)
        meta.update(entry)
    elif once.source_map is not None:  # a loaded prefix saved again (chat's /save after --cache)
        from ..reading.cite import map_tensors

        entry, attached = map_tensors(once.source_map)
        meta.update(entry)
    return save_cache(target, prefix.state.cache, meta, dtype=storage_dtype(save_dtype), extras=extras, attached=attached)


def source_map_tensors(doc, prompt, prompt_tokens: int) -> tuple[dict, dict]:
    """(metadata entry, attached tensors) that let answers from a saved prefix of `prompt`'s first
    `prompt_tokens` positions cite `doc` (`reading.cite.map_tensors`)."""
    from ..reading.cite import map_tensors
    from ..sources import SourceMap

    source_map = SourceMap.of_prompt(doc, prompt)
    source_map.offsets = source_map.offsets[:prompt_tokens]
    return map_tensors(source_map)


@user_errors
@shared(MODEL, OUTPUT, max_new_tokens=512)  # room kept, in a document cut to fit, for a question and its answer
def read(
    files: Annotated[list[str], typer.Argument(help="Files, folders or - (stdin).", show_default=False, metavar="PATHS...")],
    output: Annotated[str, typer.Option("--output", "-o", metavar="FILE.kvc", help="The .kvc file to write.", show_default=False)],
    save_dtype: Annotated[str, typer.Option("--save-dtype", metavar="auto|float32|bfloat16|float16", help="Precision of the saved keys and values: auto keeps the model's; float16 or bfloat16 halve a float32 file.")] = "auto",
    all_query_scores: Annotated[bool, typer.Option("--all-query-scores", help="Also save the attention every cached token received from the whole document, which h2o scores by (an extra pass over the document).")] = False,
    max_context: Annotated[Optional[int], typer.Option("--max-context", metavar="N", help="Longest prompt plus answer in tokens; longer documents are cut in the middle [default: the model's positions].", show_default=False)] = None,
    system: Annotated[Optional[str], typer.Option("--system", metavar="TEXT", help="A system prompt (questions asked from this file use it).", show_default=False)] = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    *,
    run: RunOptions,
) -> None:
    """Read documents once and save their full KV cache, to ask many questions later with --cache.

    Unlike `kvcli compress`, nothing is dropped yet: the file is as large as the full cache, and
    each question asked from it (`kvcli ask --cache FILE.kvc "question" --method ... --ratio ...`)
    is compressed query-aware, keeping what a one-pass `ask` keeps.
    Example: kvcli read report.pdf -o report.kvc --save-dtype bfloat16
    """
    from ..reading import ReadOnce
    from ..reading.once import PREFIX_WINDOW
    from ..store import storage_dtype

    target = check_target(output)
    storage_dtype(save_dtype)
    run = dataclasses.replace(run, max_context=max_context, system=system, method="full")  # the caller's RunOptions stay as given
    started = start(run, files, include or (), exclude or ())
    screen, options, doc, reader = started.screen, started.options, started.doc, started.reader
    once = ReadOnce(reader, doc.text, options, window_size=PREFIX_WINDOW, accumulated=all_query_scores)
    warn_prompt(reader, options, once.layout(), screen)
    with screen.layers(reader.num_layers, "reading") as on_layer:
        prefix = once.read_prefix(on_layer)
    written = save_full_prefix(target, reader, once, doc, system, save_dtype)
    facts = {"output": str(target), "kind": "full", "prompt_tokens": prefix.state.prompt_len,
             "kv_bytes": prefix.state.cache.nbytes(), "file_bytes": written, "read_s": round(prefix.state.seconds, 3)}
    if run.json:
        print_json(facts)
    elif not run.quiet:
        err.print(
            f"read {prefix.state.prompt_len} tokens in {prefix.state.seconds:.1f}s; saved {target} ({written / 2**20:.1f} MiB, the full cache); "
            f"ask with: kvcli ask --cache {target} \"question\" --ratio 0.1",
            markup=False,
        )
