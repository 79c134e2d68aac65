"""The decode worker's core: an engine loop and the KV receiver that feeds it, one owner per request.

Per request (engine thread unless noted):

    Decode RPC -> DecodeCore.decode(req)            (the RPC's thread: the sequence is already validated)
        local prefill: the request joins the scheduler (conditional disaggregation)
        otherwise:     it is registered and waits for its KV, outside the scheduler
    KVTransferBegin (receiver I/O thread) -> want(id, n) -> command
        the scheduler's admission (Scheduler.reserve_kv) grants n blocks when it can -> receiver.grant;
        a transfer whose request is not registered yet waits, keyed by id, for its registration
        (or `kv_timeout_s`): registration before transfer holds by construction
    last page written (I/O thread: the peer's meta is parsed and checked there) -> command: adopt
        the sequence takes the granted blocks, appends its first token and joins the running batch;
        with n > 1 choices it forks the other n - 1 from those blocks (Engine.fork: shared by
        reference count, a partial last block copied on first write), each with the first token the
        prefill worker sampled for it: one KV transfer for all n
    transfer failed (I/O thread) -> command: the request fails with the transfer's status

Block ownership (docs/ARCHITECTURE.md):

    free pool --reserve_kv--> granted: held by the KVReceiver --adopt--> the request's sequence
         ^                        | (transfer failed / aborted: release, a command)    |
         +------------------------+<-------------- finished / aborted: free -----------+

The receiver's I/O thread never touches the scheduler or the block manager: everything it learns
reaches the engine thread as a command.

Tensor parallelism (the runner has a `staging` pool, engine/parallel/relay.py): the receiver writes whole
pages into staging blocks, granted with the pool blocks they map to (`_relayed`); on arrival the pages
are scattered to every rank's pool (each rank its KV heads; a collective, on the engine thread), then the
staging blocks go back. A transfer waits for admission while staging is full, as while the pool is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from decode_worker.observe import DecodeObserver, DecodeTrace
from engine.engine import Engine
from engine.engine_loop import EngineLoop, Request
from engine.outputs import RequestGone
from kvtransfer import CompletedTransfer, FailedTransfer, KVLayout, KVReceiver, TransferCode
from kvtransfer.curve import CurveServer
from server.metrics import WorkerMetrics, new_registry
from server.protoconv import logprob_from_proto
from server.tracing import disabled
from server.worker import transfer_error
from tandem.v1 import kv_pb2

logger = logging.getLogger(__name__)


# How much later than this worker's own deadlines the KV receiver refuses an unanswered transfer.
_RESERVE_BACKSTOP_S = 1.0


@dataclass(eq=False)
class DecodeRequest(Request):
    local: bool = False  # prefill here; else the KV comes from a prefill worker
    kv_blocks: list[int] | None = None  # granted to its transfer, held by the receiver until adopted
    trace: DecodeTrace = field(default_factory=DecodeTrace)


@dataclass
class _Want:
    """A transfer asking for blocks: waiting for admission, or for its request's registration."""

    num_blocks: int
    since: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class _Arrived:
    """A completed transfer, its meta parsed and checked on the I/O thread."""

    transfer: CompletedTransfer
    meta: kv_pb2.KVRequestMeta | None
    error: str = ""


