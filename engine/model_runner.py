"""Owns the model weights, the KV pool and the sampler; turns a scheduled batch into tokens.

The KV pool is one tensor for all layers:

    kv: (num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim)
         kv[l, b]      one page: K and V of block b in layer l, contiguous (what kvtransfer ships)
         kv[l, b, 0]   K rows of the block's block_size tokens; kv[l, b, 1] the V rows

Tensor parallelism (engine/parallel): with `tensor_parallel_size` > 1 this runner is rank 0 (it starts the
followers, `TPDriver`) or, built with a `group`, a follower. Rank 0 broadcasts each step's tensors
(`_send_step`) and runs the same forward as the followers (`follow`); logits exist on rank 0 only.
The pool then holds this rank's KV heads only; `staging` holds whole pages for the KV transfer
(engine/parallel/relay.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import operator
from collections import Counter
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from engine.checkpoint import load_hf_config
from engine.config import EngineConfig, ModelConfig
from engine.cuda_graph import DecodeGraphs
from engine.device import pool_zeros, resolve_device, resolve_dtype
from engine.gguf_file import is_gguf, read_gguf
from engine.input_batch import InputBatch, StepArrays
from engine.model import CausalLM, ForwardContext, use_onednn_linears
from engine.outputs import TokenLogprob
from engine.parallel.driver import TPDriver
from engine.parallel.group import Command, Op, TPGroup
from engine.parallel.relay import KVStaging, gather_layer, gather_pages, scatter_pages, send_command
from engine.parallel.shard import TPShard
from engine.parallel.step import StepTensors, send_step, unpack_step
from engine.sampling.batch import SamplingBatch
from engine.sampling.sampler import Sampler, SamplerOutput
from engine.sampling.seeds import step_seed
from engine.sequence import Sequence
from engine.structured.masks import PendingMasks
from engine.weights import iter_gguf, iter_weights
from kernels.kv_store import FP8_KV_SCALE
from kernels.ops import select_ops

logger = logging.getLogger(__name__)

_CPU_KV_BUDGET = 2 << 30  # bytes; CPU pools need not be large and share RAM with everything else
_GPU_KV_FRACTION = 0.85  # of the memory free after the weights


@dataclass
class StepInput:
    """One forward's work: `num_new_tokens[i]` tokens of `seqs[i]`, from its num_computed_tokens."""

    seqs: list[Sequence]
    num_new_tokens: list[int]
    sample: list[bool]  # sequence i reaches num_tokens in this step and samples a token
    # Speculative decoding (engine.spec): draft tokens a sampling sequence verifies after its new
    # tokens, in the same forward ([] = not speculating), and how many of them the target accepted.
    # Sequence i then gets 1 + len(spec_tokens[i]) logit rows. None: no sequence speculates.
    spec_tokens: list[list[int]] | None = None
    num_accepted: list[int] | None = None
    # Copy-on-write pages (source, destination) to copy before the forward (BlockManager.take_copies).
    copies: list[tuple[int, int]] = field(default_factory=list)
    # Filled by the forward: sequence i's prompt logprobs computed in this step, in prompt order.
    prompt_logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    # Token masks of the constrained sampling rows (engine.structured.masks.PendingMasks), filled while
    # the forward runs; None when no sampling sequence of the step has a grammar.
    masks: PendingMasks | None = None
    # Overlapped steps (engine.overlap): the step's counters were advanced when it was launched, and
    # placeholder_at[i] is where sequence i's sampled token goes in its token_ids (-1: it samples none).
    placeholder_at: list[int] | None = None

    def num_draft(self, i: int) -> int:
        return len(self.spec_tokens[i]) if self.spec_tokens is not None else 0

    def num_rows(self, i: int) -> int:
        """Logit rows of sequence i (if it samples): 1 + its drafts, or one per choice it forks."""
        return self.num_draft(i) + self.seqs[i].num_sample_rows


