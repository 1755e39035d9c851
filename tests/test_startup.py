"""What a user meets before any model runs: help, argument errors, `kvcli methods`, Ctrl-C while
kvcli starts, and a hub model that cannot be fetched.

Each start-up case runs in a fresh interpreter (a subprocess), since what matters is what that
process imports and prints. No test here reaches the network: the hub is a closed local port or a
local server that answers as the hub does for a missing model.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvcli import __version__
from kvcli.cli import app
from kvcli.cli.info import METHODS_FILE, method_rows
from kvcli.methods import DEFAULT_METHOD, REGISTRY

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()

# Run kvcli's entry point as the `kvcli` script does, then say what the process imported.
PROBE = """
import json, sys
sys.argv = ["kvcli", *json.loads(sys.argv[1])]
from kvcli.__main__ import main
try:
    main()
except SystemExit as exit:
    code = exit.code
sys.stderr.write("\\nPROBE " + json.dumps({"code": code, "heavy": [m for m in ("torch", "transformers") if m in sys.modules]}) + "\\n")
"""


def probe(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = next((line for line in proc.stderr.splitlines() if line.startswith("PROBE ")), None)
    assert line is not None, proc.stderr[-2000:]
    return json.loads(line.removeprefix("PROBE "))


@pytest.mark.parametrize("args, code", [
    (["--help"], 0),
    (["-h"], 0),
    (["ask", "--help"], 0),
    (["summarize", "-h"], 0),
    (["methods"], 0),
    (["methods", "--json"], 0),
    (["-V"], 0),
    (["ask", "--ratio", "half", "doc.txt", "Q?"], 2),  # a bad option value
    (["ask", "--no-such-option"], 2),
    (["no-such-command"], 2),
    (["ask", "README.md", "nots.txt"], 2),  # kvcli's own argument checks, past Click's: a mistyped file
    (["ask", "README.md", "   "], 2),  # an empty question
    (["ask", "-q", "Q?", "--scorer", "repeat", "README.md"], 2),  # --scorer without --reuse
    (["summarize", "README.md", "what is this about?"], 2),  # a question given to summarize
])
def test_start_up_imports_neither_torch_nor_transformers(args, code):
    """Help, the version, `kvcli methods` and an argument error import neither torch nor transformers."""
    seen = probe(*args)
    assert seen == {"code": code, "heavy": []}


def test_methods_file_is_current():
    """kvcli/data/methods.json, which `kvcli methods` reads, says what the method classes say (else: python scripts/gen_methods_json.py)."""
    assert json.loads(METHODS_FILE.read_text(encoding="utf-8")) == method_rows(REGISTRY, DEFAULT_METHOD)


def test_methods_lists_every_method_with_its_knobs():
    """`kvcli methods --json` lists each registered method with its summary, paper and knobs, and marks the default."""
    result = runner.invoke(app, ["methods", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["name"] for row in rows] == list(REGISTRY)
    for row in rows:
        cls = REGISTRY[row["name"]]
        assert (row["summary"], row["paper"], row["params"], row["default"]) == (cls.summary, cls.paper, cls().params(), row["name"] == DEFAULT_METHOD)


@pytest.mark.parametrize("args", [["-h"], ["ask", "-h"], ["eval", "-h"]])
def test_short_help_is_help(args):
    """`-h` prints the same help as `--help`, for kvcli and for its commands."""
    short = runner.invoke(app, args)
    long = runner.invoke(app, [*args[:-1], "--help"])
    assert short.exit_code == long.exit_code == 0
    assert short.stdout == long.stdout and "Usage:" in short.stdout


def test_short_version():
    """`-V` prints the version, as `--version` does."""
    for flag in ("-V", "--version"):
        result = runner.invoke(app, [flag])
        assert result.exit_code == 0 and result.stdout.strip() == f"kvcli {__version__}"


def complete(words: str) -> list[str]:
    """What bash completion offers for the command line `words` (the cursor after its last word)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "_KVCLI_COMPLETE": "complete_bash", "COMP_WORDS": words,
           "COMP_CWORD": str(len(words.split()) - 1)}
    proc = subprocess.run([sys.executable, "-c", "import sys; sys.argv = ['kvcli']; from kvcli.__main__ import main; main()"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()


def test_shell_completion_completes_commands_and_options():
    """Shell completion offers the commands and a command's options; --show-completion prints the bash script."""
    assert complete("kvcli as") == ["ask"]
    assert complete("kvcli ask --rat") == ["--ratio"]
    # run from bash, as a user would: typer finds the shell among the process's parents, and a test
    # run detached from any shell (its parent gone) would have none
    code = "import sys; sys.argv = ['kvcli', '--show-completion']; from kvcli.__main__ import main; main()"
    script = subprocess.run(["bash", "-c", f'"{sys.executable}" -c "{code}"; exit $?'],  # not exec'd: bash stays its parent
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=120)
    assert "_KVCLI_COMPLETE=complete_bash" in script.stdout and "complete " in script.stdout


ASK = ["ask", "-q", "What?", "-"]  # stdin is empty: a command that got past its imports ends soon after


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child needs POSIX signals")
@pytest.mark.parametrize("command, while_importing", [
    (ASK, "rich"), (ASK, "torch"), (ASK, "transformers"),
    (["models"], "transformers"),  # a command without a model; its imports go through transformers' lazy modules
], ids=["ask-rich", "ask-torch", "ask-transformers", "models-transformers"])
def test_ctrl_c_while_starting_is_one_line(command, while_importing):
    """Ctrl-C while kvcli imports (its own modules, torch or transformers) exits 130 with `kvcli: interrupted` and no traceback."""
    # -X importtime writes a line as each module finishes importing (`import time: 12 | 34 |   torch._C`):
    # the first line of a torch submodule means torch's import is under way (it goes on for seconds).
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "kvcli", *command],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if line.rsplit("|", 1)[-1].strip().startswith(f"{while_importing}."):
                break
        else:
            pytest.fail(f"kvcli never imported {while_importing}: {''.join(seen)[-2000:]}")
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = [line for line in rest.splitlines() if line.strip() and "import time:" not in line]
    assert proc.returncode == 130, rest[-2000:]
    assert stderr == ["kvcli: interrupted"], rest[-2000:]


def run_with_hub(endpoint: str, tmp_path: Path, *extra_env: tuple[str, str]) -> subprocess.CompletedProcess:
    """`kvcli ask -m org/missing-model` with the hub at `endpoint` and an empty Hugging Face cache."""
    doc = tmp_path / "doc.txt"
    doc.write_text("The code word is PELICAN.\n")
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_ENDPOINT")}
    env.update({"PYTHONPATH": str(ROOT), "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "KVCLI_HOME": str(tmp_path / "kvcli"),
                **dict(extra_env)})
    return subprocess.run([sys.executable, "-m", "kvcli", "ask", "-m", "org/missing-model", str(doc), "What is the code word?"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def assert_one_line(proc: subprocess.CompletedProcess, *words: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("kvcli: error: "), proc.stderr[-3000:]
    for word in words:
        assert word in lines[0]
    assert proc.stdout == ""


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once the socket closes


def test_unreachable_hub_is_one_line(tmp_path):
    """A hub id when the hub cannot be reached is one line that says so and how to pass a local model."""
    proc = run_with_hub(f"http://127.0.0.1:{closed_port()}", tmp_path)
    assert_one_line(proc, "the Hugging Face hub cannot be reached", "org/missing-model", "local folder or .gguf")


class MissingModelHub(http.server.BaseHTTPRequestHandler):
    """Answers every request as the hub answers one for a model that does not exist (`error_code`
    None: a bare 404, as a mirror or proxy may answer)."""

    error_code: str | None = "RepoNotFound"

    def do_GET(self):
        self.send_response(404)
        if self.error_code:
            self.send_header("X-Error-Code", self.error_code)
            self.send_header("X-Error-Message", "Repository not found")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "Repository not found"}')

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def local_hub(handler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("error_code", ["RepoNotFound", None])
def test_missing_hub_model_is_one_line(tmp_path, error_code):
    """A hub id that does not exist is one line saying it was not found."""
    with local_hub(type("Hub", (MissingModelHub,), {"error_code": error_code})) as endpoint:
        proc = run_with_hub(endpoint, tmp_path)
    assert_one_line(proc, "'org/missing-model' was not found on the Hugging Face hub")


def test_offline_hub_is_one_line(tmp_path):
    """With HF_HUB_OFFLINE set, a hub id not in the cache is one line naming HF_HUB_OFFLINE and what to do."""
    proc = run_with_hub(f"http://127.0.0.1:{closed_port()}", tmp_path, ("HF_HUB_OFFLINE", "1"))
    assert_one_line(proc, "HF_HUB_OFFLINE", "org/missing-model", "local folder or .gguf")
