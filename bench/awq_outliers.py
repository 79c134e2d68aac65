"""Why AWQ gains little on a model: per layer and projection, how uneven the input channels are and how much
AWQ's scaling and clipping each cut the projection's output error against round-to-nearest int4.

Run from the repository root: ``.venv/bin/python -m bench.awq_outliers --model DIR --calib PATHS [--layers 3]``.
Printed per (layer, projection): RTN's output MSE on calibration inputs, then AWQ scale / clip / both as a
fraction of it, the searched scale range and max / median of mean|x| over input channels (AWQ's lever: the
larger, the more a few channels dominate).
"""

from __future__ import annotations

import argparse

import torch

if __name__ == "__main__" and not __package__:
    raise SystemExit("run from the repository root as a module: python -m bench.awq_outliers")

from engine.model_runner import load_model  # noqa: E402
from engine.tokenizer import Tokenizer  # noqa: E402
from training.awq import search_clip, search_scale  # noqa: E402
from training.quant_grid import GridSpec, rtn_spec  # noqa: E402
from training.quantize import Calibration, _capture, _linear, calibration_windows  # noqa: E402
from training.quantize_config import QuantizeConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args()
    cfg = QuantizeConfig(model=args.model, out="-", method="awq", calib=tuple(args.calib.split(",")), num_samples=32)
    spec = GridSpec(4, args.group_size, False, torch.float16)
    model = load_model(cfg.model, torch.float32, torch.device("cpu"), gguf_dequantize=True)
    calib = Calibration(model, calibration_windows(cfg, Tokenizer.from_dir(cfg.model)), 8)
    states = calib.embed()
    for i in range(min(args.layers, len(model.layers))):
        layer = model.layers[i]
        seen: dict[str, list[torch.Tensor]] = {f: [] for f in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")}
        handles = [_capture(_linear(layer, f), seen[f].append) for f in seen]  # type: ignore[arg-type]
        nxt = calib.run(layer, states)  # type: ignore[arg-type]
        for h in handles:
            h.remove()
        for f, xs in seen.items():
            x, w = torch.cat(xs)[:4096], _linear(layer, f).weight.float()  # type: ignore[arg-type]
            ref = x @ w.t()

            def err(wq: torch.Tensor) -> float:
                return float((x @ wq.t() - ref).pow(2).mean())  # noqa: B023

            base = err(rtn_spec(w, spec).dequantized())
            s = search_scale(w, x, spec)
            scaled = err(rtn_spec(w * s, spec).dequantized() / s)
            clipped = err(rtn_spec(search_clip(w, x, spec), spec).dequantized())
            both = err(rtn_spec(search_clip(w * s, x / s, spec), spec).dequantized() / s)
            xm = x.abs().mean(0)
            print(f"layer {i} {f:13s} rtn {base:.3e}  scale {scaled / base:.2f}  clip {clipped / base:.2f}  "
                  f"both {both / base:.2f}  s {float(s.min()):.2f}-{float(s.max()):.2f}  "
                  f"mean|x| max/median {float(xm.max() / xm.median()):.1f}", flush=True)
        states = nxt


if __name__ == "__main__":
    main()
