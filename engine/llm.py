"""The offline API: `LLM(path, ...).generate(prompts, params)` runs a batch to completion."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

from engine.config import EngineConfig
from engine.engine import Engine
from engine.outputs import TokenLogprob
from engine.sampling.params import SamplingParams
from engine.sequence import Sequence
from engine.spec import SpecMetrics


@dataclass
class CompletionOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    num_cached_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    spec: SpecMetrics | None = None  # acceptance of this request's drafts (engines that speculate)
    index: int = 0  # which of the prompt's n choices (SamplingParams.n)
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt tokens 1.. (SamplingParams.prompt_logprobs)


class LLM:
    """An engine in this process. Keyword arguments are `EngineConfig` fields."""

    def __init__(self, model: str, **kwargs: Any) -> None:
        self.config = EngineConfig(model=str(model), **kwargs)
        self.engine = Engine(self.config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Seq[str | Seq[int]] | str,
        params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[CompletionOutput]:
        """Generate for every prompt (text or token ids); outputs come back in prompt order, a prompt
        with n > 1 choices giving n consecutive outputs (index 0..n-1)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        params = params or SamplingParams()
        plist = list(params) if isinstance(params, Seq) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        seqs = []
        for prompt, p in zip(prompts, plist, strict=True):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
            seqs.append(self.engine.add_request(f"offline-{next(self._ids)}", ids, p))
        choices: dict[tuple[str, int], Sequence] = {(s.request_id, 0): s for s in seqs}
        texts: dict[tuple[str, int], list[str]] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                assert out.seq is not None
                choices[(out.request_id, out.index)] = out.seq
                texts.setdefault((out.request_id, out.index), []).append(out.new_text)
        return [
            CompletionOutput(c.request_id, c.prompt_token_ids, c.output_token_ids,
                             "".join(texts.get((c.request_id, c.index), [])),
                             c.finish_reason.value if c.finish_reason else "", c.num_cached_tokens, c.logprobs,
                             SpecMetrics.of(c) if self.engine.spec is not None else None, c.index,
                             list(c.prompt_logprobs) if c.params.prompt_logprobs is not None and c.index == 0
                             else None)
            for s in seqs for c in (choices[(s.request_id, j)] for j in range(s.params.n))
        ]
