"""Runtime and TaskManager under asyncio and trio."""

from __future__ import annotations

import threading

import anyio
import pytest

import mullama
from mullama import StreamConfig
from mullama.aio import GenerationResult, ModelPool, Runtime, RuntimeMetrics, TaskManager

pytestmark = pytest.mark.anyio

GREEDY = StreamConfig.greedy(12)


@pytest.fixture
def expected(tiny_model):
    with tiny_model.create_context(256, threads=1) as ctx:
        return ctx.generate("once upon", GREEDY)


async def wait_until(cond, timeout=10):
    with anyio.fail_after(timeout):
        while not cond():
            await anyio.sleep(0.001)


# -- Runtime ------------------------------------------------------------------------------


async def test_spawn_results_and_failures_are_kept():
    async def double(x):
        await anyio.sleep(0)
        return 2 * x

    async def boom():
        await anyio.sleep(0)
        raise KeyError("boom")

    async with Runtime(worker_threads=1) as rt:
        assert rt.is_running()
        ok = rt.spawn(double, 21, name="double")
        bad = rt.spawn(boom)
        assert await ok.wait() == 42 and ok.done and ok.name == "double"
        with pytest.raises(KeyError, match="boom"):
            await bad.wait()
        assert rt.spawn(double, 1).name.endswith("double")  # the function's name by default
        await wait_until(lambda: rt.metrics().active_tasks == 0)
        m = rt.metrics()
        assert m.completed_tasks == 3 and m.active_tasks == 0 and m.worker_threads == 1
        assert rt.is_running()  # a failing task does not stop the runtime


async def test_run_blocking_names_threads_and_respects_the_limit():
    running, peak, names = 0, 0, []
    lock = threading.Lock()
    release = threading.Event()

    def work(i):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            names.append(threading.current_thread().name)
        release.wait(5)
        with lock:
            running -= 1
        return i

    async with Runtime(max_blocking_threads=2, thread_name="svc") as rt:
        out = []

        async def call(i):
            out.append(await rt.run_blocking(work, i))

        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(call, i)
            await wait_until(lambda: running == 2)
            await anyio.sleep(0.05)  # a third call would be running by now if the limit let it
            m = rt.metrics()
            assert m.active_tasks == 5 and m.blocking_threads == 2
            release.set()
        assert sorted(out) == list(range(5))
        assert peak == 2
        assert all(n.startswith("svc-blocking-") for n in names)
        assert rt.metrics().completed_tasks == 5 and rt.metrics().blocking_threads == 0
    assert not any(t.name.startswith("svc-") for t in threading.enumerate())


async def test_models_generations_are_counted(tiny_model_path, expected):
    async with Runtime(worker_threads=1, thread_name="rt") as rt:
        model = await rt.load_model(tiny_model_path, context_size=256, max_concurrent=2)
        assert model.config.threads == 1
        pool = await rt.open_pool(tiny_model_path, 2, context_size=256)
        assert rt.metrics().total_generations == 0 and rt.metrics().avg_generation_ms == 0.0

        async def on_model():
            assert await model.generate_text("once upon", config=GREEDY) == expected.text
            assert any(t.name == "rt-engine-1" for t in threading.enumerate())

        async def on_pool():
            async with pool.acquire() as m:
                assert await m.generate_text("once upon", config=GREEDY) == expected.text

        handles = [rt.spawn(on_model) for _ in range(3)] + [rt.spawn(on_pool) for _ in range(2)]
        for h in handles:
            await h.wait()
        m = rt.metrics()
        assert m.total_generations == 5
        assert m.avg_generation_ms > 0
        assert m.completed_tasks == 5 and m.active_tasks == 0
        assert m.uptime_seconds > 0
    assert not model.is_ready() and not pool.is_ready()  # closed by the runtime


