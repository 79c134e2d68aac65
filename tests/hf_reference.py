"""Hugging Face transformers as the reference implementation (a test dependency only)."""

from __future__ import annotations

from pathlib import Path

import torch


def hf_model(path: str | Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int], max_new: int, ignore_eos: bool = False) -> list[int]:
    kwargs = {"min_new_tokens": max_new} if ignore_eos else {}
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new, do_sample=False, pad_token_id=0, **kwargs,
        )
    return out[0, len(prompt):].tolist()


def assert_same_or_near_tie(model, prompt: list[int], ours: list[int], ref: list[int], tie: float = 1e-4) -> None:
    """Token-identical, except that a divergence is allowed at a step whose top-2 logit gap is < `tie`."""
    for i, (a, b) in enumerate(zip(ours, ref, strict=False)):
        if a != b:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + ref[:i]])).logits[0, -1]
            top2 = logits.topk(2).values
            gap = float(top2[0] - top2[1])
            assert gap < tie, f"diverged at output {i}: ours {a}, reference {b}, top-2 gap {gap:.2e}"
            return
    assert len(ours) == len(ref), f"lengths differ: ours {len(ours)}, reference {len(ref)}"


def random_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def prompt_logits(engine, prompts: list[list[int]]) -> torch.Tensor:
    """The logits at every position of each prompt from one batched prefill forward through `engine`,
    concatenated: (sum of lengths, vocab). The blocks it takes are freed again."""
    from engine.model_runner import StepInput
    from engine.sampling.params import SamplingParams
    from engine.sequence import Sequence

    seqs = [Sequence(f"r{i}", p, SamplingParams()) for i, p in enumerate(prompts)]
    for s in seqs:
        assert engine.block_manager.allocate_slots(s, s.num_tokens)
    step = StepInput(seqs, [s.num_tokens for s in seqs], [True] * len(seqs))
    input_ids, positions, ctx, _ = engine.runner.prepare(step)
    with torch.inference_mode():
        logits = engine.runner.model.compute_logits(engine.runner.model(input_ids, positions, ctx))
    for s in seqs:
        engine.block_manager.free(s)
    return logits


def assert_prompt_logits_match(engine, path: str | Path, prompts: list[list[int]], tol: float = 1e-4) -> torch.Tensor:
    """One batched prefill forward of `prompts` through `engine` (every prompt position's logits)
    against transformers on the same checkpoint, prompt by prompt; returns our logits."""
    logits = prompt_logits(engine, prompts)
    ref_model = hf_model(path)
    offset = 0
    for p in prompts:
        with torch.no_grad():
            ref = ref_model(torch.tensor([p])).logits[0].float()
        torch.testing.assert_close(logits[offset : offset + len(p)], ref, rtol=tol, atol=tol)
        offset += len(p)
    return logits
