"""The handshake between workers of different tensor-parallel sizes, over real ZeroMQ sockets: whole pages
map whatever each side's tp size; a sender that ships one rank's KV heads only, or another model's head
count, is refused at once with MISMATCH and a message that names the heads (never a hang)."""

from __future__ import annotations

import dataclasses

import torch

from kvtransfer import KVLayout, KVSender, TransferCode
from kvtransfer.layout import mapping_error
from tests.kvtransfer.kvpeers import SHAPE, Allocator, layout_of, make_pool

T = 1.0
BIND = "tcp://127.0.0.1:0"


def _send(src: torch.Tensor, src_layout: KVLayout, dst: torch.Tensor, dst_layout: KVLayout,
          ids: list[int]) -> tuple:
    alloc = Allocator(dst.shape[1])
    receiver = alloc.receiver(dst, BIND, layout=dst_layout, timeout_s=T)
    sender = KVSender(src, src_layout, timeout_s=T)
    try:
        handle = sender.begin("tp", receiver.address, ids, len(ids) * SHAPE["block_size"])
        handle.all_ready()
        result = handle.result(timeout=5)
    finally:
        sender.close()
        receiver.close()
    assert alloc.balanced()
    return result, alloc


def test_whole_pages_map_between_different_tp_sizes() -> None:
    src, dst = make_pool("float16", seed=3), make_pool("float16", None)
    # a tp-2 prefill worker's rank 0 relays whole pages (1 KV head per rank) to a tp-1 decode worker
    sender_layout = dataclasses.replace(layout_of(src), tp_size=2, rank_kv_heads=1)
    result, alloc = _send(src, sender_layout, dst, layout_of(dst), [4, 5, 9])
    assert result.ok, result.error
    assert torch.equal(dst[:, alloc.completed["tp"].block_ids], src[:, [4, 5, 9]])


def test_a_sender_of_one_ranks_heads_is_refused_naming_them() -> None:
    heads = SHAPE["num_kv_heads"]
    src = make_pool("float16", seed=4, num_kv_heads=heads // 2)  # rank 1 of 2: head 1 only
    partial = dataclasses.replace(layout_of(src), tp_size=2, tp_rank=1, rank_kv_heads=1, kv_head_start=1,
                                  total_kv_heads=heads)
    dst = make_pool("float16", None)
    result, alloc = _send(src, partial, dst, layout_of(dst), [1, 2])
    assert result.code is TransferCode.MISMATCH and not result.ok
    assert "sends pages of KV heads [1, 2) of 2" in (result.error or ""), result.error
    assert "maps whole pages only" in (result.error or "")
    assert alloc.reservations == 0


def test_another_models_kv_head_count_is_refused() -> None:
    src = make_pool("float16", seed=5, num_kv_heads=4)
    dst = make_pool("float16", None)
    result, _ = _send(src, layout_of(src), dst, layout_of(dst), [1])
    assert result.code is TransferCode.MISMATCH
    assert "total_kv_heads: sender 4, receiver 2" in (result.error or ""), result.error


def test_layout_proto_round_trip_and_defaults() -> None:
    layout = dataclasses.replace(layout_of(make_pool("float16", None)), tp_size=4, rank_kv_heads=1)
    back = KVLayout.from_proto(layout.to_proto())
    assert back == layout and back.whole_pages and "tp 4 (1 of 2 KV heads per rank)" in back.describe()
    old = layout.to_proto()
    for name in ("tp_size", "rank_kv_heads", "total_kv_heads"):
        old.ClearField(name)  # a peer from before tensor parallelism: one rank, whole pages
    legacy = KVLayout.from_proto(old)
    assert (legacy.tp_size, legacy.rank_kv_heads, legacy.total_kv_heads) == (1, 2, 2)
    assert mapping_error(old, layout) is None
