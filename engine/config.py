"""Frozen, validated configuration.

`ModelConfig` is what the model runtime needs from a Hugging Face `config.json`; `EngineConfig` is
what a person chooses when starting an engine. Both reject bad values with `ValueError` naming the
field, the value and what is allowed. Derived values are properties. Torch-free: the gateway reads a
checkpoint's `ModelConfig` without loading the model stack (`engine.device` maps names to torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from engine.options import REQUIRED, check_options, option

SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")  # torch dtypes: engine.device.TORCH_DTYPES
SPECULATIVE_METHODS: tuple[str, ...] = ("ngram",)
MAX_SPECULATIVE_TOKENS = 16
DEFAULT_SPECULATIVE_TOKENS = 4
QUANTIZATIONS: tuple[str, ...] = ("int8", "int4", "fp8")  # engine/quant; docs/quantization.md
KV_CACHE_DTYPES: tuple[str, ...] = ("auto", "fp8")
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}
ATTENTION_BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")


@dataclass(frozen=True)
class ModelConfig:
    """The shape of one decoder-only transformer, read from a Hugging Face config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2
    qk_norm: bool  # Qwen3
    sliding_window: int | None
    checkpoint_dtype: str

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r} (config.json 'architectures'={archs!r}); "
                f"Tandem supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        num_heads = int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or int(cfg["hidden_size"]) // num_heads
        rope_theta = cfg.get("rope_theta")
        rope_scaling = cfg.get("rope_scaling")
        # transformers 5 moved rope settings into `rope_parameters`.
        rope_params = cfg.get("rope_parameters")
        if isinstance(rope_params, dict):
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
        sliding = None
        if arch == "MistralForCausalLM":
            sliding = cfg.get("sliding_window")
        elif arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and cfg.get("use_sliding_window"):
            sliding = cfg.get("sliding_window")
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=dict(rope_scaling) if rope_scaling else None,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=int(sliding) if sliding else None,
            checkpoint_dtype=dtype if dtype in DTYPES else "float32",
        )

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads {self.num_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_kv_heads}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def canonical_dtype(name: str) -> str:
    """`name` with its alias resolved ("bf16" -> "bfloat16"); raises ValueError for an unknown one."""
    key = DTYPE_ALIASES.get(name, name)
    if key != "auto" and key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return key


def check_device(name: str) -> None:
    """Raises ValueError for a device name that is not auto, cpu, cuda or cuda:N."""
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}; choose auto, cpu or cuda")


