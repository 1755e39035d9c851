"""`kvcli ask` and `kvcli summarize`: answer questions about documents, streaming the answer."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from typing import Annotated, Optional

import typer

from ..defaults import DEFAULT_SCORER
from ..errors import InputError, shorten
from .options import COMPRESSION, GENERATION, MODEL, OUTPUT, SKIM, RunOptions, shared
from .output import Screen, print_json, user_errors
from .session import load_saved, prepare, saved_read_once, start, stdin_is_piped, warn_prompt
from .sources import SourcesOpt, check_count

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
               past: str = "compressed", sources: int | None = None) -> None:
    """Answer each question, read as `reading.policy.choose` decides (query-aware by default).

    One question: its answer on stdout, the report on stderr. Several: each answer in a
    `Q: ...` / `A: ...` block on stdout (docs/cli.md), one short line per answer on stderr,
    then one report of the read. With `sources` (a count), the passages each answer drew on
    follow it on stderr (in `--json`, its "sources").
    """
    from ..reading import add_answer, answer, run_stats
    from ..reading.cite import watcher
    from ..reading.policy import choose

    check_count(sources)
    if compare and (cache or reuse):
        raise InputError("--compare reads query-aware; drop --cache or --reuse")
    if run.skim and (cache or reuse):
        raise InputError(f"--skim reads the documents for each question; {'a saved cache was read already' if cache else '--reuse reads them without the questions'}: drop --skim or {'--cache' if cache else '--reuse'}")
    agnostic = run.agnostic_method() if reuse and scorer == "repeat" else None  # checked before anything slow
    started = start(run, None if cache else files, include, exclude, agnostic)
    screen, method, options, doc, reader = started.screen, started.method, started.options, started.doc, started.reader
    saved = None
    if cache:
        saved, method = _saved(reader, cache, run, screen, method, options, sources)
    elif reuse:
        screen.warn("--reuse chooses what to keep without the questions: specific facts are often lost (docs/results.md); leave it out to read query-aware")
    if sources:
        prepare(reader, method, screen, why="--sources")
    mode = choose(reader, None if cache else doc.text, options, method, questions, reuse=reuse, compare=compare,
                  saved=saved, past=past, scorer=scorer, agnostic=agnostic)
    method = mode.method or method  # a reused prefix's: the agnostic default's where the repeat ranks it
    several, first = len(questions) > 1, None
    for index, question in enumerate(questions):
        mode.check(question, method)
        if (prompt := mode.prompt(question)) is not None and index == 0:
            warn_prompt(reader, options, prompt, screen, method)
        if index == 0 and mode.note(question):
            screen.note(mode.note(question))
        if mode.preparing:
            with screen.layers(reader.num_layers, mode.preparing) as on_layer:
                mode.prepare(on_layer)
        began = time.perf_counter()  # a shared read is charged to the first answer by its reading (`charged_s`)
        with _bar(screen, mode.bar, reader.num_layers) as progress:
            reading = mode.read(question, method, **progress)
        stats = run_stats(reader, reading)
        stats.extra.update(mode.extra)
        if doc is not None and doc.encodings:
            stats.extra["encodings"] = doc.encodings
        if "prefix" in stats.extra:
            stats.extra["prefix"]["questions"] = len(questions)
        if several and not run.json:
            sys.stdout.write(("\n" if index else "") + f"Q: {question}\nA: ")
        watch = watcher(reader, reading) if sources else None
        try:
            result = answer(reader, reading, options, on_text=screen.stream(), started=began, watch=watch)
        finally:
            screen.end_answer()
        add_answer(stats, reader, result)
        out = {"question": question, "answer": result.text, "stats": stats.to_dict()}
        if sources:
            cited = cite_answer(mode, reading, doc, watch, sources)
            out["sources"] = [passage.to_dict() for passage in cited]
            screen.sources(cited, f"Q{index + 1} " if several else "")
        if compare:
            full = answer(reader, mode.full(), options)
            out["full_cache_answer"] = full.text
            out["same_answer"] = full.text == result.text
            if mode.full_label != "full cache":
                out["full_cache_read"] = mode.full_label
        if run.json:
            print_json(out)
            continue
        if several:
            screen.note(answer_line(stats, reading.method, options.budget, f"Q{index + 1}: "))
            first = first or stats
            if index == len(questions) - 1:
                screen.report(first)  # the read's report once: the first answer's, which paid for the shared read
        else:
            screen.report(stats)
        if compare:
            _say_comparison(screen, stats, mode.full_label, full.text, result.text)


def check_source_map(saved, path: str) -> None:
    """Refuse --sources on a `.kvc` saved without the map back to its documents (kvcli before --sources)."""
    from ..reading.cite import saved_source_map

    if saved_source_map(saved) is None:
        raise InputError(f"{path} was saved without what maps its positions back to the documents; read or compress them again to use --sources")


def cite_answer(mode, reading, doc, watch, count: int) -> list:
    """The `count` passages the watched answer drew on (`reading.cite`)."""
    from ..reading.cite import cite

    source_map = mode.source_map(reading, doc)
    if source_map is None:
        raise InputError("this cache was saved without what maps its positions back to the documents; read or compress them again to use --sources")
    return cite(source_map, watch, count)


@contextlib.contextmanager
def _bar(screen: Screen, bar: str, num_layers: int):
    """The keyword arguments that report a mode's progress (`Mode.bar`) to a bar on the screen."""
    if bar == "layers":
        with screen.layers(num_layers) as on_layer:
            yield {"on_layer": on_layer}
    elif bar == "sections":
        with screen.progress("summarizing", "sections") as update:
            yield {"on_section": lambda done, total: update(done, total)}
    else:
        yield {}


