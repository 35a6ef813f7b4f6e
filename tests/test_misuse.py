"""Misuse gets a named MullamaError, never a hang, a wrong answer or an OOM kill (issue 18, item 6).

Two event loops on one async object, bytes and bools as token ids, contexts
too big for the machine's memory, hostile chat templates, pickling and
copying, out-of-range engine settings, thousands of stop strings.
"""

from __future__ import annotations

import copy
import pickle

import anyio
import numpy as np
import pytest

import mullama
from mullama import StreamConfig
from mullama._engine import Engine, EngineRequest
from mullama.aio import AsyncConfig, AsyncModel, ModelPool

pytestmark = pytest.mark.anyio

GREEDY = StreamConfig.greedy(8)
BACKENDS = ["asyncio", "trio"]
MIB = 1 << 20


async def load_tiny(path, **kw):
    kw.setdefault("threads", 1)
    kw.setdefault("context_size", 512)
    kw.setdefault("timeout_ms", None)  # a hang would be forever, as in the report
    return await AsyncModel.load(path, **kw)


async def in_other_loop(backend, fn, *args):
    """``fn(*args)`` run by a new event loop of *backend* in another thread, bounded
    in time so that a hang fails the test; returns its result or the exception it raised."""

    async def body():
        with anyio.fail_after(10):
            return await fn(*args)

    def run():
        try:
            return anyio.run(body, backend=backend)
        except BaseException as exc:  # handed back to be asserted on
            return exc

    return await anyio.to_thread.run_sync(run)


# -- 1. one async object, two event loops ----------------------------------------------------


@pytest.mark.parametrize("other", BACKENDS)
async def test_async_context_used_from_two_loops_at_once(tiny_model_path, other):
    async with await load_tiny(tiny_model_path) as model:
        conv = await model.create_context()
        async with conv.generate_stream("once upon", StreamConfig.greedy(64)) as stream:
            await stream.__anext__()  # the context is in use by this loop
            got = await in_other_loop(other, conv.generate, "abc", 4)
            assert isinstance(got, mullama.LoopConflictError), repr(got)
            assert isinstance(got, mullama.BusyError)
            assert "another event loop" in str(got)
            got = await in_other_loop(other, conv.process_batch, [1, 2, 3])
            assert isinstance(got, mullama.LoopConflictError), repr(got)
            got = await in_other_loop(other, conv.aclose)  # refused, and nothing closed
            assert isinstance(got, mullama.LoopConflictError), repr(got)
            async for _ in stream:
                pass
        # free again: another loop may use it now, then this one again
        done = await in_other_loop(other, conv.generate, " there", 4, GREEDY)
        assert isinstance(done, mullama.Completion), repr(done)
        assert (await conv.generate(" again", 4, GREEDY)).tokens
        await conv.aclose()


@pytest.mark.parametrize("other", BACKENDS)
async def test_pool_used_from_two_loops_at_once(tiny_model_path, other):
    config = AsyncConfig(tiny_model_path, context_size=256, threads=1, timeout_ms=None)
    async with ModelPool(config, size=1) as pool:
        async with pool.acquire() as member:  # every member is lent by this loop
            got = await in_other_loop(other, pool.acquire().__aenter__)
            assert isinstance(got, mullama.LoopConflictError), repr(got)
            got = await in_other_loop(other, pool.resize, 2)
            assert isinstance(got, mullama.LoopConflictError), repr(got)
            got = await in_other_loop(other, pool.aclose)
            assert isinstance(got, mullama.LoopConflictError), repr(got)
            assert pool.is_ready()
            assert (await member.complete("once upon", config=GREEDY)).tokens

        async def use():
            async with pool.acquire() as m:
                return await m.generate("once upon", config=GREEDY)

        assert isinstance(await in_other_loop(other, use), str)  # free again: any loop
        assert await use()
        assert pool.stats().available == 1


@pytest.mark.parametrize("other", BACKENDS)
async def test_async_model_serves_two_loops_at_once(tiny_model_path, other):
    # the batching engine's requests have no loop-bound parts: both loops are served
    async with await load_tiny(tiny_model_path) as model:
        expected = await model.generate("once upon", config=GREEDY)
        async with model.generate_stream("once upon", StreamConfig.greedy(64)) as stream:
            await stream.__anext__()
            assert await in_other_loop(other, model.generate, "once upon", None, GREEDY) == expected
            async for _ in stream:
                pass


