"""The OpenAI-compatible HTTP API, driven by the official `openai` client against a real stack.

One stack for the module (a start costs ~20 s here): gateway with `--http-port 0` (the bound port
comes back in the ready file) and `--max-inflight 1`, so the overload case needs only two requests.
Every answer is checked against what gRPC's Generate says for the same tokens: one code path.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import openai
import pytest

from cli.launcher import Stack
from engine.tokenizer import Tokenizer
from tandem.v1 import generation_pb2 as gen
from tandem.v1 import generation_pb2_grpc
from tests.clients import openai_client
from tests.e2e.conftest import ENGINE_ARGS, wait_all_blocks_free

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."}]


@pytest.fixture(scope="module")
def stack(tiny_model, tmp_path_factory) -> Iterator[Stack]:
    s = Stack(tiny_model("llama", max_position_embeddings=1024), engine_args=ENGINE_ARGS,
              gateway_args=["--http-port", "0", "--max-inflight", "1", "--local-prefill-threshold", "0"],
              workdir=tmp_path_factory.mktemp("http-stack"))
    with s:
        yield s


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai_client(stack)


def grpc_greedy(stack: Stack, max_tokens: int, **prompt) -> tuple[str, list[int], gen.Usage]:
    stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(stack.address))
    msgs = list(stub.Generate(gen.GenerateRequest(**prompt, sampling=gen.SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True)), timeout=60))
    return "".join(m.text for m in msgs), [t for m in msgs for t in m.token_ids], msgs[-1].usage


def served_model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_models_lists_the_served_model(client: openai.OpenAI, stack: Stack) -> None:
    name = stack.model.rsplit("/", 1)[-1]
    assert [m.id for m in client.models.list().data] == [name]
    assert client.models.retrieve(name).owned_by == "tandem"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.code == "model_not_found"


def test_completion_is_the_grpc_answer_with_usage_and_logprobs(client: openai.OpenAI, stack: Stack) -> None:
    name = served_model(client)
    resp = client.completions.create(model=name, prompt="def main():", max_tokens=12, temperature=0,
                                     logprobs=2, extra_body={"ignore_eos": True})
    text, ids, usage = grpc_greedy(stack, 12, prompt="def main():")
    choice = resp.choices[0]
    assert resp.object == "text_completion" and resp.model == name
    assert choice.text == text and choice.finish_reason == "length"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (usage.prompt_tokens, 12)
    assert resp.usage.total_tokens == usage.prompt_tokens + 12
    assert len(choice.logprobs.tokens) == 12 and all(len(t) <= 2 for t in choice.logprobs.top_logprobs)
    by_ids = client.completions.create(model=name, prompt=ids[:5], max_tokens=3, temperature=0)
    assert by_ids.usage.prompt_tokens == 5  # a token-id prompt is taken as is


def test_chat_completion_renders_the_chat_template(client: openai.OpenAI, stack: Stack) -> None:
    tok = Tokenizer.from_dir(stack.model)
    prompt_ids = tok.encode(tok.apply_chat_template(MESSAGES, add_generation_prompt=True), add_special_tokens=False)
    resp = client.chat.completions.create(model=served_model(client), messages=MESSAGES, max_tokens=10,
                                          temperature=0, extra_body={"ignore_eos": True})
    text, _, usage = grpc_greedy(stack, 10, prompt_token_ids=prompt_ids)
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant" and resp.choices[0].message.content == text
    assert resp.usage.prompt_tokens == len(prompt_ids) == usage.prompt_tokens


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_streaming_sends_deltas_then_usage(client: openai.OpenAI, kind: str) -> None:
    common = dict(model=served_model(client), max_tokens=96, temperature=0, extra_body={"ignore_eos": True})
    # A worker sends what each step made as it goes, but outputs that pile up while the event loop is busy leave
    # in one message, and the first token comes from the prefill worker on its own: a stream buffered after its
    # first token makes 3 chunks (first token, the rest, usage). A tiny model's 16 tokens take a few ms on the
    # CPU, little enough to arrive as 3 chunks too (CI saw it five times in a row), so the stream is 96 tokens,
    # tens of ms of decoding, and one of a few tries must make at least 6 chunks.
    counts = []
    for _ in range(3):
        if kind == "chat":
            whole = client.chat.completions.create(messages=MESSAGES, **common).choices[0].message.content
            chunks = list(client.chat.completions.create(messages=MESSAGES, stream=True,
                                                         stream_options={"include_usage": True}, **common))
            assert chunks[0].choices[0].delta.role == "assistant"
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            whole = client.completions.create(prompt="import os\n", **common).choices[0].text
            chunks = list(client.completions.create(prompt="import os\n", stream=True,
                                                    stream_options={"include_usage": True}, **common))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == whole
        counts.append(len(chunks))
        if len(chunks) >= 6:
            break
    print("chunks per stream:", counts)
    assert len(chunks) >= 6, f"tokens arrived in too few chunks to be a stream: {counts}"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 96
    assert all(c.usage is None for c in chunks[:-1])


def test_errors_have_openai_shape_and_status(client: openai.OpenAI, stack: Stack) -> None:
    model = served_model(client)
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=model, prompt="x", temperature=-1)
    assert bad.value.param == "temperature" and "temperature" in bad.value.message
    assert set(bad.value.body) == {"message", "type", "param", "code"}
    assert bad.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    with pytest.raises(openai.BadRequestError) as long:  # the gateway's own context check
        client.completions.create(model=model, prompt="x", max_tokens=5000)
    assert "context" in long.value.message
    with pytest.raises(openai.BadRequestError) as unknown:
        client.completions.create(model=model, prompt="x", extra_body={"bogus_option": 1})
    assert unknown.value.param == "bogus_option"


def test_overload_is_429_with_retry_after(client: openai.OpenAI, stack: Stack) -> None:
    """--max-inflight 1: while one stream runs, the next request is refused, as gRPC refuses it."""
    stream = client.completions.create(model=served_model(client), prompt="x", max_tokens=900, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))  # the first request holds the only slot
    with pytest.raises(openai.RateLimitError) as refused:
        client.completions.create(model=served_model(client), prompt="y", max_tokens=2)
    stream.close()  # disconnecting aborts the request on every worker
    assert refused.value.response.headers["Retry-After"] == "1"
    assert refused.value.code == "resource_exhausted"
    wait_all_blocks_free(stack)


def test_tandem_health_checks_each_component(stack: Stack) -> None:
    """What the compose healthchecks run: SERVING on every live component, a clear failure elsewhere."""
    from cli.health import check

    for addr in [stack.address, *(c.info["address"] for c in [*stack.prefill, *stack.decode])]:
        assert check(addr) == (True, "SERVING")
    assert check(stack.address, service="tandem.v1.Generation") == (True, "SERVING")
    ok, seen = check("127.0.0.1:9", timeout_s=0.5)
    assert not ok and seen.startswith("UNAVAILABLE")
