"""Quantized weights and the fp8 KV cache through the whole stack (1 prefill + 1 decode worker)."""

from __future__ import annotations

import grpc
import pytest

from engine import LLM, SamplingParams
from tests.e2e.conftest import ENGINE_ARGS, generate, wait_all_blocks_free
from tests.hf_reference import random_prompts

MAX_NEW = 12


@pytest.mark.parametrize("engine_flags", [["--quantization", "int8"], ["--quantization", "fp8"],
                                          ["--quantization", "int4", "--kv-cache-dtype", "fp8"]],
                         ids=["int8", "fp8", "int4+fp8kv"])
def test_greedy_through_the_stack_matches_the_offline_engine(make_stack, stack_model, engine_flags) -> None:
    stack = make_stack(stack_model, engine_args=[*ENGINE_ARGS, *engine_flags])
    prompts = random_prompts(512, [20, 45], seed=5)
    got = [generate(stack, p, temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)[0] for p in prompts]
    scheme = engine_flags[1]
    kv_dtype = "fp8" if "--kv-cache-dtype" in engine_flags else "auto"
    llm = LLM(stack_model, device="cpu", dtype="float32", block_size=8, num_kv_blocks=256, quantization=scheme,
              kv_cache_dtype=kv_dtype)
    want = [o.token_ids for o in llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW,
                                                                      ignore_eos=True))]
    assert got == want  # the prefill worker's KV (fp8 pages included) continues exactly on the decode worker
    wait_all_blocks_free(stack)


def test_fp8_kv_prefill_with_full_precision_decode_is_refused_naming_dtype(make_stack, stack_model) -> None:
    stack = make_stack(stack_model, prefill_args=["--kv-cache-dtype", "fp8"])
    with pytest.raises(grpc.RpcError) as err:
        generate(stack, random_prompts(512, [40])[0], temperature=0.0, max_tokens=4)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = err.value.details()
    assert "dtype" in details and "float8_e4m3fn" in details and "float32" in details, details
    wait_all_blocks_free(stack)
