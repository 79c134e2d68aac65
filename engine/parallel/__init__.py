"""Tensor parallelism: one model split over several processes (ranks), one GPU each (NCCL), or CPU (gloo).

    shard.py      which heads, rows and vocabulary rows each rank owns; what cannot be split, refused
    group.py      the process group: the model's collectives and rank 0's command channel
    driver.py     rank 0: starts this node's followers, serialises collectives, keep-alive, monitor
    follower.py   ranks 1..N-1: run what rank 0 broadcasts; `run_node` for nodes other than the first
    step.py       one engine step as the tensors rank 0 broadcasts
    relay.py      KV pages between the ranks' pools (their heads) and whole pages for the KV transfer
    quantized.py  one rank's part of a pre-quantized projection

docs/tensor-parallel.md has the whole picture: what crosses which network, and what happens when a rank dies.
"""