class _Prompt(NamedTuple):
    """Prompt-logprob rows of a step: rows of `hidden`, the prompt token each predicts, its sequence."""

    rows: list[int]
    targets: list[int]
    owners: list[int]


def load_model(
    path: str | Path, dtype: torch.dtype, device: torch.device, quantization: str | None = None,
    backend: str = "auto", shard: TPShard | None = None, group: TPGroup | None = None,
    gguf_dequantize: bool = False, onednn_linear: bool = False,
) -> CausalLM:  # fmt: skip
    """Build the model on the meta device, then stream checkpoint tensors into place.

    With ``quantization`` (int8 | int4 | fp8) the dense weights are staged in host memory and the
    decoder layers' projections are quantized onto ``device`` one at a time (engine/quant/apply.py);
    ``backend`` is the kernel backend their GEMMs use (auto | torch | triton).
    A pre-quantized checkpoint (config.json ``quantization_config``: GPTQ, AWQ, compressed-tensors, FP8)
    keeps its own quantization (engine/quant/loader.py); ``quantization`` must then be None. So does a
    GGUF file's Q4_0/Q4_1/Q8_0/Q4_K/Q6_K projections (engine/quant/formats/gguf.py), unless
    ``gguf_dequantize`` asks for every tensor dequantized to ``dtype`` at load (exact, more memory).
    With ``shard`` (tensor parallelism) only that rank's part is built and read (engine/parallel/shard.py).
    With ``onednn_linear`` and backend "auto", the float32 CPU linears that oneDNN runs faster (wide
    ones: gate_up_proj, the LM head; kernels/onednn_linear.py) are switched to it once loaded
    (engine.model.use_onednn_linears), in every case above.
    """
    model = _load_model(path, dtype, device, quantization, backend, shard, group, gguf_dequantize)
    if onednn_linear and backend == "auto":
        chosen = Counter(name.rsplit(".", 1)[-1] for name in use_onednn_linears(model))
        if chosen:
            logger.info("float32 linears through oneDNN (kernels/onednn_linear.py): %s",
                        ", ".join(f"{name} x{n}" if n > 1 else name for name, n in sorted(chosen.items())))
    return model


def _load_model(
    path: str | Path, dtype: torch.dtype, device: torch.device, quantization: str | None, backend: str,
    shard: TPShard | None, group: TPGroup | None, gguf_dequantize: bool,
) -> CausalLM:  # fmt: skip
    hf = load_hf_config(path)
    cfg = ModelConfig.from_hf(hf)
    with torch.device("meta"):
        model = CausalLM(cfg, shard, group)
    # -- pre-quantized checkpoints: engine/quant detects and loads them (no flag needed)
    from engine.quant.prequantized import detect

    checkpoint_quant = detect(hf, path)
    if checkpoint_quant is not None:
        if quantization is not None:
            raise ValueError(f"{path} is already quantized ({checkpoint_quant.method}); drop quantization="
                             f"{quantization!r}")
        from engine.quant.loader import load_prequantized

        return load_prequantized(model, iter_weights(path), checkpoint_quant, dtype, device, backend).eval()
    if is_gguf(path) and not gguf_dequantize:
        from engine.quant.formats import gguf

        kept = gguf.detect(read_gguf(path))
        if kept is not None:
            if quantization is not None:
                raise ValueError(f"{path} is already quantized (GGUF {kept.summary()}); drop quantization="
                                 f"{quantization!r}, or set gguf_dequantize to requantize its dequantized weights")
            from engine.quant.loader import load_prequantized

            logger.info("%s: keeping %s projections quantized (gguf_dequantize loads them as floats)",
                        Path(path).name, kept.summary())
            return load_prequantized(model, iter_gguf(path, raw=kept.keep), kept, dtype, device, backend).eval()
    # -- dense checkpoints
    staging = device if quantization is None else torch.device("cpu")
    model = model.to_empty(device=staging).to(dtype)
    with torch.no_grad():
        model.load_weights(iter_weights(path, select=shard.slice_for if shard is not None else None))
    if quantization is not None:
        from engine.quant import quantize_model

        quantize_model(model, quantization, device, backend)
    return model.eval()