@dataclass(frozen=True)
class EngineConfig:
    """Everything a person picks when starting an engine (offline, prefill or decode worker).

    Each field's default, range and help text are declared here once (engine.options); the
    `tandem` command's flags are generated from them.
    """

    model: str = option(REQUIRED, "checkpoint directory, Hugging Face cache folder or Hugging Face id "
                        "(resolved through the Hugging Face cache, HF_HOME and HF_HUB_OFFLINE: engine.hub)")
    revision: str | None = option(None, "branch, tag or commit of a Hugging Face id or cache folder (default: main)")
    dtype: str = option("auto", "auto|float32|float16|bfloat16 (auto: the checkpoint's on GPU, float32 on CPU)")
    device: str = option("auto", "auto|cpu|cuda|cuda:N")
    block_size: int = option(16, "tokens per KV block (a power of two)", min=1)
    max_num_batched_tokens: int = option(2048, "token budget of one engine step", min=1)
    max_num_seqs: int = option(256, "running sequences in one engine step", min=1)
    max_model_len: int | None = option(None, "context limit in tokens (default: the model's)", min=2)
    kv_cache_memory_gib: float | None = option(
        None, "KV pool budget in GiB (default: most of the free GPU memory, 2 GiB on CPU)", above=0,
        flag="kv-cache-memory")
    num_kv_blocks: int | None = option(None, "KV pool size in blocks (overrides --kv-cache-memory)", min=1)
    enable_prefix_caching: bool = option(True, "reuse the KV of shared prompt prefixes", flag="prefix-caching")
    attention_backend: str = option("auto", "auto: triton on CUDA; on CPU the compiled paged attention (built on "
                                    "first use where a C++ compiler is) and torch for the rest; torch: the "
                                    "PyTorch references only", choices=ATTENTION_BACKENDS)
    enforce_eager: bool = option(False, "never capture CUDA graphs: on a GPU a decode step otherwise replays the "
                                 "model's launches from a graph recorded at start-up (engine/cuda_graph.py)")
    quantization: str | None = option(None, "quantize the decoder layers' weights at load time "
                                      "(docs/quantization.md)", choices=QUANTIZATIONS)
    gguf_dequantize: bool = option(False, "load a .gguf file's quantized tensors dequantized to the model dtype "
                                   "(exact float math, ~4-8x the projections' memory) instead of keeping its "
                                   "Q4_0/Q4_1/Q8_0/Q4_K/Q6_K projections quantized (docs/quantization.md)")
    onednn_linear: bool = option(True, "float32 on CPU with backend auto: run the wide linears (out_features >= "
                                 "2 x in_features >= 1024, >= 2^20 weights: gate_up_proj from 4 rows, the LM head) "
                                 "through oneDNN instead of MKL's sgemm (kernels/onednn_linear.py); off: F.linear for every layer")
    kv_cache_dtype: str = option("auto", "auto: the model dtype; fp8: float8_e4m3fn KV pages "
                                 "(prefill and decode must agree)", choices=KV_CACHE_DTYPES)
    seed: int = option(0, "seed of the engine's unseeded draws", min=0)
    # speculative decoding (engine.spec; docs/speculative.md): at most one of model / method
    speculative_model: str | None = option(
        None, "draft checkpoint (the target's tokenizer) that proposes tokens for the model to verify; "
        "decode workers speculate, prefill workers ignore it")
    speculative_method: str | None = option(None, "ngram: propose by prompt lookup, no draft model",
                                            choices=SPECULATIVE_METHODS)
    num_speculative_tokens: int | None = option(
        None, f"k, the most draft tokens verified per sequence and step (default {DEFAULT_SPECULATIVE_TOKENS})",
        min=1, max=MAX_SPECULATIVE_TOKENS)
    speculative_adaptive: bool = option(True, "shrink k (to 0) while verifying costs more than it yields")
    grammar_cache_size: int = option(256, "compiled grammars of structured outputs kept, by content (LRU)", min=1)
    grammar_threads: int = option(0, "threads filling structured outputs' token masks while the forward "
                                  "runs (0: half the CPUs, 1 to 8)", min=0)
    async_scheduling: bool | None = option(
        None, "schedule and prepare the next step while the current forward runs (a worker's engine loop; "
        "outputs are the same as with it off); default: on for a GPU, off on the CPU, where the forward "
        "thread and the engine thread share the GIL and the overlap costs more than it hides")
    # tensor parallelism (engine/parallel; docs/tensor-parallel.md); SGLang's flag names for nodes
    tensor_parallel_size: int = option(1, "ranks one model is split over: processes, one GPU each (gloo on CPU)",
                                       min=1)
    nnodes: int = option(1, "nodes the tensor-parallel ranks run on, tensor_parallel_size / nnodes each", min=1)
    node_rank: int = option(0, "this node's index: 0 runs the worker and rank 0, the others only their ranks",
                            min=0)
    dist_init_addr: str | None = option(
        None, "host:port of rank 0's rendezvous (default: a free loopback port; required with --nnodes > 1)")
    dist_timeout_s: float = option(60.0, "seconds the ranks wait for each other (rendezvous, any collective) "
                                   "before the worker fails", flag="dist-timeout", above=0)
    kv_relay_blocks: int | None = option(
        None, "tensor parallelism: rank 0's whole-page staging blocks for KV transfers (default: one full context)",
        min=1)

    def __post_init__(self) -> None:
        self._check_speculation()
        check_options(self)
        self._check_parallel()
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size!r}")
        canonical_dtype(self.dtype)
        check_device(self.device)

    def _check_speculation(self) -> None:
        if self.speculative_model is not None and self.speculative_method is not None:
            raise ValueError(f"set speculative_model ({self.speculative_model!r}) or speculative_method "
                             f"({self.speculative_method!r}), not both")
        if self.speculative_method is not None and self.speculative_method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_method must be one of {', '.join(SPECULATIVE_METHODS)}, got "
                             f"{self.speculative_method!r} (a draft model is given as speculative_model=DIR)")
        if self.num_speculative_tokens is not None and not self.speculative:
            raise ValueError("num_speculative_tokens needs speculative_model or speculative_method")

    def _check_parallel(self) -> None:
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank must be in [0, {self.nnodes}) for --nnodes {self.nnodes}, got {self.node_rank}")
        if self.tensor_parallel_size % self.nnodes:
            raise ValueError(f"tensor_parallel_size {self.tensor_parallel_size} does not split evenly over "
                             f"--nnodes {self.nnodes}")
        if self.nnodes > 1 and not self.dist_init_addr:
            raise ValueError("--nnodes > 1 needs --dist-init-addr HOST:PORT (rank 0's rendezvous, reachable from "
                             "every node)")
        if self.dist_init_addr is not None:
            host, _, port = self.dist_init_addr.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"dist_init_addr must be HOST:PORT, got {self.dist_init_addr!r}")

    @property
    def ranks_per_node(self) -> int:
        return self.tensor_parallel_size // self.nnodes

    @property
    def speculative(self) -> bool:
        """Whether this engine speculates (a draft model or n-gram lookup)."""
        return self.speculative_model is not None or self.speculative_method is not None

    @property
    def speculative_tokens(self) -> int:
        """k: the most draft tokens verified per sequence and step (0 when not speculating)."""
        if not self.speculative:
            return 0
        return self.num_speculative_tokens or DEFAULT_SPECULATIVE_TOKENS

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    @property
    def kv_cache_memory_bytes(self) -> int | None:
        return int(self.kv_cache_memory_gib * 2**30) if self.kv_cache_memory_gib is not None else None
