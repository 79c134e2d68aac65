"""Text after the engine's step (engine.text_thread), on a text thread or on the engine thread: an
EngineLoop's outputs carry the same text, tokens and finish as `Engine.step`'s inline detokenization; a
stop string found there ends the sequence within a step or two and its blocks come back; making text
that raises kills the loop, wherever it runs; the default is the engine thread on the CPU. Real engine
on a tiny checkpoint, real threads."""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.engine_loop import EngineLoop, Request, helper_threads_pay
from engine.model_runner import StepInput
from engine.outputs import EngineDied, FinishReason, RequestOutput
from engine.sampling.params import SamplingParams

PROMPT = [5, 9, 17, 33, 65, 129, 200, 31]


@pytest.fixture(scope="module")
def engine(tiny_model) -> Engine:
    return Engine(EngineConfig(model=str(tiny_model("llama")), device="cpu", dtype="float32", num_kv_blocks=64,
                               block_size=4, max_num_batched_tokens=64))


def inline(engine: Engine, params: SamplingParams) -> tuple[list[int], str, FinishReason | None]:
    """Tokens, text and finish of one request on the engine thread itself (text made inline)."""
    engine.inline_text = True
    seq = engine.add_request("inline", PROMPT, params)
    text = ""
    while engine.has_unfinished():
        text += "".join(o.new_text for o in engine.step())
    return seq.output_token_ids, text, seq.finish_reason


@pytest.mark.parametrize("text_thread", [True, False], ids=["text-thread", "engine-thread"])
def test_a_stop_string_found_in_the_text_ends_the_request_at_once(engine, text_thread: bool) -> None:
    free = engine.block_manager.num_free_blocks
    tokens, text, _ = inline(engine, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    # a stop string that first appears several tokens in: the request must end there, not at 40
    at = next(i for i in range(6, 30) if engine.tokenizer.decode(tokens[:i]).strip())
    piece = engine.tokenizer.decode(tokens[:at])
    stop = piece[-3:] if len(piece) >= 3 else piece
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop])
    want_tokens, want_text, want_finish = inline(engine, params)
    assert want_finish is FinishReason.STOP and len(want_tokens) < 40

    steps_with_it: list[int] = []

    def observe(step: StepInput, outputs: list[RequestOutput], t0: int, t1: int) -> None:
        steps_with_it.append(sum(s.request_id == "threaded" for s in step.seqs))

    loop = EngineLoop(engine, name="text-test", observers=[observe], text_thread=text_thread)
    events: queue.Queue[RequestOutput | BaseException] = queue.Queue()
    seq = engine.make_sequence("threaded", PROMPT, params)
    loop.add(Request(seq, events.put, events.put))
    loop.start()
    outs: list[RequestOutput] = []
    try:
        while not outs or not outs[-1].finished:
            item = events.get(timeout=10)
            assert not isinstance(item, BaseException), item
            outs.append(item)
        deadline = time.monotonic() + 5
        while (loop.requests or engine.block_manager.num_free_blocks != free) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        loop.stop()
    assert [t for o in outs for t in o.new_token_ids] == want_tokens
    assert "".join(o.new_text for o in outs) == want_text and stop not in want_text
    assert outs[-1].finish_reason is FinishReason.STOP and outs[-1].stop_reason == stop
    assert outs[-1].num_output_tokens == len(want_tokens)
    assert seq.output_token_ids == want_tokens and seq.finish_reason is FinishReason.STOP  # tokens after it dropped
    # made on the engine thread, the stop reaches the engine before the step after next (the next one may be
    # launched already); a text thread may lag some steps behind a tiny model's 1 ms steps on a loaded box,
    # but never lets it run on to its max_tokens. Its blocks are freed either way.
    bound = 1 + len(want_tokens) + 2 if not text_thread else 1 + 40 - 1
    assert sum(steps_with_it) <= bound, steps_with_it
    assert not loop.requests and engine.block_manager.num_free_blocks == free
    assert events.empty()  # nothing after the finished output


@pytest.mark.parametrize("text_thread", [True, False], ids=["text-thread", "engine-thread"])
def test_outputs_with_text_made_after_the_step_equal_inline_ones(engine, text_thread: bool) -> None:
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
              SamplingParams(seed=3, max_tokens=9, ignore_eos=True, logprobs=1)]
    want = [inline(engine, p) for p in params]
    loop = EngineLoop(engine, name="text-test-2", text_thread=text_thread)
    queues: list[queue.Queue[RequestOutput | BaseException]] = [queue.Queue() for _ in params]
    for i, (p, q) in enumerate(zip(params, queues, strict=True)):
        loop.add(Request(engine.make_sequence(f"r{i}", PROMPT, p), q.put, q.put))
    loop.start()
    try:
        for (tokens, text, finish), q in zip(want, queues, strict=True):
            outs: list[RequestOutput] = []
            while not outs or not outs[-1].finished:
                item = q.get(timeout=10)
                assert not isinstance(item, BaseException), item
                outs.append(item)
            assert [t for o in outs for t in o.new_token_ids] == tokens
            assert "".join(o.new_text for o in outs) == text and outs[-1].finish_reason is finish
    finally:
        loop.stop()


def test_the_cpu_makes_text_on_the_engine_thread_an_accelerator_on_its_own(engine) -> None:
    assert not helper_threads_pay(torch.device("cpu"))
    assert helper_threads_pay(torch.device("cuda", 0))
    threads: list[str] = []
    done = threading.Event()

    def emit(out: RequestOutput) -> None:
        threads.append(threading.current_thread().name)
        if out.finished:
            done.set()

    loop = EngineLoop(engine, name="text-test-3")  # engine on the CPU: the default
    loop.add(Request(engine.make_sequence("r", PROMPT, SamplingParams(max_tokens=4, ignore_eos=True)), emit,
                     lambda exc: done.set()))
    loop.start()
    try:
        assert done.wait(10)
    finally:
        loop.stop()
    assert threads == ["text-test-3"] * 4  # every output from the engine thread itself


@pytest.mark.parametrize("text_thread", [True, False], ids=["text-thread", "engine-thread"])
def test_making_text_that_raises_kills_the_loop_and_fails_every_request(tiny_model, text_thread: bool) -> None:
    engine = Engine(EngineConfig(model=str(tiny_model("llama")), device="cpu", dtype="float32", num_kv_blocks=64,
                                 block_size=4, max_num_batched_tokens=64))  # its own: a dead loop's engine is spent
    failed: queue.Queue[BaseException] = queue.Queue()

    def broken(out: RequestOutput) -> None:
        raise RuntimeError("a broken emit")

    loop = EngineLoop(engine, name="text-test-4", text_thread=text_thread)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    loop.add(Request(engine.make_sequence("bad", PROMPT, params), broken, failed.put))
    loop.add(Request(engine.make_sequence("good", PROMPT, params), lambda out: None, failed.put))
    loop.start()
    try:
        assert loop.dead.wait(10)
        errors = [failed.get(timeout=5), failed.get(timeout=5)]
    finally:
        loop.stop()
    assert all(isinstance(e, EngineDied) and "a broken emit" in str(e) for e in errors), errors