class ModelRunner:
    def __init__(self, config: EngineConfig, *, group: TPGroup | None = None) -> None:
        """`group`: this follower's tensor-parallel group; None on rank 0 (which starts the group when
        `config.tensor_parallel_size` > 1: engine/parallel/driver.py). Raises ValueError when the model
        cannot be split over that many ranks (engine/parallel/shard.py names why)."""
        self.config = config
        self.device = group.device if group is not None else resolve_device(config.device)
        hf = load_hf_config(config.model)
        self.model_config = ModelConfig.from_hf(hf)
        self.dtype = resolve_dtype(config.dtype, self.device, self.model_config.checkpoint_dtype)
        self.tp: TPDriver | None = None
        if group is None and config.tensor_parallel_size > 1:
            TPShard(self.model_config, config.tensor_parallel_size, 0)  # refuse a bad split before any process starts
            self.tp = TPDriver(config, self.device)
            group = self.tp.group
        self.group = group
        self.shard = TPShard(self.model_config, group.size, group.rank) if group is not None else None
        self.model = load_model(config.model, self.dtype, self.device, config.quantization, config.attention_backend,
                                self.shard, group, config.gguf_dequantize, config.onednn_linear)
        # fp8 KV: float8_e4m3fn pages with one static scale (kernels/kv_store.py FP8_KV_SCALE)
        self.kv_dtype = torch.float8_e4m3fn if config.kv_cache_dtype == "fp8" else self.dtype
        self.kv_scale = FP8_KV_SCALE if config.kv_cache_dtype == "fp8" else None
        mc = self.model_config
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.model.init_rope(max(self.max_model_len, mc.max_position_embeddings))
        self.ops = select_ops(config.attention_backend, self.device)
        self.block_size = config.block_size
        self.num_blocks = config.num_kv_blocks or self._blocks_from_budget()
        if group is not None:  # every rank's pool has the same block ids
            self.num_blocks = group.all_reduce_min(self.num_blocks)
        self.kv = pool_zeros(
            (mc.num_layers, self.num_blocks, 2, self.block_size, self.num_kv_heads, mc.head_dim),
            self.kv_dtype, self.device,
        )  # under TP: this rank's KV heads only; on huge pages on a Linux CPU
        self.staging: KVStaging | None = None
        self._relay_next: tuple[list[int], list[int]] | None = None  # (pool ids, staging ids): relay_next_step
        if self.tp is not None:
            blocks = config.kv_relay_blocks or min(self.num_blocks, -(-self.max_model_len // self.block_size))
            self.staging = KVStaging(blocks, self.kv, mc.num_kv_heads)
            self.tp.start_keepalive()  # every rank is past its start-up collectives (all_reduce_min above)
        self.sampler = Sampler(seed=config.seed)
        # CUDA graphs of the decode forward (engine/cuda_graph.py): on a GPU, without tensor parallelism
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and group is None and not config.enforce_eager:
            try:
                with torch.inference_mode():
                    self.graphs = DecodeGraphs(self.model, self.kv, self.ops, self.kv_scale, config.max_num_seqs,
                                               -(-self.max_model_len // self.block_size), self.device)
            except RuntimeError as exc:  # torch's CUDA errors: a capture that failed leaves the eager path whole
                logger.warning("capturing CUDA graphs failed, every forward runs eagerly (as --enforce-eager): %s",
                               str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                torch.cuda.synchronize(self.device)
        self.inputs = InputBatch(self.block_size)  # the engine thread's (prepare)
        # (its sequences, batch): the objects themselves, compared with `is` (an id() may be reused by a
        # new sequence once the old one is freed; holding them here prevents that)
        self._last_batch: tuple[tuple[Sequence, ...], SamplingBatch] | None = None
        self._no_prompt_logprobs: tuple[Sequence, ...] = ()  # the last step's sequences if none asked for them
        logger.info("model %s: %d layers, %s on %s (quantization %s); KV pool %d blocks x %d tokens, %s (%.1f MiB)",
                    mc.architecture, mc.num_layers, self.dtype, self.device, config.quantization, self.num_blocks,
                    self.block_size, self.kv_dtype, self.kv.numel() * self.kv.element_size() / 2**20)

    @property
    def num_kv_heads(self) -> int:
        """KV heads in this rank's pool (all of them without tensor parallelism)."""
        return self.shard.num_kv_heads if self.shard is not None else self.model_config.num_kv_heads

    @property
    def transfer_pool(self) -> Tensor:
        """The pool the KV transfer reads and writes: whole pages (rank 0's staging under TP)."""
        return self.staging.kv if self.staging is not None else self.kv

    @property
    def page_bytes(self) -> int:
        mc = self.model_config
        return 2 * self.block_size * self.num_kv_heads * mc.head_dim * self.kv_dtype.itemsize

    def _blocks_from_budget(self) -> int:
        per_block = self.page_bytes * self.model_config.num_layers
        budget = self.config.kv_cache_memory_bytes
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * _GPU_KV_FRACTION)
            else:
                budget = _CPU_KV_BUDGET
        num = budget // per_block
        if num < 1:
            raise ValueError(f"KV budget of {budget} bytes holds no block of {per_block} bytes")
        return int(num)

    # ------------------------------------------------------------------ steps
    def prepare(self, step: StepInput) -> tuple[Tensor, Tensor, ForwardContext, Tensor]:
        """Flatten the step into (input_ids, positions, context, logits_indices) on the device
        (engine.input_batch). A sequence that forks choices gets its last row once per choice
        (`Sequence.num_sample_rows`)."""
        return self.upload(self.inputs.prepare(step))

    def upload(self, a: StepArrays) -> tuple[Tensor, Tensor, ForwardContext, Tensor]:
        """`prepare`'s result from a step's host arrays."""
        dev = self.device
        ctx = ForwardContext(
            kv=self.kv,
            slot_mapping=a.slot_mapping.to(dev),
            block_tables=a.block_tables.to(dev),
            query_start_loc=a.query_start_loc.to(dev),
            seq_lens=a.seq_lens.to(dev),
            max_query_len=a.max_query_len,
            ops=self.ops,
            kv_scale=self.kv_scale,
        )
        return a.input_ids.to(dev), a.positions.to(dev), ctx, a.logits_idx.to(dev)

    @torch.inference_mode()
    def forward_logits(
        self, step: StepInput, on_layer_done: Callable[[int], None] | None = None
    ) -> Tensor:
        """Run the model; logits (R, V) float32: per sampling sequence i, 1 + step.num_draft(i) rows."""
        return self._forward(step, *self.prepare(step), on_layer_done)

    def _forward(self, step: StepInput, input_ids: Tensor, positions: Tensor, ctx: ForwardContext,
                 logits_idx: Tensor, on_layer_done: Callable[[int], None] | None = None) -> Tensor:
        ctx.on_layer_done = on_layer_done
        prompt = self._prompt_rows(step) if step.placeholder_at is None else None  # overlapped: never
        rows = logits_idx
        if prompt is not None:  # one projection (one gather under TP) for both kinds of rows
            rows = torch.cat([logits_idx, torch.tensor(prompt.rows, dtype=torch.int64, device=self.device)])
        copies = (torch.tensor(step.copies, dtype=torch.int64, device=self.device).T  # (2, C): src, dst
                  if step.copies else None)
        relay, self._relay_next = self._relay_next, None
        with self._collectives():
            if self.tp is not None:  # rank 0 of a group it drives (a runner given its group only runs)
                pages = torch.tensor(relay[0], dtype=torch.int64) if relay is not None else None
                send_step(self.tp.group, StepTensors(input_ids, positions, ctx.slot_mapping, ctx.block_tables,
                                                     ctx.query_start_loc, ctx.seq_lens, ctx.max_query_len, rows,
                                                     copies, pages))
                if relay is not None:
                    ctx.on_layer_done = self._relay_hook(relay, on_layer_done)
            graphs = self.graphs
            if (graphs is not None and prompt is None and copies is None and ctx.on_layer_done is None
                    and graphs.fits(input_ids.shape[0], rows.shape[0], ctx.max_query_len, ctx.block_tables.shape[1])):
                logits = self.model.compute_logits(graphs.run(input_ids, positions, ctx))  # (n, V): rows are 0..n-1
            else:
                logits = self._run(input_ids, positions, ctx, rows, copies)
        if prompt is not None:
            self._prompt_logprobs(step, prompt, logits[len(logits_idx) :])
            logits = logits[: len(logits_idx)]
        return logits

    def _run(self, input_ids: Tensor, positions: Tensor, ctx: ForwardContext, rows: Tensor,
             copies: Tensor | None) -> Tensor:
        """The forward every rank runs: copy-on-write pages, the model, the logits of `rows`."""
        if copies is not None:  # copy-on-write pages of forked sequences, before anything writes to them
            self.kv[:, copies[1]] = self.kv[:, copies[0]]
        hidden = self.model(input_ids, positions, ctx)  # (T, H)
        return self.model.compute_logits(hidden.index_select(0, rows))  # (R, V); half hidden[rows]'s cost

    # ------------------------------------------------------------ tensor parallelism
    @contextlib.contextmanager
    def _collectives(self) -> Iterator[None]:
        """Rank 0: hold the group (one command and its collectives at a time); no-op otherwise."""
        if self.tp is None:
            yield
            return
        with self.tp.lock:
            if self.tp.error is not None:
                raise RuntimeError(self.tp.error)
            yield
            self.tp.touch()

    @torch.inference_mode()
    def follow(self, cmd: Command) -> None:
        """A follower: run rank 0's command on this rank's shard (its collectives pair with rank 0's)."""
        assert self.group is not None
        if cmd.op is Op.STEP:
            st = unpack_step(cmd)
            ctx = ForwardContext(kv=self.kv, slot_mapping=st.slot_mapping, block_tables=st.block_tables,
                                 query_start_loc=st.query_start_loc, seq_lens=st.seq_lens,
                                 max_query_len=st.max_query_len, ops=self.ops, kv_scale=self.kv_scale)
            if st.relay is not None:  # rank 0's prefill relay: this rank's heads of these pages, layer by layer
                group, relay_ids, heads = self.group, st.relay, self.model_config.num_kv_heads
                ctx.on_layer_done = lambda layer: gather_layer(group, self.kv, layer, relay_ids, heads, None, None)
            self._run(st.input_ids, st.positions, ctx, st.rows, st.copies)
        elif cmd.op is Op.GATHER_KV:
            gather_pages(self.group, self.kv, cmd.payload, self.model_config.num_kv_heads, None, None)
        elif cmd.op is Op.SCATTER_KV:
            scatter_pages(self.group, self.kv, cmd.payload, self.model_config.num_kv_heads, None, None)

    def relay_next_step(self, block_ids: list[int], staging_ids: list[int]) -> None:
        """Rank 0 under TP: during the next forward, after each layer, gather every rank's heads of pool pages
        `block_ids` into whole pages `staging_ids` of `staging` (before that layer's `on_layer_done`), so a
        KV transfer from staging overlaps the forward. Calls add up until the forward runs."""
        assert self.staging is not None and len(block_ids) == len(staging_ids)
        pool, staged = self._relay_next or ([], [])
        self._relay_next = (pool + list(block_ids), staged + list(staging_ids))

    def _relay_hook(self, relay: tuple[list[int], list[int]],
                    then: Callable[[int], None] | None) -> Callable[[int], None]:
        assert self.group is not None and self.staging is not None
        group, staging, heads = self.group, self.staging.kv, self.model_config.num_kv_heads
        ids = torch.tensor(relay[0], dtype=torch.int64, device=self.device)
        sids = torch.tensor(relay[1], dtype=torch.int64, device=self.device)

        def hook(layer: int) -> None:
            gather_layer(group, self.kv, layer, ids, heads, staging, sids)
            if then is not None:
                then(layer)

        return hook

    @torch.inference_mode()
    def gather_kv(self, block_ids: list[int], staging_ids: list[int]) -> None:
        """Rank 0 under TP: every rank's heads of pool pages `block_ids` -> whole pages `staging_ids` of
        `staging` (position i to position i)."""
        assert self.staging is not None and self.group is not None and len(block_ids) == len(staging_ids)
        with self._collectives():
            ids = send_command(self.group, Op.GATHER_KV, block_ids)
            gather_pages(self.group, self.kv, ids, self.model_config.num_kv_heads, self.staging.kv,
                         torch.tensor(staging_ids, dtype=torch.int64, device=self.device))

    @torch.inference_mode()
    def scatter_kv(self, staging_ids: list[int], block_ids: list[int]) -> None:
        """Rank 0 under TP: whole pages `staging_ids` of `staging` -> every rank's heads of pool pages `block_ids`."""
        assert self.staging is not None and self.group is not None and len(block_ids) == len(staging_ids)
        with self._collectives():
            ids = send_command(self.group, Op.SCATTER_KV, block_ids)
            scatter_pages(self.group, self.kv, ids, self.model_config.num_kv_heads, self.staging.kv,
                          torch.tensor(staging_ids, dtype=torch.int64, device=self.device))

    def close(self) -> None:
        """Stop the followers (rank 0 under TP); no-op otherwise."""
        if self.tp is not None:
            self.tp.close()

    # ------------------------------------------------------------ prompt logprobs
    def _prompt_rows(self, step: StepInput) -> _Prompt | None:
        """The rows of this step whose prompt logprobs are wanted: each prompt token whose preceding
        position this step computes (and that was not collected before: a recomputed prefill after
        preemption adds nothing twice)."""
        seqs = step.seqs
        last = self._no_prompt_logprobs
        if len(seqs) == len(last) and all(map(operator.is_, seqs, last)):
            return None  # the same sequences as a step where none asked for them (params are fixed)
        if not any(s.params.prompt_logprobs is not None for s in seqs):
            self._no_prompt_logprobs = tuple(seqs)
            return None
        if not any(s.wants_prompt_logprobs for s in seqs):
            return None
        rows: list[int] = []  # rows of `hidden`
        targets: list[int] = []  # the prompt token each row predicts
        owners: list[int] = []  # step sequence index of each row
        start_row = 0
        for i, (seq, new) in enumerate(zip(step.seqs, step.num_new_tokens, strict=True)):
            start = seq.num_computed_tokens
            if seq.wants_prompt_logprobs:
                first = max(start, len(seq.prompt_logprobs))  # position p predicts prompt token p + 1
                for p in range(first, min(start + new, seq.num_prompt_tokens - 1)):
                    rows.append(start_row + p - start)
                    targets.append(seq.prompt_token_ids[p + 1])
                    owners.append(i)
            start_row += new + step.num_draft(i)
        return _Prompt(rows, targets, owners) if rows else None

    def _prompt_logprobs(self, step: StepInput, prompt: _Prompt, logits: Tensor) -> None:
        """Fill step.prompt_logprobs from the logits (P, V) of `prompt.rows`: the raw model logprob, rank
        and top alternatives of each prompt token."""
        dev = self.device
        logp = logits.float().log_softmax(dim=-1)  # (P, V)
        owners, targets = prompt.owners, prompt.targets
        tgt = torch.tensor(targets, device=dev)[:, None]  # (P, 1)
        chosen = logp.gather(1, tgt)  # (P, 1)
        ranks = (logp > chosen).sum(dim=-1) + 1  # (P,)
        k = max(step.seqs[i].params.prompt_logprobs or 0 for i in set(owners))
        top = logp.topk(min(k, logp.shape[1]), dim=-1) if k else None
        chosen_l, ranks_l = chosen[:, 0].tolist(), ranks.tolist()
        top_ids = top.indices.tolist() if top is not None else None
        top_vals = top.values.tolist() if top is not None else None
        for r, (i, t) in enumerate(zip(owners, targets, strict=True)):
            want = step.seqs[i].params.prompt_logprobs or 0
            alts = list(zip(top_ids[r][:want], top_vals[r][:want], strict=True)) if top_ids and top_vals else []
            step.prompt_logprobs.setdefault(i, []).append(TokenLogprob(t, chosen_l[r], alts, ranks_l[r]))

    @torch.inference_mode()
    def execute(
        self, step: StepInput, on_layer_done: Callable[[int], None] | None = None
    ) -> SamplerOutput | None:
        logits = self.forward_logits(step, on_layer_done)
        sampled = step.seqs if all(step.sample) else [s for s, flag in zip(step.seqs, step.sample, strict=True) if flag]
        if not sampled:
            return None
        batch = self.sampling_batch(sampled, step.masks)
        return self.sampler(logits, batch)

    def sampling_batch(self, seqs: Seq[Sequence], masks: PendingMasks | None = None) -> SamplingBatch:
        """One row per choice each sequence samples (`num_sample_rows`): choice j with its own seed.
        `masks`: the step's grammar masks (waited for here, after the forward).

        The batch of the last call is reused, its seeded rows' step seeds renewed, when the same
        sequences sample again, none of them reads its output on the host (no penalties, bad_words or
        min_tokens bans left, no forks) and no grammar masks this step: then nothing else in it can
        have changed. A reused batch stays reusable while the same sequences sample (`_steady` never
        turns false again), so only a new batch checks each sequence."""
        cached = self._last_batch
        if (masks is None and cached is not None and len(cached[0]) == len(seqs)
                and all(map(operator.is_, cached[0], seqs))):
            batch = cached[1]
            if batch.seeded_rows:
                batch = dataclasses.replace(batch, seeded_rows=tuple(
                    (i, step_seed(seqs[i].params.seed, seqs[i].num_output_tokens))  # type: ignore[arg-type]
                    for i, _ in batch.seeded_rows))
            return batch
        batch = self._build_sampling_batch(seqs, masks)
        reusable = masks is None and all(map(_steady, seqs))
        self._last_batch = (tuple(seqs), batch) if reusable else None
        return batch

    def _build_sampling_batch(self, seqs: Seq[Sequence], masks: PendingMasks | None = None) -> SamplingBatch:
        rows = [(s, j) for s in seqs for j in range(s.num_sample_rows)]
        return SamplingBatch.build(
            [s.params.for_choice(j) if s.pending_forks else s.params for s, j in rows],
            [s.prompt_token_ids for s, _ in rows],
            [s.output_token_ids for s, _ in rows],
            [s.eos_token_ids for s, _ in rows],
            device=self.device,
            vocab_size=self.model_config.vocab_size,
            bad_words=[s.bad_words_ids for s, _ in rows] if any(s.bad_words_ids for s in seqs) else None,
            masks=masks.result(self.device, self.model_config.vocab_size) if masks is not None else None,
        )


def _steady(seq: Sequence) -> bool:
    """Its sampling row stays the same from step to step but for the seeded draw's step seed."""
    p = seq.params
    return (not (seq.pending_forks or seq.bad_words_ids or p.needs_penalties or seq.grammar is not None)
            and seq.num_output_tokens >= p.min_tokens)
