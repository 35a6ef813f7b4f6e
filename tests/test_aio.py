"""mullama.aio under asyncio and trio: streaming, capacity, cancellation, timeouts."""

from __future__ import annotations

import gc
import math
import sys

import anyio
import pytest

import mullama
from mullama import StreamConfig
from mullama.aio import AsyncConfig, AsyncModel

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

pytestmark = pytest.mark.anyio

GREEDY = StreamConfig.greedy(24)
LONG = StreamConfig.greedy(1500)  # fits a 2048-token request context



@pytest.fixture
def baseline(tiny_model):
    with tiny_model.create_context(2048, threads=1) as ctx:
        return ctx.generate("once upon", GREEDY)


async def load_tiny(path, **kw):
    kw.setdefault("threads", 1)
    kw.setdefault("context_size", 2048)
    return await AsyncModel.load(path, **kw)


async def test_generate_equals_sync(tiny_model_path, baseline):
    async with await load_tiny(tiny_model_path) as model:
        assert model.is_ready()
        assert await model.generate_text("once upon", config=GREEDY) == baseline.text
        done = await model.generate("once upon", config=GREEDY)
        assert done.tokens == baseline.tokens and done.finish_reason == baseline.finish_reason
    assert not model.is_ready()


async def test_stream(tiny_model_path, baseline):
    async with await load_tiny(tiny_model_path) as model:
        async with model.generate_stream("once upon", GREEDY) as stream:
            toks = [t async for t in stream]
        assert [t.id for t in toks] == baseline.tokens
        assert toks[-1].is_final
        assert stream.finish_reason == baseline.finish_reason
        assert stream.completion().text == baseline.text


async def test_tokenize_info(tiny_model_path, tiny_model):
    async with await load_tiny(tiny_model_path) as model:
        assert await model.tokenize("hello") == tiny_model.tokenize("hello")
        assert await model.tokenize_async("hello", add_bos=False) == tiny_model.tokenize("hello", add_bos=False)
        assert (await model.model_info()).n_vocab == 512
        assert await model.detokenize(tiny_model.tokenize("hey", add_bos=False)) == "hey"


async def test_cancel_during_decode(tiny_model_path, baseline):
    async with await load_tiny(tiny_model_path) as model:
        got = []
        with anyio.CancelScope() as scope:
            async with model.generate_stream("abc", LONG) as stream:
                async for tok in stream:
                    got.append(tok)
                    if len(got) == 20:
                        scope.cancel()
        assert scope.cancelled_caught and len(got) == 20
        assert model.active_workers == 0  # no thread is still generating
        assert model.kv_used() == 0  # its KV cells are released
        assert await model.generate_text("once upon", config=GREEDY) == baseline.text


async def test_move_on_after_during_decode(tiny_model_path, baseline):
    async with await load_tiny(tiny_model_path, context_size=4096) as model:
        with anyio.move_on_after(0.05) as scope:
            await model.generate("abc", config=LONG)
        assert scope.cancelled_caught
        assert model.active_workers == 0
        assert await model.generate_text("once upon", config=GREEDY) == baseline.text


async def test_fail_after_during_decode(tiny_model_path, baseline):
    async with await load_tiny(tiny_model_path, context_size=4096) as model:
        with pytest.raises(TimeoutError):
            with anyio.fail_after(0.05):
                async with model.generate_stream("abc", LONG) as stream:
                    async for _ in stream:
                        pass
        assert stream.finish_reason == "cancelled"
        assert model.active_workers == 0
        assert model.kv_used() == 0
        assert await model.generate_text("once upon", config=GREEDY) == baseline.text


async def test_cancel_during_prefill(default_model_path):
    async with await AsyncModel.load(default_model_path, context_size=4096) as model:
        ctx = await model.create_context()
        prompt = await model.tokenize("word " * 3000)
        with anyio.move_on_after(0.05) as scope:
            await ctx.process_batch(prompt)
        assert scope.cancelled_caught
        assert model.active_workers == 0
        assert ctx.n_past == 0  # aborted inside llama.cpp, rolled back: the prefill did not finish
        assert "Paris" in (await ctx.generate("The capital of France is", 8, StreamConfig.greedy())).text


