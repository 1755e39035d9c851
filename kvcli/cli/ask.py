"""`kvcli ask` and `kvcli summarize`: answer questions about documents, streaming the answer."""

from __future__ import annotations

import os
import re
import time
from typing import Annotated, Optional

import typer

from ..defaults import DEFAULT_SCORER
from ..errors import InputError, shorten
from .options import COMPRESSION, GENERATION, MODEL, OUTPUT, RunOptions, shared
from .output import Screen, print_json, user_errors
from .session import load_saved, saved_read_once, start, stdin_is_piped, warn_prompt

CacheOpt = Annotated[Optional[str], typer.Option("--cache", metavar="FILE.kvc", help="Answer from a cache saved by `kvcli compress` instead of reading documents.", show_default=False)]
IncludeOpt = Annotated[Optional[list[str]], typer.Option("--include", metavar="GLOB", help="In folders, read only files matching this glob (gitignore style); repeatable.", show_default=False)]
ExcludeOpt = Annotated[Optional[list[str]], typer.Option("--exclude", metavar="GLOB", help="In folders, skip files and folders matching this glob; repeatable.", show_default=False)]
ScorerOpt = Annotated[Optional[str], typer.Option("--scorer", metavar="instruction|repeat", help=f"How a question-agnostic cache ranks tokens: instruction (the attention of a generic instruction) or repeat (the attention the document gets while the model repeats it, KVzip: a second, longer pass over the document) [default: {DEFAULT_SCORER}; instruction for h2o, streamingllm and --chunk-size].", show_default=False)]


def split_arguments(args: list[str], questions: list[str] | None, cache: str | None) -> tuple[list[str], list[str]]:
    """(documents, questions) from `ask`'s arguments: `FILES... QUESTION`, or every argument a
    document when -q is given; with piped stdin and one argument, stdin is the document.

    A last argument that names a file, or looks like a file name that is not there (a typo), is
    refused rather than asked as the question: -q is the form that cannot be misread."""
    from ..prompt import check_question

    if cache:
        if questions and args:
            raise InputError("with --cache, give no documents: the cache already holds them")
        if not questions and not args:
            raise InputError(f'give the question in quotes: kvcli ask --cache {cache} "question"')
        if len(args) > 1:
            raise InputError(f"with --cache, give no documents ({', '.join(args[:-1])}): the cache already holds them; "
                             f'give the question alone in quotes, or with -q: kvcli ask --cache {cache} -q "question"')
        if args:
            check_question_argument(args[0], 'with --cache give no documents, only the question, in quotes or with -q "question"')
        files, questions = [], list(questions or args)
    elif questions:
        files, questions = args, list(questions)
    elif len(args) == 1 and stdin_is_piped():
        check_question_argument(args[0], f'the question is missing (stdin is not a terminal, so a lone argument is the question): kvcli ask {args[0]} "question", or -q "question"')
        files, questions = ["-"], args
    elif len(args) < 2:
        raise InputError('give the documents, then the question in quotes: kvcli ask FILE "question"')
    else:
        files, questions = args[:-1], [args[-1]]
        check_question(questions[0])
        check_question_argument(questions[0], 'put the question in quotes after the documents, or give it with -q "question"')
    for question in questions:
        check_question(question)
    if not files and not cache:
        raise InputError('no documents given; pass files, folders or - for stdin, then the question')
    return files, questions


# a file name's extension: a letter, then up to 7 letters or digits ('nots.txt', not 'v1.2' or 'e.g.')
EXTENSION = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,7}$")


def check_question_argument(text: str, fix: str) -> None:
    """Refuse a positional question that is a file or folder, or reads as a mistyped file name;
    `fix` says how to give the question instead."""
    kind = path_kind(text)
    if kind is not None:
        raise InputError(f"the last argument {shorten(text)!r} is a {kind}, not a question; {fix}")
    if not any(space in text for space in " \t\n") and ("/" in text or os.sep in text or EXTENSION.search(text)):
        raise InputError(f"{shorten(text)!r} does not exist, and reads as a file name rather than a question; check the path, "
                         'or give the question with -q "question"')


def refuse_questions_as_documents(files: list[str], fix: str) -> None:
    """For commands that take no question (`summarize`, `chat`): a document argument that names
    nothing and holds a space is a question typed where the documents go; `fix` says what to do."""
    for arg in files:
        if arg != "-" and path_kind(arg) is None and any(space in arg for space in " \t\n"):
            raise InputError(f"{shorten(arg)!r} is not a file or folder, and reads as a question; {fix}")


