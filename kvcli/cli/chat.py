"""`kvcli chat`: a session over documents read once; each question typed is compressed
query-aware from that read, keeping what a one-pass `kvcli ask` keeps, and answered."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ..defaults import DEFAULT_SOURCES
from ..errors import InputError, KvcliError
from .ask import ExcludeOpt, IncludeOpt, answer_line, refuse_questions_as_documents
from .options import COMPRESSION, GENERATION, MODEL, OUTPUT, SKIM, RunOptions, shared
from .output import Screen, print_json, say, user_errors
from .read import check_target, save_full_prefix
from .session import load_saved, prepare, saved_read_once, start, stdin_is_piped, warn_prompt
from .sources import SourcesOpt, check_count

if TYPE_CHECKING:  # torch, imported only when a command runs
    from ..methods import Budget

PROMPT = "kvcli> "

COMMANDS = """\
A line starting with / is a command; any other line is a question about the documents.
  /method NAME [KEY=VALUE ...]  compress with another method (and knobs, e.g. window_size=16)
  /ratio R                      keep this fraction of the prompt's KV entries, in (0, 1]
  /budget N                     keep N tokens per layer on average, window included
  /stats                        the full report of the last answer
  /save FILE.kvc                save the documents' full cache, for `kvcli chat --cache` or `kvcli ask --cache`
  /sources [N]                  the N passages (default 3) the last answer drew on: document, page or lines, text
  /help                         this list
  /exit                         leave (as Ctrl-D does); Ctrl-C stops an answer"""


class Chat:
    """One session: how the documents are read (a `reading.policy.Mode`: their full prefix read
    once, or past the model's positions read again for every question, in chunks with re-indexed
    positions, as `kvcli ask` does), the method and budget now chosen, and the report of the last
    answer. Every question is independent of the others."""

    def __init__(self, reader, mode, method, options, run: RunOptions, screen: Screen, doc, text: str | None, source: str,
                 sources: int | None = None) -> None:
        self.reader = reader
        self.mode = mode
        self.method = method
        self.options = options  # as checked at the start; the budget changes through /ratio and /budget
        self.budget: Budget = options.budget
        self.window = run.window  # --window: the window of a method chosen with /method unless it says otherwise
        self.screen = screen
        self.doc = doc  # what /save records as the sources
        self.text = text  # the documents' text, to read them again; None when started from a .kvc
        self.source = source  # the documents or the .kvc file, for messages
        self.last = None  # stats.RunStats of the last answer
        self.sources = sources  # --sources: cite every answer with this many passages; None: only on /sources
        self.last_answer = None  # (question, method, budget, reading.Answer, its watch or None), for /sources
        self.answer_ended = False  # the answer being shown has had its line end

    def handle(self, line: str, interactive: bool) -> bool:
        """Answer a question or run a command; False when the session ends.

        A user error is one line and the session goes on. Interactively, Ctrl-C cancels what is
        running (an answer, a new read): each question decodes from a fork of the prefix, and a
        new read replaces the prefix only once it is complete, so nothing is left half-changed.
        """
        line = line.strip()
        if not line:
            return True
        self.answer_ended = False
        try:
            if line.startswith("/"):
                return self.command(line)
            self.ask(line)
        except KvcliError as exc:
            say(f"kvcli: error: {exc}")
        except KeyboardInterrupt:
            if not interactive:
                raise
            # the terminal echoed ^C where the cursor was: after the answer so far, or on a line of its own
            say("(cancelled)" if self.answer_ended else "\n(cancelled)")
        return True

    def ask(self, question: str) -> None:
        """Stream the answer to stdout, then one line on stderr: what was kept, speed, why it stopped."""
        from ..prompt import check_question
        from ..reading import add_answer, answer, run_stats
        from ..reading.cite import watcher

        from .ask import _bar

        check_question(question)
        began = time.perf_counter()
        self.mode.check(question, self.method, self.budget)
        with _bar(self.screen, self.mode.bar, self.reader.num_layers) as progress:
            reading = self.mode.read(question, self.method, self.budget, **progress)
        stats = run_stats(self.reader, reading)
        watch = watcher(self.reader, reading) if self.sources else None
        try:
            result = answer(self.reader, reading, self.options, on_text=self.screen.stream(), started=began, watch=watch)
        finally:
            self.screen.end_answer()
            self.answer_ended = True
        self.last = add_answer(stats, self.reader, result)
        self.last_answer = (question, self.method, self.budget, result, watch)
        out = {"question": question, "answer": result.text, "stats": stats.to_dict()}
        cited = self.cite(reading, watch, self.sources) if self.sources else None
        if cited is not None:
            out["sources"] = [passage.to_dict() for passage in cited]
        if self.screen.json:  # one object per answer, as `kvcli ask --json` prints (scripts drive chat this way)
            print_json(out)
            return
        if not self.screen.quiet:
            say(answer_line(stats, self.method, self.budget))
        if cited is not None:
            self.screen.sources(cited)

    def cite(self, reading, watch, count: int) -> list:
        from .ask import cite_answer

        return cite_answer(self.mode, reading, self.doc, watch, count)

    def show_sources(self, arg: str) -> None:
        """/sources [N]: the last answer's passages; an answer decoded unwatched is fed again, watched,
        after its question read again (one step over the prefix when the documents were read once)."""
        from ..reading.cite import rewatch
        from .ask import _bar

        if self.last_answer is None:
            raise InputError("no answer yet; ask a question first")
        if arg and not arg.isdigit():
            raise InputError(f"/sources takes the number of passages to show, got {arg!r}")
        count = int(arg) if arg else DEFAULT_SOURCES
        check_count(count)
        question, method, budget, result, watch = self.last_answer
        prepare(self.reader, method, self.screen, why="/sources")
        with _bar(self.screen, self.mode.bar, self.reader.num_layers) as progress:
            reading = self.mode.read(question, method, budget, **progress)
        if watch is None:
            watch = rewatch(self.reader, reading, result)
        cited = self.cite(reading, watch, count)
        if self.screen.json:
            print_json({"question": question, "sources": [passage.to_dict() for passage in cited]})
        else:
            self.screen.sources(cited)

    def command(self, line: str) -> bool:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name == "/exit":
            return False
        actions = {"/method": self.set_method, "/ratio": self.set_ratio, "/budget": self.set_budget,
                   "/stats": self.show_stats, "/save": self.save, "/sources": self.show_sources, "/help": lambda _: say(COMMANDS)}
        if name not in actions:
            raise InputError(f"unknown command {name}; /help lists the commands")
        actions[name](arg)
        return True

    def set_method(self, arg: str) -> None:
        from ..methods import configure, method_names

        words = arg.split()
        if not words:
            say(f"method {_method_label(self.method)}; choose one of: {', '.join(method_names())}")
            return
        method = configure([words[0]], words[1:], self.window)[0]
        self._check(method, self.budget)
        prepare(self.reader, method, self.screen)
        self.fit(method)
        self.method = method
        say(f"method {_method_label(method)}")

    def set_ratio(self, arg: str) -> None:
        from ..methods import Budget

        self._set_budget(arg, "/ratio R, a fraction in (0, 1], e.g. /ratio 0.2", float, lambda value: Budget(ratio=value, min_keep=self.budget.min_keep))

    def set_budget(self, arg: str) -> None:
        from ..methods import Budget

        self._set_budget(arg, "/budget N, tokens kept per layer, e.g. /budget 256", int, lambda value: Budget(tokens=value, min_keep=self.budget.min_keep))

    def _set_budget(self, arg: str, usage: str, kind: type, make) -> None:
        if not arg:
            say(f"{self.budget.label}; change it with {usage}")
            return
        try:
            value = kind(arg)
        except ValueError:
            raise InputError(f"expected {usage}, got {arg!r}") from None
        budget = make(value)
        self._check(self.method, budget)
        self.budget = budget
        say(budget.label)

    def _check(self, method, budget: Budget) -> None:
        """The checks --method, --ratio and --budget get at the start."""
        dataclasses.replace(self.options, budget=budget).check(method)

    def fit(self, method) -> None:
        """Make sure the prefix holds what `method` scores by (its window, all-query scores):
        read the documents again if not, or refuse where there are only a .kvc's."""
        if self.mode.name == "skim":
            return  # each question is skimmed from the documents themselves
        if self.once is None:
            if not method.compresses:
                raise InputError(f"the documents are longer than the {self.reader.context_limit(self.options):,} positions the model reads, "
                                 "and method full keeps every token: choose a compressing method")
            return
        if method.compresses and not self.once.can_answer(method):
            self._read_again(method)

    @property
    def once(self):
        """The documents' full prefix (a `reading.ReadOnce`), or None past the model's positions."""
        return getattr(self.mode, "once", None)

    def _read_again(self, method) -> None:
        from ..reading import ReadOnce
        from ..reading.policy import QUESTION_ROOM, Once

        once = self.once
        needs, fixes = [], []
        if method.window_size > once.window_size:
            needs.append(f"a {method.window_size}-token window")
            fixes.append(f"window_size={once.window_size} or less")
        if method.needs_accumulated and not once.accumulated:
            needs.append("all-query scores")
            fixes.append("a .kvc saved by `kvcli read --all-query-scores`")
        if self.text is None:
            raise InputError(f"{method.name} needs {' and '.join(needs)}, which {self.source} was read without; "
                             f"use {' and '.join(fixes)}, or chat about the documents themselves")
        say(f"kvcli: {method.name} needs {' and '.join(needs)}: reading the documents again")
        again = ReadOnce(self.reader, self.text, self.options, window_size=max(once.window_size, method.window_size),
                         accumulated=once.accumulated or method.needs_accumulated, longest_question=QUESTION_ROOM)
        with self.screen.layers(self.reader.num_layers, "reading again") as on_layer:
            again.read_prefix(on_layer)
        self.mode = Once(again)  # only now: a cancelled read leaves the session as it was

    def show_stats(self, _: str) -> None:
        if self.last is None:
            raise InputError("no answer yet; ask a question first")
        self.screen.report(self.last)

    def save(self, arg: str) -> None:
        if not arg:
            raise InputError("give the file: /save FILE.kvc")
        if self.mode.name == "skim":
            raise InputError("--skim reads the documents again for each question, so there is no full cache to save; start chat without --skim to /save")
        if self.once is None:
            raise InputError("the documents are longer than the model's positions, so there is no full cache to save; "
                             "`kvcli compress FILES -o FILE.kvc` saves a compressed one")
        target = check_target(str(Path(arg).expanduser()), "/save")
        written = save_full_prefix(target, self.reader, self.once, self.doc, self.options.system)
        say(f"saved {target} ({written / 2**20:.1f} MiB, the full cache); later: kvcli chat --cache {target}")