async def test_cancel_generate_during_prefill(default_model_path):
    async with await AsyncModel.load(default_model_path, context_size=4096) as model:
        with anyio.move_on_after(0.05) as scope:
            async with model.generate_stream("word " * 3000, StreamConfig.greedy(10)) as stream:
                async for _ in stream:
                    pytest.fail("no token can come before the prefill is done")
        assert scope.cancelled_caught
        assert stream.finish_reason in (None, "cancelled")
        assert model.active_workers == 0
        assert "Paris" in await model.generate_text("The capital of France is", 8, StreamConfig.greedy())


async def test_consumer_breaks_out(tiny_model_path, baseline):
    async with await load_tiny(tiny_model_path) as model:
        async with model.generate_stream("abc", LONG) as stream:
            async for tok in stream:
                if tok.position > 10:
                    break
        assert model.active_workers == 0
        async with model.generate_stream("abc", LONG) as stream:
            await stream.__anext__()
            await stream.aclose()
            with pytest.raises(StopAsyncIteration):
                await stream.__anext__()
        assert model.active_workers == 0
        assert await model.generate_text("once upon", config=GREEDY) == baseline.text


async def test_exception_in_consumer(tiny_model_path, baseline):
    class Boom(Exception):
        pass

    async with await load_tiny(tiny_model_path) as model:
        with pytest.raises(Boom):
            async with model.generate_stream("abc", LONG) as stream:
                async for _ in stream:
                    raise Boom()
        assert model.active_workers == 0
        assert await model.generate_text("once upon", config=GREEDY) == baseline.text


async def test_timeout(tiny_model_path, baseline):
    async with await load_tiny(tiny_model_path, context_size=4096, timeout_ms=30) as model:
        with pytest.raises(mullama.RequestTimeoutError) as info:
            await model.generate("abc", config=LONG)
        assert isinstance(info.value, TimeoutError)
        assert model.active_workers == 0
    async with await load_tiny(tiny_model_path, timeout_ms=None) as model:
        assert await model.generate_text("once upon", config=GREEDY) == baseline.text


async def test_cancel_while_waiting_for_capacity(tiny_model_path, baseline):
    async with await load_tiny(tiny_model_path, max_concurrent=1) as model:
        holding = anyio.Event()
        release = anyio.Event()

        async def hold():
            async with model.generate_stream("abc", LONG) as stream:
                await stream.__anext__()
                holding.set()
                await release.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            await holding.wait()
            with anyio.move_on_after(0.05) as scope:
                await model.generate("once upon", config=GREEDY)
            assert scope.cancelled_caught
            assert model.waiting == 0  # it left the queue
            assert model.active_workers == 1  # only the holder runs
            release.set()
        assert model.active_workers == 0
        assert await model.generate_text("once upon", config=GREEDY) == baseline.text


async def test_cancel_while_loading(tiny_model_path):
    from mullama import _core

    def live_models():
        gc.collect()
        return sum(isinstance(o, _core.LlamaModel) and not o.closed for o in gc.get_objects())

    before = live_models()
    with anyio.CancelScope() as scope:
        await AsyncModel.load(tiny_model_path, progress=lambda fraction: scope.cancel())
    assert scope.cancelled_caught
    assert live_models() == before  # nothing half-loaded is left


async def test_load_progress_and_errors(tiny_model_path, tmp_path):
    seen = []
    async with await AsyncModel.load(tiny_model_path, progress=seen.append, threads=1):
        pass
    assert seen and math.isclose(seen[-1], 1.0)
    with pytest.raises(mullama.ModelNotFoundError):
        await AsyncModel.load(tmp_path / "missing.gguf")
    with pytest.raises(mullama.InvalidConfigError, match="max_concurrent"):
        AsyncConfig(tiny_model_path, max_concurrent=0)
    with pytest.raises(mullama.InvalidConfigError, match="timeout_ms"):
        AsyncConfig(tiny_model_path, timeout_ms=-5)
    with pytest.raises(mullama.InvalidConfigError):
        await AsyncModel.load_with_config({"model_path": tiny_model_path})


