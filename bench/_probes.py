"""Measurements shared by mullama's bench scripts and the peer worker (bench/_peer_llama_cpp.py).

Standard library only (anyio for the async one): the same code times both
bindings, each in its own environment.

* :func:`prompt_rate`: prompt evaluation speed over a prompt from :func:`prompt_tokens`.
* :func:`emit`: print one figure as a JSON line; :func:`pct`: a percentile.
* :func:`rss`: this process's resident memory.
* :func:`cancel_latency_ms`: one request cancelled at a random moment, and how
  long until it has let go of the model (anyio, imported when used).
* :func:`other_thread_ratio`: how fast another Python thread runs while a
  generation runs. A spinner thread counts loop iterations, once while the main
  thread only sleeps (idle) and once while it generates; the figure is the
  ratio of the two rates. A binding that holds the GIL while llama.cpp works
  starves the spinner.
"""

import json
import random
import statistics
import threading
import time
from typing import Awaitable, Callable, List, Optional, Sequence, Tuple


def emit(**fields) -> None:
    """Print one figure as a JSON line (a bench script's stdout holds only these)."""
    print(json.dumps(fields), flush=True)


def pct(values: Sequence[float], q: float) -> float:
    """The *q*-th percentile of *values* (nearest rank)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def prompt_tokens(n_vocab: int, n: int) -> List[int]:
    """A prompt of *n* token ids spread over the vocabulary (llama-bench's are random)."""
    return [(i * 7919 + 13) % n_vocab for i in range(n)]


def prompt_rate(reset: Callable[[], None], evaluate: Callable[[Sequence[int]], None], prompt: Sequence[int],
                reps: int) -> float:
    """Median tokens/s of ``evaluate(prompt)`` after ``reset()``, over *reps* runs after a warm-up."""
    rates = []
    for i in range(reps + 1):  # the first run is the warm-up
        reset()
        t0 = time.perf_counter()
        evaluate(prompt)
        if i:
            rates.append(len(prompt) / (time.perf_counter() - t0))
    return statistics.median(rates)


def rss() -> int:
    """Resident set size of this process, in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _spin_during(work: Callable[[], None]) -> float:
    stop = threading.Event()
    count = [0]

    def spin() -> None:
        n = 0
        while not stop.is_set():
            for _ in range(200):
                n += 1
        count[0] = n

    thread = threading.Thread(target=spin)
    thread.start()
    t0 = time.perf_counter()
    work()
    elapsed = time.perf_counter() - t0
    stop.set()
    thread.join()
    return count[0] / elapsed


def other_thread_ratio(generate: Callable[[], None], reps: int) -> float:
    """Median over *reps* of (spinner rate while generating) / (spinner rate while idle)."""
    generate()  # warm-up
    ratios = []
    for _ in range(reps):
        t0 = time.perf_counter()
        busy = _spin_during(generate)
        duration = time.perf_counter() - t0
        idle = _spin_during(lambda: time.sleep(duration))
        ratios.append(busy / idle)
    return statistics.median(ratios)


async def cancel_latency_ms(consume: Callable[[Callable[[], None]], Awaitable[None]], phase: str,
                            delay_s: Tuple[float, float], rng: random.Random) -> Optional[float]:
    """Milliseconds from cancelling a request to the moment ``consume`` has returned.

    ``consume(on_token)`` runs one request and calls ``on_token()`` for each token
    it reads. It is cancelled at a random moment *delay_s* after its first token
    (*phase* ``"decode"``) or after its start (``"prefill"``). None when the request
    finished before the cancellation: not a sample.
    """
    import anyio

    marks = {}
    with anyio.CancelScope() as scope:
        async def cancel_later(started: anyio.Event) -> None:
            await started.wait()
            await anyio.sleep(rng.uniform(*delay_s))
            marks["cancel"] = time.perf_counter()
            scope.cancel()

        started = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_later, started)
            if phase == "prefill":
                started.set()
            await consume(started.set)
            tg.cancel_scope.cancel()
    end = time.perf_counter()
    return (end - marks["cancel"]) * 1e3 if "cancel" in marks and scope.cancelled_caught else None