def _method_label(method) -> str:
    params = ", ".join(f"{k}={v}" for k, v in method.params().items())
    return f"{method.name} ({params})" if params else method.name


def typed_lines():
    """Lines typed at the terminal, with line editing and in-memory history where the stdlib
    readline exists. Ctrl-C clears the line; Ctrl-D ends the session."""
    on_terminal = sys.stdout.isatty()
    if on_terminal:
        try:
            import readline  # noqa: F401  (input() edits lines and keeps history once it is imported)
        except ImportError:
            pass
    prompt_to = sys.stdout if on_terminal else sys.stderr  # a redirected stdout holds only answers
    while True:
        try:
            if on_terminal:
                line = input(PROMPT)  # readline draws the prompt, so it must know it
            else:
                prompt_to.write(PROMPT)
                prompt_to.flush()
                line = input()
        except KeyboardInterrupt:
            prompt_to.write("\n")
            continue
        except EOFError:
            prompt_to.write("\n")
            return
        yield line


def piped_lines():
    """Lines read from piped stdin, to its end."""
    for line in sys.stdin:
        yield line.rstrip("\n")


def _saved_full(reader, path: str, options, method, screen: Screen):
    """(ReadOnce, sources) for `--cache path`: a .kvc of kind full, as `kvcli read` or /save write it."""
    saved = load_saved(reader, path)
    if saved.kind != "full":
        raise InputError(f"{path} is compressed, and chat compresses each question itself; save the full cache with `kvcli read FILES -o {path}`")
    # /save writes the sources it was read from again (name, page, sha256 are what it records)
    sources = SimpleNamespace(sources=[SimpleNamespace(**source) for source in saved.meta.get("sources", [])])
    return saved_read_once(reader, saved, path, options, method, screen), sources


