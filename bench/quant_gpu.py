"""GPU benchmark of the quantized GEMMs and of quantized decoding (issue 6), Llama-3.1-8B shapes.

Run from the repository root: ``.venv/bin/python -m bench.quant_gpu [--rep MS] [--sweep] [--out PATH]``.

GEMMs. For each projection of a Llama-3.1-8B layer (qkv 6144x4096, o 4096x4096, gate_up 28672x4096,
down 4096x14336), random weights, M = 1, 16, 64 (decode batches) and 2048 (a prefill chunk): the median
time of bf16 ``F.linear`` and of each scheme's GEMM as the engine builds it on CUDA (int8 / int4: the
Triton W8A16 / W4A16 kernels; fp8: ``torch._scaled_mm``, W8A8 with per-token activation scales), the
weight bytes streamed per second, the speed-up over bf16, and the relative error against the scheme's
dequantize-then-matmul reference. ``--sweep`` also times a grid of tile configs per (scheme, shape, M)
and reports the best, to tune kernels/quant_gemm.py ``choose_config``.

Decode. A 32-layer Llama-3.1-8B (random weights, bf16, Triton kernels) quantized in place by
``engine.quant.quantize_model``: one decode step for a batch of B = 1, 16, 64 sequences with 512 tokens
of context each, captured in a CUDA graph (eager if capture fails; the JSON says which). Reported:
tokens/s, the speed-up over bf16, and the projection weights' bytes.
Targets (issue 6): at batch 1, int4 >= 2.5x and int8 >= 1.6x bf16 decode speed.

Formats (issue 20). The grouped kernel every pre-quantized checkpoint runs on (kernels/wna16_gemm.py) on
the same shapes and M, per layout: GPTQ/AWQ int4 groups of 128, GPTQ act-order (x gathered through the
permutation), GGUF Q4_K-style float offsets (groups of 32), Q8_0 (8 bits, groups of 32) and Q6_K (8 bits,
groups of 16): time, speed-up over bf16 and error against the reference.

Without CUDA it exits with status 2. ``--smoke`` instead runs tiny float32 shapes on CPU through the
Triton interpreter (set TRITON_INTERPRET=1 first): it checks this script, not speed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

if __name__ == "__main__" and not __package__:
    raise SystemExit("run from the repository root as a module: python -m bench.quant_gpu")

from bench.kernel_speed import timer  # noqa: E402
from engine.config import ModelConfig  # noqa: E402
from engine.model import CausalLM, ForwardContext  # noqa: E402
from engine.quant import linear_weight_bytes, quantize_model  # noqa: E402
from engine.quant.apply import quantize_linear  # noqa: E402
from engine.quant.linear import Fp8Linear, Int4Linear, Int8Linear, QuantLinear  # noqa: E402
from kernels.ops import select_ops  # noqa: E402
from kernels.quant_gemm import GemmConfig, w4a16_gemm, w8a16_gemm  # noqa: E402
from kernels.wna16_gemm import GroupWeight, pack_int4, wna16_gemm, wna16_ref  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMES = ("int8", "int4", "fp8")
TARGETS = {"int4": 2.5, "int8": 1.6}  # decode speed-up over bf16 at batch 1
FULL = dict(hidden=4096, inter=14336, hq=32, hk=8, head_dim=128, vocab=128256, layers=32,
            batches=(1, 16, 64), prefill_m=2048, context=512, block_size=16)  # fmt: skip
SMOKE = dict(hidden=64, inter=128, hq=2, hk=1, head_dim=32, vocab=256, layers=1,
             batches=(1, 2), prefill_m=20, context=20, block_size=16)  # fmt: skip
SWEEP = [GemmConfig(bm, bn, bk, sk, 8, w, st) for bm, bn, bk, sk, w, st in (
    (16, 32, 128, 1, 4, 4), (16, 64, 128, 1, 4, 4), (16, 64, 128, 4, 4, 4), (16, 128, 128, 2, 4, 4),
    (16, 128, 64, 1, 4, 5), (32, 64, 128, 2, 4, 4), (64, 64, 64, 1, 4, 4), (64, 128, 64, 1, 4, 3),
    (128, 128, 64, 1, 8, 3), (128, 256, 64, 1, 8, 3))]  # fmt: skip


def shapes(s: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(N, K) of each projection of one layer."""
    q, kv = s["hq"] * s["head_dim"], s["hk"] * s["head_dim"]
    return {"qkv_proj": (q + 2 * kv, s["hidden"]), "o_proj": (s["hidden"], q),
            "gate_up_proj": (2 * s["inter"], s["hidden"]), "down_proj": (s["hidden"], s["inter"])}


