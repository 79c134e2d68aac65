"""The KV layout both ends of a transfer must agree on, and the check that compares them.

A worker's KV pool is one contiguous tensor; block b of layer l is one page:

    kv: (num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim)   dtype, contiguous

    kv[l] ──► | page 0 | page 1 | page 2 | ... | page N-1 |      one page = kv[l, b]:
                                                            (2, block_size, Hk, D)  K then V
    page_bytes = 2 * block_size * num_kv_heads * head_dim * itemsize

Pages of one layer with adjacent block ids are adjacent in memory, so a run of ids b..b+k is one
contiguous byte range; this is what lets the transport send runs without copying.

Tensor parallelism: a worker of tp ranks splits its KV heads over them (each rank's pool holds
`rank_kv_heads`); its rank 0 relays whole pages (all `total_kv_heads`) through a staging pool
(engine/parallel/relay.py), so the pages on the wire are the same whatever each side's tp size:

    prefill tp 1  --whole pages-->  decode rank 0 (staging) --scatter--> rank 0 heads [0, 2), rank 1 [2, 4)
    prefill rank 0 <--gather-- ranks 0..n-1;  staging --whole pages-->  decode tp 1

`mapping_error` is the handshake's check that two layouts can be mapped: both sides' pages must be whole
(a peer that sends one rank's heads only is refused, naming the heads), and every field that shapes a page
must agree; the tp sizes themselves may differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.v1 import kv_pb2

PROTOCOL_VERSION = 1  # bump on any change to kv.proto semantics or frame layout

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}


_FIELDS = ("protocol_version", "model_fingerprint", "dtype", "num_layers", "block_size", "num_kv_heads", "head_dim")


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def layout_diff(a: KVLayout | kv_pb2.KVLayout, b: KVLayout | kv_pb2.KVLayout, a_name: str, b_name: str) -> list[str]:
    """Each field where `a` and `b` differ, as "field: <a_name> <a value>, <b_name> <b value>".

    Takes layouts or their protos, so a peer's layout is compared even when it is not a valid
    KVLayout here (say, a dtype this version does not know).
    """
    return [f"{n}: {a_name} {getattr(a, n)}, {b_name} {getattr(b, n)}" for n in _FIELDS if getattr(a, n) != getattr(b, n)]


@dataclass(frozen=True)
class KVLayout:
    """What a KV page means; two workers can exchange KV only if their layouts are equal.

    model_fingerprint identifies the weights (two checkpoints with equal shapes still differ);
    dtype is a torch dtype name. Raises ValueError on a non-positive size or an unknown dtype.
    """

    model_fingerprint: str
    dtype: str
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    protocol_version: int = PROTOCOL_VERSION
    tp_size: int = 1
    tp_rank: int = 0
    rank_kv_heads: int = 0  # 0: num_kv_heads (one rank)
    kv_head_start: int = 0
    total_kv_heads: int = 0  # 0: num_kv_heads (whole pages)

    def __post_init__(self) -> None:
        if not self.rank_kv_heads:
            object.__setattr__(self, "rank_kv_heads", self.num_kv_heads)
        if not self.total_kv_heads:
            object.__setattr__(self, "total_kv_heads", self.num_kv_heads)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("num_layers", "block_size", "num_kv_heads", "head_dim", "protocol_version"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @classmethod
    def for_pool(cls, kv: torch.Tensor, model_fingerprint: str, *, tp_size: int = 1,
                 rank_kv_heads: int = 0) -> KVLayout:
        """The layout of a pool tensor shaped (num_layers, num_blocks, 2, block_size, Hk, D) of whole pages;
        `tp_size` and `rank_kv_heads` describe the worker's ranks behind it (a relaying rank 0)."""
        if kv.dim() != 6 or kv.shape[2] != 2:
            raise ValueError(f"a KV pool is (layers, blocks, 2, block_size, kv_heads, head_dim), got {tuple(kv.shape)}")
        return cls(model_fingerprint, dtype_name(kv.dtype), kv.shape[0], kv.shape[3], kv.shape[4], kv.shape[5],
                   tp_size=tp_size, rank_kv_heads=rank_kv_heads)

    @property
    def whole_pages(self) -> bool:
        return self.kv_head_start == 0 and self.num_kv_heads == self.total_kv_heads

    def describe(self) -> str:
        """"tp 2 (2 of 4 KV heads per rank), whole pages" or "... pages of KV heads [0, 2) of 4"."""
        pages = ("whole pages" if self.whole_pages else
                 f"pages of KV heads [{self.kv_head_start}, {self.kv_head_start + self.num_kv_heads}) of "
                 f"{self.total_kv_heads} (rank {self.tp_rank})")
        return f"tp {self.tp_size} ({self.rank_kv_heads} of {self.total_kv_heads} KV heads per rank), {pages}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def page_bytes(self) -> int:
        """Bytes of one block of one layer: 2 * block_size * num_kv_heads * head_dim * itemsize."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    def transfer_bytes(self, num_blocks: int) -> int:
        """KV bytes of `num_blocks` blocks over all layers."""
        return self.num_layers * num_blocks * self.page_bytes

    def mismatches(self, other: KVLayout | kv_pb2.KVLayout, mine: str = "local", theirs: str = "remote") -> list[str]:
        """One line per differing field: "block_size: sender 16, receiver 32" (mine="sender")."""
        return layout_diff(self, other, mine, theirs)

    def check_pool(self, kv: torch.Tensor) -> None:
        """Raise ValueError unless `kv` is a contiguous pool of this layout (any number of blocks)."""
        want = (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)
        got = (kv.shape[0], *kv.shape[2:]) if kv.dim() == 6 else tuple(kv.shape)
        if got != want:
            raise ValueError(f"KV pool shape {tuple(kv.shape)} does not match layout (layers, blocks, 2, bs, Hk, D) = "
                             f"({want[0]}, *, {', '.join(map(str, want[1:]))})")
        if kv.dtype != self.torch_dtype:
            raise ValueError(f"KV pool dtype {dtype_name(kv.dtype)} does not match layout dtype {self.dtype}")
        if not kv.is_contiguous():
            raise ValueError("KV pool must be contiguous")

    def to_proto(self) -> kv_pb2.KVLayout:
        return kv_pb2.KVLayout(
            protocol_version=self.protocol_version, model_fingerprint=self.model_fingerprint, dtype=self.dtype,
            num_layers=self.num_layers, block_size=self.block_size, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, tp_size=self.tp_size, tp_rank=self.tp_rank, rank_kv_heads=self.rank_kv_heads,
            kv_head_start=self.kv_head_start, total_kv_heads=self.total_kv_heads,
        )

    @classmethod
    def from_proto(cls, msg: kv_pb2.KVLayout) -> KVLayout:
        """Raises ValueError when the peer sent an invalid layout (unknown dtype, zero sizes)."""
        return cls(
            model_fingerprint=msg.model_fingerprint, dtype=msg.dtype, num_layers=msg.num_layers,
            block_size=msg.block_size, num_kv_heads=msg.num_kv_heads, head_dim=msg.head_dim,
            protocol_version=msg.protocol_version, tp_size=msg.tp_size or 1, tp_rank=msg.tp_rank,
            rank_kv_heads=msg.rank_kv_heads, kv_head_start=msg.kv_head_start, total_kv_heads=msg.total_kv_heads,
        )


def mapping_error(sender: KVLayout | kv_pb2.KVLayout, receiver: KVLayout) -> str | None:
    """Why the sender's pages cannot be mapped into the receiver's ranks (None: they can). Takes the
    sender's proto too (a layout this version cannot build still gets a precise answer)."""
    total = sender.total_kv_heads or sender.num_kv_heads
    if total != receiver.total_kv_heads:
        return (f"total_kv_heads: sender {total}, receiver {receiver.total_kv_heads} (not the same model)")
    start, heads = sender.kv_head_start, sender.num_kv_heads
    if start != 0 or heads != total:
        return (f"the sender (tp {sender.tp_size or 1}, rank {sender.tp_rank}) sends pages of KV heads [{start}, "
                f"{start + heads}) of {total}; this receiver ({receiver.describe()}) maps whole pages only: the "
                f"sending worker must relay all {total} heads through its rank 0")
    return None