# -- 2. bytes and bools are not token ids ----------------------------------------------------


@pytest.mark.parametrize("prompt", [b"hello", bytearray(b"hello"), memoryview(b"hello")],
                         ids=["bytes", "bytearray", "memoryview"])
def test_bytes_are_not_token_ids(tiny_model, tiny_ctx, prompt):
    with pytest.raises(mullama.InvalidConfigError, match=f"not {type(prompt).__name__}.*decode"):
        tiny_ctx.eval(prompt)
    with pytest.raises(mullama.InvalidConfigError, match="not bytes|not bytearray|not memoryview"):
        tiny_ctx.generate(prompt, GREEDY)
    with pytest.raises(mullama.InvalidConfigError, match="not bytes|not bytearray|not memoryview"):
        tiny_ctx.stream(prompt, GREEDY)
    with pytest.raises(mullama.InvalidConfigError, match="not bytes|not bytearray|not memoryview"):
        tiny_model.detokenize(prompt)
    assert tiny_ctx.n_past == 0  # nothing was evaluated


@pytest.mark.parametrize("tokens", [[True, False], [5, True], np.array([True, False])],
                         ids=["bools", "mixed", "numpy"])
def test_bools_are_not_token_ids(tiny_model, tiny_ctx, tokens):
    with pytest.raises(mullama.InvalidConfigError, match="is a bool"):
        tiny_ctx.eval(tokens)
    with pytest.raises(mullama.InvalidConfigError, match="is a bool"):
        tiny_ctx.generate(tokens, GREEDY)
    with pytest.raises(mullama.InvalidConfigError, match="is a bool"):
        tiny_model.detokenize(tokens)
    with pytest.raises(mullama.InvalidConfigError, match="is a bool"):
        tiny_model.token_to_piece(True)
    assert tiny_ctx.n_past == 0
    # real token ids still pass, numpy integers included
    tiny_ctx.eval(np.array([1, 2, 3], dtype=np.int64))
    assert tiny_ctx.tokens == [1, 2, 3]


async def test_bytes_and_bools_refused_by_the_async_api(tiny_model_path):
    async with await load_tiny(tiny_model_path) as model:
        for bad, what in ((b"hi", "not bytes"), ([True, False], "is a bool")):
            with pytest.raises(mullama.InvalidConfigError, match=what):
                await model.generate(bad, config=GREEDY)
            with pytest.raises(mullama.InvalidConfigError, match=what):
                async with model.generate_stream(bad, GREEDY):
                    pass
            with pytest.raises(mullama.InvalidConfigError, match=what):
                await model.detokenize(bad)
            conv = await model.create_context()
            with pytest.raises(mullama.InvalidConfigError, match=what):
                await conv.generate(bad, config=GREEDY)
            with pytest.raises(mullama.InvalidConfigError, match=what):
                await conv.process_batch(bad)
            assert conv.n_past == 0
            await conv.aclose()
        assert model.kv_used() == 0
    config = AsyncConfig(tiny_model_path, context_size=256, threads=1, timeout_ms=None)
    async with ModelPool(config, size=1) as pool:
        async with pool.acquire() as member:
            with pytest.raises(mullama.InvalidConfigError, match="not bytes"):
                await member.generate(b"hi", config=GREEDY)
            with pytest.raises(mullama.InvalidConfigError, match="is a bool"):
                await member.process_batch([True])


def test_engine_request_refuses_bytes(tiny_model):
    class Sink:
        def has_space(self):
            return True

        def offer(self, batch):
            pass

        def finish(self):
            pass

    engine = Engine(tiny_model, 1, 256, 1)
    try:
        with pytest.raises(mullama.InvalidConfigError, match="not bytes"):
            engine.submit(EngineRequest(b"hi", GREEDY, Sink()))
        with pytest.raises(mullama.InvalidConfigError, match="is a bool"):
            engine.submit(EngineRequest([True, 2], GREEDY, Sink()))
        assert engine.waiting == 0 and engine.active == 0
    finally:
        engine.close()
