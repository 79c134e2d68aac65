"""How a transfer's pages are cut into chunks and frames, and the byte views they are read from and
written to.

A transfer moves pages (block ids) src[0..n) of the sender's pool into dst[0..n) of the receiver's,
for every layer. Each layer is cut into chunks (one KVLayer message each, one ack each) of at most
`chunk_bytes`; each chunk into frames. A frame is a run of pages that the sender reads and the
receiver writes as one buffer:

    position in transfer:  0   1   2   3   4   5   6   7
    src block ids:         4   5   6   9  10  11  12  30      src runs: [4-6] [9-12] [30]
    dst block ids:         7   8   2   3   4   5  20  21      dst runs: [7-8] [2-5] [20-21]
    segments (both runs):  [0-1] [2] [3-5] [6] [7]             contiguous on both sides
    frames:                big segments (>= direct_min_bytes) alone: zero-copy on both sides;
                           small neighbours merged into one gathered frame (one copy each side)

Measured on loopback (pyzmq 27, 2 cores): 32 KiB frames move ~1 GB/s, >= 1 MiB frames ~3 GB/s, and
a memcpy is far faster than either, so gathering small pages beats one frame per page.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kvtransfer.layout import KVLayout

DIRECT_MIN_BYTES = 256 << 10  # a segment this big is its own zero-copy frame
MAX_FRAME_BYTES = 4 << 20  # gathered frames stop growing here
MAX_CHUNK_BYTES = 16 << 20  # one KVLayer message (and one ack) covers at most this much


def run_lengths(ids: Sequence[int]) -> list[int]:
    """Lengths of the maximal runs of consecutive ids: [4, 5, 6, 9, 10] -> [3, 2]."""
    out: list[int] = []
    for i, b in enumerate(ids):
        if i and b == ids[i - 1] + 1:
            out[-1] += 1
        else:
            out.append(1)
    return out


def run_breaks(ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """breaks[i] is True where page i does not continue page i-1's run (always True at 0)."""
    arr = np.asarray(ids, dtype=np.int64)
    breaks = np.ones(len(arr), dtype=bool)
    breaks[1:] = arr[1:] != arr[:-1] + 1
    return breaks


def breaks_from_runs(runs: Sequence[int]) -> np.ndarray:
    """The inverse of run_lengths, as breaks: [3, 2] -> [T, F, F, T, F]."""
    breaks = np.zeros(int(sum(runs)), dtype=bool)
    breaks[np.cumsum([0, *runs[:-1]], dtype=np.int64)] = True
    return breaks


def contiguous(breaks: np.ndarray, first: int, n: int) -> bool:
    """Pages [first, first + n) are one run."""
    return not breaks[first + 1 : first + n].any()


