"""deploy/k8s passes Pod Security "restricted", has its NetworkPolicy, PodDisruptionBudgets and
ServiceMonitor, and validates against the Kubernetes API schemas.

The manifests are rendered by the real `kubectl kustomize` when kubectl is installed (else read as
listed in kustomization.yaml). The schema check uses the `kubernetes-validate` package (the official
OpenAPI schemas per Kubernetes version, offline) when installed. Pod Security admission itself needs
an API server, so the "restricted" profile's rules are checked here field by field, as the admission
controller checks them (https://kubernetes.io/docs/concepts/security/pod-security-standards/).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.32.0"
ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                   "projected", "secret"}


def render(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is not None:
        out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return [d for d in yaml.safe_load_all(out.stdout) if d]
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return [d for f in kustomization["resources"] for d in yaml.safe_load_all((directory / f).read_text()) if d]


def pod_specs(objs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]) for o in objs
            if o["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet")]


def restricted_violations(name: str, spec: dict[str, Any]) -> list[str]:
    """The Pod Security Standards' baseline + restricted checks, for one pod spec."""
    bad = []
    pod = spec.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            bad.append(f"{name}: {key}")
    for vol in spec.get("volumes", []):
        kinds = set(vol) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            bad.append(f"{name}: volume {vol['name']} of type {kinds - ALLOWED_VOLUMES}")
    if pod.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
        bad.append(f"{name}: pod seccompProfile must be RuntimeDefault")
    for c in [*spec.get("initContainers", []), *spec["containers"]]:
        sc = c.get("securityContext", {})
        where = f"{name} container {c['name']}"
        if sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True:
            bad.append(f"{where}: runAsNonRoot")
        if sc.get("runAsUser", pod.get("runAsUser")) == 0:
            bad.append(f"{where}: runAsUser 0")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{where}: allowPrivilegeEscalation must be false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            bad.append(f"{where}: capabilities must drop ALL")
        if set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            bad.append(f"{where}: adds capabilities")
        if sc.get("privileged"):
            bad.append(f"{where}: privileged")
        if any("hostPort" in p for p in c.get("ports", [])):
            bad.append(f"{where}: hostPort")
        if sc.get("readOnlyRootFilesystem") is not True:  # not required by the profile; ours all manage it
            bad.append(f"{where}: readOnlyRootFilesystem")
    return bad


def test_every_pod_passes_the_restricted_profile() -> None:
    specs = pod_specs(render(K8S))
    assert {n.split("/")[1] for n, _ in specs} == {"gateway", "prefill", "decode", "tandem-model-init"}
    bad = [v for name, spec in specs for v in restricted_violations(name, spec)]
    assert not bad, "\n".join(bad)


def test_the_restricted_check_catches_what_it_should() -> None:
    spec = {"containers": [{"name": "c", "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}],
            "volumes": [{"name": "h", "hostPath": {"path": "/"}}]}
    found = " ".join(restricted_violations("x", spec))
    for problem in ("seccompProfile", "runAsNonRoot", "allowPrivilegeEscalation", "drop ALL", "adds capabilities",
                    "hostPath"):
        assert problem in found, problem


def test_network_policy_admits_exactly_the_request_path() -> None:
    objs = render(K8S)
    policies = {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "NetworkPolicy"}
    assert policies["tandem-default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress"]}

    def admitted(component: str) -> dict[int, list[Any]]:
        [spec] = [s for s in policies.values() if s["podSelector"].get("matchLabels", {}).get(
            "app.kubernetes.io/component") == component]
        out: dict[int, list[Any]] = {}
        for rule in spec["ingress"]:
            for port in rule["ports"]:
                out.setdefault(port["port"], []).extend(rule.get("from", ["anyone"]))
        return out

    def component(peer: Any) -> str:
        if peer == "anyone":
            return "anyone"
        if "namespaceSelector" in peer:
            return "ns:" + peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        return peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"]

    want = {
        "gateway": {50051: {"anyone"}, 8000: {"anyone"}, 9100: {"ns:monitoring"}},
        "prefill": {50061: {"gateway"}, 9100: {"ns:monitoring"}},
        "decode": {50071: {"gateway"}, 50081: {"prefill"}, 9100: {"ns:monitoring"}},
    }
    for name, ports in want.items():
        assert {p: {component(x) for x in peers} for p, peers in admitted(name).items()} == ports, name


def test_disruption_budgets_and_monitoring() -> None:
    objs = render(K8S)
    pdbs = {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "PodDisruptionBudget"}
    assert set(pdbs) == {"gateway", "prefill", "decode"} and all(s["maxUnavailable"] == 1 for s in pdbs.values())
    services = [o for o in objs if o["kind"] == "Service"]
    mon = render(K8S / "monitoring")
    [sm] = [o for o in mon if o["kind"] == "ServiceMonitor"]
    for svc in services:  # the ServiceMonitor selects every Service and each has its metrics port
        assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        assert "metrics" in {p["name"] for p in svc["spec"]["ports"]}
    [rule] = [o for o in mon if o["kind"] == "PrometheusRule"]
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yml").read_text())
    assert rule["spec"]["groups"] == rules["groups"], "prometheusrule.yaml must say what rules.yml says"


def test_manifests_validate_against_the_kubernetes_schemas() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (a test extra)")
    objs = render(K8S)
    for obj in objs:
        kv.validate(obj, K8S_VERSION, strict=True)
    bad = {**objs[-1], "spec": {**objs[-1]["spec"], "replicaz": 2}}  # the validator does refuse a typo
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)


