"""Stateless seeds for seeded draws: a request's draw depends only on its seed, its sibling index and
its position, never on the batch, the process or preemption. Torch-free (the gateway documents it).

    sibling_seed(seed, i)        the seed of choice i of a request with n choices (parallel sampling)
    step_seed(seed, t)           the generator seed of the draw after t output tokens
"""

from __future__ import annotations

_MASK64 = (1 << 64) - 1
_SEED_LIMIT = 1 << 63  # seeds are non-negative signed 64-bit integers


def splitmix64(x: int) -> int:
    """A bijective 64-bit mixer (Steele et al., SplitMix64 finaliser)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, num_output_tokens: int) -> int:
    """The generator seed for a seeded request's draw after `num_output_tokens` outputs.

    Stateless: it depends only on the request's seed and its position, so the draw is the same
    in any batch, after preemption and recompute, and in another process.
    """
    return splitmix64((splitmix64(seed) + num_output_tokens) & _MASK64)


def sibling_seed(seed: int, index: int) -> int:
    """The seed of choice `index` of a seeded request with n > 1 choices.

    Choice 0 keeps the request's seed (so n = 1 and choice 0 of n draw the same tokens); choice i > 0
    uses splitmix64(seed XOR splitmix64(i)) mod 2**63: the choices draw independent streams, and the
    same seed and n give the same n completions in any batch or process.
    """
    if index == 0:
        return seed
    return splitmix64(seed ^ splitmix64(index)) % _SEED_LIMIT
