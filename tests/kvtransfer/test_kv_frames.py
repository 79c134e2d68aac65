"""Layouts, frame planning and pool byte views: the pure parts of kvtransfer, with exact numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtransfer import KVLayout
from kvtransfer.frames import (
    PagePool,
    breaks_from_runs,
    plan_chunks,
    plan_frames,
    run_breaks,
    run_lengths,
    runs_within,
)
from tests.kvtransfer.kvpeers import make_pool


def test_layout_page_bytes_and_mismatch_lines() -> None:
    a = KVLayout("m", "bfloat16", num_layers=16, block_size=16, num_kv_heads=8, head_dim=64)
    assert a.page_bytes == 2 * 16 * 8 * 64 * 2 == 32768 and a.transfer_bytes(3) == 16 * 3 * 32768
    b = KVLayout("m", "float16", num_layers=16, block_size=32, num_kv_heads=8, head_dim=64)
    assert a.mismatches(b, "sender", "receiver") == ["dtype: sender bfloat16, receiver float16",
                                                     "block_size: sender 16, receiver 32"]
    assert a.mismatches(KVLayout.from_proto(a.to_proto())) == []
    with pytest.raises(ValueError, match="dtype"):
        KVLayout("m", "int8", 1, 16, 1, 64)
    with pytest.raises(ValueError, match="block_size"):
        KVLayout("m", "float16", 1, 0, 1, 64)


def test_layout_checks_pools() -> None:
    kv = make_pool("float16", None)
    layout = KVLayout.for_pool(kv, "m")
    layout.check_pool(kv)
    with pytest.raises(ValueError, match="dtype"):
        layout.check_pool(kv.float())
    with pytest.raises(ValueError, match="shape"):
        layout.check_pool(kv[:, :, :, :8])
    with pytest.raises(ValueError, match="contiguous"):
        layout.check_pool(kv.transpose(0, 1).contiguous().transpose(0, 1))


def test_runs_and_breaks() -> None:
    ids = [4, 5, 6, 9, 10, 11, 12, 30]
    assert run_lengths(ids) == [3, 4, 1]
    assert runs_within(run_breaks(ids), 1, 6) == [(1, 2), (3, 4)]
    assert run_breaks(ids).tolist() == breaks_from_runs([3, 4, 1]).tolist() == [1, 0, 0, 1, 0, 0, 0, 1]
    assert plan_chunks(10, page_bytes=100, chunk_bytes=400) == [(0, 4), (4, 4), (8, 2)]
    assert plan_chunks(2, page_bytes=100, chunk_bytes=10) == [(0, 1), (1, 1)]  # at least a page


def test_plan_frames_matches_the_docstring_example() -> None:
    src = run_breaks([4, 5, 6, 9, 10, 11, 12, 30])
    dst = run_breaks([7, 8, 2, 3, 4, 5, 20, 21])
    # segments contiguous on both sides: [0-1] [2] [3-5] [6] [7]; >= 2 pages go alone
    assert plan_frames(src, dst, 0, 8, page_bytes=1, direct_min_bytes=2, max_frame_bytes=100) == [2, 1, 3, 2]
    # a chunk in the middle; a gathered frame stops growing at max_frame_bytes
    assert plan_frames(src, dst, 2, 6, page_bytes=1, direct_min_bytes=2, max_frame_bytes=100) == [1, 3, 2]
    assert plan_frames(src, dst, 0, 8, page_bytes=1, direct_min_bytes=99, max_frame_bytes=3) == [3, 3, 2]


def test_page_pool_round_trip_direct_and_gathered() -> None:
    src, dst = make_pool("bfloat16", seed=5), make_pool("bfloat16", None)
    layout = KVLayout.for_pool(src, "m")
    a, b = PagePool(src, layout), PagePool(dst, layout)
    src_ids = np.array([3, 4, 5, 6, 40, 41, 9, 77], dtype=np.int64)
    dst_ids = np.array([10, 11, 12, 13, 14, 2, 100, 101], dtype=np.int64)
    sb, db = run_breaks(src_ids), run_breaks(dst_ids)
    frames = plan_frames(sb, db, 0, 8, layout.page_bytes, direct_min_bytes=4 * layout.page_bytes)
    assert frames == [4, 4]  # pages 0-3 contiguous on both sides; the rest gathered
    for layer in range(layout.num_layers):
        bufs, staged = a.read_frames(layer, src_ids, sb, frames)
        assert np.shares_memory(bufs[0], a.pages.numpy()) and not np.shares_memory(bufs[1], a.pages.numpy())
        assert len(staged) == 1 and np.shares_memory(bufs[1], staged[0])
        targets = b.write_targets(layer, dst_ids, db, frames)
        assert np.shares_memory(targets[0], b.pages.numpy())  # received straight into the pool
        for buf, target in zip(bufs, targets, strict=True):
            target[:] = buf
        b.commit(layer, dst_ids, db, frames)
        a.give_back(staged)  # reused by the next layer
    assert torch.equal(dst[:, dst_ids], src[:, src_ids])
    untouched = [i for i in range(dst.shape[1]) if i not in set(dst_ids.tolist())]
    assert not dst[:, untouched].any()
