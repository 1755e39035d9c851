"""`kvcli chat` driven through a real pseudo-terminal (pexpect) and through piped stdin, on a tiny
random Llama saved in the test: its answers are `kvcli ask`'s, Ctrl-C cancels an answer without
harming the next one, and the commands change what the next answer keeps."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
from test_models import save_tiny_llama
from typer.testing import CliRunner

from kvcli.cli import app

PROMPT = "kvcli> "
FLAGS = ["--method", "snapkv", "--temperature", "0"]
QUESTIONS = ["w1?", "w2 w3?", "w4 w5?"]
# the line on stderr after each answer: "(snapkv, ratio 0.1) kept 10.0% of the KV cache (...), ..."
SUMMARY = r"\((\w+)(?:, (?:ratio|budget) [\d.]+(?:, min-keep \d+)?)?\) kept (\d+\.\d)% of the KV cache[^\r\n]*\r\n"
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")  # colours, cursor moves, bracketed paste


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A folder with a two-layer random Llama (tiny/), a 300-word document (doc.txt) and KVCLI_HOME (home/)."""
    folder = tmp_path_factory.mktemp("chat")
    save_tiny_llama(folder / "tiny", max_positions=1024)
    (folder / "doc.txt").write_text(" ".join(f"w{(7 * i) % 60}" for i in range(300)))
    return folder


