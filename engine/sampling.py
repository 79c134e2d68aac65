"""Sampling: per-request options and the batched sampler.

One import point for the engine, the workers and the gateway. The pieces live in
`engine.sampling_params` (options and their limits), `engine.sampling_batch` (one step's options
as device tensors) and `engine.sampler` (penalties, truncation, the draw).
"""

from engine.sampler import Sampler, SamplerOutput, penalized_logits, probabilities
from engine.sampling_batch import PenaltyTensors, SamplingBatch, step_seed
from engine.sampling_params import (
    GREEDY_TEMPERATURE_EPS,
    MAX_LOGPROBS,
    MAX_PENALTY,
    MAX_SEED,
    MAX_STOP_LEN,
    MAX_STOP_STRINGS,
    MIN_PENALTY,
    SamplingParams,
)

__all__ = [
    "GREEDY_TEMPERATURE_EPS",
    "MAX_LOGPROBS",
    "MAX_PENALTY",
    "MAX_SEED",
    "MAX_STOP_LEN",
    "MAX_STOP_STRINGS",
    "MIN_PENALTY",
    "PenaltyTensors",
    "Sampler",
    "SamplerOutput",
    "SamplingBatch",
    "SamplingParams",
    "penalized_logits",
    "probabilities",
    "step_seed",
]
