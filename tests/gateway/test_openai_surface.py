"""The rest of the OpenAI and gRPC surface against a real stack, driven by the official `openai` client
and by gRPC side by side: n choices, echo and prompt logprobs, logit_bias and friends, batched
prompts, /tokenize and /detokenize, vLLM's extensions, /v1/responses, and models by several names.

One disaggregated stack for the module (1 prefill + 1 decode worker, every prompt's KV shipped:
--local-prefill-threshold 0), served as "tiny" and "tiny-alias". Every test ends with every block free.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import openai
import pytest
import torch

from cli.launcher import Stack
from engine.sampling.seeds import sibling_seed
from engine.tokenizer import Tokenizer
from tandem.v1 import generation_pb2 as gen
from tandem.v1 import generation_pb2_grpc
from tests.clients import grpc_stub as generation_stub
from tests.clients import openai_client
from tests.clients import post_json as post
from tests.e2e.conftest import ENGINE_ARGS, wait_all_blocks_free
from tests.hf_reference import hf_model

NAMES = ["tiny", "tiny-alias"]
CHAT = [{"role": "user", "content": "Name a prime."}]


@pytest.fixture(scope="module")
def stack(tiny_model, tmp_path_factory) -> Iterator[Stack]:
    s = Stack(tiny_model("llama", max_position_embeddings=1024), engine_args=ENGINE_ARGS,
              gateway_args=["--http-port", "0", "--local-prefill-threshold", "0", "--served-model-name",
                            ",".join(NAMES)],
              workdir=tmp_path_factory.mktemp("surface-stack"))
    with s:
        yield s


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai_client(stack)


@pytest.fixture(scope="module")
def grpc_stub(stack: Stack) -> generation_pb2_grpc.GenerationStub:
    return generation_stub(stack)


@pytest.fixture(autouse=True)
def every_block_comes_back(stack: Stack) -> Iterator[None]:
    yield
    wait_all_blocks_free(stack)



def choices(msgs: list[gen.GenerateResponse]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for m in msgs:
        out.setdefault(m.index, []).extend(m.token_ids)
    return out


def run(stub: generation_pb2_grpc.GenerationStub, **kw: object) -> list[gen.GenerateResponse]:
    sampling = kw.pop("sampling")
    return list(stub.Generate(gen.GenerateRequest(sampling=gen.SamplingParams(**sampling), **kw),  # type: ignore[arg-type]
                              timeout=60))


# ------------------------------------------------------------------ n
def test_n_choices_are_the_single_requests_of_their_seeds_over_grpc_and_http(grpc_stub, client) -> None:
    sampling = dict(n=4, seed=21, max_tokens=10, temperature=0.9, ignore_eos=True)
    msgs = run(grpc_stub, prompt="def fib(n):", sampling=sampling)
    got = choices(msgs)
    assert sorted(got) == [0, 1, 2, 3] and len({tuple(t) for t in got.values()}) == 4
    finished = [m.index for m in msgs if m.finish_reason == gen.FINISH_REASON_LENGTH]
    assert sorted(finished) == [0, 1, 2, 3] and msgs[-1].usage.completion_tokens == 40
    for i, tokens in got.items():
        alone = run(grpc_stub, prompt="def fib(n):", sampling={**sampling, "n": 1, "seed": sibling_seed(21, i)})
        assert choices(alone)[0] == tokens
    resp = client.completions.create(model="tiny", prompt="def fib(n):", n=4, seed=21, max_tokens=10,
                                     temperature=0.9, logprobs=0, extra_body={"ignore_eos": True})
    assert [c.index for c in resp.choices] == [0, 1, 2, 3] and resp.usage.completion_tokens == 40
    text = {m.index: "" for m in msgs}
    for m in msgs:
        text[m.index] += m.text
    assert [c.text for c in resp.choices] == [text[i] for i in range(4)]
    stream = client.chat.completions.create(model="tiny", messages=CHAT, n=3, max_tokens=6, stream=True,
                                            temperature=0.8, seed=5, extra_body={"ignore_eos": True})
    streamed: dict[int, str] = {}
    for chunk in stream:
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    whole = client.chat.completions.create(model="tiny", messages=CHAT, n=3, max_tokens=6, temperature=0.8, seed=5,
                                           extra_body={"ignore_eos": True})
    assert streamed == {c.index: c.message.content for c in whole.choices} and len(streamed) == 3


def test_cancelling_a_stream_of_n_choices_frees_every_block(grpc_stub) -> None:
    call = grpc_stub.Generate(gen.GenerateRequest(prompt="import os\n", sampling=gen.SamplingParams(
        n=4, max_tokens=800, ignore_eos=True)), timeout=60)
    seen = set()
    for m in call:
        seen.add(m.index)
        if len(seen) == 4:
            break
    call.cancel()  # the fixture checks that both workers give every block back


# ------------------------------------------------------------------ prompt logprobs and echo
def test_prompt_logprobs_match_transformers_over_grpc_and_echo(stack, grpc_stub, client) -> None:
    prompt = "def add(a, b):\n    return a + b\n"
    msgs = run(grpc_stub, prompt=prompt, sampling=dict(max_tokens=1, temperature=0.0, prompt_logprobs=2))
    first = msgs[0]
    ids = list(first.prompt_token_ids)
    assert len(first.prompt_logprobs) == len(ids) - 1 and all(not m.prompt_logprobs for m in msgs[1:])
    with torch.no_grad():
        logp = hf_model(stack.model)(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # (P, V)
    for i, lp in enumerate(first.prompt_logprobs):
        assert lp.token_id == ids[i + 1]
        assert lp.logprob == pytest.approx(float(logp[i, ids[i + 1]]), abs=1e-3)
        assert lp.rank == int((logp[i] > logp[i, ids[i + 1]]).sum()) + 1
        assert [t.token_id for t in lp.top] == logp[i].topk(2).indices.tolist()
    # echo + logprobs + max_tokens 0: the prompt alone, scored (what evaluation harnesses send)
    resp = client.completions.create(model="tiny", prompt=prompt, echo=True, logprobs=1, max_tokens=0)
    c = resp.choices[0]
    assert c.text == prompt and resp.usage.completion_tokens == 0 and resp.usage.prompt_tokens == len(ids)
    assert c.logprobs.token_logprobs[0] is None and len(c.logprobs.tokens) == len(ids)
    assert c.logprobs.token_logprobs[1:] == pytest.approx([lp.logprob for lp in first.prompt_logprobs], abs=1e-5)
    assert c.logprobs.text_offset[:2] == [0, len(c.logprobs.tokens[0])]
    assert all(len(t) >= 1 for t in c.logprobs.top_logprobs[1:])
    # echo while generating: the prompt, then the completion (streamed too)
    gen_resp = client.completions.create(model="tiny", prompt=prompt, echo=True, max_tokens=5, temperature=0)
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0)
    assert gen_resp.choices[0].text == prompt + plain.choices[0].text
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model="tiny", prompt=prompt, echo=True, max_tokens=5, temperature=0, stream=True) if ch.choices)
    assert streamed == gen_resp.choices[0].text
    vllm = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, extra_body={"prompt_logprobs": 0})
    pl = (vllm.choices[0].model_extra or {})["prompt_logprobs"]
    assert pl[0] is None and pl[1][str(ids[1])]["rank"] == first.prompt_logprobs[0].rank


# ------------------------------------------------------------------ logit_bias and friends
def test_logit_bias_allowed_ids_and_bad_words_over_http_and_grpc(stack, grpc_stub, client) -> None:
    forced = client.completions.create(model="tiny", prompt="x = ", max_tokens=5, temperature=1.0, seed=1,
                                       logit_bias={"77": 100}, extra_body={"ignore_eos": True})
    assert choices(run(grpc_stub, prompt="x = ", sampling=dict(max_tokens=5, seed=1, logit_bias={77: 100},
                                                               ignore_eos=True)))[0] == [77] * 5
    _, tokenized = post(stack, "/tokenize", {"prompt": forced.choices[0].text, "add_special_tokens": False})
    assert set(tokenized["tokens"]) == {77}
    allowed = run(grpc_stub, prompt="x = ", sampling=dict(max_tokens=20, temperature=1.5, seed=2, ignore_eos=True,
                                                          allowed_token_ids=[40, 41, 42]))
    assert set(choices(allowed)[0]) <= {40, 41, 42}
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny", prompt="x", logit_bias={"5": 150})
    assert bad.value.param == "logit_bias" and "[-100, 100]" in bad.value.message
    with pytest.raises(grpc.RpcError) as err:
        run(grpc_stub, prompt="x", sampling=dict(allowed_token_ids=[10**6]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "allowed_token_ids" in err.value.details()
    greedy = client.completions.create(model="tiny", prompt="def main():", max_tokens=12, temperature=0)
    word = greedy.choices[0].text.split()[0] if greedy.choices[0].text.split() else ""
    if word:
        banned = client.completions.create(model="tiny", prompt="def main():", max_tokens=12, temperature=0,
                                           extra_body={"bad_words": [word]})
        assert banned.choices[0].text != greedy.choices[0].text


# ------------------------------------------------------------------ batched prompts
def test_a_batch_of_prompts_numbers_its_choices_prompt_by_prompt(client) -> None:
    prompts = ["def a():", "class B:", [5, 6, 7, 8]]
    resp = client.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=4, temperature=0.7, seed=3,
                                     extra_body={"ignore_eos": True})
    assert [c.index for c in resp.choices] == list(range(6))
    for i, p in enumerate(prompts):
        alone = client.completions.create(model="tiny", prompt=p, n=2, max_tokens=4, temperature=0.7, seed=3,
                                          extra_body={"ignore_eos": True})
        assert [c.text for c in resp.choices[2 * i: 2 * i + 2]] == [c.text for c in alone.choices]
    assert resp.usage.completion_tokens == 24
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=4, temperature=0.7,
                                           seed=3, stream=True, extra_body={"ignore_eos": True}):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {c.index: c.text for c in resp.choices}


# ------------------------------------------------------------------ tokenize, detokenize, models
def test_tokenize_and_detokenize_over_http_and_grpc(stack, grpc_stub) -> None:
    tok = Tokenizer.from_dir(stack.model)
    _, r = post(stack, "/tokenize", {"model": "tiny-alias", "prompt": "def main():"})
    assert r["tokens"] == tok.encode("def main():") and r["count"] == len(r["tokens"]) and r["max_model_len"] == 1024
    g = grpc_stub.Tokenize(gen.TokenizeRequest(prompt="def main():"), timeout=10)
    assert list(g.token_ids) == r["tokens"] and list(g.tokens) == r["token_strs"]
    chat = post(stack, "/tokenize", {"messages": CHAT})[1]["tokens"]
    assert chat == tok.encode(tok.apply_chat_template(CHAT), add_special_tokens=False)
    text = post(stack, "/detokenize", {"tokens": r["tokens"]})[1]["prompt"]
    assert text == grpc_stub.Detokenize(gen.DetokenizeRequest(token_ids=r["tokens"]), timeout=10).text
    assert text.endswith("def main():")
    status, bad = post(stack, "/detokenize", {"model": "other", "tokens": [1]})
    assert status == 404 and bad["error"]["code"] == "model_not_found"


def test_every_served_name_is_listed_and_accepted(grpc_stub, client) -> None:
    assert [m.id for m in client.models.list().data] == NAMES
    assert client.models.retrieve("tiny-alias").id == "tiny-alias"
    resp = client.completions.create(model="tiny-alias", prompt="x", max_tokens=2)
    assert resp.model == "tiny-alias"
    assert list(grpc_stub.Models(gen.ModelsRequest(), timeout=10).names) == NAMES
    assert run(grpc_stub, prompt="x", model="tiny-alias", sampling=dict(max_tokens=2))[-1].usage.completion_tokens == 2
    with pytest.raises(grpc.RpcError) as err:
        run(grpc_stub, prompt="x", model="tiny-other", sampling=dict(max_tokens=2))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "'tiny', 'tiny-alias'" in err.value.details()


# ------------------------------------------------------------------ vLLM's extensions
def test_include_stop_str_and_continue_final_message_and_priority(stack, grpc_stub, client) -> None:
    text = client.completions.create(model="tiny", prompt="def main():", max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = client.completions.create(model="tiny", prompt="def main():", max_tokens=24, temperature=0, stop=[stop])
    kept = client.completions.create(model="tiny", prompt="def main():", max_tokens=24, temperature=0, stop=[stop],
                                     extra_body={"include_stop_str_in_output": True, "priority": -5})
    assert kept.choices[0].text == cut.choices[0].text + stop
    grpc_kept = run(grpc_stub, prompt="def main():", priority=3, sampling=dict(
        max_tokens=24, temperature=0.0, stop=[stop], include_stop_str_in_output=True))
    assert "".join(m.text for m in grpc_kept) == kept.choices[0].text
    messages = [*CHAT, {"role": "assistant", "content": "The answer is"}]
    cont = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0,
                                          extra_body={"continue_final_message": True, "ignore_eos": True})
    _, tok_resp = post(stack, "/tokenize", {"messages": messages, "continue_final_message": True})
    assert cont.usage.prompt_tokens == tok_resp["count"]
    assert client.completions.create(model="tiny", prompt="x", max_tokens=1).usage.prompt_tokens >= 1


# ------------------------------------------------------------------ the Responses API
def test_responses_api_plain_text_streamed_and_not(client) -> None:
    resp = client.responses.create(model="tiny", input="Name a prime.", instructions="Be terse.",
                                   max_output_tokens=8, temperature=0)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "Be terse."},
                                                                  *CHAT], max_tokens=8, temperature=0)
    assert resp.object == "response" and resp.model == "tiny" and resp.output_text == chat.choices[0].message.content
    assert resp.usage.input_tokens == chat.usage.prompt_tokens and resp.usage.output_tokens == chat.usage.completion_tokens
    assert resp.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    events = list(client.responses.create(model="tiny", input=[{"role": "user", "content": [
        {"type": "input_text", "text": "Name a prime."}]}], instructions="Be terse.", max_output_tokens=8,
        temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == resp.output_text
    assert events[-1].response.output_text == resp.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.create(model="tiny", input="x", previous_response_id="resp_123")
    assert bad.value.param == "previous_response_id"


def test_n_choices_through_a_local_prefill(tiny_model, tmp_path) -> None:
    """0 prefill workers: the decode worker prefills and forks the choices itself (and computes the
    prompt logprobs, which reach the client in choice 0's first message)."""
    with Stack(tiny_model("llama", max_position_embeddings=1024), prefill_workers=0, engine_args=ENGINE_ARGS,
               workdir=tmp_path / "local") as s:
        stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(s.address))
        msgs = run(stub, prompt="def fib(n):", sampling=dict(n=3, seed=21, max_tokens=6, ignore_eos=True,
                                                             prompt_logprobs=0))
        got = choices(msgs)
        for i, tokens in got.items():
            alone = run(stub, prompt="def fib(n):", sampling=dict(seed=sibling_seed(21, i), max_tokens=6,
                                                                   ignore_eos=True))
            assert choices(alone)[0] == tokens
        assert len(msgs[0].prompt_logprobs) == len(msgs[0].prompt_token_ids) - 1 > 0
        wait_all_blocks_free(s)


def test_concurrent_n_requests_share_the_decode_worker(grpc_stub) -> None:
    results: list[dict[int, list[int]]] = []

    def one(seed: int) -> None:
        results.append(choices(run(grpc_stub, prompt=f"print({seed})", sampling=dict(
            n=4, seed=seed, max_tokens=12, ignore_eos=True))))

    threads = [threading.Thread(target=one, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(sorted(r) == [0, 1, 2, 3] and all(len(v) == 12 for v in r.values())
                                     for r in results)