async def test_many_concurrent_tasks(tiny_model_path, baseline):
    async with await load_tiny(tiny_model_path, max_concurrent=3) as model:
        results = []
        peak = 0

        async def one():
            nonlocal peak
            async with model.generate_stream("once upon", GREEDY) as stream:
                toks = []
                async for tok in stream:
                    peak = max(peak, model.active_workers)
                    toks.append(tok.id)
            results.append(toks)

        async with anyio.create_task_group() as tg:
            for _ in range(12):
                tg.start_soon(one)
        assert results == [baseline.tokens] * 12
        assert 1 <= peak <= 3
        assert model.active_workers == 0 and model.kv_used() == 0


async def test_heartbeat_during_generation(default_model_path):
    """The event loop is never blocked: a ticking task keeps running during a long C call."""
    # no deadline: this checks the loop keeps ticking, not how fast a busy machine evaluates
    async with await AsyncModel.load(default_model_path, context_size=4096, timeout_ms=None) as model:
        ctx = await model.create_context()
        prompt = await model.tokenize("word " * 1500)
        ticks = 0
        done = False

        async def heartbeat():
            nonlocal ticks
            while not done:
                ticks += 1
                await anyio.sleep(0.001)

        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeat)
            start = ticks
            await ctx.process_batch(prompt)  # one long prefill on a worker thread
            during = ticks - start
            done = True
        assert during >= 5


async def test_backpressure(default_model_path):
    async with await AsyncModel.load(default_model_path) as model:
        async with model.generate_stream("Once upon a time", StreamConfig.greedy(2000)) as stream:
            await stream.__anext__()  # then the consumer stops reading
            prev, stalled = -1, len(stream._run.tokens)
            with anyio.fail_after(60):  # the buffer fills (slowly on a busy machine), then generation waits
                while stalled != prev:
                    await anyio.sleep(0.3)
                    prev, stalled = stalled, len(stream._run.tokens)
            assert stalled < 100  # a few buffered batches, not the 2000 tokens asked for
            await stream.__anext__()


async def test_async_context_conversation(tiny_model_path, tiny_model, tmp_path):
    async with await load_tiny(tiny_model_path) as model:
        async with await model.create_context() as ctx:
            first = await ctx.generate("ab", 8, StreamConfig.greedy())
            second = await ctx.generate("cd", 8, StreamConfig.greedy())
            with tiny_model.create_context(2048, threads=1) as sync:
                assert sync.generate("ab", StreamConfig.greedy(8)).tokens == first.tokens
                assert sync.generate("cd", StreamConfig.greedy(8)).tokens == second.tokens
                assert ctx.tokens == sync.tokens

            path = tmp_path / "conv.state"
            await ctx.save_state(path)
            expected = await ctx.generate("ef", 8, StreamConfig.greedy())
            await ctx.load_state(path)
            assert (await ctx.generate("ef", 8, StreamConfig.greedy())).tokens == expected.tokens

            await ctx.reset()
            assert ctx.n_past == 0
            assert await ctx.process_batch("ab") == len(tiny_model.tokenize("ab"))


async def test_async_context_stream_left_early_keeps_what_was_seen(tiny_model_path):
    async with await load_tiny(tiny_model_path) as model:
        async with await model.create_context() as ctx:
            async with ctx.generate_stream("ab", LONG) as stream:
                async for tok in stream:
                    if tok.position >= 9:
                        break
            assert ctx.n_past == 10
            assert model.active_workers == 0


