"""ModelPool under asyncio and trio: lending, reset on release, replacement, resize, cancellation."""

from __future__ import annotations

import functools

import anyio
import pytest

import mullama
from mullama import StreamConfig
from mullama.aio import AsyncConfig, ModelPool, PoolStats

pytestmark = pytest.mark.anyio

GREEDY = StreamConfig.greedy(16)


@pytest.fixture
def config(tiny_model_path):
    return AsyncConfig(tiny_model_path, context_size=256, threads=1, timeout_ms=None)


@pytest.fixture
def expected(tiny_model):
    with tiny_model.create_context(256, threads=1) as ctx:
        return ctx.generate("once upon", GREEDY)


async def test_members_share_one_model_and_generate_like_sync(config, expected):
    async with ModelPool(config, 3) as pool:
        assert pool.is_ready()
        assert pool.stats() == PoolStats(size=3, available=3, in_use=0, waiting=0)
        members = {m for m in pool._conversations}
        assert len(members) == 3 and all(m._ctx.model is pool.model for m in members)
        async with pool.acquire() as m:
            assert pool.stats() == PoolStats(size=3, available=2, in_use=1, waiting=0)
            assert await m.generate_text("once upon", config=GREEDY) == expected.text
            assert await m.tokenize("hi") == pool.model.tokenize("hi")
            assert (await m.model_info()).n_vocab == pool.model.n_vocab
        assert pool.stats() == PoolStats(size=3, available=3, in_use=0, waiting=0)
        assert pool.generation_stats()[0] == 1
    assert not pool.is_ready()


async def test_member_keeps_its_conversation_until_released(config, expected):
    async with ModelPool(config, 1) as pool:
        m = await pool.acquire()  # the awaitable form
        first = await m.generate("once upon", config=GREEDY)
        assert first.tokens == expected.tokens
        await m.generate(" and then", max_tokens=4)
        held = m.n_past
        assert held > len(first.tokens)
        # KV cells: every token but the last sampled one, which the next call evaluates first
        assert pool.kv_used() == m.kv_used() == held - 1
        await pool.release(m)
        assert pool.kv_used() == 0
        with pytest.raises(mullama.ClosedError, match="released"):
            await m.generate("x")
        await pool.release(m)  # idempotent
        async with pool.acquire() as again:
            assert again.n_past == 0  # reset on release
            assert (await again.generate("once upon", config=GREEDY)).tokens == expected.tokens


async def test_never_more_than_size_members(config, expected):
    size, in_use, peak, waiting_seen = 2, 0, 0, 0
    async with ModelPool(config, size) as pool:
        texts = []

        async def user():
            nonlocal in_use, peak, waiting_seen
            async with pool.acquire() as m:
                in_use += 1
                peak = max(peak, in_use)
                s = pool.stats()
                assert s.in_use <= size and s.size == size
                waiting_seen = max(waiting_seen, s.waiting)
                texts.append(await m.generate_text("once upon", config=GREEDY))
                in_use -= 1

        async with anyio.create_task_group() as tg:
            for _ in range(7):
                tg.start_soon(user)
        assert peak == size
        assert waiting_seen > 0
        assert texts == [expected.text] * 7
        assert pool.stats() == PoolStats(size=size, available=size, in_use=0, waiting=0)
        assert pool.kv_used() == 0
        count, total_ms = pool.generation_stats()
        assert count == 7 and total_ms > 0


async def test_acquire_nowait_and_cancel_while_waiting(config):
    async with ModelPool(config, 1) as pool:
        async with pool.acquire() as held:
            with pytest.raises(mullama.BusyError, match="in use"):
                await pool.acquire_nowait()
            with anyio.move_on_after(0.05) as scope:
                await pool.acquire()
            assert scope.cancelled_caught
            assert pool.stats().waiting == 0
            await held.generate("x", max_tokens=2)
        assert pool.stats() == PoolStats(size=1, available=1, in_use=0, waiting=0)


async def test_a_cancelled_waiter_passes_its_turn_to_the_next(config):
    async with ModelPool(config, 1) as pool:
        lease = await pool.acquire()
        got = []
        waiter = functools.partial(use_once, pool, got)

        first = anyio.CancelScope()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_in_scope, first, waiter, "first")
            await wait_until(lambda: pool.stats().waiting == 1)
            tg.start_soon(waiter, "second")
            await wait_until(lambda: pool.stats().waiting == 2)
            # "first" is cancelled as the member comes back: it never gets it
            first.cancel()
            await pool.release(lease)
        assert got == ["second"]
        assert pool.stats() == PoolStats(size=1, available=1, in_use=0, waiting=0)


