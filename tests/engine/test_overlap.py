"""Overlapped steps (engine.overlap, async_scheduling) produce what serial steps produce: the same tokens,
text, finish reasons and logprobs for greedy and seeded requests, through preemption, requests that
finish (length, stop ids, stop strings) while the next step is already launched, and steps that must
run serially (a penalty). Real engines on a tiny checkpoint, real threads; blocks all come back."""

from __future__ import annotations

import dataclasses
import queue
import time

import pytest

from engine.config import EngineConfig
from engine.engine import Engine
from engine.engine_loop import EngineLoop, Request
from engine.outputs import RequestOutput
from engine.sampling.params import SamplingParams

PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
    SamplingParams(seed=7, temperature=0.8, top_p=0.9, max_tokens=17, ignore_eos=True, logprobs=2),
    SamplingParams(seed=8, max_tokens=12, min_tokens=4),
    SamplingParams(temperature=0.0, max_tokens=15, stop_token_ids=[7, 11, 13, 17, 19], ignore_eos=True),
    SamplingParams(seed=9, max_tokens=14, ignore_eos=True, stop=["e"]),
    SamplingParams(seed=10, max_tokens=10, ignore_eos=True, repetition_penalty=1.3),  # serial steps
    SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
]


def run(model: str, overlap: bool) -> tuple[list[list[RequestOutput]], Engine]:
    # 14 blocks of 4 tokens for 8 requests of 9-31 tokens: the batch must preempt
    cfg = EngineConfig(model=model, device="cpu", dtype="float32", num_kv_blocks=14, block_size=4,
                       max_num_batched_tokens=32, max_num_seqs=8, async_scheduling=overlap)
    engine = Engine(cfg)
    loop = EngineLoop(engine, name=f"overlap-{overlap}")
    queues: list[queue.Queue[RequestOutput | BaseException]] = []
    for i, p in enumerate(PARAMS):
        q: queue.Queue[RequestOutput | BaseException] = queue.Queue()
        queues.append(q)
        prompt = [(13 * i + 3 * j) % 200 + 3 for j in range(8 + i % 3)]
        loop.add(Request(engine.make_sequence(f"r{i}", prompt, p), q.put, q.put))
    loop.start()
    results = []
    try:
        for q in queues:
            outs: list[RequestOutput] = []
            while not outs or not outs[-1].finished:
                item = q.get(timeout=30)
                assert not isinstance(item, BaseException), item
                outs.append(item)
            results.append(outs)
        deadline = time.monotonic() + 5
        while (loop.requests or engine.block_manager.num_free_blocks != 14) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        loop.stop()
    assert not loop.requests and engine.block_manager.num_free_blocks == 14
    return results, engine


@pytest.fixture(scope="module")
def model(tiny_model) -> str:
    return str(tiny_model("llama"))


@pytest.fixture(scope="module")
def looped(model) -> dict[bool, tuple[list[list[RequestOutput]], Engine]]:
    """Each request's outputs through a loop, serial (False) and overlapped (True)."""
    return {overlap: run(model, overlap) for overlap in (False, True)}


def test_overlapped_steps_equal_serial_steps(looped) -> None:
    serial, _ = looped[False]
    overlapped, engine = looped[True]
    assert engine.stats()["preemptions"] > 0
    reasons = set()
    for want, got in zip(serial, overlapped, strict=True):
        assert [t for o in got for t in o.new_token_ids] == [t for o in want for t in o.new_token_ids]
        assert "".join(o.new_text for o in got) == "".join(o.new_text for o in want)
        assert (got[-1].finish_reason, got[-1].stop_reason) == (want[-1].finish_reason, want[-1].stop_reason)
        assert got[-1].num_output_tokens == want[-1].num_output_tokens
        lp_got = [dataclasses.astuple(lp) for o in got for lp in o.new_logprobs]
        lp_want = [dataclasses.astuple(lp) for o in want for lp in o.new_logprobs]
        assert [x[0] for x in lp_got] == [x[0] for x in lp_want]
        assert all(abs(a[1] - b[1]) < 1e-4 for a, b in zip(lp_got, lp_want, strict=True))
        reasons.add(got[-1].finish_reason)
        seq = got[-1].seq
        assert seq is not None and -1 not in seq.token_ids  # every placeholder filled or dropped
    assert len(reasons) >= 2  # both length and stop endings were exercised