def plan_chunks(num_pages: int, page_bytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """[(first, count)] covering [0, num_pages) with at most max(1, chunk_bytes // page_bytes) pages each."""
    per = max(1, chunk_bytes // page_bytes)
    return [(a, min(per, num_pages - a)) for a in range(0, num_pages, per)]


def plan_frames(src_breaks: np.ndarray, dst_breaks: np.ndarray, first: int, n: int, page_bytes: int,
                direct_min_bytes: int = DIRECT_MIN_BYTES, max_frame_bytes: int = MAX_FRAME_BYTES) -> list[int]:
    """Page counts of the frames of chunk [first, first + n); they sum to n."""
    cut = np.flatnonzero(src_breaks[first : first + n] | dst_breaks[first : first + n])
    bounds = [*cut.tolist(), n] if len(cut) and cut[0] == 0 else [0, *cut.tolist(), n]
    frames: list[int] = []
    pending = 0
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        seg = b - a
        if seg * page_bytes >= direct_min_bytes:
            if pending:
                frames.append(pending)
                pending = 0
            frames.append(seg)
            continue
        if pending and (pending + seg) * page_bytes > max_frame_bytes:
            frames.append(pending)
            pending = 0
        pending += seg
    if pending:
        frames.append(pending)
    return frames


def runs_within(breaks: np.ndarray, at: int, n: int) -> list[tuple[int, int]]:
    """(start, length) of each run among positions [at, at + n)."""
    starts = [at, *(at + 1 + np.flatnonzero(breaks[at + 1 : at + n])).tolist(), at + n]
    return [(a, b - a) for a, b in zip(starts[:-1], starts[1:], strict=True)]


class PagePool:
    """Byte views of one worker's KV pool: `pages[l, b]` is the page_bytes of block b of layer l.

        kv (L, N, 2, bs, Hk, D) dtype  ──view──►  pages (L, N, page_bytes) uint8   (no copy)

    CPU pools are read and written in place where a frame's pages are one run; other frames are
    gathered into reusable staging buffers (sender) or scattered from a reusable scratch buffer
    (receiver), one slice copy per run (torch's index_copy_ on uint8 rows ran at ~1 GB/s, slice
    copies at memcpy speed). CUDA pools go through host memory, one device gather or scatter per
    chunk. Raises ValueError if `kv` does not match `layout`.
    """

    def __init__(self, kv: torch.Tensor, layout: KVLayout, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        layout.check_pool(kv)
        self.kv = kv
        self.layout = layout
        self.page_bytes = pb = layout.page_bytes  # pb: page bytes, used in every slice below
        self.num_blocks = kv.shape[1]
        self.on_cpu = kv.device.type == "cpu"
        self.pages = kv.view(torch.uint8).view(kv.shape[0], self.num_blocks, pb)
        self._np = self.pages.numpy() if self.on_cpu else np.empty((0, 0, pb), dtype=np.uint8)
        self._scratch = np.empty(0, dtype=np.uint8)
        self._staging_bytes = max(max_frame_bytes, pb)
        self._free_staging: list[np.ndarray] = []

    def read_frames(self, layer: int, ids: np.ndarray, breaks: np.ndarray,
                    frames: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The bytes of pages `ids` (a chunk) of `layer`: (one 1-D uint8 buffer per frame, the staging
        buffers used). Frames that are one run of a CPU pool are views of the pool: zero-copy, so the
        pages must not change until they are sent. Hand the staging buffers to `give_back` once the
        peer acknowledged the chunk (ZeroMQ has read them then), never earlier."""
        pb = self.page_bytes
        if not self.on_cpu:
            index = torch.from_numpy(ids).to(self.pages.device)
            host = self.pages[layer].index_select(0, index).cpu().numpy().reshape(-1)
            return np.split(host, np.cumsum(frames[:-1]) * pb), []
        out, staged, at = [], [], 0
        for n in frames:
            if contiguous(breaks, at, n):
                b = int(ids[at])
                out.append(self._np[layer, b : b + n].reshape(-1))
            else:
                buf = self._free_staging.pop() if self._free_staging else np.empty(self._staging_bytes, np.uint8)
                for start, k in runs_within(breaks, at, n):
                    b = int(ids[start])
                    buf[(start - at) * pb : (start - at + k) * pb] = self._np[layer, b : b + k].reshape(-1)
                out.append(buf[: n * pb])
                staged.append(buf)
            at += n
        return out, staged

    def give_back(self, staged: list[np.ndarray]) -> None:
        """Return staging buffers for reuse (keeping at most 64 MiB of them)."""
        room = max(0, (64 << 20) // self._staging_bytes - len(self._free_staging))
        self._free_staging.extend(staged[:room])

    def write_targets(self, layer: int, ids: np.ndarray, breaks: np.ndarray, frames: list[int]) -> list[np.ndarray]:
        """Writable 1-D uint8 buffers to receive each frame of a chunk into, in order; call
        `commit` with the same arguments once all are filled. Frames that are one run of a CPU pool
        are the pool itself; the rest are slices of a scratch buffer reused across chunks."""
        pb = self.page_bytes
        if len(self._scratch) < sum(frames) * pb:
            self._scratch = np.empty(sum(frames) * pb, dtype=np.uint8)
        out, at = [], 0
        for n in frames:
            if self.on_cpu and contiguous(breaks, at, n):
                b = int(ids[at])
                out.append(self._np[layer, b : b + n].reshape(-1))
            else:
                out.append(self._scratch[at * pb : (at + n) * pb])
            at += n
        return out

    def commit(self, layer: int, ids: np.ndarray, breaks: np.ndarray, frames: list[int]) -> None:
        """Scatter the scratch-buffered frames of a chunk into the pool (no-op for direct ones)."""
        pb, n_all = self.page_bytes, sum(frames)
        if not self.on_cpu:
            index = torch.from_numpy(ids).to(self.pages.device)
            rows = torch.from_numpy(self._scratch[: n_all * pb]).view(n_all, pb).to(self.pages.device)
            self.pages[layer].index_copy_(0, index, rows)
            return
        at = 0
        for n in frames:
            if not contiguous(breaks, at, n):
                for start, k in runs_within(breaks, at, n):
                    b = int(ids[start])
                    self._np[layer, b : b + k] = self._scratch[start * pb : (start + k) * pb].reshape(k, pb)
            at += n