async def test_async_context_one_task_at_a_time(tiny_model_path):
    async with await load_tiny(tiny_model_path) as model:
        ctx = await model.create_context()
        order = []
        first_started = anyio.Event()

        async def first():
            async with ctx.generate_stream("ab", StreamConfig.greedy(30)) as stream:
                await stream.__anext__()
                first_started.set()
                await anyio.sleep(0.05)
                async for _ in stream:
                    pass
            order.append("first")

        async def second():
            await first_started.wait()
            await ctx.generate("x", 2, StreamConfig.greedy())  # waits its turn
            order.append("second")

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            tg.start_soon(second)
        assert order == ["first", "second"]


async def test_use_after_close(tiny_model_path):
    model = await load_tiny(tiny_model_path)
    ctx = await model.create_context()
    await model.aclose()
    await model.aclose()  # idempotent
    for call in (lambda: model.generate("x"), lambda: model.tokenize("x"), model.model_info,
                 model.create_context, lambda: ctx.generate("x")):
        with pytest.raises(mullama.ClosedError):
            await call()


async def test_aclose_stops_running_requests(tiny_model_path):
    model = await load_tiny(tiny_model_path, context_size=4096)
    got = []

    async def consume():
        async with model.generate_stream("abc", LONG) as stream:
            async for tok in stream:
                got.append(tok)

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        while len(got) < 5:
            await anyio.sleep(0.001)
        await model.aclose()
    assert model.active_workers == 0
    assert not model.is_ready()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_asyncio_task_cancel(tiny_model_path, baseline):
    import asyncio

    async with await load_tiny(tiny_model_path, context_size=4096) as model:
        task = asyncio.ensure_future(model.generate("abc", config=LONG))
        while model.active_workers == 0:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert model.active_workers == 0
        assert await model.generate_text("once upon", config=GREEDY) == baseline.text


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_nursery_cancel(tiny_model_path, baseline):
    import trio

    async with await load_tiny(tiny_model_path, context_size=4096) as model:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(model.generate, "abc", None, LONG)
            while model.active_workers == 0:
                await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
        assert model.active_workers == 0
        assert await model.generate_text("once upon", config=GREEDY) == baseline.text


async def test_worker_error_reaches_caller_bare(tiny_model_path, baseline):
    async with await load_tiny(tiny_model_path, context_size=256) as model:
        with pytest.raises(mullama.ContextOverflowError, match="256"):
            await model.generate("a" * 1000, config=GREEDY)
        with pytest.raises(mullama.InvalidTokenError):
            await model.generate([1, 99999], config=GREEDY)
        assert model.active_workers == 0
        assert await model.generate_text("once upon", config=GREEDY) == baseline.text


async def test_stream_in_batches(tiny_model_path, baseline):
    """next_batch()/batches() hand over every token once, in order, on the engine and on a conversation;
    reading by token and by batch can be mixed."""
    async with await load_tiny(tiny_model_path, context_size=256) as model:
        assert model.request_context_size == 256
        async with model.generate_stream("once upon", GREEDY) as stream:
            first = await stream.__anext__()
            batches = [b async for b in stream.batches()]
            with pytest.raises(StopAsyncIteration):
                await stream.next_batch()
        assert all(batches)
        assert [first.id] + [t.id for b in batches for t in b] == baseline.tokens
        assert "".join([first.text] + [t.text for b in batches for t in b]) == baseline.text
        conv = await model.create_context()
        async with conv.generate_stream("once upon", GREEDY) as stream:
            ids = [t.id async for b in stream.batches() for t in b]
        assert ids == baseline.tokens and stream.seen_tokens() == conv.n_past


