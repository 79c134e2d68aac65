"""docker-compose.yml and deploy/k8s/ run exactly the commands `tandem up` runs, on consistent ports.

Each Tandem container's command is parsed by the real `tandem` parser (`cli.main.build_parser`),
so a renamed or removed flag fails here, not in someone's cluster. `docker-compose config` validates
the compose file itself when the binary is installed (`.ci/run` installs it when it can).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
COMPONENTS = {"gateway": 50051, "prefill-worker": 50061, "decode-worker": 50071}
METRICS_PORT = 9100
HTTP_PORT = 8000
KV_PORT = 50081


def parse_command(command: list[str]) -> argparse.Namespace:
    """The container command as `tandem` would parse it; fails the test on any argparse error."""
    assert command[0] == "tandem", f"{command[:2]}: Tandem containers run the `tandem` command"
    try:
        return build_parser().parse_args(command[1:])
    except SystemExit:
        pytest.fail(f"`{' '.join(command)}` does not parse with tandem's own parser")


def host_port(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def compose_services() -> dict[str, Any]:
    """The resolved compose file: from `docker-compose config` if installed, else the YAML itself."""
    exe = shutil.which("docker-compose")
    if exe is None:  # interpolate ${VAR:-default} as compose does with those variables unset
        text = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: m.group(2), COMPOSE.read_text())
        return yaml.safe_load(text)["services"]
    out = subprocess.run([exe, "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)["services"]


def test_docker_compose_config_accepts_the_file() -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose; .ci/run does it as root)")
    for profile in ("cpu", "gpu"):
        out = subprocess.run([exe, "-f", str(COMPOSE), "--profile", profile, "config", "-q"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"profile {profile}: {out.stderr}"


def test_compose_services_run_launcher_commands_on_consistent_ports() -> None:
    services = compose_services()
    by_role: dict[str, list[tuple[str, argparse.Namespace]]] = {c: [] for c in COMPONENTS}
    for name, svc in services.items():
        command = svc.get("command")
        if not command or command[0] != "tandem":
            continue
        args = parse_command(command)
        if args.command not in COMPONENTS:
            continue
        by_role[args.command].append((name, args))
        assert args.host == "0.0.0.0" and args.port == COMPONENTS[args.command], name
        assert args.metrics_port == METRICS_PORT and args.otlp_endpoint == "http://jaeger:4317", name
        health = svc["healthcheck"]["test"]
        assert health[1:] == ["tandem", "health", "--addr", f"127.0.0.1:{args.port}"], name
        parse_command(health[1:])
    assert len(by_role["prefill-worker"]) == 4 and len(by_role["decode-worker"]) == 4  # 2 each, cpu + gpu
    for _, args in by_role["decode-worker"]:
        assert args.kv_bind == f"tcp://0.0.0.0:{KV_PORT}"
    [(gw_name, gw)] = by_role["gateway"]
    assert gw.http_port == HTTP_PORT
    # only the gateway is published, on loopback unless TANDEM_BIND says otherwise
    assert set(_ports(services[gw_name])) == {f"127.0.0.1:{HTTP_PORT}:{HTTP_PORT}", f"127.0.0.1:{gw.port}:{gw.port}"}
    assert [n for n, svc in services.items() if svc.get("ports") and n != gw_name] == []
    names = {name for name, svc in services.items() for name in [name, svc.get("hostname")] if name}
    for role, flag in (("prefill-worker", gw.prefill_workers), ("decode-worker", gw.decode_workers)):
        targets = [host_port(a) for a in flag]
        assert len(targets) == 2 and all(p == COMPONENTS[role] for _, p in targets)
        assert all(h in names for h, _ in targets), f"the gateway dials {targets}; services are {sorted(names)}"


def _ports(svc: dict[str, Any]) -> list[str]:
    """Published TCP ports as "ip:host:container", whichever syntax `docker-compose config` wrote (the raw
    file's ${TANDEM_BIND:-127.0.0.1} read as its default)."""
    out = []
    for p in svc.get("ports", []):
        if isinstance(p, dict):
            out.append(f"{p.get('host_ip', '0.0.0.0')}:{p['published']}:{p['target']}")
        else:
            out.append(str(p).replace("${TANDEM_BIND:-127.0.0.1}", "127.0.0.1"))
    # docker-compose 1.29 on some builds spells the default protocol out ("8000:8000/tcp")
    return [p.removesuffix("/tcp") for p in out]


def test_gpu_workers_take_their_devices_and_kv_budget_from_variables() -> None:
    raw = COMPOSE.read_text()
    services = yaml.safe_load(raw)["services"]
    gpu = {n: s for n, s in services.items() if n.endswith("-gpu")}
    assert len(gpu) == 4
    for name, svc in gpu.items():
        [dev] = svc["deploy"]["resources"]["reservations"]["devices"]
        [device_id] = dev["device_ids"]
        var = name.removesuffix("-gpu").replace("-", "_").upper() + "_GPU"
        assert device_id == f"${{{var}:-0}}", name  # GPU 0 unless told: works on a one-GPU machine
        assert "${TANDEM_GPU_KV_GIB:-4}" in svc["command"], name


def test_the_ui_override_publishes_on_loopback_only() -> None:
    ui = yaml.safe_load((ROOT / "deploy" / "compose.ui.yml").read_text())["services"]
    assert set(ui) == {"grafana", "prometheus", "jaeger"}
    for name, svc in ui.items():
        assert all(str(p).startswith("127.0.0.1:") for p in svc["ports"]), name
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    for volume in grafana["volumes"]:
        assert (ROOT / volume.split(":")[0]).is_dir(), volume
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"


PROMETHEUS = ROOT / "deploy" / "prometheus"


def test_prometheus_scrapes_every_component_without_renaming_labels() -> None:
    prom = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"{h}:{METRICS_PORT}" for h in ("gateway", "prefill-0", "prefill-1", "decode-0", "decode-1")}
    # a target label the series also carry (role) would come back as exported_role
    assert all("labels" not in sc for job in prom["scrape_configs"] for sc in job["static_configs"])


