#!/usr/bin/env python3
"""Does overlapping the batching engine's hand-off with the next decode step pay?

Between two steps the engine's driver thread hands each request its new tokens
(``Engine._deliver``: text assembly, stop strings, the consumer's wake-up)
while llama.cpp waits: about 0.45 ms per step at 4 requests (a step there is
about 33 ms). This script measures a variant in which the driver only takes
the tokens out of the C buffers and releases finished slots, and a second
thread does the rest while the driver already runs the next step, against the
engine as it is, in one run:

* ``handoff_overlap`` per (requests, threads): N concurrent streaming requests
  (``concurrency.aggregate``: a 19-token prompt, ``--tokens`` greedy tokens
  each, aggregate generated tokens/s), the two variants alternating in pairs
  (the order swapped every pair); ``ratio`` = median over pairs of overlapped
  ÷ as-is, with its range and mean.

The variant replaces ``Engine._deliver`` in this process only and is an
approximation made to measure, not the library's code: it ignores stop
strings (these requests have none), speculation counts and the engine's KV
figures, and its hand-off thread (one per engine) outlives the engine.

Usage: python bench/handoff.py [--pairs 8] [--requests 4 8] [--threads 2 1] [--tokens 128]
"""

from __future__ import annotations

import argparse
import functools
import queue
import statistics
import sys
import threading
from pathlib import Path
from typing import List

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mullama  # noqa: E402
from mullama import _core  # noqa: E402
from mullama._engine import Engine  # noqa: E402
from mullama._generation import FINISH_REASONS  # noqa: E402

from _probes import emit  # noqa: E402
from concurrency import aggregate  # noqa: E402

AS_IS = Engine._deliver


def overlapped_deliver(self: Engine) -> None:
    """Take every slot's tokens and release finished slots here; a second thread assembles the
    text and hands it over while this one runs the next step."""
    core = self._core
    if not hasattr(self, "_handoff_queue"):
        self._handoff_queue = queue.SimpleQueue()  # type: ignore[attr-defined]

        def worker() -> None:
            while True:
                items = self._handoff_queue.get()  # type: ignore[attr-defined]
                for req, toks, pieces, lps, top, finish, reason in items:
                    if toks and not req.finished:
                        batch, _ = req.add(toks, pieces, lps, len(req.tokens_in) + len(req.tokens),
                                           ends=finish != _core.STATUS_OK, top=top)
                        if batch:
                            req.sink.offer(batch)
                    if reason is not None:
                        self._finish(req, reason)

        threading.Thread(target=worker, daemon=True).start()
    items = []
    for slot, req in list(self._active.items()):
        toks, pieces, lps, top = core.drain(slot)
        _, finish, cancelled, _, _, _ = core.slot_state(slot)
        reason = None
        if cancelled or req.cancelled:
            reason = "timeout" if req._expired else "cancelled"
        elif finish != _core.STATUS_OK:
            reason = FINISH_REASONS[finish]
        if reason is not None:  # _leave without _finish (the worker finishes it after its last tokens)
            core.release(slot, keep=True)
            del self._active[slot]
            self._free.append(slot)
            self._touch(slot)
            req.slot = None
        items.append((req, toks, pieces, lps, top, finish, reason))
    self._handoff_queue.put(items)  # type: ignore[attr-defined]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--requests", nargs="+", type=int, default=[4, 8])
    ap.add_argument("--threads", nargs="+", type=int, default=[2, 1],
                    help="compute threads (fixed); with fewer than the cores, one is free for the overlap")
    ap.add_argument("--tokens", type=int, default=128)
    a = ap.parse_args()
    path = mullama.default_model_path(progress=False)
    variants = {"as_is": AS_IS, "overlapped": overlapped_deliver}
    for threads in a.threads:
        for n in a.requests:
            ratios: List[float] = []
            rates = {k: [] for k in variants}  # type: dict
            for i in range(a.pairs):
                for name in (("as_is", "overlapped") if i % 2 == 0 else ("overlapped", "as_is")):
                    Engine._deliver = variants[name]  # type: ignore[method-assign]
                    rates[name].append(anyio.run(functools.partial(aggregate, path, n, a.tokens, threads,
                                                                   adaptive_threads=False)))
                ratios.append(rates["overlapped"][-1] / rates["as_is"][-1])
                print(f"[handoff] {n} requests, {threads} thread(s), pair {i + 1}: as is {rates['as_is'][-1]:.1f}, "
                      f"overlapped {rates['overlapped'][-1]:.1f} tok/s", file=sys.stderr, flush=True)
            Engine._deliver = AS_IS  # type: ignore[method-assign]
            ratios.sort()
            emit(figure="handoff_overlap", requests=n, threads=threads, pairs=a.pairs, tokens=a.tokens,
                 as_is_tok_s=round(statistics.median(rates["as_is"]), 1),
                 overlapped_tok_s=round(statistics.median(rates["overlapped"]), 1),
                 ratio=round(statistics.median(ratios), 3), ratio_min=round(ratios[0], 3),
                 ratio_max=round(ratios[-1], 3), ratio_mean=round(statistics.mean(ratios), 3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