@pytest.mark.anyio
async def test_a_failed_stream_leaves_no_reference_cycles(tiny_model_path, cyclic_garbage):
    """An error from the worker thread (here a prompt too long for the context) reaches
    the caller without reference cycles: the caller's frames it holds are freed with it."""
    async with await AsyncModel.load(tiny_model_path, context_size=256, threads=1) as model:
        async with await model.create_context(context_size=256) as ctx:
            async def request() -> None:
                held = list(range(100_000))  # noqa: F841  (what a leaked frame would keep)
                async with ctx.generate_stream(list(range(5, 400)), StreamConfig.greedy(4)) as stream:
                    async for _ in stream:
                        pass

            for _ in range(2):
                with cyclic_garbage() as garbage:
                    with pytest.raises(mullama.ContextOverflowError):
                        await request()
                assert [len(o) for o in garbage if isinstance(o, list) and len(o) > 1000] == []
                assert [repr(o)[:200] for o in garbage
                        if isinstance(o, (mullama.ContextOverflowError, BaseExceptionGroup))] == []
                del garbage


@pytest.mark.anyio
async def test_a_stuck_consumer_loses_its_slot_at_the_deadline(default_model_path):
    """A consumer that stops reading, and cannot even be cancelled (like a server blocked in
    a shielded write to a client that stopped receiving), does not keep its slot or its KV
    cells past timeout_ms: the engine ends the request itself (finish reason "timeout"); the
    consumer then gets RequestTimeoutError, and the slot serves the next request."""
    # (the default model: 2000 tokens take far longer than the deadline, on any machine)
    config = AsyncConfig(model_path=default_model_path, context_size=2048, threads=1, max_concurrent=1,
                         max_queue=0, timeout_ms=500)
    async with await AsyncModel.load_with_config(config) as model:
        with pytest.raises(mullama.RequestTimeoutError, match="timeout_ms=500"):
            async with model.generate_stream("1, 2, 3,", StreamConfig(max_tokens=2000, temperature=0)) as stream:
                await stream.__anext__()
                with anyio.CancelScope(shield=True):  # stuck: the deadline's cancellation cannot reach it
                    with anyio.move_on_after(60):  # a bound, not a timing assertion
                        while model.active_workers or model.kv_used():
                            await anyio.sleep(0.02)
                    assert (model.active_workers, model.kv_used()) == (0, 0)
                    assert stream.finish_reason == "timeout"  # the engine ended it
                async for _ in stream:
                    pass
        got = await model.generate("once upon", config=StreamConfig.greedy(4))
        assert len(got.tokens) == 4


@pytest.mark.anyio
async def test_the_callers_own_timeout_is_not_the_requests(tiny_model_path):
    """Only the request's own deadline becomes RequestTimeoutError; a TimeoutError of the
    caller's own scope inside the request passes unchanged."""
    config = AsyncConfig(model_path=tiny_model_path, context_size=256, threads=1, timeout_ms=30_000)
    async with await AsyncModel.load_with_config(config) as model:
        with pytest.raises(TimeoutError) as info:
            async with model.generate_stream("once upon", StreamConfig.greedy(8)) as stream:
                await stream.__anext__()
                with anyio.fail_after(0.01):
                    await anyio.sleep(5)
        assert not isinstance(info.value, mullama.RequestTimeoutError)
        async with await model.create_context(256) as ctx:
            with pytest.raises(TimeoutError) as info:
                async with ctx.generate_stream("once upon", StreamConfig.greedy(8)) as stream:
                    with anyio.fail_after(0.01):
                        await anyio.sleep(5)
            assert not isinstance(info.value, mullama.RequestTimeoutError)
    config = AsyncConfig(model_path=tiny_model_path, context_size=256, threads=1, timeout_ms=50)
    async with await AsyncModel.load_with_config(config) as model:  # the request's own deadline still is
        with pytest.raises(mullama.RequestTimeoutError, match="timeout_ms=50"):
            async with model.generate_stream("once upon", StreamConfig.greedy(8)) as stream:
                await anyio.sleep(5)