async def use_once(pool, got, tag):
    async with pool.acquire() as m:
        got.append(tag)
        await m.generate("x", max_tokens=2)


async def _in_scope(scope, fn, *args):
    with scope:
        await fn(*args)


async def wait_until(cond, timeout=10):
    with anyio.fail_after(timeout):
        while not cond():
            await anyio.sleep(0.001)


async def test_member_whose_reset_fails_is_replaced(config, expected):
    async with ModelPool(config, 2) as pool:
        async with pool.acquire() as m:
            broken = m._member
            await m.generate("once upon", config=GREEDY)

            def fail():
                raise mullama.StateError("reset failed (injected)")

            broken._ctx.reset = fail
        assert pool.replaced == 1
        assert broken._closed and broken not in pool._conversations
        assert pool.stats() == PoolStats(size=2, available=2, in_use=0, waiting=0)
        results = []

        async def use():
            async with pool.acquire() as m:
                results.append(await m.generate_text("once upon", config=GREEDY))

        async with anyio.create_task_group() as tg:
            tg.start_soon(use)
            tg.start_soon(use)
        assert results == [expected.text] * 2


async def test_resize_up_and_down_under_load(config, expected):
    async with ModelPool(config, 2) as pool:
        a, b = await pool.acquire(), await pool.acquire()
        await pool.resize(4)  # grows at once, even with every member busy
        assert pool.stats() == PoolStats(size=4, available=2, in_use=2, waiting=0)
        c = await pool.acquire()
        assert pool.stats().in_use == 3

        done = anyio.Event()

        async def shrink():
            await pool.resize(1)
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(shrink)
            await wait_until(lambda: pool.stats().available == 0)  # the idle member went at once
            assert pool.stats() == PoolStats(size=3, available=0, in_use=3, waiting=0)
            # in-use members finish their work first
            assert await a.generate_text("once upon", config=GREEDY) == expected.text
            await pool.release(a)
            assert pool.stats() == PoolStats(size=2, available=0, in_use=2, waiting=0)
            assert not done.is_set()
            await pool.release(b)
            await wait_until(done.is_set)
            assert pool.stats() == PoolStats(size=1, available=0, in_use=1, waiting=0)
            assert await c.generate_text("once upon", config=GREEDY) == expected.text  # untouched by the shrink
            await pool.release(c)
        assert pool.target_size == 1 and pool.stats() == PoolStats(size=1, available=1, in_use=0, waiting=0)
        assert len(pool._conversations) == 1
        async with pool.acquire() as m:
            assert await m.generate_text("once upon", config=GREEDY) == expected.text


async def test_a_later_resize_ends_a_waiting_shrink(config):
    async with ModelPool(config, 2) as pool:
        a, b = await pool.acquire(), await pool.acquire()
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.resize, 1)
            await wait_until(lambda: pool.target_size == 1)
            await pool.resize(3)  # the waiting shrink returns: the newer size wins
        assert pool.stats() == PoolStats(size=3, available=1, in_use=2, waiting=0)
        await a.release()
        await b.release()
        assert pool.stats() == PoolStats(size=3, available=3, in_use=0, waiting=0)


async def test_close_while_a_member_is_being_created(config):
    import threading

    async with ModelPool(config, 1) as pool:
        model = pool.model
        go, made = threading.Event(), []
        create = model.create_context

        def slow_create(**kw):
            go.wait(10)
            made.append(create(**kw))
            return made[-1]

        model.create_context = slow_create
        outcome = []

        async def grow():
            try:
                await pool.resize(2)
                outcome.append("returned")
            except mullama.ClosedError:
                outcome.append("closed")

        async with anyio.create_task_group() as tg:
            tg.start_soon(grow)
            await wait_until(lambda: pool.stats().size == 2 and pool._creating == 1)
            tg.start_soon(pool.aclose)
            await anyio.sleep(0.05)
            assert pool._model is not None and not model.closed  # close waits for the context
            go.set()
        assert outcome and made and made[0].closed and model.closed


async def test_an_empty_pool_fails_waiters_and_recovers_by_resize(config, expected):
    async with ModelPool(config, 1) as pool:
        lease = await pool.acquire()
        model = pool.model
        create = model.create_context

        def fail_create(**kw):
            raise mullama.ContextCreationError("out of memory (injected)")

        model.create_context = fail_create
        errors = []

        async def waiter():
            try:
                await pool.acquire()
            except mullama.ContextCreationError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await wait_until(lambda: pool.stats().waiting == 1)

            def fail_reset():
                raise mullama.StateError("reset failed (injected)")

            lease._member._ctx.reset = fail_reset
            await lease.release()
        assert len(errors) == 1 and "injected" in str(errors[0])
        assert pool.stats() == PoolStats(size=0, available=0, in_use=0, waiting=0)
        with pytest.raises(mullama.ContextCreationError, match="no members"):
            await pool.acquire()
        model.create_context = create
        await pool.resize(1)
        async with pool.acquire() as m:
            assert await m.generate_text("once upon", config=GREEDY) == expected.text


