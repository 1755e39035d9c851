"""The steps every model-running command takes: read the documents, load the model, get the
method ready (its profile, with progress the first time), warn about the prompt."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from ..errors import InputError
from .options import RunOptions
from .output import Screen


def read_documents(paths: list[str], screen: Screen, include=(), exclude=()):
    """The documents as one text, with a bar over files on a terminal and warnings shown."""
    from ..ingest import read_documents as read

    if not paths:
        raise InputError("no documents given; pass files, folders or - for stdin before the question")
    try:
        with screen.progress("reading", "files") as update:
            doc = read(paths, progress=lambda done, total: update(done, total), include=include, exclude=exclude)
    except InputError as exc:
        if paths == ["-"] and str(exc).startswith("stdin is empty"):
            # `start` serves every command: name both forms (summarize takes no question)
            raise InputError('no documents given and stdin is empty; pass files or folders, or pipe text in: kvcli ask FILE "question", kvcli summarize FILE') from None
        raise
    screen.warn(*doc.warnings)
    return doc


def load(run: RunOptions, screen: Screen):
    """The model as a `reading.Reader`; the reported peak memory starts after the load."""
    import torch

    from ..models import load_model
    from ..reading import Reader
    from ..stats import reset_peak_memory
    from ..threads import plan_threads

    quiet_transformers()
    plan = plan_threads(run.threads)  # --threads: the reader prefills and decodes on it
    torch.set_num_threads(plan.prefill)  # the load and anything outside a read, for this command (`options.shared` scopes it)
    with screen.status("loading model") as update:
        lm = load_model(run.model, device=run.device, dtype=run.dtype, trust_remote_code=run.trust_remote_code, progress=update,
                        device_map=run.device_map)
    reader = Reader(lm, threads=plan)
    reset_peak_memory(lm.device)
    return reader


def quiet_transformers() -> None:
    """Turn off transformers' progress bars and advice: they would interleave with kvcli's status
    line and report (kvcli says what it is loading itself)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def prepare(reader, method, screen: Screen, why: str | None = None) -> None:
    """Load (or compute, once per model, with a progress bar) what the method needs from the model;
    with `why` (an option such as --sources), the retrieval-head profile whatever the method."""
    if why is None and (not method.needs_profile or reader.attention.cannot_compress()):  # nothing will be compressed: no profile to pay for
        return
    with screen.progress("retrieval-head profile", "prefills") as update:
        def progress(done: int, total: int) -> None:
            if done == 0:
                screen.note(f"kvcli: computing the retrieval-head profile of {reader.lm.name} for {why or method.name} (once per model: {total} short prefills)")
            update(done, total)

        reader.profile(progress)


def warn_prompt(reader, options, prompt, screen: Screen, method=None) -> None:
    """Say when the document was cut to fit, or is read past the model's positions (by a
    compressing `method`; for `full` the read itself refuses)."""
    limit = reader.context_limit(options)
    if prompt.dropped_tokens:
        screen.warn(
            f"the documents are {prompt.dropped_tokens} tokens longer than fit the {limit}-token context with room for "
            f"the answer; cut from the middle (head and tail kept), as --cut-middle asks"
        )
    elif len(prompt) + options.max_new_tokens > limit and (method is None or method.compresses):
        screen.note(
            f"kvcli: the {len(prompt):,}-token prompt is {len(prompt) / limit:.1f}x the {limit:,} positions the model reads: "
            "reading it whole in chunks, compressing after each, positions re-indexed"
        )
    if limit > reader.max_positions:
        screen.warn(f"--max-context {limit} passes the model's trained context ({reader.max_positions}); answers may degrade")


@dataclass
class Started:
    """What a model-running command has once it has checked its options, read and loaded."""

    screen: Screen
    method: object  # methods.Method
    options: object  # reading.Options
    doc: object  # ingest.Document, or None when answering from a saved cache
    reader: object  # reading.Reader


def start(run: RunOptions, files: list[str] | None, include=(), exclude=(), agnostic=None) -> Started:
    """Check the options (before anything slow), read the documents, load the model, prepare the
    method (`agnostic`: a question-agnostic read's default, `RunOptions.make_method`)."""
    screen = Screen(run.quiet, run.json, run.verbose)
    method = run.make_method(agnostic)
    options = run.options()
    options.check(method)
    doc = read_documents(list(files), screen, include, exclude) if files is not None else None
    reader = load(run, screen)
    if doc is not None:
        prepare(reader, method, screen)
    return Started(screen, method, options, doc, reader)


def load_saved(reader, path: str):
    """The `.kvc` at `path`, checked against the loaded model (architecture, weights, format, bytes)."""
    from ..store import load_cache

    lm = reader.lm
    return load_cache(path, lm.config_hash, lm.name, device=lm.device, dtype=lm.dtype, weights_fingerprint=lm.weights_fingerprint)


def saved_read_once(reader, saved, path: str, options, method, screen: Screen):
    """A `reading.ReadOnce` over a saved full prefix, refused when it was read with another system prompt."""
    from ..reading import ReadOnce

    if (saved.meta.get("system") or None) != (options.system or None):
        raise InputError(f"{path} was read with --system {saved.meta.get('system')!r}; use the same system prompt or read the documents again")
    prepare(reader, method, screen)
    return ReadOnce.saved(reader, saved, options)


def stdin_is_piped() -> bool:
    try:
        return not sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False
