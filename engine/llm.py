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
        """Generate for every prompt (text or token ids); outputs come back in prompt order."""
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
        texts: dict[str, list[str]] = {s.request_id: [] for s in seqs}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.new_text:
                    texts[out.request_id].append(out.new_text)
        return [
            CompletionOutput(s.request_id, s.prompt_token_ids, s.output_token_ids,
                             "".join(texts[s.request_id]), s.finish_reason.value if s.finish_reason else "",
                             s.num_cached_tokens, s.logprobs,
                             SpecMetrics.of(s) if self.engine.spec is not None else None)
            for s in seqs
        ]