def path_kind(text: str) -> str | None:
    """'file' or 'folder' when `text` names one, else None: text that cannot be a path at all
    (too long a name, a NUL, a folder that cannot be searched) names nothing, and never raises."""
    # os.path's checks answer False where pathlib's raise (ENAMETOOLONG on Python 3.11)
    if os.path.isdir(text):
        return "folder"
    return "file" if os.path.lexists(text) else None


def answer_all(files: list[str], questions: list[str], run: RunOptions, *, cache: str | None = None,
               reuse: bool = False, compare: bool = False, include=(), exclude=(), scorer: str = DEFAULT_SCORER,
               past: str = "compressed") -> None:
    """Answer each question: query-aware by default, or after one question-agnostic prefix.
    Past the context, `past` "sections" summarizes section by section (`reading.Sections`)."""
    from ..reading import QueryAware, ReadOnce, Reused, Sections, add_answer, answer, run_stats

    if compare and (cache or reuse):
        raise InputError("--compare reads query-aware; drop --cache or --reuse")
    started = start(run, None if cache else files, include, exclude)
    screen, method, options, doc, reader = started.screen, started.method, started.options, started.doc, started.reader
    prefix = None
    if cache:
        prefix, method, mode = _saved(reader, cache, run, screen, method, options)
    else:
        if reuse:
            screen.warn("--reuse chooses what to keep without the questions: specific facts are often lost (docs/results.md); leave it out to read query-aware")
            mode = Reused(reader, doc.text, options, scorer)
            warn_prompt(reader, options, mode.prompt, screen)
            with screen.layers(reader.num_layers, "compress") as on_layer:
                prefix = mode.read(method, on_layer=on_layer)
        else:
            mode = QueryAware(reader, doc.text, options)
            if past == "sections" and options.fit == "reindex" and not compare and mode.past_window(questions[0]):
                mode = Sections(reader, doc.text, options)
            elif len(questions) > 1 and options.chunk_size is None and not compare:
                # Many questions: read the document once and compress a copy per question (the same
                # cache as one pass), unless it is read past the context, where each needs its own read.
                longest = max(questions, key=lambda q: len(reader.tokenizer(q)["input_ids"]))
                if options.fit != "reindex" or not mode.past_window(longest):
                    mode = ReadOnce(reader, doc.text, options, window_size=max(32, method.window_size),
                                    accumulated=method.needs_accumulated, longest_question=longest)
                    warn_prompt(reader, options, mode.layout(), screen)
                    with screen.layers(reader.num_layers, "reading once") as on_layer:
                        mode.read_prefix(on_layer)
    for question in questions:
        began = time.perf_counter()
        if prefix is not None:
            reading = prefix.ask(reader, question, options)
        elif isinstance(mode, ReadOnce):
            reading = mode.read(question, method)
        elif isinstance(mode, Sections):
            screen.note(f"kvcli: the documents are longer than the {reader.context_limit(options):,} positions the model reads: "
                        "summarizing them section by section, then the summaries")
            with screen.progress("summarizing", "sections") as update:
                reading = mode.read(question, method, on_section=lambda done, total: update(done, total))
        else:
            mode.check(question, method)
            warn_prompt(reader, options, mode.prompt(question), screen, method)
            with screen.layers(reader.num_layers) as on_layer:
                if compare:
                    from ..methods import Full

                    captured = mode.capture(question, method.window_size, method.needs_accumulated, on_layer)
                    reading = mode.derive(captured, question, method)
                else:
                    reading = mode.read(question, method, on_layer=on_layer)
        stats = run_stats(reader, reading)
        stats.extra.update(prefix.extra if prefix is not None else {})
        if doc is not None and doc.encodings:
            stats.extra["encodings"] = doc.encodings
        if "prefix" in stats.extra:
            stats.extra["prefix"]["questions"] = len(questions)
        try:
            result = answer(reader, reading, options, on_text=screen.stream(), started=began)
        finally:
            screen.end_answer()
        add_answer(stats, reader, result)
        out = {"question": question, "answer": result.text, "stats": stats.to_dict()}
        if compare:
            full = answer(reader, mode.derive(captured, question, Full()), options)
            out["full_cache_answer"] = full.text
            out["same_answer"] = full.text == result.text
        if run.json:
            print_json(out)
        else:
            screen.report(stats)
            if compare:
                _say_comparison(screen, stats, full.text, result.text)


def _say_comparison(screen: Screen, stats, full: str, compressed: str) -> None:
    kept = 100 * stats.kv_bytes_kept / stats.kv_bytes_full if stats.kv_bytes_full else 100.0
    verdict = "same answer" if full == compressed else "a different answer"
    screen.note(f"full cache answered: {full}")
    screen.note(f"kept {kept:.1f}%: {stats.kv_bytes_kept / 2**20:.1f} of {stats.kv_bytes_full / 2**20:.1f} MiB, {verdict}")


