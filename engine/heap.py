"""The process's heap and Python's cyclic garbage collector."""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """After one last full collection, move every object alive now (the model, the tokenizer's tables,
    torch's, grpc's and every other imported module's objects) out of the cyclic garbage collector's
    reach, and return how many are frozen. They live as long as the process; without this, every full
    collection walks all of them on whichever thread trips it (the engine thread, the event loop):
    115-140 ms for a SmolLM2 decode worker's ~330k objects, a stall of every stream; frozen, under 1 ms
    (docs/benchmarks.md). Reference counting still frees a frozen object that loses its last reference.

    Every long-lived Tandem process calls it once it is built: the gateway and the workers as they
    start serving (server.process.serve_component), a tensor-parallel follower rank once its shard is
    loaded, and `tandem bench` before its first send."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
