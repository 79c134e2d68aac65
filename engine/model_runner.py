"""Owns the model weights, the KV pool and the sampler; turns a scheduled batch into tokens.

The KV pool is one tensor for all layers:

    kv: (num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim)
         kv[l, b]      one page: K and V of block b in layer l, contiguous (what kvtransfer ships)
         kv[l, b, 0]   K rows of the block's block_size tokens; kv[l, b, 1] the V rows
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from engine.checkpoint import load_hf_config
from engine.config import EngineConfig, ModelConfig
from engine.device import resolve_device, resolve_dtype
from engine.model import CausalLM, ForwardContext
from engine.outputs import TokenLogprob
from engine.sampling.batch import SamplingBatch
from engine.sampling.sampler import Sampler, SamplerOutput
from engine.sampling.seeds import step_seed
from engine.sequence import Sequence
from engine.weights import iter_weights
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
    # Overlapped steps (engine.overlap): the step's counters were advanced when it was launched, and
    # placeholder_at[i] is where sequence i's sampled token goes in its token_ids (-1: it samples none).
    placeholder_at: list[int] | None = None

    def num_draft(self, i: int) -> int:
        return len(self.spec_tokens[i]) if self.spec_tokens is not None else 0

    def num_rows(self, i: int) -> int:
        """Logit rows of sequence i (if it samples): 1 + its drafts, or one per choice it forks."""
        return self.num_draft(i) + self.seqs[i].num_sample_rows


def load_model(
    path: str | Path, dtype: torch.dtype, device: torch.device, quantization: str | None = None,
    backend: str = "auto",
) -> CausalLM:  # fmt: skip
    """Build the model on the meta device, then stream checkpoint tensors into place.

    With ``quantization`` (int8 | int4 | fp8) the dense weights are staged in host memory and the
    decoder layers' projections are quantized onto ``device`` one at a time (engine/quant/apply.py);
    ``backend`` is the kernel backend their GEMMs use (auto | torch | triton).
    A pre-quantized checkpoint (config.json ``quantization_config``: GPTQ, AWQ, compressed-tensors, FP8)
    keeps its own quantization (engine/quant/loader.py); ``quantization`` must then be None.
    """
    hf = load_hf_config(path)
    cfg = ModelConfig.from_hf(hf)
    with torch.device("meta"):
        model = CausalLM(cfg)
    # -- pre-quantized checkpoints: engine/quant detects and loads them (no flag needed)
    from engine.quant.prequantized import detect

    checkpoint_quant = detect(hf, path)
    if checkpoint_quant is not None:
        if quantization is not None:
            raise ValueError(f"{path} is already quantized ({checkpoint_quant.method}); drop quantization="
                             f"{quantization!r}")
        from engine.quant.loader import load_prequantized

        return load_prequantized(model, iter_weights(path), checkpoint_quant, dtype, device, backend).eval()
    # -- dense checkpoints
    staging = device if quantization is None else torch.device("cpu")
    model = model.to_empty(device=staging).to(dtype)
    with torch.no_grad():
        model.load_weights(iter_weights(path))
    if quantization is not None:
        from engine.quant import quantize_model

        quantize_model(model, quantization, device, backend)
    return model.eval()


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        hf = load_hf_config(config.model)
        self.model_config = ModelConfig.from_hf(hf)
        self.dtype = resolve_dtype(config.dtype, self.device, self.model_config.checkpoint_dtype)
        self.model = load_model(config.model, self.dtype, self.device, config.quantization, config.attention_backend)
        # fp8 KV: float8_e4m3fn pages with one static scale (kernels/kv_store.py FP8_KV_SCALE)
        self.kv_dtype = torch.float8_e4m3fn if config.kv_cache_dtype == "fp8" else self.dtype
        self.kv_scale = FP8_KV_SCALE if config.kv_cache_dtype == "fp8" else None
        mc = self.model_config
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.model.init_rope(max(self.max_model_len, mc.max_position_embeddings))
        self.ops = select_ops(config.attention_backend, self.device)
        self.block_size = config.block_size
        self.num_blocks = config.num_kv_blocks or self._blocks_from_budget()
        self.kv = torch.zeros(
            (mc.num_layers, self.num_blocks, 2, self.block_size, mc.num_kv_heads, mc.head_dim),
            dtype=self.kv_dtype, device=self.device,
        )
        self.sampler = Sampler(seed=config.seed)
        self._last_batch: tuple[list[int], SamplingBatch] | None = None  # (ids of its sequences, batch)
        logger.info("model %s: %d layers, %s on %s (quantization %s); KV pool %d blocks x %d tokens, %s (%.1f MiB)",
                    mc.architecture, mc.num_layers, self.dtype, self.device, config.quantization, self.num_blocks,
                    self.block_size, self.kv_dtype, self.kv.numel() * self.kv.element_size() / 2**20)

    @property
    def page_bytes(self) -> int:
        mc = self.model_config
        return 2 * self.block_size * mc.num_kv_heads * mc.head_dim * self.kv_dtype.itemsize

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
        """Flatten the step into (input_ids, positions, context, logits_indices).

        A sequence that forks choices gets its last row once per choice (`Sequence.num_sample_rows`).
        Per sequence only its new token ids, its start and its block table are read in Python; the
        positions, slot mapping and logit rows are computed over the batch with tensor operations:

            seq b, n_b rows from start_b:  positions  start_b .. start_b + n_b - 1
                                           slot(p) =  block_tables[b, p // bs] * bs + p % bs
        """
        bs = self.block_size
        seqs = step.seqs
        drafts = step.spec_tokens
        input_ids: list[int] = []
        starts: list[int] = []
        counts: list[int] = []
        for i, (seq, new) in enumerate(zip(seqs, step.num_new_tokens, strict=True)):
            start = seq.num_computed_tokens
            starts.append(start)
            if new == 1 and not (drafts and drafts[i]):
                input_ids.append(seq.token_ids[start])
                counts.append(1)
                continue
            draft = drafts[i] if drafts is not None else []
            input_ids.extend(seq.token_ids[start : start + new])
            input_ids.extend(draft)  # drafts are verified right after the new tokens
            counts.append(new + len(draft))
        max_blocks = max(len(s.block_table) for s in seqs)
        tables_t = torch.tensor([s.block_table + [0] * (max_blocks - len(s.block_table)) for s in seqs],
                                dtype=torch.int64)  # (B, max_blocks)
        starts_t = torch.tensor(starts, dtype=torch.int64)  # (B,)
        num_tokens = len(input_ids)
        if num_tokens == len(seqs):  # every sequence computes one token (decode)
            owner = torch.arange(len(seqs))  # (T,)
            positions = starts_t
            counts_t = torch.ones(len(seqs), dtype=torch.int64)
        else:
            counts_t = torch.tensor(counts, dtype=torch.int64)  # (B,)
            owner = torch.repeat_interleave(torch.arange(len(seqs)), counts_t)  # (T,)
            first_row = torch.cumsum(counts_t, 0) - counts_t  # (B,)
            positions = starts_t[owner] + torch.arange(num_tokens) - first_row[owner]  # (T,)
        slots = tables_t[owner, positions // bs] * bs + positions % bs  # (T,)
        qsl = torch.zeros(len(seqs) + 1, dtype=torch.int32)
        torch.cumsum(counts_t, 0, out=qsl[1:])
        seq_lens = (starts_t + counts_t).to(torch.int32)  # (B,)
        logits_idx = self._logit_rows(step, qsl)
        dev = self.device
        ctx = ForwardContext(
            kv=self.kv,
            slot_mapping=slots.to(dev),
            block_tables=tables_t.to(torch.int32).to(dev),
            query_start_loc=qsl.to(dev),
            seq_lens=seq_lens.to(dev),
            max_query_len=max(counts),
            ops=self.ops,
            kv_scale=self.kv_scale,
        )
        return torch.tensor(input_ids, dtype=torch.int64, device=dev), positions.to(dev), ctx, logits_idx.to(dev)

    @staticmethod
    def _logit_rows(step: StepInput, qsl: Tensor) -> Tensor:
        """Rows of the flat batch whose logits are sampled, in sampling order (R,) int64: per sampling
        sequence its last row (once per choice it forks), or its last new token's and its drafts'."""
        ends = qsl[1:].to(torch.int64) - 1  # (B,): each sequence's last row
        if all(step.sample) and step.spec_tokens is None and not any(s.pending_forks for s in step.seqs):
            return ends
        rows: list[int] = []
        ends_l = ends.tolist()
        for i, (seq, sample) in enumerate(zip(step.seqs, step.sample, strict=True)):
            if not sample:
                continue
            last = ends_l[i]
            draft = step.num_draft(i)
            if draft:
                rows.extend(range(last - draft, last + 1))
            else:
                rows.extend([last] * seq.num_sample_rows)
        return torch.tensor(rows, dtype=torch.int64)

    @torch.inference_mode()
    def forward_logits(
        self, step: StepInput, on_layer_done: Callable[[int], None] | None = None
    ) -> Tensor:
        """Run the model; logits (R, V) float32: per sampling sequence i, 1 + step.num_draft(i) rows."""
        return self._forward(step, *self.prepare(step), on_layer_done)

    def _forward(self, step: StepInput, input_ids: Tensor, positions: Tensor, ctx: ForwardContext,
                 logits_idx: Tensor, on_layer_done: Callable[[int], None] | None = None) -> Tensor:
        ctx.on_layer_done = on_layer_done
        if step.copies:  # copy-on-write pages of forked sequences, before anything writes to them
            src, dst = (torch.tensor(c, dtype=torch.int64, device=self.device) for c in zip(*step.copies, strict=True))
            self.kv[:, dst] = self.kv[:, src]
        hidden = self.model(input_ids, positions, ctx)  # (T, H)
        if step.placeholder_at is None and any(s.wants_prompt_logprobs for s in step.seqs):
            self._prompt_logprobs(step, hidden)
        return self.model.compute_logits(hidden[logits_idx])

    def _prompt_logprobs(self, step: StepInput, hidden: Tensor) -> None:
        """Fill step.prompt_logprobs: the raw model logprob, rank and top alternatives of each prompt
        token whose preceding position this step computed (and that was not collected before: a
        recomputed prefill after preemption adds nothing twice). Only the rows asked for are projected."""
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
        if not rows:
            return
        dev = self.device
        logp = self.model.compute_logits(hidden[torch.tensor(rows, device=dev)]).float().log_softmax(dim=-1)  # (P, V)
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
        sampled = [s for s, flag in zip(step.seqs, step.sample, strict=True) if flag]
        if not sampled:
            return None
        batch = self.sampling_batch(sampled)
        return self.sampler(logits, batch)

    def sampling_batch(self, seqs: Seq[Sequence]) -> SamplingBatch:
        """One row per choice each sequence samples (`num_sample_rows`): choice j with its own seed.

        The batch of the last call is reused, its seeded rows' step seeds renewed, when the same
        sequences sample again and none of them reads its output on the host (no penalties,
        bad_words or min_tokens bans left, no forks): then nothing else in it can have changed."""
        key = [id(s) for s in seqs]
        cached = self._last_batch
        if cached is not None and cached[0] == key and all(map(_steady, seqs)):
            batch = cached[1]
            if batch.seeded_rows:
                batch = dataclasses.replace(batch, seeded_rows=tuple(
                    (i, step_seed(seqs[i].params.seed, seqs[i].num_output_tokens))  # type: ignore[arg-type]
                    for i, _ in batch.seeded_rows))
            return batch
        batch = self._build_sampling_batch(seqs)
        self._last_batch = (key, batch) if all(map(_steady, seqs)) else None
        return batch

    def _build_sampling_batch(self, seqs: Seq[Sequence]) -> SamplingBatch:
        rows = [(s, j) for s in seqs for j in range(s.num_sample_rows)]
        return SamplingBatch.build(
            [s.params.for_choice(j) if s.pending_forks else s.params for s, j in rows],
            [s.prompt_token_ids for s, _ in rows],
            [s.output_token_ids for s, _ in rows],
            [s.eos_token_ids for s, _ in rows],
            device=self.device,
            vocab_size=self.model_config.vocab_size,
            bad_words=[s.bad_words_ids for s, _ in rows] if any(s.bad_words_ids for s in seqs) else None,
        )


def _steady(seq: Sequence) -> bool:
    """Its sampling row stays the same from step to step but for the seeded draw's step seed."""
    p = seq.params
    return not (seq.pending_forks or seq.bad_words_ids or p.needs_penalties) and seq.num_output_tokens >= p.min_tokens
