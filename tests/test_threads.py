"""The compute-thread governor (mullama/_threads.h): how many threads a context
decodes with while the machine is busy.

The governor is driven here by step times given to it, as a machine would
give them: a deterministic harness, no clock and no load involved. Then real
contexts and engines check that switching thread counts (also a step stopped
by the watchdog and run again) never changes what is generated.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

import mullama
import mullama.aio
from mullama import StreamConfig, ThreadStats, _core


class Machine:
    """Step times of a model on a machine with *cores* cores, *busy* of them
    taken by other processes: *work* seconds of compute per step, split over
    the threads; more threads than free cores collapse (each barrier waits
    for a descheduled thread), which the watchdog must catch."""

    def __init__(self, work=0.020, cores=2, busy=0):
        self.work, self.cores, self.busy = work, cores, busy

    def step_time(self, threads, n_tokens=1):
        work = self.work * (n_tokens + 16) / 17
        free = self.cores - self.busy
        if free <= 0:  # everything shared: one thread gets a share of a core
            share = self.cores / (self.cores + self.busy)
            return work / share if threads == 1 else 50 * work
        if threads > free:
            return 50 * work  # the collapse: seconds where milliseconds were due
        return work / threads * (1 + 0.05 * (threads - 1))  # a little sync cost per thread


def drive(gov, machine, steps, n_tokens=1):
    """Run *steps* steps; returns the thread count of each and the time each cost
    (a step stopped by the watchdog costs its limit, then runs again)."""
    used, costs = [], []
    for _ in range(steps):
        cost = 0.0
        while True:
            threads, limit = gov.plan(n_tokens)
            t = machine.step_time(threads, n_tokens)
            if limit and t > limit:
                gov.observe(n_tokens, limit, watchdog=True)
                cost += limit
                continue
            gov.observe(n_tokens, t)
            cost += t
            break
        used.append(threads)
        costs.append(cost)
    return used, costs


def test_idle_machine_keeps_every_thread():
    gov = _core.ThreadGovernor(2)
    used, _ = drive(gov, Machine(), 2000)
    assert set(used) == {2}
    st = gov.stats()
    assert st["changes"] == 0 and st["watchdog_aborts"] == 0 and st["trials"] == 0


def test_a_competing_process_moves_to_one_thread_and_the_quiet_machine_gets_both_back():
    m = Machine()
    gov = _core.ThreadGovernor(2)
    drive(gov, m, 200)                       # learns the quiet step
    m.busy = 1                               # a CPU-bound process starts
    used, costs = drive(gov, m, 500)
    assert used[0] == 1                      # the first collapsing step was stopped and run with one thread
    assert gov.stats()["watchdog_aborts"] >= 1
    assert max(costs) <= 4 * m.step_time(2) + m.step_time(1) + 1e-9   # bounded: no step takes seconds
    # probes for the second thread back off: nearly every step stays on one thread
    assert used.count(2) <= 0.03 * len(used)
    assert sum(costs) <= 1.1 * 500 * m.step_time(1)   # within 10% of the best fixed choice for this load
    m.busy = 0                               # the process ends
    used, _ = drive(gov, m, 400)
    back = used.index(2)
    assert back < 300 and set(used[back + 20:]) == {2}


def test_no_probe_while_no_core_is_idle():
    # on Linux the governor looks at /proc/stat before a probe; here that look is simulated
    m = Machine()
    gov = _core.ThreadGovernor(2)
    drive(gov, m, 100)
    m.busy, gov.idle_cores = 1, 0.0
    trials = gov.stats()["trials"]
    used, costs = drive(gov, m, 1000)
    assert used[0] == 1 and used[1:].count(2) == 0
    # one probe right after the watchdog's drop (a slow step may be a hiccup), stopped by its own
    # watchdog at twice the one-thread step; then not one more while no core is idle
    assert gov.stats()["trials"] == trials + 1
    assert sum(costs[1:]) == pytest.approx(999 * m.step_time(1) + 2 * m.step_time(1))
    m.busy, gov.idle_cores = 0, 1.0
    used, _ = drive(gov, m, 200)
    assert used[-100:] == [2] * 100


def test_mild_contention_is_found_by_a_trial_not_only_by_the_watchdog():
    class Mild(Machine):
        def step_time(self, threads, n_tokens=1):   # two threads 30% slower than one, never collapsing
            return 0.026 if threads == 2 else 0.020

    quiet = Machine()
    gov = _core.ThreadGovernor(2)
    drive(gov, quiet, 100)
    used, _ = drive(gov, Mild(), 300)
    assert gov.stats()["watchdog_aborts"] == 0
    assert used[-100:].count(1) >= 95


def test_two_competing_processes_never_collapse_a_step():
    m = Machine()
    gov = _core.ThreadGovernor(2)
    drive(gov, m, 100)
    idle_step = m.step_time(2)
    m.busy = 2
    _, costs = drive(gov, m, 1000)
    assert max(costs) < 10 * idle_step


def test_a_busy_start_is_caught_before_anything_is_known():
    m = Machine(busy=1)
    gov = _core.ThreadGovernor(2, first_cap=0.5)
    used, costs = drive(gov, m, 50)
    assert costs[0] <= 0.5 + m.step_time(1) + 1e-9   # the first step is capped, then run with one thread
    assert used[0] == 1 and used[-10:] == [1] * 10


def test_many_cores_settle_on_the_free_ones():
    m = Machine(work=0.080, cores=8)
    gov = _core.ThreadGovernor(8)
    drive(gov, m, 300)
    assert gov.stats()["threads"] == 8
    m.busy = 3
    used, _ = drive(gov, m, 600)
    assert used[-50:].count(5) >= 45
    m.busy = 0
    used, _ = drive(gov, m, 1500)
    assert used[-50:].count(8) >= 45


def test_steps_are_compared_by_size():
    # an engine's steps mix one-token decodes with 256-token prompt chunks: the
    # long chunks are not taken for slow decode steps
    m = Machine()
    gov = _core.ThreadGovernor(2)
    for _ in range(300):
        drive(gov, m, 3, n_tokens=4)
        drive(gov, m, 1, n_tokens=256)
    assert gov.stats()["threads"] == 2 and gov.stats()["changes"] == 0
    assert gov.floor(256, 2) > 10 * gov.floor(4, 2) > 0


def test_trials_go_on_through_steps_of_other_sizes():
    # an engine under mild contention: one-token decode steps with prompt chunks in between;
    # the trial started on decode steps skips the chunks and still decides
    class Mild(Machine):
        def step_time(self, threads, n_tokens=1):
            return (0.026 if threads == 2 else 0.020) * (n_tokens + 16) / 17

    gov = _core.ThreadGovernor(2)
    for _ in range(40):
        drive(gov, Machine(), 3)
        drive(gov, Machine(), 1, n_tokens=200)
    for _ in range(100):
        drive(gov, Mild(), 1)
        drive(gov, Mild(), 1, n_tokens=200)
    assert gov.stats()["threads"] == 1 and gov.stats()["watchdog_aborts"] == 0


def test_prompt_steps_are_not_taken_for_a_collapse():
    # decode steps are memory-bound (~the same time for 1 token or 4), prompt steps compute-bound
    # (a time per token): a first 512-token step after only decode steps, or as the very first
    # step of all, is long but healthy
    class Real(Machine):
        def step_time(self, threads, n_tokens=1):
            return (0.012 if n_tokens < 8 else 0.0045 * n_tokens) * (2 / threads) ** 0.8

    m = Real()
    gov = _core.ThreadGovernor(2, first_cap=1.0)
    drive(gov, m, 1, n_tokens=512)
    drive(gov, m, 50)
    drive(gov, m, 3, n_tokens=512)
    gov2 = _core.ThreadGovernor(2, first_cap=1.0)
    drive(gov2, m, 50)
    drive(gov2, m, 3, n_tokens=300)
    for g in (gov, gov2):
        assert g.stats()["watchdog_aborts"] == 0 and g.stats()["threads"] == 2 and g.stats()["changes"] == 0


def test_fixed_threads_never_change_and_have_no_watchdog():
    m = Machine(busy=1)
    gov = _core.ThreadGovernor(2, adaptive=False)
    for _ in range(100):
        threads, limit = gov.plan(1)
        assert (threads, limit) == (2, 0.0)
        gov.observe(1, m.step_time(2))
    assert gov.stats()["changes"] == 0


# -- real contexts: thread changes never change outputs -------------------------

def _switching(ctx, prompt, n, chunk):
    """Greedy tokens of *ctx*, generated *chunk* at a time while its thread
    count is flipped between chunks (the pools swapped under it)."""
    done = ctx.generate(prompt, StreamConfig.greedy(chunk))
    out = done.tokens
    while len(out) < n and done.finish_reason == "length":
        ctx._core._set_threads(1 if ctx.thread_stats().threads == 2 else 2)
        done = ctx.generate([], StreamConfig.greedy(min(chunk, n - len(out))))
        out += done.tokens
    return out


def test_thread_switches_and_watchdog_retries_keep_greedy_output(tiny_model):
    prompt = "hello world, once more"
    with tiny_model.create_context(512, threads=2, adaptive_threads=False) as fixed:
        want = fixed.generate(prompt, StreamConfig.greedy(120)).tokens
    with tiny_model.create_context(512, threads=2) as ctx:
        assert _switching(ctx, prompt, 120, 10) == want
        assert ctx.thread_stats().changes >= 10
    with tiny_model.create_context(512, threads=2) as ctx:
        # every step at two threads is stopped by the watchdog, rolled back and run again
        ctx._core._set_watchdog(1e-9)
        assert ctx.generate(prompt, StreamConfig.greedy(120)).tokens == want
        st = ctx.thread_stats()
        assert st.watchdog_aborts >= 1 and st.threads == 1


@pytest.mark.integration
def test_default_model_output_is_the_same_with_and_without_the_governor(default_model):
    prompt = "Write a long story about a lighthouse keeper and his dog. Chapter 1."
    with default_model.create_context(1024, threads=2, adaptive_threads=False) as fixed:
        want = fixed.generate(prompt, StreamConfig.greedy(96)).tokens
    with default_model.create_context(1024, threads=2) as ctx:
        assert _switching(ctx, prompt, 96, 8) == want
    with default_model.create_context(1024, threads=2) as ctx:
        ctx._core._set_watchdog(1e-9)
        assert ctx.generate(prompt, StreamConfig.greedy(96)).tokens == want
        assert ctx.thread_stats().watchdog_aborts >= 1


@pytest.mark.anyio
async def test_engine_watchdog_retries_keep_outputs(tiny_model_path, anyio_backend):
    from mullama.aio import AsyncModel

    prompts = ["one two three", "the quick brown fox", "hello", "a b c d e f"]
    async with await AsyncModel.load(tiny_model_path, max_concurrent=4, threads=2, context_size=256,
                                     adaptive_threads=False) as fixed:
        want = [await fixed.generate_text(p, max_tokens=40, config=StreamConfig.greedy()) for p in prompts]
    async with await AsyncModel.load(tiny_model_path, max_concurrent=4, threads=2, context_size=256) as model:
        model._engine._core._set_watchdog(1e-9)
        import anyio

        got = [None] * len(prompts)

        async def one(i):
            got[i] = await model.generate_text(prompts[i], max_tokens=40, config=StreamConfig.greedy())

        async with anyio.create_task_group() as tg:
            for i in range(len(prompts)):
                tg.start_soon(one, i)
        assert got == want
        st = model.thread_stats()
        assert isinstance(st, ThreadStats) and st.watchdog_aborts >= 1 and st.max_threads == 2


def test_thread_stats(tiny_model):
    with tiny_model.create_context(256, threads=1) as ctx:
        ctx.generate("hi", StreamConfig.greedy(5))
        st = ctx.thread_stats()
    assert st.threads == st.max_threads == 1 and st.adaptive
    assert st.steps >= 5 and st.last_step_ms > 0
    with pytest.raises(mullama.ClosedError):
        ctx.thread_stats()


def test_more_threads_than_cores_are_capped_with_a_warning(tiny_model):
    cores = mullama.default_threads()
    with pytest.warns(RuntimeWarning, match="more than the"):
        ctx = tiny_model.create_context(256, threads=cores + 1000)
    with ctx:
        assert ctx.threads == cores == ctx.thread_stats().max_threads
    with pytest.warns(RuntimeWarning, match=f"threads={cores + 1} is more than"):
        cfg = mullama.aio.AsyncConfig("x.gguf", threads=cores + 1)
    assert cfg.threads == cores
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_model.create_context(256, threads=cores).close()


def test_cli_prints_its_speed(tiny_model_path):
    r = subprocess.run([sys.executable, "-m", "mullama", "run", "hello", "--model", str(tiny_model_path), "-n", "8"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "tok/s" in r.stderr and "threads" in r.stderr
    assert "tok/s" not in r.stdout
    r = subprocess.run([sys.executable, "-m", "mullama", "run", "hello", "--model", str(tiny_model_path), "-n", "8",
                        "--quiet", "--fixed-threads"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "tok/s" not in r.stderr


def test_thread_changes_are_logged(tiny_model, caplog):
    with tiny_model.create_context(256, threads=2) as ctx:
        ctx.generate("hello", StreamConfig.greedy(2))
        ctx._core._set_threads(1 if ctx.thread_stats().threads == 2 else 2)
        with caplog.at_level("INFO", logger="mullama"):
            ctx.generate([], StreamConfig.greedy(2))
    (rec,) = [r for r in caplog.records if r.name == "mullama"]
    assert "a context now decodes with" in rec.getMessage() and "of 2 threads" in rec.getMessage()
