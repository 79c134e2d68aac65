"""Sampling: per-request options and the batched sampler.

    params.py   SamplingParams and its limits (torch-free: the gateway validates with it)
    batch.py    one step's options as device tensors (SamplingBatch)
    sampler.py  penalties, truncation and the draw (Sampler)
"""
