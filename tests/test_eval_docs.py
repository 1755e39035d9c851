"""docs/eval.md runs as written: its `kvcli eval` commands, its Python example, and its NIAH lengths against their haystacks.

The commands run through Typer's CliRunner on a tiny random model, so what is checked is that the
documented flags and data paths are accepted (exit code 0), not the scores. Only -m is replaced,
and for speed alone the NIAH lengths and the rows are made few and small: whether the documented
lengths fit their haystacks is checked with a real tokenizer, apart.
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvcli import models
from kvcli.cli import app
from kvcli.cli.evaluate import NIAH_ANSWER, NIAH_NEEDLE, NIAH_QUESTION, eval_
from kvcli.eval import log_path, niah_rows
from kvcli.ingest import read_documents
from test_evaluate import save_tiny_eval_model, tiny_words

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "eval.md"
runner = CliRunner()

pytestmark = pytest.mark.usefixtures("one_thread")


def documented_commands() -> list[str]:
    """Each `kvcli eval` command in the page's sh blocks, its continued lines joined, without `kvcli eval`."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("kvcli eval "):
                commands.append(line[len("kvcli eval "):])
    return commands


COMMANDS = documented_commands()
NIAH_COMMANDS = [command for command in COMMANDS if "--niah" in command.split()]


def shell_words(command: str) -> list[str]:
    """The arguments bash passes for `command` (quotes and $'...' escapes as a user's shell reads them)."""
    if shutil.which("bash") is None:
        pytest.skip("bash is needed to split the documented commands as a shell does")
    done = subprocess.run(["bash", "-c", f"printf '%s\\0' {command}"], capture_output=True, check=True)
    return [word.decode() for word in done.stdout.split(b"\0")[:-1]]


def option(args: list[str], *names: str) -> str | None:
    """The value given to option `names` in `args`, or None."""
    for i, arg in enumerate(args[:-1]):
        if arg in names:
            return args[i + 1]
    return None


def with_option(args: list[str], names: tuple[str, ...], value: str) -> list[str]:
    """`args` with option `names` set to `value`, replaced where given, else added."""
    args = list(args)
    for i, arg in enumerate(args[:-1]):
        if arg in names:
            args[i + 1] = value
            return args
    return [*args, names[0], value]


def test_the_page_shows_the_eval_commands_it_documents():
    """The page has a --data, a --niah and a --modes example, and examples with -o FILE, --json, --template and --param."""
    assert len(COMMANDS) >= 5
    words = [shell_words(command) for command in COMMANDS]
    for flag in ("--data", "--niah", "--modes", "-o", "--json", "--template", "--param"):
        assert any(flag in args for args in words), flag
    assert not any(option(args, "--json") is not None and not option(args, "--json").startswith("-") for args in words), "--json takes no file: use -o"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    """A tiny random Llama saved as a folder for -m; loads in milliseconds."""
    return str(save_tiny_eval_model(tmp_path_factory.mktemp("tiny") / "tiny_llama"))


@pytest.fixture
def in_checkout_copy(tmp_path, monkeypatch) -> Path:
    """A working folder where the documented relative paths resolve: samples/ is the repository's, outputs land here."""
    (tmp_path / "samples").symlink_to(ROOT / "samples", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KVCLI_HOME", str(tmp_path / "kvcli_home"))  # profiles for the tiny model stay here
    return tmp_path


def write_longbench_rows(path: Path, n: int = 2) -> None:
    """A stand-in for a LongBench file the page names (they are not shipped), in words the tiny tokenizer knows."""
    path.write_text("".join(json.dumps({"context": tiny_words(200), "input": "w1 w2 w3?", "answers": ["w4 w5"]}) + "\n" for _ in range(n)))


@pytest.mark.parametrize("command", COMMANDS, ids=[f"example-{i + 1}" for i in range(len(COMMANDS))])
def test_documented_eval_command_runs(command, tiny_folder, in_checkout_copy):
    """A `kvcli eval` command of docs/eval.md exits 0 as written, -m swapped for a tiny model; -o writes its file and log, --json prints JSON."""
    args = shell_words(command)
    data = option(args, "--data")
    if data is not None and not Path(data).exists():
        write_longbench_rows(in_checkout_copy / data)
    haystack = option(args, "--haystack")
    if haystack is not None:
        assert (ROOT / haystack).exists(), f"the page's haystack {haystack} is not in the repository"
    run = with_option(args, ("-m", "--model"), tiny_folder)
    # for speed only: one short NIAH length, one row
    if "--niah" in run:
        run = with_option(run, ("--lengths",), "300")
    if data is not None:
        run = with_option(run, ("--limit",), "1")
    result = runner.invoke(app, ["eval", *run])
    assert result.exit_code == 0, f"kvcli eval {command}\n{result.output}"
    output = option(args, "-o", "--output")
    if output is not None:
        assert json.loads((in_checkout_copy / output).read_text())["summary"]
        assert log_path(in_checkout_copy / output).exists()
    if "--json" in args:
        assert json.loads(result.stdout)["summary"]


def test_python_api_example_runs(tiny_folder, in_checkout_copy, monkeypatch):
    """The Python API example runs as written (the model it loads swapped for the tiny one) and writes its JSON."""
    (code,) = re.findall(r"## Python API\n\n```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    write_longbench_rows(in_checkout_copy / "qasper.jsonl")
    load_model = models.load_model
    monkeypatch.setattr(models, "load_model", lambda spec=None, **kwargs: load_model(tiny_folder, **kwargs))
    exec(compile(code, str(DOC), "exec"), {})
    data = json.loads((in_checkout_copy / "qasper.json").read_text())
    assert [(e["method"], e["mode"]) for e in data["summary"]][:2] == [("full", "query"), ("snapkv", "query")]


@pytest.mark.model
@pytest.mark.parametrize("command", NIAH_COMMANDS, ids=[f"niah-{i + 1}" for i in range(len(NIAH_COMMANDS))])
def test_documented_niah_lengths_fit_their_haystack(command, smollm):
    """Each NIAH example's lengths (or the default ones) fit its haystack, counted with SmolLM2's tokenizer (the default model's counts alike)."""
    args = shell_words(command)
    haystack = read_documents([str(ROOT / option(args, "--haystack"))]).text
    lengths = option(args, "--lengths") or inspect.signature(eval_).parameters["lengths"].default
    rows = niah_rows(
        haystack, option(args, "--needle") or NIAH_NEEDLE, option(args, "-q", "--question") or NIAH_QUESTION,
        option(args, "--answer") or NIAH_ANSWER, [int(n) for n in lengths.split(",")], [0.5], smollm.tokenizer,
    )
    assert rows  # niah_rows raises "the haystack has N tokens" for a length that does not fit
