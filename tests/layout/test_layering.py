"""The package map (docs/ARCHITECTURE.md): arrows only point down, and the gateway needs no torch.

Every import of every module in the packages below is read with `ast` (top-level and function-level
imports alike), so a lazy import that breaks the layering fails here too.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# package -> the packages it may import (besides itself). Lowest first.
ALLOWED: dict[str, set[str]] = {
    "tandem": set(),  # generated protos
    "kernels": set(),
    "kvtransfer": {"tandem"},
    "engine": {"kernels"},
    "server": {"tandem", "engine", "kvtransfer"},
    "gateway": {"tandem", "engine", "server"},
    "prefill_worker": {"tandem", "engine", "kvtransfer", "server"},
    "decode_worker": {"tandem", "engine", "kvtransfer", "server"},
    "training": {"engine", "kernels"},
    "cli": {"tandem", "kernels", "kvtransfer", "engine", "server", "gateway", "prefill_worker",
            "decode_worker", "training"},
}
OURS = set(ALLOWED) | {"bench", "tests", "protos"}


def imports_of(path: Path) -> set[str]:
    """The top-level names of every package `path` imports."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & OURS


def test_arrows_only_point_down() -> None:
    wrong = []
    for package, allowed in ALLOWED.items():
        files = [p for p in (ROOT / package).rglob("*.py") if "v1" not in p.relative_to(ROOT).parts]
        assert files or package == "tandem", package
        for path in files:
            for name in imports_of(path) - allowed - {package}:
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_the_map_has_no_cycle() -> None:
    order = list(ALLOWED)
    for package, allowed in ALLOWED.items():
        assert all(order.index(a) < order.index(package) for a in allowed), package


def test_every_package_is_on_the_map() -> None:
    found = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert found - OURS == set(), "a new top-level package needs a place in ALLOWED and docs/ARCHITECTURE.md"


def _fresh_import(code: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


HEAVY = ("torch", "triton", "kernels", "engine.model", "engine.model_runner", "engine.engine", "engine.spec",
         "safetensors")


@pytest.mark.parametrize("target", [
    "import gateway.main, gateway.http_api",
    "import cli.main; cli.main.build_parser()",
    "import cli.health",
])
def test_the_gateway_and_the_cli_import_no_torch(target: str) -> None:
    loaded = _fresh_import(f"import json, sys; {target}; "
                           f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {list(HEAVY)!r} "
                           f"or m in {list(HEAVY)!r})))")
    assert loaded == [], f"{target} loads {loaded}"


def test_tandem_health_imports_nothing_heavy(tmp_path: Path) -> None:
    """The docker-compose healthcheck runs this every few seconds in every container: the real command
    path (argument parsing, the probe, the error) must not pay for torch. Checked on what the process
    imported (-X importtime), not on a wall-clock figure that a loaded machine would break."""
    exe = [sys.executable, "-X", "importtime", "-m", "cli.main", "health", "--addr", "127.0.0.1:9", "--timeout", "0.2"]
    out = subprocess.run(exe, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "UNAVAILABLE" in out.stderr, out.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "grpc" in imported  # the parse worked: the probe's own imports are there
    heavy = sorted(m for m in imported if m.split(".")[0] in HEAVY or m in HEAVY)
    assert heavy == [], f"tandem health imports {heavy}"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    from cli.main import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_flag_of_every_command_has_help() -> None:
    missing = [f"tandem {name} {'/'.join(a.option_strings) or a.dest}"
               for name, sub in _subcommands().items() for a in sub._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert not missing, missing


@pytest.mark.parametrize(("command", "configs"), [
    ("gateway", ["GatewayConfig"]),
    ("prefill-worker", ["PrefillWorkerConfig"]),
    ("decode-worker", ["DecodeWorkerConfig"]),
    ("up", ["EngineConfig", "GatewayConfig", "PrefillWorkerConfig", "DecodeWorkerConfig"]),
])
def test_every_config_field_a_user_may_set_has_a_flag(command: str, configs: list[str]) -> None:
    """One place holds each default: the flags are generated from the config fields, none by hand."""
    from decode_worker.config import DecodeWorkerConfig
    from engine.config import EngineConfig
    from engine.options import option_names
    from gateway.config import GatewayConfig
    from prefill_worker.config import PrefillWorkerConfig

    classes = {c.__name__: c for c in (EngineConfig, GatewayConfig, PrefillWorkerConfig, DecodeWorkerConfig)}
    dests = {a.dest for a in _subcommands()[command]._actions}
    set_by_up = {"decode_workers", "prefill_workers", "ready_file"}  # tandem up decides these itself
    for name in configs:
        missing = set(option_names(classes[name])) - dests - (set_by_up if command == "up" else set())
        assert not missing, f"tandem {command} has no flag for {name}.{missing}"