# -- a multi-node decode worker (deploy/k8s/multinode: tensor parallelism over a LeaderWorkerSet) ---------
MULTINODE = K8S / "multinode"


def _lws(objs: list[dict[str, Any]]) -> dict[str, Any]:
    [lws] = [o for o in objs if o["kind"] == "LeaderWorkerSet"]
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    return lws["spec"]


def _worker_config(command: list[str], env: dict[str, str]) -> Any:
    """The DecodeWorkerConfig our real `tandem decode-worker` parser makes of a container's command, with
    Kubernetes' $(VAR) references expanded from `env`."""
    import re

    from cli.main import build_parser
    from decode_worker.config import DecodeWorkerConfig
    from engine.options import from_args

    argv = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in command]
    assert argv[:2] == ["tandem", "decode-worker"], argv
    return from_args(DecodeWorkerConfig, build_parser().parse_args(argv[1:]))


def test_the_multinode_worker_passes_the_restricted_profile_and_its_ranks_add_up() -> None:
    spec = _lws(render(MULTINODE))
    tmpl = spec["leaderWorkerTemplate"]
    size = tmpl["size"]
    assert tmpl["restartPolicy"] == "RecreateGroupOnPodRestart", "a dead rank must recreate the whole group"
    leader, worker = tmpl["leaderTemplate"]["spec"], tmpl["workerTemplate"]["spec"]
    bad = restricted_violations("leader", leader) + restricted_violations("worker", worker)
    assert not bad, "\n".join(bad)
    env = {"TANDEM_MODEL": "/models/m", "LWS_GROUP_SIZE": str(size), "LWS_LEADER_ADDRESS": "decode-tp-0.decode-tp",
           "POD_IP": "10.0.0.7"}
    lead = _worker_config(leader["containers"][0]["command"], {**env, "LWS_WORKER_INDEX": "0"}).engine
    ranks = [_worker_config(worker["containers"][0]["command"], {**env, "LWS_WORKER_INDEX": str(i)}).engine
             for i in range(1, size)]
    for i, e in enumerate([lead, *ranks]):
        assert (e.nnodes, e.node_rank, e.dist_init_addr) == (size, i, "decode-tp-0.decode-tp:29500")
        assert e.tensor_parallel_size == lead.tensor_parallel_size
    gpus = [int(c["resources"]["limits"]["nvidia.com/gpu"]) for c in (leader["containers"][0], worker["containers"][0])]
    assert gpus == [lead.ranks_per_node] * 2, "one GPU per rank on every node"
    assert 29500 in {p["containerPort"] for p in leader["containers"][0]["ports"]}


def test_the_multinode_network_policy_opens_the_group_to_itself_only() -> None:
    objs = render(MULTINODE)
    policies = {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "NetworkPolicy"}
    group = policies["decode-tp-group"]
    assert group["ingress"] == [{"from": [{"podSelector": group["podSelector"]}]}], "any port, group members only"
    serving = policies["decode-tp-serving"]
    admitted = {(p["port"], next(iter(r["from"][0].values()))["matchLabels"].get(
        "app.kubernetes.io/component", "monitoring")) for r in serving["ingress"] for p in r["ports"]}
    assert admitted == {(50071, "gateway"), (50081, "prefill"), (9100, "monitoring")}
    [svc] = [o for o in objs if o["kind"] == "Service"]
    assert svc["spec"]["selector"] == serving["podSelector"]["matchLabels"], "the Service reaches the leader only"


def test_the_multinode_manifests_validate_where_schemas_exist() -> None:
    """The Service and NetworkPolicies against the Kubernetes schemas; the LeaderWorkerSet is a CRD that
    has none there (its fields are checked above)."""
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (a test extra)")
    for obj in render(MULTINODE):
        if obj["kind"] != "LeaderWorkerSet":
            kv.validate(obj, K8S_VERSION, strict=True)