def test_a_reused_sampling_batch_renews_its_step_seeds(model) -> None:
    """The runner reuses the last step's sampling batch for the same sequences (engine.model_runner);
    what changes per step (a seeded row's step seed) must be what a fresh build gives."""
    engine = Engine(EngineConfig(model=model, device="cpu", dtype="float32", num_kv_blocks=16, block_size=4))
    seqs = [engine.make_sequence(f"s{i}", [3, 4, 5], SamplingParams(seed=i, max_tokens=8)) for i in range(2)]
    seqs.append(engine.make_sequence("g", [3, 4, 5], SamplingParams(temperature=0.0, max_tokens=8)))
    runner = engine.runner
    first = runner.sampling_batch(seqs)
    for seq in seqs:
        seq.append_token(9)
    again = runner.sampling_batch(seqs)
    fresh = runner._build_sampling_batch(seqs)
    assert again.seeded_rows == fresh.seeded_rows != first.seeded_rows
    assert again.temperatures is first.temperatures  # the rest was reused, not rebuilt
    penalised = [*seqs, engine.make_sequence("p", [3], SamplingParams(seed=1, repetition_penalty=1.2))]
    runner.sampling_batch(penalised)
    assert runner.sampling_batch(penalised).penalties is not None and runner._last_batch is None


def fields(out: RequestOutput) -> tuple:
    """Everything an output tells its client (logprobs to 4 decimals)."""
    lps = [(lp.token_id, round(lp.logprob, 4), [(t, round(x, 4)) for t, x in lp.top]) for lp in out.new_logprobs]
    return (out.request_id, out.index, out.new_token_ids, out.new_text, out.finished, out.finish_reason,
            out.stop_reason, out.num_prompt_tokens, out.num_output_tokens, out.num_cached_tokens, lps)


def test_a_loop_delivers_what_inline_steps_make(model, looped) -> None:
    """The loop's plain decodes leave the engine as rows (StepOutput) and become RequestOutputs, with
    text, on the text thread: every output, serial or overlapped, is the one `Engine.step` makes inline."""
    cfg = EngineConfig(model=model, device="cpu", dtype="float32", num_kv_blocks=14, block_size=4,
                       max_num_batched_tokens=32, max_num_seqs=8)
    engine = Engine(cfg)
    inline: list[list[RequestOutput]] = [[] for _ in PARAMS]
    for i, p in enumerate(PARAMS):
        engine.add_request(f"r{i}", [(13 * i + 3 * j) % 200 + 3 for j in range(8 + i % 3)], p)
    while engine.has_unfinished():
        for out in engine.step():
            inline[int(out.request_id[1:])].append(out)
    for overlap in (False, True):
        for want, got in zip(inline, looped[overlap][0], strict=True):
            assert [fields(o) for o in got] == [fields(o) for o in want]


@pytest.mark.parametrize("setting", [None, True, False], ids=["default", "on", "off"])
def test_the_cpu_overlaps_steps_only_when_asked(model, setting: bool | None) -> None:
    """On the CPU the forward thread shares the GIL with the engine thread, so a loop runs its steps
    serially unless async_scheduling asks for the overlap; an accelerator overlaps by default."""
    import threading

    import torch

    from engine.engine_loop import helper_threads_pay

    assert not helper_threads_pay(torch.device("cpu")) and helper_threads_pay(torch.device("cuda", 0))
    cfg = EngineConfig(model=model, device="cpu", dtype="float32", num_kv_blocks=32, block_size=4,
                       async_scheduling=setting)
    engine = Engine(cfg)
    done = threading.Event()
    loop = EngineLoop(engine, name=f"overlap-default-{setting}")
    # an overlapped step's forward runs on the loop's forward thread, a serial one on the engine thread
    seen: set[str] = set()
    inner = engine.runner._forward

    def spy(*args, **kwargs):
        seen.add(threading.current_thread().name)
        return inner(*args, **kwargs)

    engine.runner._forward = spy  # type: ignore[method-assign]

    def emit(out: RequestOutput) -> None:
        if out.finished:
            done.set()

    loop.add(Request(engine.make_sequence("r", [5, 6, 7, 8, 9], SamplingParams(max_tokens=6, ignore_eos=True)),
                     emit, lambda exc: done.set()))
    loop.start()
    try:
        assert done.wait(20)
    finally:
        loop.stop()
    assert seen, "no forward ran"
    on_forward_thread = any(name.startswith(f"overlap-default-{setting}-forward") for name in seen)
    assert on_forward_thread is bool(setting)
    assert engine.block_manager.num_free_blocks == 32
