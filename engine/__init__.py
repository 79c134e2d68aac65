"""Tandem's model runtime: checkpoint loading, the paged KV cache, scheduling and sampling.

`from engine import LLM, SamplingParams` is the offline API. Names resolve lazily so that light
modules (the block manager, configs) import without loading the model stack.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "LLM": "engine.llm",
    "CompletionOutput": "engine.llm",
    "Engine": "engine.engine",
    "EngineConfig": "engine.config",
    "ModelConfig": "engine.config",
    "SamplingParams": "engine.sampling.params",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