@pytest.mark.anyio
async def test_100_open_conversation_streams_and_a_tokenize_call_all_progress(tiny_model_path):
    """Each conversation has its own worker-thread slot: 100 open streams (their workers
    waiting for consumers that do not read) do not hold anyio's 40 default slots, which a
    tokenize call needs."""
    async with await AsyncModel.load(tiny_model_path, context_size=256, threads=1) as model:
        ctxs = [await model.create_context(4096) for _ in range(100)]
        started = 0
        release = anyio.Event()

        async def converse(ctx) -> None:
            nonlocal started
            async with ctx.generate_stream("once upon", StreamConfig.greedy(4000)) as stream:
                await stream.__anext__()
                started += 1
                await release.wait()

        async with anyio.create_task_group() as tg:
            for ctx in ctxs:
                tg.start_soon(converse, ctx)
            with anyio.fail_after(120):  # a bound, not a timing assertion
                while started < 100:
                    await anyio.sleep(0.05)
                assert await model.tokenize("hello") == (await model.tokenize("hello"))
            assert sum(c._workers.active for c in ctxs) == 100  # all still generating, none finished
            release.set()
        for ctx in ctxs:
            await ctx.aclose()


async def _collected(box: list) -> None:
    """Drop the object in *box* (its last reference) and wait, bounded, until it is garbage
    collected: on asyncio an idle worker thread lets go of the last call it ran (which may hold
    the object) a moment after the caller has its result."""
    import weakref

    ref = weakref.ref(box.pop())
    with anyio.fail_after(10):
        while ref() is not None:
            gc.collect()
            await anyio.sleep(0.01)


async def test_an_async_model_or_pool_dropped_open_warns_and_is_closed(tiny_model_path):
    """An AsyncModel or ModelPool dropped without aclose() is closed by the garbage collector
    (its engine's thread joined, its contexts and model freed) with a ResourceWarning naming it.
    A pool that was never opened owns nothing and says nothing."""
    from mullama import _core
    from mullama.aio import ModelPool

    model = await AsyncModel.load(tiny_model_path, context_size=256, threads=1, max_concurrent=2)
    assert (await model.generate("once upon", 2, StreamConfig.greedy())).tokens
    conv = await model.create_context()
    owned = [o for o in _core._live if getattr(o, "model", None) is model.model._core] + [model.model._core]
    thread = model._engine._thread
    box = [model]
    del conv, model
    with pytest.warns(ResourceWarning) as caught:
        await _collected(box)
    # (collected as a cycle, its conversation's context may be finalized first, and say so too)
    assert {str(w.message).split()[1] for w in caught} - {"<mullama.Context"} == {"<mullama.aio.AsyncModel"}
    assert len(owned) == 3 and all(o.closed for o in owned) and not thread.is_alive()

    pool = await ModelPool.load(AsyncConfig(tiny_model_path, context_size=256, threads=1), 2)
    owned = [pool.model._core] + [o for o in _core._live if getattr(o, "model", None) is pool.model._core]
    box = [pool]
    del pool
    with pytest.warns(ResourceWarning) as caught:
        await _collected(box)
    assert {str(w.message).split()[1] for w in caught} - {"<mullama.Context"} == {"<mullama.aio.ModelPool"}
    assert len(owned) == 3 and all(o.closed for o in owned)
    ModelPool(AsyncConfig(tiny_model_path), 1)  # never opened: dropped at once, silently
    gc.collect()


async def without_default_threads(fn, *args, **kwargs):
    """``await fn(*args, **kwargs)`` while every free slot of anyio's default thread limiter is
    held; fails if it does not complete within a bound (a call waiting for a default
    slot would wait for ever). The slots are given back either way, so such a call ends."""
    default = anyio.to_thread.current_default_thread_limiter()
    held = []
    result = []
    done = anyio.Event()

    async def call():
        result.append(await fn(*args, **kwargs))
        done.set()

    async with anyio.create_task_group() as tg:
        try:
            for _ in range(int(default.available_tokens)):
                held.append(object())
                default.acquire_on_behalf_of_nowait(held[-1])
            tg.start_soon(call)
            with anyio.move_on_after(20):  # a bound, not a timing assertion (less than timeout_ms)
                await done.wait()
            in_time = done.is_set()
        finally:
            for borrower in held:
                default.release_on_behalf_of(borrower)
    assert in_time, f"{fn.__qualname__} waited for one of anyio's default thread slots"
    return result[0]


