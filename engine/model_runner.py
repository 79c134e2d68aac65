"""Owns the model weights, the KV pool and the sampler; turns a scheduled batch into tokens.

The KV pool is one tensor for all layers:

    kv: (num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim)
         kv[l, b]      one page: K and V of block b in layer l, contiguous (what kvtransfer ships)
         kv[l, b, 0]   K rows of the block's block_size tokens; kv[l, b, 1] the V rows
"""

from __future__ import annotations

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
from engine.gguf_file import is_gguf, read_gguf
from engine.model import CausalLM, ForwardContext
from engine.outputs import TokenLogprob
from engine.sampling.batch import SamplingBatch
from engine.sampling.sampler import Sampler, SamplerOutput
from engine.sequence import Sequence
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

    def num_draft(self, i: int) -> int:
        return len(self.spec_tokens[i]) if self.spec_tokens is not None else 0

    def num_rows(self, i: int) -> int:
        """Logit rows of sequence i (if it samples): 1 + its drafts, or one per choice it forks."""
        return self.num_draft(i) + self.seqs[i].num_sample_rows


def load_model(
    path: str | Path, dtype: torch.dtype, device: torch.device, quantization: str | None = None,
    backend: str = "auto", gguf_dequantize: bool = False,
) -> CausalLM:  # fmt: skip
    """Build the model on the meta device, then stream checkpoint tensors into place.

    With ``quantization`` (int8 | int4 | fp8) the dense weights are staged in host memory and the
    decoder layers' projections are quantized onto ``device`` one at a time (engine/quant/apply.py);
    ``backend`` is the kernel backend their GEMMs use (auto | torch | triton).
    A pre-quantized checkpoint (config.json ``quantization_config``: GPTQ, AWQ, compressed-tensors, FP8)
    keeps its own quantization (engine/quant/loader.py); ``quantization`` must then be None. So does a
    GGUF file's Q4_0/Q4_1/Q8_0/Q4_K/Q6_K projections (engine/quant/formats/gguf.py), unless
    ``gguf_dequantize`` asks for every tensor dequantized to ``dtype`` at load (exact, more memory).
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
        self.model = load_model(config.model, self.dtype, self.device, config.quantization, config.attention_backend,
                                config.gguf_dequantize)
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
        """
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        logits_idx: list[int] = []
        for i, (seq, new, sample) in enumerate(zip(step.seqs, step.num_new_tokens, step.sample, strict=True)):
            start = seq.num_computed_tokens
            draft = step.spec_tokens[i] if step.spec_tokens is not None else []
            n = new + len(draft)  # drafts are verified right after the new tokens
            input_ids.extend(seq.token_ids[start : start + new])
            input_ids.extend(draft)
            positions.extend(range(start, start + n))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            qsl.append(qsl[-1] + n)
            seq_lens.append(start + n)
            if sample:
                logits_idx.extend(range(qsl[-1] - 1 - len(draft), qsl[-1] - 1))
                logits_idx.extend([qsl[-1] - 1] * seq.num_sample_rows if not draft else [qsl[-1] - 1])
        max_blocks = max(len(s.block_table) for s in step.seqs)
        tables = [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in step.seqs]
        dev = self.device
        ctx = ForwardContext(
            kv=self.kv,
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            max_query_len=max(b - a for a, b in zip(qsl[:-1], qsl[1:], strict=True)),
            ops=self.ops,
            kv_scale=self.kv_scale,
        )
        return (
            torch.tensor(input_ids, dtype=torch.int64, device=dev),
            torch.tensor(positions, dtype=torch.int64, device=dev),
            ctx,
            torch.tensor(logits_idx, dtype=torch.int64, device=dev),
        )

    @torch.inference_mode()
    def forward_logits(
        self, step: StepInput, on_layer_done: Callable[[int], None] | None = None
    ) -> Tensor:
        """Run the model; logits (R, V) float32: per sampling sequence i, 1 + step.num_draft(i) rows."""
        input_ids, positions, ctx, logits_idx = self.prepare(step)
        ctx.on_layer_done = on_layer_done
        if step.copies:  # copy-on-write pages of forked sequences, before anything writes to them
            src, dst = (torch.tensor(c, dtype=torch.int64, device=self.device) for c in zip(*step.copies, strict=True))
            self.kv[:, dst] = self.kv[:, src]
        hidden = self.model(input_ids, positions, ctx)  # (T, H)
        if any(s.wants_prompt_logprobs for s in step.seqs):
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
        """One row per choice each sequence samples (`num_sample_rows`): choice j with its own seed."""
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
