"""Render deploy/grafana/dashboards/tandem.json's panels with matplotlib from a real Prometheus, for a
look at the dashboard where no Grafana runs (and for docs/img/dashboard.png).

    python -m bench.render_dashboard --demo --out docs/img/dashboard.png
        starts a local stack (tiny llama unless --model), a Prometheus (`prometheus` on PATH) scraping
        its three processes every second, sends --seconds of mixed traffic (streams, 400s, cancels),
        then renders every panel over that window
    python -m bench.render_dashboard --prometheus http://127.0.0.1:9090 --minutes 30 --out dash.png

Each panel's PromQL runs as Grafana would run it ($model_name = all, $__rate_interval = --rate-interval).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "tandem.json"
UNITS = {"s": "seconds", "reqps": "requests / s", "percentunit": "fraction", "Bps": "bytes / s", "short": ""}


def query_range(prom: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    url = f"{prom}/api/v1/query_range?" + urllib.parse.urlencode({"query": expr, "start": start, "end": end,
                                                                   "step": step})
    with urllib.request.urlopen(url, timeout=30) as r:
        body = json.loads(r.read())
    if body["status"] != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


def legend(fmt: str, labels: dict[str, str]) -> str:
    out = fmt
    for k, v in labels.items():
        out = out.replace("{{" + k + "}}", v)
    return out


def render(prom: str, start: float, end: float, out: Path, rate_interval: str = "15s") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p["type"] == "timeseries"]
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.3 * rows), squeeze=False)
    step = max((end - start) / 200, 1.0)
    for ax, panel in zip(axes.flat, panels, strict=False):
        unit = panel["fieldConfig"]["defaults"].get("unit", "short")
        for target in panel["targets"]:
            expr = target["expr"].replace("$model_name", ".*").replace("$__rate_interval", rate_interval)
            for series in query_range(prom, expr, start, end, step):
                pts = [(float(t) - start, float(v)) for t, v in series["values"] if v not in ("NaN", "+Inf", "-Inf")]
                if pts:
                    ax.plot(*zip(*pts, strict=True), label=legend(target["legendFormat"], series["metric"]),
                            linewidth=1.2)
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel("seconds", fontsize=8)
        ax.set_ylabel(UNITS.get(unit, unit), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{dash['title']} dashboard ({len(panels)} panels), rendered from Prometheus data", fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the title
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _traffic(http: str, model: str, seconds: float, seed: int = 0) -> None:
    """Bounded mixed load on loopback: completions, chats, streams, bad bodies, abandoned streams."""
    rng = random.Random(seed)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        kind = rng.random()
        body: dict[str, Any] = {"model": model, "max_tokens": rng.randint(4, 48), "temperature": 0.0}
        if kind < 0.1:
            data, path = b"{not json", "/v1/completions"
        elif kind < 0.55:
            body["prompt"] = " ".join(rng.choice(["def", "return", "x", "import", "class"]) for _ in range(30))
            data, path = json.dumps(body).encode(), "/v1/completions"
        else:
            body["messages"] = [{"role": "user", "content": "hello " * rng.randint(1, 40)}]
            body["stream"] = kind > 0.9
            data, path = json.dumps(body).encode(), "/v1/chat/completions"
        req = urllib.request.Request(f"http://{http}{path}", data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                r.read(64 if body.get("stream") and kind > 0.95 else -1)  # some streams abandoned early
        except urllib.error.HTTPError:
            pass
        time.sleep(rng.expovariate(4.0))


def demo(args: argparse.Namespace) -> Path:
    from cli.launcher import Stack

    work = Path(tempfile.mkdtemp(prefix="tandem-dash-"))
    model = args.model
    if model is None:
        from training.tiny import make_tiny_model

        model = str(make_tiny_model(work / "tiny-llama", "llama", max_position_embeddings=1024))
    ports = {r: _free_port() for r in ("gateway", "prefill", "decode")}
    stack = Stack(model, engine_args=["--device", "cpu", "--num-kv-blocks", "128", "--block-size", "8"],
                  gateway_args=["--http-port", "0", "--metrics-port", str(ports["gateway"])],
                  prefill_args=["--metrics-port", str(ports["prefill"])],
                  decode_args=["--metrics-port", str(ports["decode"])], workdir=work / "stack").start()
    prom_port = _free_port()
    config = {"global": {"scrape_interval": "1s"}, "scrape_configs": [
        {"job_name": f"tandem-{r}", "static_configs": [{"targets": [f"127.0.0.1:{p}"]}]} for r, p in ports.items()]}
    (work / "prometheus.yml").write_text(json.dumps(config))
    exe = shutil.which("prometheus")
    if exe is None:
        raise SystemExit("prometheus is not on PATH (Debian package prometheus)")
    prom = subprocess.Popen([exe, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        time.sleep(3)
        start = time.time()
        _traffic(stack.gateway.info["http_address"], stack.gateway.info["model_name"], args.seconds)  # type: ignore[union-attr]
        time.sleep(3)
        return render(f"http://127.0.0.1:{prom_port}", start, time.time(), Path(args.out), args.rate_interval)
    finally:
        prom.terminate()
        prom.wait(10)
        stack.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/img/dashboard.png")
    p.add_argument("--prometheus", default=None, help="render from this Prometheus (else --demo)")
    p.add_argument("--minutes", type=float, default=30.0, help="with --prometheus: the window up to now")
    p.add_argument("--demo", action="store_true", help="start a stack, Prometheus and traffic first")
    p.add_argument("--model", default=None, help="with --demo: the checkpoint (default: a tiny llama)")
    p.add_argument("--seconds", type=float, default=90.0, help="with --demo: seconds of traffic")
    p.add_argument("--rate-interval", default="15s", help="what $__rate_interval becomes")
    args = p.parse_args()
    if args.prometheus:
        now = time.time()
        print(render(args.prometheus, now - 60 * args.minutes, now, Path(args.out), args.rate_interval))
    else:
        print(demo(args))


if __name__ == "__main__":
    main()