async def test_graceful_shutdown_with_timeout(tiny_model_path):
    finished = []

    async def quick():
        await anyio.sleep(0.01)
        finished.append("quick")

    async def forever():
        await anyio.sleep_forever()

    rt = Runtime()
    async with rt:
        model = await rt.load_model(tiny_model_path, context_size=2048, threads=1)
        rt.spawn(quick)
        hang = rt.spawn(forever)
        gen = rt.spawn(model.generate, "once upon", 1500)
        await rt.shutdown(timeout=0.2)
        assert not rt.is_running()
        assert finished == ["quick"]
        assert hang.cancelled and gen.done
        assert not model.is_ready()
        with pytest.raises(mullama.ClosedError, match="shutting down"):
            rt.spawn(quick)
        with pytest.raises(mullama.ClosedError):
            await rt.load_model(tiny_model_path)
        await rt.shutdown()  # idempotent
    assert model.kv_used() == 0 and model.active_workers == 0


async def test_shutdown_from_a_task_and_loading_during_shutdown(tiny_model_path):
    async with Runtime() as rt:
        others = []

        async def worker():
            await anyio.sleep_forever()

        async def stopper():
            await rt.shutdown(timeout=0.01)  # must not wait for itself
            return "stopped"

        others.append(rt.spawn(worker))
        loading = rt.spawn(lambda: rt.load_model(tiny_model_path, threads=1))  # starts before the shutdown
        stop = rt.spawn(stopper)
        with anyio.fail_after(10):
            assert await stop.wait() == "stopped"
        assert others[0].cancelled
        # the load was cancelled, refused by the stopping runtime, or closed by it: nothing leaks
        assert loading.done
        if not loading.cancelled:
            try:
                assert not loading.result().is_ready()
            except mullama.ClosedError:
                pass


async def test_task_cancelled_by_an_outer_scope_is_not_a_success():
    async with Runtime() as rt:
        async def forever():
            await anyio.sleep_forever()

        h = rt.spawn(forever)
        await anyio.sleep(0.01)
        rt._tg.cancel_scope.cancel()  # cancelled from outside its own scope
        await h._done.wait()
        assert h.cancelled
        with pytest.raises(mullama.MullamaError, match="cancelled"):
            h.result()


async def test_body_errors_come_out_bare():
    with pytest.raises(KeyError):
        async with Runtime():
            raise KeyError("mine")
    with pytest.raises(KeyError):
        async with TaskManager():
            raise KeyError("mine")


async def test_runtime_errors():
    with pytest.raises(mullama.InvalidConfigError, match="worker_threads"):
        Runtime(worker_threads=0)
    with pytest.raises(mullama.InvalidConfigError, match="max_blocking_threads"):
        Runtime(max_blocking_threads=0)
    rt = Runtime()
    assert not rt.is_running()
    with pytest.raises(mullama.ClosedError, match="not started"):
        rt.spawn(anyio.sleep, 0)
    assert isinstance(rt.metrics(), RuntimeMetrics)


# -- TaskManager --------------------------------------------------------------------------


async def test_supervised_workers_report_failures_and_restart():
    attempts = []

    async def flaky():
        attempts.append(1)
        await anyio.sleep(0)
        if len(attempts) < 3:
            raise RuntimeError(f"attempt {len(attempts)} failed")

    async def always_fails():
        await anyio.sleep(0)
        raise ValueError("broken")

    async def steady(out):
        for i in range(5):
            await anyio.sleep(0.001)
            out.append(i)

    out = []
    async with TaskManager() as tm:
        tm.spawn_worker("flaky", flaky, max_restarts=5, restart_delay=0)
        tm.spawn_worker("bad", always_fails, max_restarts=1, restart_delay=0)
        tm.spawn_worker("steady", steady, out)
        with pytest.raises(mullama.InvalidConfigError, match="already running"):
            tm.spawn_worker("steady", steady, out)
        bad = await tm.wait("bad")
        assert bad.state == "failed" and bad.restarts == 1 and isinstance(bad.error, ValueError)
        assert bad.finished_at is not None
        flaky_status = await tm.wait("flaky")
        assert flaky_status.state == "completed" and flaky_status.restarts == 2
        assert (await tm.wait("steady")).state == "completed"
        assert out == [0, 1, 2, 3, 4]  # the failing worker did not disturb it
        status = tm.worker_status()
        assert set(status) == {"flaky", "bad", "steady"}
        tm.spawn_worker("steady", steady, out)  # a name can be reused once its worker ended
        with pytest.raises(mullama.InvalidConfigError, match="no worker"):
            await tm.wait("nope")