def _promtool(*args: str) -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/run installs it)")
    out = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, cwd=PROMETHEUS)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def test_promtool_accepts_the_config_and_rules_and_the_alerts_fire() -> None:
    assert "SUCCESS" in _promtool("check", "config", "prometheus.yml")
    assert "SUCCESS: 16 rules found" in _promtool("check", "rules", "rules.yml")
    assert "SUCCESS" in _promtool("test", "rules", "rules_test.yml")  # alerts fire on the series they watch


def k8s_objects() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = [d for f in kustomization["resources"] for d in yaml.safe_load_all((K8S / f).read_text()) if d]
    assert all({"apiVersion", "kind", "metadata"} <= set(d) for d in docs)
    return docs


def test_k8s_manifests_name_the_same_commands_and_ports() -> None:
    objs = k8s_objects()
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    workloads = [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]
    roles = {}
    for w in workloads:
        [container] = w["spec"]["template"]["spec"]["containers"]
        args = parse_command(container["command"])
        roles[args.command] = (w, args)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["grpc"] == args.port == COMPONENTS[args.command]
        assert ports["metrics"] == args.metrics_port == METRICS_PORT
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert container[probe]["grpc"]["port"] == args.port, f"{w['metadata']['name']} {probe}"
        svc = services[w["metadata"]["name"]]
        assert svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)
        gpu = container["resources"]["limits"].get("nvidia.com/gpu")
        assert (gpu == 1) == (args.command != "gateway"), "workers ask for one GPU each, the gateway none"
        if args.command != "gateway":
            assert args.device == "cuda"
    assert set(roles) == set(COMPONENTS)
    gw_obj, gw = roles["gateway"]
    assert gw_obj["kind"] == "Deployment" and gw.http_port == HTTP_PORT
    for role, flag in (("prefill-worker", gw.prefill_workers), ("decode-worker", gw.decode_workers)):
        obj, _ = roles[role]
        name, replicas = obj["metadata"]["name"], obj["spec"]["replicas"]
        assert obj["kind"] == "StatefulSet" and obj["spec"]["serviceName"] == name
        assert [host_port(a) for a in flag] == [(f"{name}-{i}.{name}", COMPONENTS[role])
                                                           for i in range(replicas)]
    assert roles["decode-worker"][1].kv_bind == f"tcp://$(POD_IP):{KV_PORT}"


def test_the_components_are_the_ones_the_launcher_starts(tmp_path: Path) -> None:
    from cli.launcher import Stack

    stack = Stack(tmp_path / "model", workdir=tmp_path)  # builds the argv lists; starts nothing
    argvs = [c.argv for c in [*stack.prefill, *stack.decode]] + [stack._gateway_argv]
    started = {argv[argv.index("cli.main") + 1] for argv in argvs}
    assert started == set(COMPONENTS)
    for argv in argvs:  # start_gateway() adds the worker lists once the workers are up
        cmd = ["tandem", *argv[argv.index("cli.main") + 1:]]
        parse_command(cmd + (["--decode-workers", "127.0.0.1:1"] if cmd[1] == "gateway" else []))
