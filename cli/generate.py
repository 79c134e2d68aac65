"""`tandem generate PROMPT`: stream a completion from a running gateway to the terminal."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def run(args: argparse.Namespace) -> int:
    import grpc

    from tandem.v1 import generation_pb2 as gen
    from tandem.v1 import generation_pb2_grpc

    sampling = gen.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    if args.seed is not None:
        sampling.seed = args.seed
    with grpc.insecure_channel(args.addr) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        last = None
        try:
            for resp in stub.Generate(gen.GenerateRequest(prompt=args.prompt, sampling=sampling), timeout=args.timeout):
                sys.stdout.write(resp.text)
                sys.stdout.flush()
                last = resp
        except grpc.RpcError as exc:
            print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if last is not None:
        u = last.usage
        reason = gen.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
        print(f"\n[{reason}; {u.prompt_tokens} prompt + {u.completion_tokens} completion tokens, "
              f"{u.cached_tokens} cached; first token {last.timing.time_to_first_token_ns / 1e6:.1f} ms]",
              file=sys.stderr)
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("generate", help="stream a completion from a running gateway")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--addr", default="127.0.0.1:50051", help="the gateway's host:port")
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    p.add_argument("--seed", type=int, default=None, help="seed of the draws (reproducible sampling)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before giving up (default: 300)")
    p.set_defaults(func=run)
