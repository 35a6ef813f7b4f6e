#!/usr/bin/env python3
"""Throughput under CPU contention: mullama's default settings against fixed thread
counts, llama-bench and llama-batched-bench (same pinned build), on the default model.

Loads, each held while every system below is measured once (the order of the
loads and of the systems rotates from round to round, so the machine's drift
hits them alike):

* ``idle``: nothing else runs;
* ``busy1`` / ``busy2``: one / two CPU-bound processes (``while True: pass``);
* ``llama-bench``: another llama-bench decoding with its default threads, in a loop.

Systems, single stream (greedy decode of ``--tokens`` tokens after a short prompt):

* ``mullama``: a new ``Context`` with the default settings (threads = the usable
  cores, the thread governor on), ``generate`` (the generation phase is timed, as
  in decode.py); then another new one timed step by step (one ``generate`` call
  per token, ``--steps`` of them), for the slowest step;
* ``mullama_t1`` / ``mullama_t2``: the same with the governor off at 1 / 2 threads
  (a thread count chosen by hand);
* ``llama_bench``: ``llama-bench -p 0 -n N`` with its default threads;
  ``llama_bench_t1`` / ``_t2`` with ``-t 1`` / ``-t 2``.

And four requests at once (``--tokens`` each): ``mullama`` is an ``AsyncModel``
with the default settings (``max_concurrent=4``), ``mullama_t1`` / ``_t2`` with
the governor off, against ``llama-batched-bench -npl 4`` with its default threads
and with ``-t 1`` / ``-t 2``; aggregate generated tokens/s.

Collapsed systems can take minutes for a few tokens: each measurement stops
after ``--cap`` seconds. mullama's then counts the tokens it made; a llama.cpp
tool that did not finish is killed and reported as at most N / cap tok/s
(``capped``: an upper bound).

Figures (one JSON line each):

* ``contention_tok_s``: per load, mode (``single`` / ``aggregate``) and system, the
  median tok/s over rounds and ``vs_idle``: the median over rounds of tok/s
  divided by the same system's idle tok/s of the same round;
* ``contention_step_ms``: the default mullama context's slowest decode step
  under each load against its median idle step;
* ``contention_targets``: the issue's targets, computed from the figures above,
  each with ``met``.

Usage: python bench/contention.py [--rounds 3] [--tokens 48] [--cap 10] [--steps 24]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "bench"))

import mullama  # noqa: E402
from mullama import StreamConfig  # noqa: E402
from _probes import emit  # noqa: E402
from concurrency import PROMPT, aggregate  # noqa: E402
from decode import llama_tool  # noqa: E402

LOADS = ("idle", "busy1", "busy2", "llama-bench")
SYSTEMS = ("mullama", "mullama_t1", "mullama_t2", "native", "native_t1", "native_t2")


# -- loads --------------------------------------------------------------------------

def start_load(load: str, bench_exe: Path, model: Path) -> List[subprocess.Popen]:
    if load == "idle":
        return []
    if load.startswith("busy"):
        return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(int(load[4:]))]
    # another llama-bench, decoding in a loop with its own defaults
    return [subprocess.Popen([str(bench_exe), "-m", str(model), "-p", "0", "-n", "512", "-r", "1000"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]


def stop_load(procs: List[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


# -- mullama ------------------------------------------------------------------------

def mullama_single(model: mullama.Model, threads: Optional[int], tokens: int, cap: float) -> float:
    """tok/s of a greedy decode on a new context (the generation phase; at most *cap* s)."""
    adaptive = threads is None
    with model.create_context(context_size=256, threads=threads, adaptive_threads=adaptive) as ctx:
        n = 0
        t0 = time.perf_counter()
        for _ in ctx.stream(PROMPT, StreamConfig.greedy(tokens)):
            if n == 0:
                t0 = time.perf_counter()  # from the first token: the prompt is not timed
            n += 1
            if time.perf_counter() - t0 > cap:
                break
        return (n - 1) / (time.perf_counter() - t0) if n > 1 else 0.0


def mullama_steps(model: mullama.Model, steps: int, cap: float) -> List[float]:
    """The time (s) of each decode step of a new default context: one ``generate`` call per token."""
    with model.create_context(context_size=256) as ctx:
        one = StreamConfig.greedy(1)
        ctx.generate(PROMPT, one)  # the prompt, and the first token
        out: List[float] = []
        t0 = time.perf_counter()
        while len(out) < steps and time.perf_counter() - t0 < cap:
            t = time.perf_counter()
            ctx.generate([], one)
            out.append(time.perf_counter() - t)
        return out


async def mullama_aggregate(path: Path, threads: Optional[int], tokens: int, cap: float) -> float:
    """Generated tokens/s of 4 concurrent greedy streams on a new engine (no warm-up: its
    first steps are part of the default settings' behaviour), first token to last, capped."""
    return await aggregate(path, 4, tokens, threads, adaptive_threads=threads is None, warm_up=False, cap=cap)


# -- llama.cpp's tools --------------------------------------------------------------

def native_single(exe: Path, model: Path, threads: Optional[int], tokens: int, cap: float) -> Tuple[float, bool]:
    cmd = [str(exe), "-m", str(model), "-p", "0", "-n", str(tokens), "-r", "1", "-fa", "0", "-o", "jsonl"]
    if threads is not None:
        cmd += ["-t", str(threads)]
    return _run_capped(cmd, cap, tokens, lambda row: row["avg_ts"])


def native_aggregate(exe: Path, model: Path, threads: Optional[int], npp: int, tokens: int,
                     cap: float) -> Tuple[float, bool]:
    cmd = [str(exe), "-m", str(model), "-c", str(4 * (npp + tokens) + 256), "-npp", str(npp), "-ntg", str(tokens),
           "-npl", "4", "-fa", "off", "--output-format", "jsonl"]
    if threads is not None:
        cmd += ["-t", str(threads)]
    return _run_capped(cmd, cap, 4 * tokens, lambda row: row["speed_tg"])


def _run_capped(cmd: List[str], cap: float, tokens: int, rate) -> Tuple[float, bool]:
    """The tool's rate, or (tokens / cap, True) when it did not finish within *cap* s
    (an upper bound: it was still running). Model loading is inside the cap too."""
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=cap).stdout
    except subprocess.TimeoutExpired:
        return tokens / cap, True
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return rate(rows[-1]), False