def ask(folder: Path, question: str, *flags: str, cache: str | None = None) -> str:
    """`kvcli ask doc.txt QUESTION --json`'s answer (`--cache` instead of the document if given), run in this process."""
    env = {"KVCLI_HOME": str(folder / "home"), "KVCLI_METHOD": None, "KVCLI_MODEL": None, "KVCLI_DEVICE": None}
    where = ["--cache", str(folder / cache)] if cache else [str(folder / "doc.txt")]
    result = CliRunner().invoke(app, ["ask", *where, question, "-m", str(folder / "tiny"), *FLAGS, *flags, "--json"], env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["answer"].strip()


def environment(folder: Path) -> dict:
    env = {name: value for name, value in os.environ.items() if not name.startswith("KVCLI_") or name == "KVCLI_CPU_BF16"}  # the suite's pinned CPU (conftest.py)
    return {**env, "KVCLI_HOME": str(folder / "home"), "OMP_NUM_THREADS": "1"}


def chat_args(folder: Path, *flags: str) -> list[str]:
    return ["-m", "kvcli", "chat", str(folder / "doc.txt"), "-m", str(folder / "tiny"), *FLAGS, *flags]


def plain(text: str) -> str:
    return ESCAPES.sub("", text).replace("^C", "")


class Terminal:
    """`kvcli chat` on a pseudo-terminal (stdin, stdout and stderr all on it, as for a person)."""

    def __init__(self, folder: Path, *flags: str) -> None:
        self.child = pexpect.spawn(sys.executable, chat_args(folder, *flags), cwd=str(folder), env=environment(folder),
                                   encoding="utf-8", dimensions=(24, 250), timeout=60)
        self.child.expect_exact(PROMPT)

    def ask(self, question: str) -> tuple[str, float]:
        """(the answer, the kept % from its summary line), once the prompt is back."""
        self.child.sendline(question)
        self.child.expect(SUMMARY)
        echoed, _, answer = plain(self.child.before).partition("\n")  # the terminal echoes the question first
        assert question.startswith("\x1b") or echoed.endswith(question), echoed
        kept = float(self.child.match.group(2))
        self.child.expect_exact(PROMPT)
        return answer.strip(), kept

    def command(self, line: str) -> str:
        """What a command printed before the prompt came back."""
        self.child.sendline(line)
        self.child.expect_exact(PROMPT)
        return plain(self.child.before).partition("\n")[2]

    def leave(self, line: str | None) -> int:
        """Send `line` (None: Ctrl-D) and return the exit status."""
        if line is None:
            self.child.sendeof()
        else:
            self.child.sendline(line)
        self.child.expect(pexpect.EOF)
        self.child.close()
        return self.child.exitstatus


@pytest.fixture(scope="module")
def short(folder) -> dict:
    """One session of 6-token answers: three questions, /ratio 0.3 and one more, an unknown command,
    /method h2o and a question, /save, /exit; what each step showed."""
    seen: dict = {}
    term = Terminal(folder, "--max-new-tokens", "6", "--min-keep", "0")  # the bare ratio: a short document compresses
    seen["answers"], seen["kept"] = zip(*(term.ask(q) for q in QUESTIONS))
    seen["recalled"] = term.ask("\x1b[A")[0]  # the up arrow recalls the last question
    seen["ratio"] = term.command("/ratio 0.3")
    seen["after_ratio"] = term.ask(QUESTIONS[0])
    seen["unknown"] = term.command("/nonsense 3")
    seen["method"] = term.command("/method h2o")
    seen["h2o"] = term.ask(QUESTIONS[1])
    seen["save"] = term.command("/save x.kvc")
    seen["exit"] = term.leave("/exit")
    return seen


@pytest.fixture(scope="module")
def long(folder) -> dict:
    """One session of 400-token answers: Ctrl-C as the first answer starts, the same question again,
    Ctrl-C at the prompt over typed text, a second question, Ctrl-D; what each step showed."""
    seen: dict = {}
    term = Terminal(folder, "--max-new-tokens", "400")
    child = term.child
    child.sendline(QUESTIONS[0])
    child.expect_exact(QUESTIONS[0] + "\r\n")  # the echo, then the answer
    child.expect(r"w\d+")
    first = child.after
    child.sendintr()
    child.expect_exact("(cancelled)")
    seen["partial"] = plain(first + child.before).strip()
    child.expect_exact(PROMPT)
    seen["again"] = term.ask(QUESTIONS[0])[0]
    child.send("w9 w9 w9")
    child.expect_exact("w9 w9 w9")
    child.sendintr()
    child.expect_exact(PROMPT)
    seen["after_clear"] = term.ask(QUESTIONS[1])[0]
    seen["exit"] = term.leave(None)
    return seen


def test_answers_equal_ask(folder, short):
    """Three questions in one session get the answers `kvcli ask` gives each alone."""
    assert list(short["answers"]) == [ask(folder, q, "--max-new-tokens", "6", "--min-keep", "0") for q in QUESTIONS]
    assert all(answer for answer in short["answers"])


def test_up_arrow_recalls_the_last_question(short):
    """Line editing keeps the session's questions: the up arrow and Enter ask the last one again."""
    pytest.importorskip("readline")
    assert short["recalled"] == short["answers"][-1]


def test_ratio_changes_what_the_next_answer_keeps(folder, short):
    """/ratio 0.3 triples the kept share in the next summary line, and that answer is `ask --ratio 0.3`'s."""
    assert "ratio 0.3" in short["ratio"]
    assert short["kept"][0] == pytest.approx(10, abs=2)  # 10% of the document, and the question kept whole
    answer, kept = short["after_ratio"]
    assert kept == pytest.approx(30, abs=2)
    assert answer == ask(folder, QUESTIONS[0], "--max-new-tokens", "6", "--ratio", "0.3")


def test_unknown_command_is_one_line_and_the_session_goes_on(short):
    """An unknown command prints one error line; the commands after it still run."""
    lines = [line for line in short["unknown"].splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvcli: error: unknown command /nonsense"), lines
    assert "saved" in short["save"]


def test_method_needing_all_query_scores_reads_again(folder, short):
    """/method h2o says in one line that the document is read again, then answers as `ask --method h2o` does."""
    assert "reading the documents again" in short["method"]
    answer, _ = short["h2o"]
    assert answer == ask(folder, QUESTIONS[1], "--max-new-tokens", "6", "--ratio", "0.3", "--method", "h2o")


def test_saved_prefix_answers_ask_cache(folder, short):
    """/save x.kvc writes a full cache that `kvcli ask --cache x.kvc` answers from, as from the document."""
    assert (folder / "x.kvc").is_file()
    assert ask(folder, QUESTIONS[2], "--max-new-tokens", "6", "--min-keep", "0", cache="x.kvc") == short["answers"][2]


def test_exit_leaves_with_status_zero(short, long):
    """/exit and Ctrl-D both end the session with exit status 0."""
    assert short["exit"] == 0
    assert long["exit"] == 0


def test_ctrl_c_cancels_the_answer_and_the_next_is_unharmed(folder, long):
    """Ctrl-C stops a streaming answer part way; the same question asked again gets `kvcli ask`'s whole answer."""
    full = ask(folder, QUESTIONS[0], "--max-new-tokens", "400")
    partial = long["partial"]
    assert partial and full.startswith(partial) and len(partial) < len(full)
    assert long["again"] == full


def test_ctrl_c_at_the_prompt_clears_the_line(folder, long):
    """Ctrl-C over text typed at the prompt drops it: the next question is asked alone."""
    assert long["after_clear"] == ask(folder, QUESTIONS[1], "--max-new-tokens", "400")


def test_piped_questions_are_answered_in_turn(folder):
    """With piped stdin each line is answered, stdout holds only the answers, and chat exits 0 at the end of input."""
    result = subprocess.run([sys.executable, *chat_args(folder, "--max-new-tokens", "6")], check=False, input="\n".join(QUESTIONS[:2]) + "\n",
                            capture_output=True, text=True, cwd=folder, env=environment(folder), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [ask(folder, q, "--max-new-tokens", "6") for q in QUESTIONS[:2]]
    assert PROMPT not in result.stderr
    assert len(re.findall(SUMMARY.replace(r"\r\n", r"\n"), result.stderr)) == 2


def test_past_the_context_each_question_reads_the_documents_again(folder):
    """Documents longer than --max-context are read whole per question, re-indexed, and answer as `kvcli ask` does; /save says why it cannot."""
    flags = ("--max-new-tokens", "6", "--max-context", "128", "--ratio", "0.1")
    lines = [*QUESTIONS[:2], "/save past.kvc", "/method full"]
    result = subprocess.run([sys.executable, *chat_args(folder, *flags), "--json"], check=False, input="\n".join(lines) + "\n",
                            capture_output=True, text=True, cwd=folder, env=environment(folder), timeout=120)
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["answer"].strip() for a in answers] == [ask(folder, q, *flags) for q in QUESTIONS[:2]]
    assert all(a["stats"]["read"] == "reindexed" and a["stats"]["extra"]["past_window"]["chunks"] > 1 for a in answers)
    assert "no full cache to save" in result.stderr and "choose a compressing method" in result.stderr
    assert not (folder / "past.kvc").exists()


def test_chat_skim_skims_each_question_as_ask_does(folder):
    """`chat --skim` skims the documents for each question piped in, answering as `ask --skim` does; /save says why it cannot."""
    flags = ("--max-new-tokens", "6", "--skim", "--skim-tokens", "32", "--skim-depth", "0.9")
    lines = [*QUESTIONS[:2], "/save skim.kvc"]
    result = subprocess.run([sys.executable, *chat_args(folder, *flags), "--json"], check=False, input="\n".join(lines) + "\n",
                            capture_output=True, text=True, cwd=folder, env=environment(folder), timeout=120)
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["stats"]["read"] for a in answers] == ["skim", "skim"]
    assert [a["answer"].strip() for a in answers] == [ask(folder, q, *flags) for q in QUESTIONS[:2]]
    assert "no full cache to save" in result.stderr and not (folder / "skim.kvc").exists()
