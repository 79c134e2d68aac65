"""Which slice of each weight, head and vocabulary row one tensor-parallel rank owns.

For tp ranks, Hq query heads, Hk KV heads of head_dim D, intermediate size I and vocabulary V:

    q heads      rank r: [r * Hq/tp, (r+1) * Hq/tp)                  Hq % tp == 0, else refused
    KV heads     Hk >= tp: [r * Hk/tp, (r+1) * Hk/tp)                 Hk % tp == 0, else refused
                 Hk <  tp: head r // (tp/Hk), replicated on tp/Hk ranks  tp % Hk == 0, else refused
    MLP          rank r: intermediate rows [r * I/tp, (r+1) * I/tp)   I % tp == 0, else refused
    vocabulary   rank r: rows [r * Vp, min((r+1) * Vp, V)), Vp = ceil(V / tp); the last rank's rows past
                 V are zero padding (never looked up, their logits dropped)

    Hugging Face tensor              split        dim   rows/cols
    q_proj.weight / .bias            column       0     q heads * D
    k_proj, v_proj .weight / .bias   column       0     KV heads * D
    o_proj.weight                    row          1     q heads * D    (output all-reduced)
    gate_proj, up_proj .weight       column       0     intermediate
    down_proj.weight                 row          1     intermediate  (output all-reduced)
    embed_tokens.weight, lm_head     vocabulary   0     vocabulary rows
    norms, q_norm / k_norm           replicated

A query head h attends to KV head h // (Hq/Hk): rank r's query heads all map to its own KV heads in both
cases above, so attention needs no communication. Torch-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from engine.config import ModelConfig


class Slice(NamedTuple):
    """Take [start, start + size) of dimension `dim` of a tensor whose full length there is `full`."""

    dim: int
    start: int
    size: int
    full: int


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """Raise ValueError, naming the number and the size, when `cfg` cannot be split over `tp` ranks."""
    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
    if tp == 1:
        return
    where = f"--tensor-parallel-size {tp}"
    if cfg.num_heads % tp:
        raise ValueError(f"{cfg.architecture} has {cfg.num_heads} attention heads, which {where} does not divide; "
                         f"choose a size that divides {cfg.num_heads}")
    hk = cfg.num_kv_heads
    if hk >= tp and hk % tp:
        raise ValueError(f"{cfg.architecture} has {hk} KV heads, which {where} does not divide; choose a size that "
                         f"divides {hk}, or a multiple of it (KV heads are then replicated)")
    if hk < tp and tp % hk:
        raise ValueError(f"{cfg.architecture} has {hk} KV heads, fewer than {where} and not a divisor of it: "
                         f"KV heads can be replicated only when the size is a multiple of {hk}")
    if cfg.intermediate_size % tp:
        raise ValueError(f"{cfg.architecture} has intermediate_size {cfg.intermediate_size}, which {where} "
                         f"does not divide")


@dataclass(frozen=True)
class TPShard:
    """Rank `rank` of `size`'s part of a model shaped by `cfg` (see the module docstring)."""

    cfg: ModelConfig
    size: int
    rank: int

    def __post_init__(self) -> None:
        check_tp(self.cfg, self.size)
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank must be in [0, {self.size}), got {self.rank}")

    # ---------------------------------------------------------------- heads
    @property
    def num_heads(self) -> int:
        return self.cfg.num_heads // self.size

    @property
    def head_start(self) -> int:
        return self.rank * self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return max(1, self.cfg.num_kv_heads // self.size)

    @property
    def kv_head_start(self) -> int:
        return kv_head_start(self.cfg.num_kv_heads, self.size, self.rank)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.cfg.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.cfg.head_dim

    # ------------------------------------------------------------------ MLP
    @property
    def intermediate_size(self) -> int:
        return self.cfg.intermediate_size // self.size

    # ------------------------------------------------------------ vocabulary
    @property
    def vocab_per_rank(self) -> int:
        """Vp: rows of every rank's embedding and lm_head shard (the last one zero-padded)."""
        return math.ceil(self.cfg.vocab_size / self.size)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_per_rank

    @property
    def vocab_rows(self) -> int:
        """Real (non-padding) rows of this rank's shard."""
        return max(0, min(self.vocab_per_rank, self.cfg.vocab_size - self.vocab_start))

    # ------------------------------------------------------------- weights
    def slice_for(self, hf_name: str) -> Slice | None:
        """The part of Hugging Face tensor `hf_name` this rank loads; None: all of it (replicated)."""
        if self.size == 1:
            return None
        d, cfg = self.cfg.head_dim, self.cfg
        leaf = hf_name.rsplit(".", 2)
        module, kind = (leaf[-2], leaf[-1]) if len(leaf) >= 2 else ("", "")
        if module == "q_proj":
            return Slice(0, self.head_start * d, self.q_size, cfg.q_size)
        if module in ("k_proj", "v_proj"):
            return Slice(0, self.kv_head_start * d, self.kv_size, cfg.kv_size)
        if module == "o_proj" and kind == "weight":
            return Slice(1, self.head_start * d, self.q_size, cfg.q_size)
        if module in ("gate_proj", "up_proj"):
            return Slice(0, self.rank * self.intermediate_size, self.intermediate_size, cfg.intermediate_size)
        if module == "down_proj" and kind == "weight":
            return Slice(1, self.rank * self.intermediate_size, self.intermediate_size, cfg.intermediate_size)
        if module in ("embed_tokens", "lm_head") and kind == "weight":
            return Slice(0, self.vocab_start, self.vocab_rows, cfg.vocab_size)
        return None


def kv_head_start(num_kv_heads: int, size: int, rank: int) -> int:
    """The first KV head rank `rank` of `size` holds (module docstring: split, or replicated)."""
    if num_kv_heads >= size:
        return rank * (num_kv_heads // size)
    return rank // (size // num_kv_heads)