def answer_line(stats, method, budget, lead: str = "") -> str:
    """One line about an answer: the share of the KV cache kept, time, decode speed, why it stopped."""
    kept = 100 * stats.kv_bytes_kept / stats.kv_bytes_full if stats.kv_bytes_full else 100.0
    line = lead + (f"({method.name}, {budget.label}) " if method.compresses else f"({method.name}) ")
    line += f"kept {kept:.1f}% of the KV cache ({stats.kv_bytes_kept / 2**20:.1f} of {stats.kv_bytes_full / 2**20:.1f} MiB)"
    if not stats.compressed:
        line += f", not compressed: {stats.note}"
    if stats.ttft_s is not None:
        line += f", {stats.ttft_s + stats.decode_s:.1f}s"
    if stats.decode_tokens_per_s:
        line += f", {stats.decode_tokens_per_s:.1f} tokens/s"
    stopped = "--max-new-tokens" if stats.stopped == "max_new_tokens" else "the end of sequence"
    return line + f", {stats.decode_tokens} tokens, stopped at {stopped}"


def _say_comparison(screen: Screen, stats, label: str, full: str, compressed: str) -> None:
    kept = 100 * stats.kv_bytes_kept / stats.kv_bytes_full if stats.kv_bytes_full else 100.0
    verdict = "same answer" if full == compressed else "a different answer"
    screen.note(f"{label} answered: {full}")
    screen.note(f"kept {kept:.1f}%: {stats.kv_bytes_kept / 2**20:.1f} of {stats.kv_bytes_full / 2**20:.1f} MiB, {verdict}")


def _saved(reader, path: str, run: RunOptions, screen: Screen, method, options, sources: int | None = None):
    """(saved, method) for `--cache path`: a compressed prefix (a `reading.Prefix`) answers with the
    method it was compressed with; a full one (a `reading.ReadOnce`) compresses each question with this run's.
    With `sources`, a file saved without the map back to its documents is refused before any answer."""
    from ..methods import make_method
    from ..reading import saved_prefix

    saved = load_saved(reader, path)
    if sources:
        check_source_map(saved, path)
    if saved.kind == "full":
        return saved_read_once(reader, saved, path, options, method, screen), method
    method = make_method(saved.meta["method"], **saved.meta.get("method_params", {}))
    ignored = run.given_flags("method", "ratio", "budget", "chunk_size", "param", "min_keep")
    if ignored:
        screen.warn(f"{', '.join(ignored)} ignored: {path} was compressed with {method.name} when it was saved")
    screen.warn(f"{path} was compressed without knowing the questions: specific facts are often lost (docs/results.md); `kvcli read` saves a cache that answers query-aware")
    return saved_prefix(reader, saved, method), method


@user_errors
@shared(MODEL, COMPRESSION, SKIM, GENERATION, OUTPUT)
def ask(
    args: Annotated[Optional[list[str]], typer.Argument(help="Files, folders or - (stdin), then the question (unless -q is used). With piped stdin, the question alone.", show_default=False, metavar="PATHS... QUESTION")] = None,
    question: Annotated[Optional[list[str]], typer.Option("--question", "-q", metavar="TEXT", help="A question; repeat for several (then every argument is a document).", show_default=False)] = None,
    cache: CacheOpt = None,
    reuse: Annotated[bool, typer.Option("--reuse", help="Compress the documents once, question-agnostic, and answer every question from that cache (cheaper, but keeps specific facts far less well).")] = False,
    compare: Annotated[bool, typer.Option("--compare", help="Also answer from a full cache and say whether the answers agree: the compressed answer is a plain ask's; past the model's positions the full cache is of the documents cut in the middle to fit.")] = False,
    scorer: ScorerOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    sources: SourcesOpt = None,
    *,
    run: RunOptions,
) -> None:
    """Answer a question about documents, streaming the answer; report what the cache kept on stderr.

    Examples: kvcli ask report.pdf "What did the audit find?" --ratio 0.05;
    kvcli ask src/ -q "Where is the retry logic?" -q "What are its limits?";
    cat notes.txt | kvcli ask "Who objected?"; kvcli ask report.pdf "Who signed?" --sources
    """
    check_count(sources)
    files, questions = split_arguments(list(args or []), question, cache)
    if scorer is not None and not reuse:
        raise InputError("--scorer ranks a question-agnostic cache's tokens; add --reuse or drop --scorer")
    from ..reading.prefix import pick_scorer  # after the arguments' checks: it imports transformers

    # a question-agnostic read checks --param against the method that reads with them
    scorer = run.agnostic_scorer(scorer)[0] if reuse else pick_scorer(scorer, run.make_method(), run.chunk_size)
    answer_all(files, questions, run, cache=cache, reuse=reuse, compare=compare, include=include or (), exclude=exclude or (), scorer=scorer,
               sources=sources)


@user_errors
@shared(MODEL, COMPRESSION, SKIM, GENERATION, OUTPUT, max_new_tokens=400)
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


__all__ = ["answer_all", "answer_line", "ask", "refuse_questions_as_documents", "split_arguments", "summarize"]
