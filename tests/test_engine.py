"""The continuous batching engine behind AsyncModel (asyncio and trio)."""

from __future__ import annotations

import threading
import time

import anyio
import pytest

import mullama
from mullama import StreamConfig
from mullama.aio import AsyncModel

pytestmark = pytest.mark.anyio

PROMPTS = ["once upon", "hello there", "abc", "The capital of France is", "xyz", "q", "zz top", "mm"]



def sequential(model, prompts, configs, ctx_size=512):
    out = []
    for p, cfg in zip(prompts, configs):
        with model.create_context(ctx_size, threads=1) as ctx:
            out.append(ctx.generate(p, cfg))
    return out


async def run_all(model, prompts, configs):
    results = [None] * len(prompts)

    async def one(i):
        results[i] = await model.generate(prompts[i], config=configs[i])

    async with anyio.create_task_group() as tg:
        for i in range(len(prompts)):
            tg.start_soon(one, i)
    return results


@pytest.mark.parametrize("path_fixture", ["tiny_model_path", "default_model_path"])
async def test_batched_greedy_equals_one_at_a_time(request, path_fixture):
    path = request.getfixturevalue(path_fixture)
    cfgs = [StreamConfig.greedy(24)] * len(PROMPTS)
    with mullama.Model.load(path) as m:
        expected = sequential(m, PROMPTS, cfgs)
    async with await AsyncModel.load(path, max_concurrent=4, context_size=512, threads=1) as model:
        got = await run_all(model, PROMPTS, cfgs)
        assert [c.tokens for c in got] == [c.tokens for c in expected]
        assert [c.text for c in got] == [c.text for c in expected]
        assert [c.finish_reason for c in got] == [c.finish_reason for c in expected]
        assert model.kv_used() == 0 and model.active_workers == 0


async def test_mixed_sampling_settings(tiny_model_path):
    cfgs = [StreamConfig.greedy(20), StreamConfig(max_tokens=20, temperature=1.2, seed=3),
            StreamConfig(max_tokens=20, temperature=0.7, top_k=5, seed=9, repeat_penalty=1.3),
            StreamConfig.greedy(20, stop=["a"]), StreamConfig(max_tokens=20, temperature=2.0, min_p=0.0,
                                                              top_p=0.5, seed=1, include_probabilities=True)]
    prompts = PROMPTS[: len(cfgs)]
    with mullama.Model.load(tiny_model_path) as m:
        expected = sequential(m, prompts, cfgs)
    async with await AsyncModel.load(tiny_model_path, max_concurrent=3, context_size=512, threads=1) as model:
        got = await run_all(model, prompts, cfgs)
    for g, e, cfg in zip(got, expected, cfgs):
        assert g.tokens == e.tokens, cfg
        assert g.text == e.text
    assert got[4].logprobs is not None and len(got[4].logprobs) == len(got[4].tokens)


async def test_cancelling_one_leaves_the_others_unchanged(tiny_model_path):
    cfg = StreamConfig.greedy(200)
    with mullama.Model.load(tiny_model_path) as m:
        expected = sequential(m, PROMPTS[:3], [cfg] * 3)
    async with await AsyncModel.load(tiny_model_path, max_concurrent=4, context_size=512, threads=1) as model:
        results = {}

        async def keep(i):
            results[i] = await model.generate(PROMPTS[i], config=cfg)

        async def cancel_after(n):
            with anyio.CancelScope() as scope:
                async with model.generate_stream("victim", cfg) as stream:
                    async for tok in stream:
                        if tok.position >= n:
                            scope.cancel()

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(keep, i)
            tg.start_soon(cancel_after, 10)
        assert [results[i].tokens for i in range(3)] == [e.tokens for e in expected]
        assert model.kv_used() == 0 and model.active_workers == 0


