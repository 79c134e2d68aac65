"""Token masks of a step's constrained rows, filled while the step's forward runs.

    Engine.execute(step)                                  mask thread (llguidance's pool below it)
      masks = filler.start(step)  ------------------------->  fill every constrained row's bitmask
      forward (the model)                                      (the GIL is released while it fills)
      sampling: masks.result(device, V) <-- waits, if at all, only for what the forward did not hide
      logits[rows] = -inf where the mask bit is 0        (engine.sampling.sampler.penalized_logits)

Rows follow the sampler's layout: each sampling sequence owns `step.num_rows(i)` consecutive rows.
A constrained sequence's rows get masks in three ways:

    plain decode / prefill        1 row: the mask after its output so far
    forking n choices             n rows: the same mask (every choice starts from the same state)
    verifying k drafts            k + 1 rows: row r is the mask after its output + drafts[:r]; the filler
                                  consumes the drafts to compute them and rolls them back. Rows after a
                                  draft the grammar forbids stay all-allowed: the target's draw at the
                                  forbidden draft's row cannot take it, so those rows are never emitted.

Buffers: (S, W) int32 bitmasks on the host, W = ceil(tokenizer vocab / 32), one per distinct mask
slot; `result` unpacks them (numpy on CPU; on a GPU the packed words move and unpack there) to (M, V)
bool "forbidden" rows for the M constrained rows. Bits past the tokenizer's vocabulary (a model's
padded rows) are 0: never allowed.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import llguidance as llg
import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from engine.model_runner import StepInput


def default_threads() -> int:
    """Mask threads when none are configured: half the CPUs (the forward needs the rest), 1 to 8."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


@dataclass(frozen=True)
class StepMasks:
    """rows: (M,) int64 sampler rows that are constrained, ascending; forbidden: (M, V) bool on the
    device, True where the row's grammar forbids the token."""

    rows: Tensor
    forbidden: Tensor


class PendingMasks:
    """One step's masks being filled. `result` waits for them (once) and says how long it waited."""

    def __init__(self, future: Future[float], buffer: np.ndarray, rows: list[int], slots: list[int]) -> None:
        self._future = future
        self._buffer = buffer  # (S, W) int32, written by the mask thread until the future is done
        self.rows = rows
        self.slots = slots
        self.fill_seconds = 0.0  # time the mask thread took
        self.wait_seconds = 0.0  # time the step waited for it after its forward
        self._result: StepMasks | None = None

    def result(self, device: torch.device, vocab_size: int) -> StepMasks:
        if self._result is None:
            t0 = time.perf_counter()
            self.fill_seconds = self._future.result()
            self.wait_seconds = time.perf_counter() - t0
            self._result = unpack(self._buffer, self.rows, self.slots, device, vocab_size)
        return self._result


def unpack(buffer: np.ndarray, rows: list[int], slots: list[int], device: torch.device, vocab_size: int
           ) -> StepMasks:
    """(S, W) int32 bitmasks (bit set: allowed) -> StepMasks over `vocab_size` logit columns. Bits past
    W * 32, and past the tokenizer's vocabulary (which the filler leaves 0), are forbidden."""
    if device.type == "cpu":  # numpy unpacks bits ~100x faster than torch's shifts on CPU
        bits = np.unpackbits(np.invert(buffer).view(np.uint8), axis=1, bitorder="little")  # (S, W * 32)
        forbidden = torch.from_numpy(bits).view(torch.bool)
    else:  # move the packed words (32x fewer bytes), unpack on the device
        packed = torch.from_numpy(buffer).to(device, non_blocking=True)  # (S, W) int32
        shifts = torch.arange(32, dtype=torch.int32, device=device)  # (32,)
        forbidden = ((packed[:, :, None] >> shifts) & 1).eq(0).reshape(packed.shape[0], -1)  # (S, W * 32)
    width = forbidden.shape[1]
    if width >= vocab_size:
        forbidden = forbidden[:, :vocab_size]
    else:
        forbidden = torch.nn.functional.pad(forbidden, (0, vocab_size - width), value=True)
    if slots != list(range(len(slots))):  # forked choices share a slot; drafts' rows have their own
        forbidden = forbidden.index_select(0, torch.tensor(slots, dtype=torch.int64, device=forbidden.device))
    return StepMasks(torch.tensor(rows, dtype=torch.int64, device=device), forbidden.to(device))


class MaskFiller:
    """Fills masks on one thread that drives llguidance's own pool of `threads` workers."""

    def __init__(self, tokenizer_vocab: int, threads: int | None = None) -> None:
        self.words = (tokenizer_vocab + 31) // 32
        self.tokenizer_vocab = tokenizer_vocab
        self._executor = llg.LLExecutor(threads or default_threads())
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")

    def start(self, step: StepInput) -> PendingMasks | None:
        """Begin filling the masks of `step`'s constrained sampling rows (None: it has none). Reads
        each sequence's grammar state on the mask thread: nothing may touch those states until
        `result` returns."""
        if all(seq.grammar is None for seq in step.seqs):  # the common step: no row walk, no allocation
            return None
        jobs: list[tuple[llg.LLMatcher, int, list[int]]] = []
        rows: list[int] = []
        slots: list[int] = []
        row = slot = 0
        for i, (seq, sample) in enumerate(zip(step.seqs, step.sample, strict=True)):
            if not sample:
                continue
            n = step.num_rows(i)
            state = seq.grammar
            if state is not None:
                drafts = list(step.spec_tokens[i]) if step.spec_tokens is not None else []
                jobs.append((state.matcher, slot, drafts))
                if drafts:  # row r: after drafts[:r]
                    rows += range(row, row + n)
                    slots += range(slot, slot + n)
                    slot += n
                else:  # one row, or one per forked choice: the same mask
                    rows += range(row, row + n)
                    slots += [slot] * n
                    slot += 1
            row += n
        if not jobs:
            return None
        buffer = np.full((slot, self.words), -1, dtype=np.int32)  # rows the filler skips: all allowed
        future = self._thread.submit(self._fill, jobs, buffer)
        return PendingMasks(future, buffer, rows, slots)

    def _fill(self, jobs: list[tuple[llg.LLMatcher, int, list[int]]], buffer: np.ndarray) -> float:
        t0 = time.perf_counter()
        plain = [(m, slot) for m, slot, drafts in jobs if not drafts]
        drafted = [job for job in jobs if job[2]]
        if plain:
            self._executor.unsafe_compute_mask_ptr(plain, buffer.ctypes.data, self.words * 4, buffer.shape[0])
        if drafted:
            self._executor.unsafe_compute_mask_ptr_with_draft_token(drafted, buffer.ctypes.data, self.words * 4,
                                                                    buffer.shape[0])
        keep = self.tokenizer_vocab - (self.words - 1) * 32  # bits of the last word inside the vocabulary
        if keep < 32:  # the rest are never allowed (rows the filler skipped hold all ones)
            buffer[:, -1] &= np.array([(1 << keep) - 1], dtype=np.uint32).view(np.int32)[0]
        return time.perf_counter() - t0

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