@user_errors
@shared(MODEL, COMPRESSION, SKIM, GENERATION, OUTPUT)
def chat(
    files: Annotated[Optional[list[str]], typer.Argument(help="Files or folders.", show_default=False, metavar="PATHS...")] = None,
    cache: Annotated[Optional[str], typer.Option("--cache", metavar="FILE.kvc", help="Start from a full cache saved by `kvcli read` or /save instead of reading documents.", show_default=False)] = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    sources: SourcesOpt = None,
    *,
    run: RunOptions,
) -> None:
    """Ask questions about documents in a session: they are read once, then each question typed
    is compressed query-aware from that read (keeping what `kvcli ask` keeps) and answered.
    Documents longer than the model's positions are read again for each question, in chunks
    with re-indexed positions, as `kvcli ask` reads them (slower: no read is shared).

    Answers stream to stdout; after each, one line on stderr says how much of the KV cache was
    kept, the decode speed and why the answer stopped. The prompt (`kvcli> `) is on stdout when
    stdout is the terminal, else on stderr, so a redirected stdout holds only the answers. Line
    editing and history (kept in memory only) need stdin and stdout on the terminal.

    Commands: /method NAME [KEY=VALUE ...] (reads the documents again when the method needs
    it), /ratio R, /budget N, /stats (the last answer's full report), /save FILE.kvc, /sources [N]
    (the passages the last answer drew on; --sources shows them after every answer), /help, /exit. Ctrl-C stops an answer, Ctrl-D leaves. With piped stdin every line is a question (or
    a command), answered in turn, and the session ends with the input; with --json each answer
    is one JSON object on stdout, as `kvcli ask --json` prints.

    Examples: kvcli chat report.pdf --ratio 0.05; kvcli chat --cache report.kvc;
    printf 'Q1\\nQ2\\n' | kvcli chat notes.txt
    """
    from ..reading.policy import QUESTION_ROOM, choose

    check_count(sources)
    files = list(files or [])
    refuse_questions_as_documents(files, "chat asks its questions at the kvcli> prompt (or one a line on piped stdin); give only the documents")
    if cache and files:
        raise InputError("give documents or --cache, not both")
    if not files and not cache:
        raise InputError("give the documents to ask about: kvcli chat FILE..., or --cache FILE.kvc")
    if "-" in files:
        raise InputError("chat reads its questions from stdin, so the documents cannot come from it; save them to a file, or `kvcli read - -o doc.kvc` and `kvcli chat --cache doc.kvc`")
    if run.chunk_size is not None:
        raise InputError("chat reads the documents once in full and compresses each question from that read; leave out --chunk-size")
    if run.skim and cache:
        raise InputError("--skim reads the documents for each question, and a saved cache was read already: drop --skim or --cache")
    started = start(run, None if cache else files, include or (), exclude or ())
    screen, method, options, doc, reader = started.screen, started.method, started.options, started.doc, started.reader
    saved = None
    if cache:
        saved, doc = _saved_full(reader, cache, options, method, screen)
        if sources and saved.source_map is None:
            raise InputError(f"{cache} was saved without what maps its positions back to the documents; read them again to use --sources")
    mode = choose(reader, None if cache else doc.text, options, method, None, saved=saved)
    if (prompt := mode.prompt(QUESTION_ROOM)) is not None:
        mode.check(QUESTION_ROOM, method)
        warn_prompt(reader, options, prompt, screen, method)
    if mode.preparing:
        with screen.layers(reader.num_layers, "reading") as on_layer:
            mode.prepare(on_layer)
    interactive = not stdin_is_piped()
    if sources:
        prepare(reader, method, screen, why="--sources")
    session = Chat(reader, mode, method, options, run, screen, doc, None if cache else doc.text, cache or " ".join(files), sources)
    session.fit(method)  # a .kvc may lack what --method scores by
    if interactive and mode.name == "skim":
        screen.note("each question skims the documents (--skim); ask a question, /help lists the commands, Ctrl-D leaves")
    elif interactive and session.once is None:
        tokens = len(mode.prompt(QUESTION_ROOM))
        screen.note(f"the documents are {tokens:,} tokens, past the {reader.context_limit(options):,} positions the model reads: "
                    "each question reads them again in chunks; ask a question, /help lists the commands, Ctrl-D leaves")
    elif interactive:
        prefix = session.once.read_prefix().state
        read = f"read {prefix.prompt_len} tokens in {prefix.seconds:.1f}s" if not cache else f"loaded {cache} ({prefix.prompt_len} tokens)"
        screen.note(f"{read}; ask a question, /help lists the commands, Ctrl-D leaves")
    for line in typed_lines() if interactive else piped_lines():
        if not session.handle(line, interactive):
            break


__all__ = ["chat"]