class DecodeCore:
    def __init__(self, engine: Engine, layout: KVLayout, kv_bind: str, kv_timeout_s: float,
                 obs: DecodeObserver | None = None, *, curve: CurveServer | None = None,
                 watchdog_s: float | None = None, fault: tuple[str, int] | None = None) -> None:
        self.engine = engine
        self.obs = obs or DecodeObserver(disabled(), WorkerMetrics(new_registry(), "decode"))
        self.layout = layout
        self.kv_timeout_s = kv_timeout_s
        self._wants: dict[str, _Want] = {}  # engine thread; insertion order is admission order
        self.staging = engine.runner.staging  # None: one rank, the receiver writes the pool itself
        self._relayed: dict[str, tuple[list[int], list[int]]] = {}  # rid -> (pool ids, staging ids); engine thread
        self.loop = EngineLoop(engine, name="decode-engine", watchdog_s=watchdog_s, fault=fault, on_death=self._died,
                               observers=[lambda *a: self.obs.on_step(self.requests, *a)],
                               gauges=self._gauges, tick=self._admit,
                               on_text_stop=lambda out: self.obs.text_stopped(self.requests, out))
        self.receiver = KVReceiver(
            engine.runner.transfer_pool, layout, kv_bind, want=self._want, release=self._release,
            on_complete=self._on_complete, on_failed=self._on_failed, timeout_s=kv_timeout_s, curve=curve,
            # this worker answers every want itself within kv_timeout_s, naming why (no Decode call, no
            # space): the receiver's own NO_SPACE is only a backstop should the engine thread not answer
            reserve_timeout_s=kv_timeout_s + _RESERVE_BACKSTOP_S,
        )

    @property
    def requests(self) -> dict[str, DecodeRequest]:
        return self.loop.requests  # type: ignore[return-value]

    def start(self) -> None:
        self.loop.start()

    def close(self) -> None:
        self.receiver.close()
        self.loop.stop()

    # -------------------------------------------------------- request entry (any thread)
    def decode(self, req: DecodeRequest) -> None:
        """Register `req`: a local prefill joins the scheduler, any other waits for its KV."""
        self.loop.add(req, schedule=req.local, then=None if req.local else self._admit)

    def abort(self, request_id: str, reason: str, found: Callable[[bool], None] | None = None) -> None:
        """End `request_id` wherever it is (waiting for KV, transferring, running); its blocks and
        any reservation go back. `found(bool)` is told, on the engine thread, whether it was live."""
        self.receiver.abort(request_id, reason)

        def abort() -> None:
            req = self.requests.pop(request_id, None)
            self._wants.pop(request_id, None)
            if req is not None:
                self.engine.abort(request_id)  # frees its blocks if it runs; no-op while it waits for KV
                req.fail(RequestGone(reason))
            if found is not None:
                found(req is not None)

        self.loop.submit(abort)

    # ------------------------------------------------ receiver callbacks (I/O thread)
    def _want(self, request_id: str, num_blocks: int) -> None:
        self.loop.submit(lambda: self._on_want(request_id, num_blocks))

    def _release(self, request_id: str, block_ids: list[int]) -> None:
        self.loop.submit(lambda: self._on_release(request_id, block_ids))

    def _on_complete(self, t: CompletedTransfer) -> None:
        self.obs.kv_received(t)
        try:  # peer bytes are parsed here, never on the engine thread
            meta = kv_pb2.KVRequestMeta.FromString(t.meta)
        except Exception as exc:  # noqa: BLE001 - DecodeError and friends
            arrived = _Arrived(t, None, f"unreadable KV meta from the prefill worker: {exc}")
        else:
            arrived = _Arrived(t, meta, self._check_meta(t, meta))
        self.loop.submit(lambda: self._adopt(arrived))

    def _on_failed(self, f: FailedTransfer) -> None:
        self.obs.kv_failed(f)
        error = transfer_error(f.code, f"KV transfer for request {f.request_id} failed ({f.code.name}): {f.message}")

        def fail() -> None:
            self._wants.pop(f.request_id, None)
            req = self.requests.pop(f.request_id, None)
            if req is not None:
                req.fail(error)

        self.loop.submit(fail)

    def _check_meta(self, t: CompletedTransfer, meta: kv_pb2.KVRequestMeta) -> str:
        bound = self.engine.vocab_size
        if meta.first_token_id >= bound:
            return f"the prefill worker sent first token id {meta.first_token_id}, outside [0, {bound})"
        if meta.num_prompt_tokens and meta.num_prompt_tokens != t.num_tokens:
            return f"KV meta says {meta.num_prompt_tokens} prompt tokens, the transfer carried {t.num_tokens}"
        bad = next((tok for tok in meta.sibling_token_ids if tok >= bound), None)
        if bad is not None:
            return f"the prefill worker sent a first token id {bad}, outside [0, {bound})"
        if meta.sibling_token_logprobs and len(meta.sibling_token_logprobs) != len(meta.sibling_token_ids):
            return (f"the prefill worker sent {len(meta.sibling_token_logprobs)} logprobs for "
                    f"{len(meta.sibling_token_ids)} first tokens of other choices")
        return ""

    # ------------------------------------------------------------ engine thread
    def _on_want(self, request_id: str, num_blocks: int) -> None:
        self._wants[request_id] = _Want(num_blocks)
        self._admit()

    def _on_release(self, request_id: str, block_ids: list[int]) -> None:
        block_ids = self._unrelay(request_id, block_ids)
        self.engine.block_manager.free_blocks(block_ids)
        req = self.requests.get(request_id)
        if req is not None and req.kv_blocks == block_ids:
            req.kv_blocks = None
        self._admit()

    def _admit(self) -> None:
        """Grant blocks to the transfers that may have them, oldest first (the loop's tick)."""
        now = time.monotonic()
        blocked = False
        for rid, want in list(self._wants.items()):
            req = self.requests.get(rid)
            if req is None or req.local or req.kv_blocks is not None:
                if now - want.since > self.kv_timeout_s:  # its Decode call never came (or is gone)
                    del self._wants[rid]
                    self.receiver.refuse(rid, TransferCode.UNKNOWN_REQUEST,
                                         f"no Decode call for request {rid} reached this worker within "
                                         f"{self.kv_timeout_s:.1f} s")
                continue
            # first come, first served: behind a transfer that waits for space, a later, smaller one waits
            # too; relayed (tensor parallelism), the staging blocks are as scarce as the pool's
            ids = None
            if not blocked and (self.staging is None or self.staging.num_free >= want.num_blocks):
                ids = self.engine.scheduler.reserve_kv(want.num_blocks, req.seq.params.n)
            if ids is None:
                blocked = True
                if now - want.since > self.kv_timeout_s:
                    del self._wants[rid]
                    self.receiver.refuse(rid, TransferCode.NO_SPACE, f"no space for {want.num_blocks} KV blocks "
                                         f"within {self.kv_timeout_s:.1f} s")
                continue
            del self._wants[rid]
            req.kv_blocks = ids
            granted = ids
            if self.staging is not None:
                staged = self.staging.alloc(want.num_blocks)
                assert staged is not None  # checked above, on this thread
                self._relayed[rid] = (ids, staged)
                granted = staged
            self.receiver.grant(rid, granted)

    def _unrelay(self, request_id: str, granted: list[int]) -> list[int]:
        """The pool blocks behind granted ids (staging ids under tensor parallelism: freed here)."""
        relayed = self._relayed.pop(request_id, None) if self.staging is not None else None
        if relayed is None:
            return granted
        assert self.staging is not None
        self.staging.free(relayed[1])
        return relayed[0]

    def _adopt(self, arrived: _Arrived) -> None:
        """The KV is in place: the sequence joins the running batch with its first token."""
        t = arrived.transfer
        bm = self.engine.block_manager
        req = self.requests.get(t.request_id)
        relayed = self._relayed.get(t.request_id) if self.staging is not None else None
        if relayed is not None and req is not None and req.kv_blocks is not None and not arrived.error:
            try:
                self.engine.runner.scatter_kv(relayed[1], relayed[0])  # whole pages -> every rank's heads
            except Exception as exc:  # a rank is gone: fail-stop, as a failed step would
                self.loop.kill(f"KV relay scatter failed: {type(exc).__name__}: {exc}")
                return
        block_ids = self._unrelay(t.request_id, list(t.block_ids))
        if req is None or req.kv_blocks is None:  # aborted while the KV was in flight
            bm.free_blocks(block_ids)
            return
        seq = req.seq
        error = arrived.error
        if not error and arrived.meta is not None and len(arrived.meta.sibling_token_ids) != seq.pending_forks:
            error = (f"the prefill worker sampled {1 + len(arrived.meta.sibling_token_ids)} first tokens for a "
                     f"request of {seq.params.n} choices")
        if error or arrived.meta is None or t.num_tokens != seq.num_prompt_tokens:
            del self.requests[t.request_id]
            bm.free_blocks(block_ids)
            why = error or f"KV for {t.num_tokens} tokens arrived for a {seq.num_prompt_tokens}-token prompt"
            req.fail(transfer_error(TransferCode.PROTOCOL, why))
            return
        meta = arrived.meta
        req.kv_blocks = None
        bm.adopt(seq, block_ids)
        seq.num_computed_tokens = seq.num_prompt_tokens
        seq.num_cached_tokens = meta.num_cached_tokens
        bm.cache_full_blocks(seq)
        lps = [logprob_from_proto(meta.first_token_logprob)] if meta.HasField("first_token_logprob") else []
        sibling_lps = [[logprob_from_proto(p)] for p in meta.sibling_token_logprobs]
        firsts = [(meta.first_token_id, lps)] + [
            (tok, sibling_lps[j] if sibling_lps else []) for j, tok in enumerate(meta.sibling_token_ids)]
        self.engine.scheduler.add_running(seq)
        outs = self.engine.fork(seq, firsts)  # choices 1.. share the transferred blocks
        self.loop.observe(self.obs.adopted, req, outs[0], default=None)
        for out in outs:
            self.loop.deliver(out)

    def _died(self, cause: BaseException) -> None:
        """The engine is dead (engine or watchdog thread): refuse every transfer from now on."""
        self.receiver.refuse_all(f"the decode worker's engine died: {cause}")

    # -------------------------------------------------------------- status
    def _gauges(self) -> dict[str, int]:
        relay = {"kv_relay_blocks_free": self.staging.num_free} if self.staging is not None else {}
        return {"kv_wanted": len(self._wants)} | relay

    def num_pending(self) -> int:
        return int(self.loop.snapshot.stats.get("kv_wanted", 0))

    def health_error(self) -> str:
        """Why this worker cannot serve ("" when it can): its engine thread or its KV receiver died."""
        if self.loop.dead.is_set():
            return f"engine failed: {self.loop.error}"
        if self.receiver.error is not None:
            return f"KV receiver failed: {self.receiver.error!r}"
        return ""