def default_threads_of(exe: Path, model: Path) -> int:
    out = subprocess.run([str(exe), "-m", str(model), "-p", "0", "-n", "1", "-r", "1", "-o", "jsonl"], check=True,
                         capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")][-1]["n_threads"]


# -- the run ------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48, help="tokens per stream")
    ap.add_argument("--cap", type=float, default=10.0, help="seconds a measurement may take")
    ap.add_argument("--steps", type=int, default=24, help="decode steps timed one by one (slowest step)")
    args = ap.parse_args()
    bench_exe, batched_exe = llama_tool("llama-bench"), llama_tool("llama-batched-bench")
    path = mullama.default_model_path(progress=False)
    default_nt = default_threads_of(bench_exe, path)
    print(f"[contention] llama-bench's default threads here: {default_nt}", file=sys.stderr, flush=True)
    threads_of = {"mullama": None, "mullama_t1": 1, "mullama_t2": 2, "native": None, "native_t1": 1, "native_t2": 2}
    # rates[mode][load][system] = per-round tok/s; capped[...] = a tool stopped at the cap
    rates: Dict[str, Dict[str, Dict[str, List[float]]]] = {
        m: {ld: {s: [] for s in SYSTEMS} for ld in LOADS} for m in ("single", "aggregate")}
    capped: Dict[Tuple[str, str, str], bool] = {}
    steps: Dict[str, List[float]] = {ld: [] for ld in LOADS}
    with mullama.Model.load(path) as model:
        npp = len(model.tokenize(PROMPT))
        mullama_single(model, None, 4, args.cap)  # warm-up (page cache, first-use costs)
        for r in range(args.rounds):
            loads = LOADS[r % len(LOADS):] + LOADS[:r % len(LOADS)]
            if "idle" in loads:  # idle first in every round: each round's ratios have their own baseline
                loads = ("idle",) + tuple(ld for ld in loads if ld != "idle")
            for load in loads:
                procs = start_load(load, bench_exe, path)
                try:
                    time.sleep(0.5)
                    order = SYSTEMS[r % len(SYSTEMS):] + SYSTEMS[:r % len(SYSTEMS)]
                    for system in order:
                        t = threads_of[system]
                        if system.startswith("mullama"):
                            rate = mullama_single(model, t, args.tokens, args.cap)
                            agg = anyio.run(mullama_aggregate, path, t, args.tokens, args.cap)
                            if system == "mullama":
                                steps[load] += mullama_steps(model, args.steps, args.cap)
                            cs = ca = False
                        else:
                            rate, cs = native_single(bench_exe, path, t, args.tokens, args.cap)
                            agg, ca = native_aggregate(batched_exe, path, t, npp, args.tokens, args.cap)
                        rates["single"][load][system].append(rate)
                        rates["aggregate"][load][system].append(agg)
                        capped[("single", load, system)] = capped.get(("single", load, system), False) or cs
                        capped[("aggregate", load, system)] = capped.get(("aggregate", load, system), False) or ca
                finally:
                    stop_load(procs)
                print(f"[contention] round {r + 1}/{args.rounds} {load}: " + ", ".join(
                    f"{s} {rates['single'][load][s][-1]:.0f}/{rates['aggregate'][load][s][-1]:.0f}" for s in SYSTEMS)
                    + " tok/s (single/4 requests)", file=sys.stderr, flush=True)

    med: Dict[Tuple[str, str, str], float] = {}
    for mode in rates:
        for load in LOADS:
            for system in SYSTEMS:
                values = rates[mode][load][system]
                idle = rates[mode]["idle"][system]
                vs_idle = statistics.median(v / i for v, i in zip(values, idle) if i > 0)
                med[(mode, load, system)] = statistics.median(values)
                emit(figure="contention_tok_s", mode=mode, load=load, system=system,
                     threads="default" if threads_of[system] is None else threads_of[system],
                     tok_s=round(med[(mode, load, system)], 1), vs_idle=round(vs_idle, 3),
                     capped=capped[(mode, load, system)], rounds=args.rounds,
                     tokens=args.tokens if mode == "single" else 4 * args.tokens)
    idle_step = statistics.median(steps["idle"])
    for load in LOADS:
        emit(figure="contention_step_ms", load=load, idle_median_ms=round(idle_step * 1e3, 2),
             median_ms=round(statistics.median(steps[load]) * 1e3, 2), max_ms=round(max(steps[load]) * 1e3, 2),
             max_vs_idle=round(max(steps[load]) / idle_step, 2), steps=len(steps[load]))

    def target(name: str, value: float, goal: float, **extra) -> None:
        emit(figure="contention_targets", target=name, value=round(value, 3), goal=goal, met=value >= goal, **extra)

    for mode in ("single", "aggregate"):
        ours = lambda ld: med[(mode, ld, "mullama")]  # noqa: E731
        vs_idle = statistics.median(v / i for v, i in zip(rates[mode]["busy1"]["mullama"],
                                                          rates[mode]["idle"]["mullama"]))
        target(f"{mode}: one competing process, default vs its idle", vs_idle, 0.4)
        best = max(med[(mode, "busy1", "mullama_t1")], med[(mode, "busy1", "mullama_t2")])
        target(f"{mode}: one competing process, default vs the best fixed thread count", ours("busy1") / best, 0.9)
        for load in LOADS[1:]:
            target(f"{mode}: {load}, default vs llama.cpp's default threads ({default_nt})",
                   ours(load) / med[(mode, load, "native")], 3.0,
                   native_capped=capped[(mode, load, "native")])
            nbest = max(med[(mode, load, "native_t1")], med[(mode, load, "native_t2")])
            target(f"{mode}: {load}, default vs llama.cpp's best thread count", ours(load) / nbest, 1.0)
        target(f"{mode}: idle, default vs fixed threads=2", ours("idle") / med[(mode, "idle", "mullama_t2")], 0.98)
    worst = max(max(steps["busy2"]), max(steps["busy1"])) / idle_step
    emit(figure="contention_targets", target="single: slowest step under 1-2 competing processes vs idle median step",
         value=round(worst, 2), goal="< 10", met=worst < 10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