async def test_stop_and_stop_all():
    async def forever():
        await anyio.sleep_forever()

    async with TaskManager() as tm:
        tm.spawn_worker("a", forever)
        tm.spawn_worker("b", forever)
        await anyio.sleep(0.01)
        assert (await tm.stop("a")).state == "cancelled"
        assert tm.worker_status()["b"].state == "running"
    assert tm.worker_status()["b"].state == "cancelled"  # leaving the block stopped it
    with pytest.raises(mullama.ClosedError):
        tm.spawn_worker("c", forever)


async def test_generation_worker(tiny_model_path, expected):
    prompts = ["once upon", "once upon", "x" * 3000, "once upon", (7, 8, 9), (1, 99999)]
    async with Runtime(worker_threads=1) as rt, TaskManager() as tm:
        model = await rt.load_model(tiny_model_path, context_size=256)
        send, recv = anyio.create_memory_object_stream(10)
        res_send, res_recv = anyio.create_memory_object_stream(10)
        tm.spawn_generation_worker("gen", model, recv, res_send)
        async with send:
            for p in prompts:
                await send.send((p, GREEDY))
        async with res_recv:
            results = [r async for r in res_recv]  # ends: the worker closed its results
        assert [r.prompt for r in results] == prompts
        assert all(isinstance(r, GenerationResult) for r in results)
        for r in results[:2] + results[3:4]:
            assert r.error is None and r.completion.text == expected.text
        assert isinstance(results[2].error, mullama.ContextOverflowError) and results[2].completion is None
        assert results[4].error is None and results[4].completion.tokens  # token ids are a prompt too
        assert isinstance(results[5].error, mullama.InvalidTokenError)
        status = await tm.wait("gen")
        assert status.state == "completed" and status.processed == 6 and status.kind == "generation"
        assert rt.metrics().total_generations == 4


async def test_generation_worker_on_a_pool(tiny_model_path, expected):
    async with TaskManager() as tm:
        pool = await ModelPool.load(mullama.aio.AsyncConfig(tiny_model_path, context_size=256, threads=1), 2)
        async with pool:
            send, recv = anyio.create_memory_object_stream(10)
            res_send, res_recv = anyio.create_memory_object_stream(10)
            for name in ("g1", "g2"):  # two workers share the queue, each with its own results clone
                tm.spawn_generation_worker(name, pool, recv.clone(), res_send.clone())
            recv.close()
            res_send.close()
            async with send:
                for _ in range(6):
                    await send.send(("once upon", GREEDY))
            async with res_recv:
                texts = [r.completion.text async for r in res_recv]
            assert texts == [expected.text] * 6
            assert sum(s.processed for s in tm.worker_status().values()) == 6
            assert pool.kv_used() == 0


async def test_metrics_collector(tiny_model_path):
    seen = []

    async def sink(sample):
        seen.append(sample)

    async with Runtime() as rt, TaskManager() as tm:
        tm.spawn_metrics_collector("rt", rt, interval=0.005, sink=sink)
        tm.spawn_metrics_collector("fn", lambda: 7, interval=0.005)
        await wait_until(lambda: len(seen) >= 3 and tm.last_sample("fn") == 7)
        assert all(isinstance(s, RuntimeMetrics) for s in seen)
        assert isinstance(tm.last_sample("rt"), RuntimeMetrics)
        status = await tm.stop("rt")
        assert status.state == "cancelled" and status.processed >= 3 and status.kind == "metrics"
        with pytest.raises(mullama.InvalidConfigError, match="source"):
            tm.spawn_metrics_collector("bad", 3)