async def test_async_model_calls_do_not_need_anyio_default_thread_slots(tiny_model_path, tiny_model):
    """AsyncModel's own blocking calls run on worker-thread slots of its own: with all of
    anyio's default slots held (by a pool's or the application's threads), it still loads,
    tokenizes prompts, makes contexts and closes."""
    model = await without_default_threads(load_tiny, tiny_model_path)
    async with model:
        expected = tiny_model.tokenize("hello")
        assert await without_default_threads(model.tokenize, "hello") == expected
        assert await without_default_threads(model.detokenize, expected) == tiny_model.detokenize(expected)
        assert await without_default_threads(model.tokenize_chat, [{"role": "user", "content": "hi"}],
                                             template="chatml")
        assert (await without_default_threads(model.model_info)).n_vocab == tiny_model.info.n_vocab
        assert (await without_default_threads(model.generate, "once upon", 4)).tokens  # its prompt tokenized
        conv = await without_default_threads(model.create_context, 256)
        await conv.aclose()
        await without_default_threads(model.aclose)
    assert not model.is_ready()


async def test_one_meaning_of_generate_and_kv_used(tiny_model_path, tiny_model):
    """generate() returns a Completion on the model, a conversation and a pool member alike;
    generate_text() is its text. kv_used() counts KV cells everywhere: a model's include its
    conversations', a pool's its members'."""
    from mullama.aio import ModelPool

    want = tiny_model.create_context(256, threads=1)
    try:
        expected = want.generate("once upon", StreamConfig.greedy(6))
    finally:
        want.close()
    async with await load_tiny(tiny_model_path) as model:
        done = await model.generate("once upon", 6, StreamConfig.greedy())
        assert isinstance(done, mullama.Completion) and done.tokens == expected.tokens
        assert await model.generate_text("once upon", 6, StreamConfig.greedy()) == expected.text
        async with await model.create_context(256) as conv:
            assert (await conv.generate("once upon", 6, StreamConfig.greedy())).tokens == expected.tokens
            assert conv.kv_used() == conv.n_past - 1 > 0  # the last token waits for the next call
            assert model.kv_used() == conv.kv_used()
            assert await conv.generate_text(" and", 2, StreamConfig.greedy())
        assert model.kv_used() == 0
    async with ModelPool(AsyncConfig(tiny_model_path, context_size=256, threads=1), 2) as pool:
        async with pool.acquire() as m:
            assert (await m.generate("once upon", 6, StreamConfig.greedy())).text == expected.text
            assert pool.kv_used() == m.kv_used() > 0
            assert await m.generate_text(" and", 2, StreamConfig.greedy())


async def test_pool_calls_do_not_need_anyio_default_thread_slots(tiny_model_path, tiny_model):
    """A ModelPool's own blocking calls (load, its members' contexts, tokenize, detokenize,
    model_info, close) and its members' generations run on thread slots of its own."""
    from mullama.aio import ModelPool

    pool = await without_default_threads(ModelPool.load, AsyncConfig(tiny_model_path, context_size=256,
                                                                     threads=1), 2)
    try:
        expected = tiny_model.tokenize("hello")
        assert await without_default_threads(pool.tokenize, "hello") == expected
        assert await without_default_threads(pool.detokenize, expected) == tiny_model.detokenize(expected)
        assert (await without_default_threads(pool.model_info)).n_vocab == tiny_model.info.n_vocab
        member = await without_default_threads(pool.acquire)
        assert (await without_default_threads(member.generate, "once upon", 4)).tokens
        assert await without_default_threads(member.detokenize, expected) == tiny_model.detokenize(expected)
        await without_default_threads(member.release)
        await without_default_threads(pool.resize, 3)  # a new member's context
    finally:
        await without_default_threads(pool.aclose)