async def test_queue_overflow(tiny_model_path):
    async with await AsyncModel.load(tiny_model_path, max_concurrent=1, max_queue=1, context_size=2048,
                                     threads=1) as model:
        hold = anyio.Event()
        started = anyio.Event()

        async def holder():
            async with model.generate_stream("abc", StreamConfig.greedy(1500)) as stream:
                await stream.__anext__()
                started.set()
                await hold.wait()

        async def waiter():
            await model.generate("q", config=StreamConfig.greedy(3))

        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            await started.wait()
            tg.start_soon(waiter)
            while model.waiting == 0:
                await anyio.sleep(0.001)
            with pytest.raises(mullama.OverloadedError, match="max_queue=1"):
                await model.generate("x", config=StreamConfig.greedy(3))
            hold.set()
        assert model.waiting == 0 and model.active_workers == 0 and model.kv_used() == 0


async def test_no_queue_still_fills_every_slot(tiny_model_path):
    """max_queue=0: requests take free slots (even several in the same step); only beyond them, overload."""
    async with await AsyncModel.load(tiny_model_path, max_concurrent=2, max_queue=0, context_size=2048,
                                     threads=1) as model:
        got = await run_all(model, PROMPTS[:2], [StreamConfig.greedy(8)] * 2)
        assert all(c.finish_reason == "length" for c in got)
        async with model.generate_stream("abc", StreamConfig.greedy(1500)) as one, \
                model.generate_stream("xyz", StreamConfig.greedy(1500)) as two:
            await one.__anext__()
            await two.__anext__()
            with pytest.raises(mullama.OverloadedError, match="all 2 slots are busy and 0 requests are waiting"):
                await model.generate("x", config=StreamConfig.greedy(3))
        assert await model.generate_text("q", config=StreamConfig.greedy(3))


async def test_prompt_too_long_refused_up_front(tiny_model_path):
    async with await AsyncModel.load(tiny_model_path, max_concurrent=2, context_size=256, threads=1) as model:
        # a prompt of 3 tokens plus max_tokens 300 cannot fit in 256; nothing is queued
        with pytest.raises(mullama.ContextOverflowError, match=r"max_tokens \(300\).*256"):
            await model.generate("ab", config=StreamConfig.greedy(300))
        assert model.waiting == 0 and model.active_workers == 0
        with pytest.raises(mullama.ContextOverflowError, match=r"prompt \(502 tokens\).*\(256 tokens\)"):
            await model.generate("a" * 1000, config=StreamConfig.greedy(5))
        assert await model.generate_text("ab", config=StreamConfig.greedy(5))


async def test_metrics_add_up(tiny_model_path):
    cfg = StreamConfig.greedy(16)
    async with await AsyncModel.load(tiny_model_path, max_concurrent=2, context_size=512, threads=1) as model:
        done_before = model._engine.completed
        got = await run_all(model, PROMPTS[:5], [cfg] * 5)
        engine = model._engine
        assert engine.completed - done_before == 5
        assert engine.generated_tokens >= sum(len(c.tokens) for c in got)
        for c in got:
            m = c.metrics
            assert m.generated_tokens == len(c.tokens) == c.timings.generated_tokens
            assert m.finish_reason == c.finish_reason
            assert m.queue_ms >= 0 and m.time_to_first_token_ms >= m.queue_ms
            assert m.prompt_tokens > 0
        # with 2 slots and 5 requests, someone waited in the queue
        assert max(c.metrics.queue_ms for c in got) > min(c.metrics.queue_ms for c in got)


async def test_slow_consumer_pauses_only_its_own_sequence(default_model_path):
    async with await AsyncModel.load(default_model_path, max_concurrent=2, context_size=2048) as model:
        async with model.generate_stream("Once upon a time", StreamConfig.greedy(1000)) as slow:
            await slow.__anext__()  # then it stops reading
            fast = await model.generate("Once upon a time", config=StreamConfig.greedy(64))
            assert fast.finish_reason == "length"  # the other request ran to its end meanwhile
            stalled = len(slow._run.tokens)
            assert stalled < 32  # paused after a few buffered batches, not generating on
            await anyio.sleep(0.2)
            assert len(slow._run.tokens) == stalled
            got = [await slow.__anext__() for _ in range(stalled + 4)]  # reading resumes it
            assert [t.id for t in got[:4]] == fast.tokens[1:5]  # same prompt, greedy: same tokens
        assert model.kv_used() == 0 and model.active_workers == 0