async def test_cancel_mid_generation_then_member_is_clean(config, expected):
    async with ModelPool(config, 1) as pool:
        with anyio.CancelScope() as scope:
            async with pool.acquire() as m:
                async with m.generate_stream("once upon", StreamConfig.greedy(200)) as stream:
                    async for _ in stream:
                        scope.cancel()  # after the first token
        assert scope.cancelled_caught
        async with pool.acquire() as m:
            assert m.n_past == 0
            assert await m.generate_text("once upon", config=GREEDY) == expected.text
        assert pool.kv_used() == 0


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_asyncio_cancel_of_a_waiter_handed_a_member(config):
    """A plain Task.cancel() can land after the hand-over: the member goes on to the next waiter."""
    import asyncio

    async with ModelPool(config, 1) as pool:
        lease = await pool.acquire()
        got = []
        waiter = functools.partial(use_once, pool, got)

        first = asyncio.ensure_future(waiter("first"))
        await wait_until(lambda: pool.stats().waiting == 1)
        second = asyncio.ensure_future(waiter("second"))
        await wait_until(lambda: pool.stats().waiting == 2)
        lease._member = None  # hand the member over without release()'s awaits, as release() does last
        member = next(iter(pool._in_use))
        pool._in_use.discard(member)
        pool._put_back(member)
        first.cancel()  # same tick: "first" was handed the member but never resumed
        with pytest.raises(asyncio.CancelledError):
            await first
        with anyio.fail_after(10):  # without the pass-on, "second" would wait forever
            await second
        assert got == ["second"]
        assert pool.stats() == PoolStats(size=1, available=1, in_use=0, waiting=0)


async def test_close_wakes_waiters_and_refuses_use(config):
    pool = await ModelPool.load(config, 1)
    errors = []

    async def waiter():
        try:
            await pool.acquire()
        except mullama.ClosedError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        held = await pool.acquire()
        tg.start_soon(waiter)
        await wait_until(lambda: pool.stats().waiting == 1)
        await pool.aclose()
    assert len(errors) == 1
    await held.release()  # releasing after close is harmless
    with pytest.raises(mullama.ClosedError):
        await pool.acquire()
    with pytest.raises(mullama.ClosedError):
        await pool.tokenize("x")
    await pool.aclose()  # idempotent


async def test_bad_arguments(config, tiny_model_path):
    with pytest.raises(mullama.InvalidConfigError, match="size"):
        ModelPool(config, 0)
    with pytest.raises(mullama.InvalidConfigError, match="AsyncConfig"):
        ModelPool(str(tiny_model_path), 2)
    pool = ModelPool(config, 1)
    with pytest.raises(mullama.ClosedError, match="not open"):
        await pool.acquire()
    with pytest.raises(mullama.ModelNotFoundError):
        await ModelPool.load(AsyncConfig("/nonexistent.gguf"), 1)
    async with pool:
        with pytest.raises(mullama.InvalidConfigError, match="size"):
            await pool.resize(-1)
        async with ModelPool(config, 1) as other:
            lease = await other.acquire()
            with pytest.raises(mullama.InvalidConfigError, match="this pool"):
                await pool.release(lease)
            await lease.release()


async def test_one_acquire_is_used_once(config):
    async with ModelPool(config, 2) as pool:
        acquire = pool.acquire()
        async with acquire as member:
            await member.generate("once upon", max_tokens=2)
            with pytest.raises(mullama.InvalidConfigError, match="already used"):
                async with acquire:
                    pass
        with pytest.raises(mullama.InvalidConfigError, match="already used"):
            await acquire
        assert pool.stats().in_use == 0


async def test_closed_errors_are_anyios_closed_resource_errors(config):
    pool = await ModelPool.load(config, 1)
    await pool.aclose()
    with pytest.raises(anyio.ClosedResourceError):
        await pool.acquire()
    assert issubclass(mullama.ClosedError, mullama.MullamaError)


async def test_acquire_nowait(config):
    async with ModelPool(config, 1) as pool:
        async with pool.acquire_nowait() as member:
            with pytest.raises(mullama.BusyError):
                await pool.acquire_nowait()
            await member.generate("once upon", max_tokens=2)
        member = await pool.acquire_nowait()  # free again
        await member.release()
        assert pool.stats().in_use == 0