def reference(module: QuantLinear, weight: torch.Tensor, dtype: torch.dtype) -> nn.Module:
    """The same quantized weights behind the dequantize-then-matmul kernel."""
    if isinstance(module, Int4Linear):
        return Int4Linear(weight, None, "dequant", dtype, module.group_size)
    return (Int8Linear if isinstance(module, Int8Linear) else Fp8Linear)(weight, None, "dequant", dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def gemm_rows(s: dict[str, Any], dtype: torch.dtype, device: torch.device, time_ms: Callable[..., float],
              sweep: bool) -> list[dict[str, Any]]:  # fmt: skip
    rows: list[dict[str, Any]] = []
    backend = "triton"  # CUDA, or the interpreter in --smoke
    for name, (n, k) in shapes(s).items():
        weight = torch.randn(n, k, device=device, dtype=dtype) / math.sqrt(k)
        dense_bytes = n * k * weight.element_size()
        for m in (*s["batches"], s["prefill_m"]):
            x = torch.randn(m, k, device=device, dtype=dtype)
            base_ms = time_ms(lambda: F.linear(x, weight))  # noqa: B023
            rows.append(dict(shape=name, n=n, k=k, m=m, scheme="dense", kernel="F.linear", ms=base_ms,
                             weight_gbps=dense_bytes / base_ms / 1e6, speedup=1.0, rel_err=0.0))
            for scheme in SCHEMES:
                mod = quantize_linear(_dense(weight), scheme, backend, device, dtype)
                assert isinstance(mod, QuantLinear)
                ms = time_ms(lambda: mod(x))  # noqa: B023
                row = dict(shape=name, n=n, k=k, m=m, scheme=scheme, kernel=mod.kernel, ms=ms,
                           weight_gbps=mod.weight_bytes() / ms / 1e6, speedup=base_ms / ms,
                           rel_err=rel_err(mod(x), reference(mod, weight, dtype)(x)))
                if sweep and mod.kernel == "triton" and m != s["prefill_m"]:
                    row["sweep"] = sweep_configs(mod, x, time_ms)
                rows.append(row)
                print(f"{name:13s} M={m:5d} {scheme:5s} {mod.kernel:9s} {ms * 1e3:9.1f} us "
                      f"x{base_ms / ms:5.2f} vs {dtype}  err {row['rel_err']:.1e}", flush=True)
    return rows


# layout name -> (bits, group, float offsets, act-order)
FORMATS = {"int4-g128 (gptq, awq)": (4, 128, False, False), "int4-g128-act-order (gptq)": (4, 128, False, True),
           "int4-g32-offsets (q4_k)": (4, 32, True, False), "int8-g32 (q8_0)": (8, 32, False, False),
           "int8-g16 (q6_k)": (8, 16, False, False)}  # fmt: skip


def group_weight(n: int, k: int, bits: int, group: int, offsets: bool, act_order: bool,
                 device: torch.device) -> GroupWeight:  # fmt: skip
    """Random codes and scales of one layout (the values do not matter for speed)."""
    groups = -(-k // group)
    q = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, device=device)
    scales = torch.rand(n, groups, device=device) / (2**bits * math.sqrt(k))
    zeros = (-scales * 2 ** (bits - 1) if offsets
             else torch.full((n, groups), 2 ** (bits - 1), dtype=torch.uint8, device=device))  # fmt: skip
    perm = torch.randperm(k, device=device).to(torch.int32) if act_order else None
    return GroupWeight(pack_int4(q) if bits == 4 else q, scales.half(), zeros, group, bits, perm)


def format_rows(s: dict[str, Any], dtype: torch.dtype, device: torch.device,
                time_ms: Callable[..., float]) -> list[dict[str, Any]]:  # fmt: skip
    rows: list[dict[str, Any]] = []
    for name, (n, k) in shapes(s).items():
        weight = torch.randn(n, k, device=device, dtype=dtype) / math.sqrt(k)
        for layout, (bits, group, offsets, act_order) in FORMATS.items():
            w = group_weight(n, k, bits, group, offsets, act_order, device)
            nbytes = sum(t.numel() * t.element_size() for t in (w.qweight, w.scales, w.zeros))
            for m in (*s["batches"], s["prefill_m"]):
                x = torch.randn(m, k, device=device, dtype=dtype)
                base_ms = time_ms(lambda: F.linear(x, weight))  # noqa: B023
                ms = time_ms(lambda: wna16_gemm(x, w))  # noqa: B023
                err = rel_err(wna16_gemm(x, w), wna16_ref(x, w))
                rows.append(dict(shape=name, n=n, k=k, m=m, layout=layout, ms=ms, speedup=base_ms / ms,
                                 weight_gbps=nbytes / ms / 1e6, rel_err=err))
                print(f"{name:13s} M={m:5d} {layout:28s} {ms * 1e3:9.1f} us x{base_ms / ms:5.2f} vs {dtype}  "
                      f"err {err:.1e}", flush=True)
    return rows


def _dense(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    return lin


def sweep_configs(mod: QuantLinear, x: torch.Tensor, time_ms: Callable[..., float]) -> dict[str, Any]:
    """Time every SWEEP config that fits this layer; the best and the default's time."""
    times: dict[str, float] = {}
    for cfg in SWEEP:
        if isinstance(mod, Int4Linear):
            if mod.group_size % cfg.block_k:
                continue
            fn = lambda: w4a16_gemm(x, mod.qweight, mod.scales, mod.zeros, mod.group_size, config=cfg)  # noqa: B023, E731
        elif isinstance(mod, Int8Linear):
            fn = lambda: w8a16_gemm(x, mod.qweight, mod.scale, config=cfg)  # noqa: B023, E731
        else:
            continue
        times[str(tuple(cfg))] = time_ms(fn)
    best = min(times, key=times.__getitem__)
    return {"best": best, "best_ms": times[best], "default_ms": time_ms(lambda: mod(x)), "all_ms": times}


def build_model(s: dict[str, Any], dtype: torch.dtype, device: torch.device) -> CausalLM:
    """A Llama of shape ``s`` with random weights (projections N(0, 1/fan_in), norms 1), on ``device``."""
    cfg = ModelConfig.from_hf({
        "architectures": ["LlamaForCausalLM"], "vocab_size": s["vocab"], "hidden_size": s["hidden"],
        "intermediate_size": s["inter"], "num_hidden_layers": s["layers"], "num_attention_heads": s["hq"],
        "num_key_value_heads": s["hk"], "head_dim": s["head_dim"], "rope_theta": 500000.0,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
    })  # fmt: skip
    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
            else:
                p.fill_(1.0)
    model.init_rope(cfg.max_position_embeddings)
    return model.eval()


def decode_step(model: CausalLM, s: dict[str, Any], batch: int, dtype: torch.dtype, device: torch.device,
                backend: str) -> Callable[[], torch.Tensor]:  # fmt: skip
    """One decode step for ``batch`` sequences at position ``context - 1``, over a private KV pool."""
    bs, ctx_len = s["block_size"], s["context"]
    per_seq = math.ceil(ctx_len / bs)
    kv = torch.zeros(s["layers"], batch * per_seq, 2, bs, s["hk"], s["head_dim"], dtype=dtype, device=device)
    tables = torch.arange(batch * per_seq, dtype=torch.int32, device=device).view(batch, per_seq)
    pos = ctx_len - 1
    ctx = ForwardContext(
        kv=kv, slot_mapping=(tables[:, pos // bs].long() * bs + pos % bs),
        block_tables=tables, query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=device),
        seq_lens=torch.full((batch,), ctx_len, dtype=torch.int32, device=device), max_query_len=1,
        ops=select_ops(backend, device),
    )  # fmt: skip
    ids = torch.randint(0, s["vocab"], (batch,), device=device)
    positions = torch.full((batch,), pos, dtype=torch.int64, device=device)

    @torch.inference_mode()
    def step() -> torch.Tensor:
        return model.compute_logits(model(ids, positions, ctx))  # (batch, V)

    return step


def graphed(step: Callable[[], torch.Tensor], device: torch.device) -> tuple[Callable[[], Any], str]:
    """``step`` captured in a CUDA graph, or ``step`` itself (eager) when capture is impossible."""
    if device.type != "cuda":
        return step, "eager"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return graph.replay, "cuda_graph"
    except RuntimeError as err:  # a host sync or an uncapturable op: time it eagerly
        print(f"CUDA graph capture failed ({err}); timing eagerly", file=sys.stderr)
        return step, "eager"


def decode_rows(s: dict[str, Any], dtype: torch.dtype, device: torch.device, time_ms: Callable[..., float],
                backend: str) -> list[dict[str, Any]]:  # fmt: skip
    rows: list[dict[str, Any]] = []
    base: dict[int, float] = {}
    for scheme in ("dense", *SCHEMES):
        model = build_model(s, dtype, device)
        if scheme != "dense":
            quantize_model(model, scheme, device, backend)
        weight_bytes = linear_weight_bytes(model)
        for batch in s["batches"]:
            fn, mode = graphed(decode_step(model, s, batch, dtype, device, backend), device)
            ms = time_ms(fn)
            base.setdefault(batch, ms)
            rows.append(dict(scheme=scheme, batch=batch, ms=ms, tokens_per_s=batch / ms * 1e3,
                             speedup=base[batch] / ms, mode=mode, linear_weight_bytes=weight_bytes))
            print(f"decode {scheme:5s} batch {batch:3d}: {ms:8.3f} ms/step  {batch / ms * 1e3:9.1f} tok/s  "
                  f"x{base[batch] / ms:5.2f} ({mode})", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def run(s: dict[str, Any], dtype: torch.dtype, device: torch.device, rep_ms: int, sweep: bool,
        judge: bool) -> dict[str, Any]:  # fmt: skip
    time_ms = timer(device, rep_ms)
    backend = "auto" if device.type == "cuda" else "triton"
    torch.manual_seed(0)
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)",
        "dtype": str(dtype), "shapes": s, "gemm": gemm_rows(s, dtype, device, time_ms, sweep),
        "decode": decode_rows(s, dtype, device, time_ms, backend),
        "formats": format_rows(s, dtype, device, time_ms),
    }  # fmt: skip
    if judge:
        at1 = {r["scheme"]: r["speedup"] for r in result["decode"] if r["batch"] == 1}
        result["targets"] = {k: {"target": v, "speedup": at1[k], "met": at1[k] >= v} for k, v in TARGETS.items()}
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rep", type=int, default=100, help="milliseconds of repetitions per timing (CUDA)")
    ap.add_argument("--sweep", action="store_true", help="also time a grid of Triton tile configs")
    ap.add_argument("--smoke", action="store_true", help="tiny float32 shapes on CPU (Triton interpreter)")
    ap.add_argument("--out", type=Path, default=None)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        result = run(SMOKE, torch.float32, torch.device("cpu"), args.rep, args.sweep, judge=False)
    elif not torch.cuda.is_available():
        print("bench/quant_gpu.py needs a CUDA GPU (none found); --smoke checks the script on CPU", file=sys.stderr)
        return 2
    else:
        result = run(FULL, torch.bfloat16, torch.device("cuda"), args.rep, args.sweep, judge=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or RESULTS / f"quant-gpu-{'smoke' if args.smoke else 'h200'}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all(t["met"] for t in result.get("targets", {}).values()) else 1


if __name__ == "__main__":
    sys.exit(main())
