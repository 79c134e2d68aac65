"""A follower rank: joins the group, loads its shard, and runs what rank 0 broadcasts until STOP.

    python -m engine.parallel.follower --rank R --config JSON      (started by TPDriver or run_node)

It owns no scheduler, sampler, gRPC or KV transfer: each STEP is rank 0's batch as tensors, run on this
rank's shard (its collectives pair with rank 0's). Any error, a collective that times out (the group's
`dist_timeout_s`; rank 0 sends a keep-alive NOP while idle) or a closed peer connection ends the
process with exit code 1; rank 0's monitor (or its own collectives) then fails the whole worker.

`run_node(config)` is what a worker command runs on a node other than the first (`--node-rank k`):
it starts that node's ranks as follower processes and exits 1 as soon as any of them fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time

from engine.config import EngineConfig
from engine.heap import freeze_startup_heap
from engine.parallel.driver import follower_config, spawn_follower
from engine.parallel.group import Op, destroy_group, init_group

logger = logging.getLogger(__name__)


def follow(config: EngineConfig, rank: int) -> int:
    """Run rank `rank` until rank 0 says STOP (0) or something fails (1)."""
    from engine.device import resolve_device
    from engine.model_runner import ModelRunner

    device = resolve_device(config.device)
    if device.type == "cuda":
        import torch

        device = torch.device("cuda", rank % config.ranks_per_node)
    assert config.dist_init_addr is not None
    try:
        group = init_group(rank, config.tensor_parallel_size, config.dist_init_addr, config.dist_timeout_s, device)
        runner = ModelRunner(config, group=group)
        freeze_startup_heap()  # a full collection here would stall every rank's collectives
        while True:
            cmd = group.recv()
            if cmd.op is Op.STOP:
                logger.info("tensor parallel: rank %d stopping", rank)
                destroy_group()
                return 0
            runner.follow(cmd)
    except Exception as exc:  # noqa: BLE001 - fail-stop: rank 0 hears of it through its monitor/collectives
        logger.critical("tensor parallel: rank %d failed: %s: %s", rank, type(exc).__name__, exc)
        return 1


def run_node(config: EngineConfig) -> int:
    """Node `config.node_rank` > 0: start its ranks as processes; 1 as soon as one fails, 0 when all stop."""
    per = config.ranks_per_node
    first = config.node_rank * per
    assert config.dist_init_addr is not None  # EngineConfig requires it with nnodes > 1
    cfg = follower_config(config, config.dist_init_addr)
    procs: dict[int, subprocess.Popen[bytes]] = {r: spawn_follower(cfg, r) for r in range(first, first + per)}
    logger.info("tensor parallel: node %d of %d runs ranks %d..%d, rendezvous at %s", config.node_rank,
                config.nnodes, first, first + per - 1, config.dist_init_addr)
    try:
        while procs:
            for rank, proc in list(procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                del procs[rank]
                if code != 0:
                    logger.critical("tensor parallel: rank %d exited with code %d; stopping this node", rank, code)
                    return 1
            time.sleep(0.1)
        return 0
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--config", required=True, help="the EngineConfig as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{args.rank} %(levelname)s %(name)s: %(message)s")
    return follow(EngineConfig(**json.loads(args.config)), args.rank)


if __name__ == "__main__":
    sys.exit(main())
