"""`kvcli compress`: compress documents once and save the cache for later questions."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__
from .ask import ExcludeOpt, IncludeOpt, ScorerOpt
from .options import COMPRESSION, MODEL, OUTPUT, RunOptions, shared
from .output import err, print_json, user_errors
from .read import check_target, source_map_tensors
from .session import start, warn_prompt


@user_errors
@shared(MODEL, COMPRESSION, OUTPUT)
def compress(
    files: Annotated[list[str], typer.Argument(help="Files, folders or - (stdin).", show_default=False, metavar="PATHS...")],
    output: Annotated[str, typer.Option("--output", "-o", metavar="FILE.kvc", help="The .kvc file to write.", show_default=False)],
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    scorer: ScorerOpt = None,
    *,
    run: RunOptions,
) -> None:
    """Compress documents once and save the cache, to answer many questions later with --cache.

    The cache is question-agnostic: tokens are ranked by the attention the model pays them while
    repeating the document (--scorer repeat: a second, longer pass over the document) and, unless
    --method names a method, kept by dynamickv with each layer's budget split over its heads by
    their scores (docs/methods.md), so it keeps specific facts less well than `kvcli ask` does
    (docs/results.md), though far better than a generic instruction's attention. Example: kvcli compress report.pdf -o report.kvc --ratio 0.3
    """
    from ..reading import Reused, run_stats
    from ..store import save_cache

    target = check_target(output)
    scorer, agnostic = run.agnostic_scorer(scorer)  # checked before anything slow
    started = start(run, files, include or (), exclude or (), agnostic)
    screen, method, options, doc, reader = started.screen, started.method, started.options, started.doc, started.reader
    screen.warn("a saved cache is compressed without knowing the questions: it suits summaries and broad questions, and often loses specific facts (docs/results.md)")
    mode = Reused(reader, doc.text, options, scorer)
    method = mode.method_for(method, agnostic)
    warn_prompt(reader, options, mode.prompt, screen)
    with screen.layers(reader.num_layers, "compress") as on_layer:
        prefix = mode.read(method, on_layer=on_layer)
    stats = run_stats(reader, prefix.reading())
    stats.extra.update(prefix.extra)
    lm = reader.lm
    meta = {
        "kvcli_version": __version__,
        "model": lm.name,
        "config_hash": lm.config_hash,
        "weights_fingerprint": lm.weights_fingerprint,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "method": prefix.method.name,  # past the context it may hold less in one layer than asked (Method.within)
        "method_params": prefix.method.params(),
        "prompt_tokens": prefix.state.prompt_len,
        "compressed": prefix.state.compressed,
        "note": prefix.note,
        "window_text": prefix.window,
        "kv_peak_bytes": prefix.state.cache.kv_peak_nbytes,
        "next_position": prefix.state.next_position,  # re-indexed past the context: where the question goes
        "retained_per_layer": stats.retained_per_layer,
        "sources": [{"name": s.name, "page": s.page, "sha256": s.sha256} for s in doc.sources],
    }
    entry, attached = source_map_tensors(doc, mode.prompt, prefix.state.prompt_len)  # for --sources
    meta.update(entry)
    written = save_cache(target, prefix.state.cache, meta, attached=attached)
    stats.extra["file_bytes"] = written
    if run.json:
        print_json({"output": str(target), "stats": stats.to_dict()})
    elif not run.quiet:
        screen.report(stats)
        err.print(f"saved {target} ({written / 2**20:.1f} MiB); ask with: kvcli ask --cache {target} \"question\"", markup=False)