async def test_metrics_on_the_stream(tiny_model_path):
    async with await AsyncModel.load(tiny_model_path, max_concurrent=2, context_size=512, threads=1) as model:
        async with model.generate_stream("once upon", StreamConfig.greedy(40)) as stream:
            seen = 0
            async for _ in stream:
                seen += 1
                m = stream.metrics()
                assert m.generated_tokens >= seen and m.prompt_tokens == len(await model.tokenize("once upon"))
        final = stream.metrics()
        assert final == stream.completion().metrics
        assert final.finish_reason == stream.finish_reason and final.generated_tokens == seen
        async with await model.create_context() as conv:  # a conversation reports the same metrics
            async with conv.generate_stream("once upon", StreamConfig.greedy(8)) as s2:
                got = [t async for t in s2]
            m = s2.metrics()
            assert m == s2.completion().metrics and m.finish_reason == "length"
            assert m.generated_tokens == len(got) == 8 and m.prompt_tokens == final.prompt_tokens
            assert m.queue_ms >= 0 and m.time_to_first_token_ms >= m.queue_ms


def test_the_engine_ends_a_request_at_its_deadline_whatever_its_consumer_does(tiny_model):
    """A consumer that never takes anything (its sink stays full) cannot keep a slot past
    timeout_ms; the request ends with finish reason "timeout" and its completion raises."""
    from mullama._engine import Engine, EngineRequest

    class FullSink:
        def __init__(self) -> None:
            self.finished = threading.Event()
            self.batches = 0

        def has_space(self) -> bool:
            return self.batches == 0  # one batch, then never any room

        def offer(self, batch) -> None:
            self.batches += 1

        def finish(self) -> None:
            self.finished.set()

    engine = Engine(tiny_model, n_seq=2, ctx_per_seq=4096, threads=1)
    try:
        stuck, waiting = FullSink(), FullSink()
        timed = EngineRequest(tiny_model.tokenize("a b"), StreamConfig.greedy(4000), stuck, timeout_ms=300)
        engine.submit(timed)
        request = EngineRequest(tiny_model.tokenize("a b"), StreamConfig.greedy(4000), waiting, timeout_ms=None)
        engine.submit(request)
        assert stuck.finished.wait(60)  # a bound, not a timing assertion
        assert timed.finish_reason == "timeout" and engine.active == 1 and stuck.batches == 1
        request.cancel()
        assert waiting.finished.wait(60) and request.finish_reason == "cancelled"
    finally:
        engine.close()
    assert engine.kv_cells == 0


def test_a_queued_request_times_out_too(tiny_model):
    from mullama._engine import Engine, EngineRequest

    class Sink:
        def has_space(self) -> bool:
            return False

        def offer(self, batch) -> None:
            pass

        def finish(self) -> None:
            pass

    engine = Engine(tiny_model, n_seq=1, ctx_per_seq=4096, threads=1)
    try:
        first = EngineRequest(tiny_model.tokenize("a b"), StreamConfig.greedy(4000), Sink())
        queued = EngineRequest(tiny_model.tokenize("a b"), StreamConfig.greedy(8), Sink(), timeout_ms=200)
        engine.submit(first)
        engine.submit(queued)
        deadline = time.monotonic() + 60
        while not queued.finished:  # a bound, not a timing assertion
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert queued.finish_reason == "timeout" and queued.timed_out
        with pytest.raises(mullama.RequestTimeoutError, match="timeout_ms=200"):
            queued.completion()
        assert not first.finished  # the running one is not touched
    finally:
        engine.close()
