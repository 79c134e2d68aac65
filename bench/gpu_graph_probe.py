"""Which op of the decode forward breaks CUDA-graph capture on a model shape (a GPU diagnostic).

`python -m bench.gpu_graph_probe [--hidden 2048 --heads 32 --kv-heads 8 --inter 8192 --vocab 32000]`: builds
a 2-layer random Llama of that shape in bfloat16, then captures, each in a graph of its own, every op the
decode forward runs (embedding, rms_norm, the linears, rotary, store_kv, paged decode attention,
silu_and_mul), then one layer, then the whole model through engine.cuda_graph.DecodeGraphs, at batch 1
and 64, printing ok or the error for each.
"""

from __future__ import annotations

import argparse
import tempfile
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F


def try_capture(name: str, fn) -> None:
    try:
        fn()  # eager first
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        g.replay()
        torch.cuda.synchronize()
        print(f"ok    {name}", flush=True)
    except Exception as exc:  # noqa: BLE001 - a diagnostic: print and go on
        print(f"FAIL  {name}: {type(exc).__name__}: {str(exc).splitlines()[0]}", flush=True)
        torch.cuda.synchronize()


def probe_batch(r, b: int, args: argparse.Namespace) -> None:
    from engine.model import ForwardContext

    m, ops, dev = r.model, r.ops, r.device
    layer = m.layers[0]
    attn = layer.self_attn
    hd = args.hidden // args.heads
    x = torch.randn(b, args.hidden, dtype=torch.bfloat16, device=dev)
    ids = torch.zeros(b, dtype=torch.int64, device=dev)
    pos = torch.zeros(b, dtype=torch.int64, device=dev)
    slots = torch.full((b,), -1, dtype=torch.int64, device=dev)
    bt = torch.zeros((b, 128), dtype=torch.int32, device=dev)
    sl = torch.ones(b, dtype=torch.int32, device=dev)
    qsl = torch.arange(b + 1, dtype=torch.int32, device=dev)
    q = torch.randn(b, args.heads, hd, dtype=torch.bfloat16, device=dev)
    k = torch.randn(b, args.kv_heads, hd, dtype=torch.bfloat16, device=dev)
    ctx = ForwardContext(kv=r.kv, slot_mapping=slots, block_tables=bt, query_start_loc=qsl, seq_lens=sl,
                         max_query_len=1, ops=ops)
    try_capture(f"B={b} embed", lambda: m.embed(ids))
    try_capture(f"B={b} rms_norm", lambda: ops.rms_norm(x, layer.input_layernorm, 1e-6))
    try_capture(f"B={b} rms_norm+residual", lambda: ops.rms_norm(x, layer.input_layernorm, 1e-6, x.clone()))
    try_capture(f"B={b} qkv linear", lambda: attn.qkv_proj(x))
    try_capture(f"B={b} F.linear bf16", lambda: F.linear(x, attn.qkv_proj.weight))
    try_capture(f"B={b} rotary", lambda: ops.rotary(pos, q.clone(), k.clone(), m.cos_sin_cache))
    try_capture(f"B={b} store_kv", lambda: ops.store_kv(k, k, r.kv[0], slots))
    try_capture(f"B={b} paged decode", lambda: ops.paged_attention(q, r.kv[0], bt, qsl, sl, 0.125, None,
                                                                   max_query_len=1))
    try_capture(f"B={b} gate_up+silu", lambda: ops.silu_and_mul(layer.mlp.gate_up_proj(x)))
    try_capture(f"B={b} lm head", lambda: m.compute_logits(x))
    try_capture(f"B={b} layer", lambda: layer(pos, x, None, m.cos_sin_cache, ctx))
    try_capture(f"B={b} model", lambda: m(ids, pos, ctx))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--inter", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()
    from engine.config import EngineConfig
    from engine.cuda_graph import DecodeGraphs
    from engine.model_runner import ModelRunner
    from training.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        path = make_tiny_model(Path(tmp) / "m", "llama", hidden_size=args.hidden, num_layers=2, num_heads=args.heads,
                               num_kv_heads=args.kv_heads, intermediate_size=args.inter, vocab_size=args.vocab,
                               dtype="bfloat16")
        r = ModelRunner(EngineConfig(model=str(path), device="cuda", dtype="bfloat16", num_kv_blocks=64,
                                     max_num_seqs=64, enforce_eager=True))
        m, ops, dev = r.model, r.ops, r.device
        for b in (1, 64):
            probe_batch(r, b, args)
        try:
            DecodeGraphs(m, r.kv, ops, None, 64, 128, dev)
            print("ok    DecodeGraphs 1..64", flush=True)
        except Exception:  # noqa: BLE001
            print("FAIL  DecodeGraphs:", traceback.format_exc().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
