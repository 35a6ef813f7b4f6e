"""How fast another Python thread runs while a generation runs (shared by bench/gil.py and the peer worker).

A spinner thread counts loop iterations, once while the main thread only
sleeps (idle) and once while it generates; the figure is the ratio of the two
rates. A binding that holds the GIL while llama.cpp works starves the spinner.
"""

import statistics
import threading
import time
from typing import Callable


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