def _saved(reader, path: str, run: RunOptions, screen: Screen, method, options):
    """(prefix, method, mode) for `--cache path`: a compressed prefix answers with the method it was
    compressed with (prefix set); a full one compresses each question with this run's method (mode set)."""
    from ..methods import make_method
    from ..reading import saved_prefix

    saved = load_saved(reader, path)
    if saved.kind == "full":
        return None, method, saved_read_once(reader, saved, path, options, method, screen)
    method = make_method(saved.meta["method"], **saved.meta.get("method_params", {}))
    ignored = [flag for flag, name in (("--method", "method"), ("--ratio", "ratio"), ("--budget", "budget"), ("--chunk-size", "chunk_size"), ("--param", "param")) if name in run.given]
    if ignored:
        screen.warn(f"{', '.join(ignored)} ignored: {path} was compressed with {method.name} when it was saved")
    screen.warn(f"{path} was compressed without knowing the questions: specific facts are often lost (docs/results.md); `kvcli read` saves a cache that answers query-aware")
    return saved_prefix(reader, saved, method), method, None


@user_errors
@shared(MODEL, COMPRESSION, GENERATION, OUTPUT)
def ask(
    args: Annotated[Optional[list[str]], typer.Argument(help="Files, folders or - (stdin), then the question (unless -q is used). With piped stdin, the question alone.", show_default=False, metavar="PATHS... QUESTION")] = None,
    question: Annotated[Optional[list[str]], typer.Option("--question", "-q", metavar="TEXT", help="A question; repeat for several (then every argument is a document).", show_default=False)] = None,
    cache: CacheOpt = None,
    reuse: Annotated[bool, typer.Option("--reuse", help="Compress the documents once, question-agnostic, and answer every question from that cache (cheaper, but keeps specific facts far less well).")] = False,
    compare: Annotated[bool, typer.Option("--compare", help="Also answer from the full cache (one shared prefill) and say whether the answers agree.")] = False,
    scorer: ScorerOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    *,
    run: RunOptions,
) -> None:
    """Answer a question about documents, streaming the answer; report what the cache kept on stderr.

    Examples: kvcli ask report.pdf "What did the audit find?" --ratio 0.05;
    kvcli ask src/ -q "Where is the retry logic?" -q "What are its limits?";
    cat notes.txt | kvcli ask "Who objected?"
    """
    from ..reading.prefix import pick_scorer

    files, questions = split_arguments(list(args or []), question, cache)
    if scorer is not None and not reuse:
        raise InputError("--scorer ranks a question-agnostic cache's tokens; add --reuse or drop --scorer")
    scorer = pick_scorer(scorer, run.make_method(), run.chunk_size)
    answer_all(files, questions, run, cache=cache, reuse=reuse, compare=compare, include=include or (), exclude=exclude or (), scorer=scorer)


@user_errors
@shared(MODEL, COMPRESSION, GENERATION, OUTPUT, max_new_tokens=400)
def summarize(
    files: Annotated[Optional[list[str]], typer.Argument(help="Files, folders or - (stdin).", show_default=False, metavar="PATHS...")] = None,
    length: Annotated[str, typer.Option("--length", metavar="short|medium|long", help="How long the summary is.")] = "medium",
    focus: Annotated[Optional[str], typer.Option("--focus", metavar="TEXT", help="What the summary should concentrate on.", show_default=False)] = None,
    past: Annotated[str, typer.Option("--past", metavar="sections|compressed", help="Documents longer than the model's positions: summarize each section, then the summaries (sections: the better summaries measured, about 4x slower), or read them whole in one compressed, re-indexed read, the instruction probing every chunk (compressed; docs/results.md).")] = "sections",
    cache: CacheOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    *,
    run: RunOptions,
) -> None:
    """Summarize documents, streaming the summary; report what the cache kept on stderr.

    Examples: kvcli summarize paper.pdf --length short; kvcli summarize --cache paper.kvc
    """
    from ..prompt import summary_instruction

    instruction = summary_instruction(length, focus)
    if past not in ("sections", "compressed"):
        raise InputError(f"--past must be sections or compressed, got {past!r}")
    files = list(files or [])
    refuse_questions_as_documents(files, 'summarize takes no question: steer it with --focus "TEXT", or use kvcli ask')
    if cache and files:
        raise InputError("give documents or --cache, not both")
    if not files and not cache:
        if not stdin_is_piped():
            raise InputError("give the documents to summarize, or --cache FILE.kvc")
        files = ["-"]
    answer_all(files, [instruction], run, cache=cache, include=include or (), exclude=exclude or (), past=past)


__all__ = ["answer_all", "ask", "refuse_questions_as_documents", "split_arguments", "summarize"]
