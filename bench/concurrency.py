#!/usr/bin/env python3
"""Aggregate throughput of concurrent requests: mullama's batching engine against
llama.cpp's llama-batched-bench and llama-cpp-python, in one run, on the default model.

Figures (one JSON line each):

* ``aggregate_tok_s``: for 1, 2, 4 and 8 concurrent streaming requests (each a
  19-token prompt and 128 greedy tokens), generated tokens per second over all
  of them, counted from the first token to the last (the generation phase), against
  llama-batched-bench's ``speed_tg`` at the same parallelism (same threads,
  same pinned source and flags) and, with the peer, llama-cpp-python serving
  the same requests the way its server does (one at a time on the model, each
  streamed through a worker thread; bench/_peer_llama_cpp.py). They alternate
  over several rounds. ``ratio`` = median over rounds of mullama / native,
  with its range; ``vs_single`` = mullama at N / mullama at 1.
* ``ttft_ms``: time to first token (queue wait included) of requests submitted
  at once to an engine with 4 slots, each generating 32 tokens, p50/p99: 4
  requests (repeated) and 32 requests. For 4 requests llama-batched-bench's
  prompt time at 4 sequences is the native figure (its 4 first tokens come
  out of that one batch); no native tool queues requests, so 32 has none.

Usage: python bench/concurrency.py [--threads 2] [--tokens 128] [--rounds 7] [--no-peer]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "bench"))

import mullama  # noqa: E402
from mullama import StreamConfig  # noqa: E402
from mullama.aio import AsyncModel  # noqa: E402
from _probes import emit, pct  # noqa: E402
from decode import llama_tool  # noqa: E402
from peers import ensure_peer, run_peer  # noqa: E402

PARALLEL = (1, 2, 4, 8)
PROMPT = "The history of the city begins with a small village by the river, where farmers and traders lived"


def native(exe: Path, model: Path, npp: int, ntg: int, threads: int, npl: int) -> dict:
    """llama-batched-bench's result row at *npl* sequences (``speed_tg``: aggregate generation
    tokens/s; ``t_pp``: seconds to evaluate the *npl* prompts in one batch)."""
    ctx = npl * (npp + ntg) + 256
    cmd = [str(exe), "-m", str(model), "-c", str(ctx), "-npp", str(npp), "-ntg", str(ntg),
           "-npl", str(npl), "-t", str(threads), "-fa", "off", "--output-format", "jsonl"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return rows[-1]


async def aggregate(model_path: Path, n: int, ntg: int, threads: Optional[int] = None, *,
                    adaptive_threads: bool = True, warm_up: bool = True, cap: Optional[float] = None) -> float:
    """Generated tokens/s over *n* concurrent streams, from the first token of
    the first to the last token of the last (each stream's first token is not
    counted: it belongs to the prompt phase, as in llama-batched-bench). With
    *cap*, the streams are stopped after that many seconds and the tokens
    generated so far count."""
    cfg = StreamConfig.greedy(ntg)
    async with await AsyncModel.load(model_path, max_concurrent=n, context_size=256, threads=threads,
                                     adaptive_threads=adaptive_threads, timeout_ms=None) as model:
        # token ids: the n requests are submitted in the same tick and join the same step,
        # as llama-batched-bench's sequences do (text would take a thread hop each)
        prompt = model.model.tokenize(PROMPT)
        if warm_up:
            await model.generate(prompt, config=StreamConfig.greedy(4))
        firsts: List[float] = []
        counted = [0]

        async def one():
            first = True
            async with model.generate_stream(prompt, cfg) as stream:
                async for _ in stream:
                    if first:
                        firsts.append(time.perf_counter())
                        first = False
                    else:
                        counted[0] += 1

        with anyio.move_on_after(cap if cap is not None else float("inf")):
            async with anyio.create_task_group() as tg:
                for _ in range(n):
                    tg.start_soon(one)
        end = time.perf_counter()
    return counted[0] / (end - min(firsts)) if firsts and end > min(firsts) else 0.0


async def ttft(model_path: Path, threads: int, requests: int, repeat: int = 1, slots: int = 4) -> list:
    """Times to first token (ms) of *requests* submitted at once, *repeat* times."""
    async with await AsyncModel.load(model_path, max_concurrent=slots, context_size=256, threads=threads,
                                     timeout_ms=None) as model:
        await model.generate(PROMPT, config=StreamConfig.greedy(4))  # warm-up
        results = []

        async def one():
            results.append(await model.generate(PROMPT, config=StreamConfig.greedy(32)))

        for _ in range(repeat):
            async with anyio.create_task_group() as tg:
                for _ in range(requests):
                    tg.start_soon(one)
    return [r.metrics.time_to_first_token_ms for r in results]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7, help="alternating native/mullama/peer rounds")
    ap.add_argument("--no-peer", action="store_true", help="skip llama-cpp-python")
    args = ap.parse_args()
    peer = None if args.no_peer else ensure_peer()
    exe = llama_tool("llama-batched-bench")
    path = mullama.default_model_path(progress=False)
    with mullama.Model.load(path) as m:
        npp = len(m.tokenize(PROMPT))
    # native and mullama run back to back at each parallelism, round after
    # round: this machine's speed drifts by tens of percent within a minute,
    # and both should see the same drift
    nat: Dict[int, List[dict]] = {n: [] for n in PARALLEL}
    ours: Dict[int, List[float]] = {n: [] for n in PARALLEL}
    peers: Dict[int, List[float]] = {n: [] for n in PARALLEL}
    task = dict(model=str(path), prompt=PROMPT, threads=args.threads)
    for r in range(args.rounds):
        for n in PARALLEL:  # each pair back to back
            nat[n].append(native(exe, path, npp, args.tokens, args.threads, n))
            ours[n].append(anyio.run(aggregate, path, n, args.tokens, args.threads))
        if peer is not None:
            got = run_peer(peer, dict(task, task="aggregate", tokens=args.tokens, parallel=PARALLEL))
            for n in PARALLEL:
                peers[n].append(got[str(n)])
        print(f"[concurrency] round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n}: {ours[n][-1]:.0f}/{nat[n][-1]['speed_tg']:.0f}" + (f"/{peers[n][-1]:.0f}" if peers[n] else "")
            for n in PARALLEL) + " tok/s (mullama/native/peer)", file=sys.stderr, flush=True)
    single = statistics.median(ours[1])
    native_single = statistics.median(row["speed_tg"] for row in nat[1])
    for n in PARALLEL:
        natives = [row["speed_tg"] for row in nat[n]]
        ratios = sorted(o / t for o, t in zip(ours[n], natives))
        mine, theirs = statistics.median(ours[n]), statistics.median(natives)
        fig = dict(figure="aggregate_tok_s", parallel=n, prompt_tokens=npp, gen_tokens=args.tokens,
                   threads=args.threads, mullama=round(mine, 1), native=round(theirs, 1),
                   ratio=round(statistics.median(ratios), 3), ratio_min=round(ratios[0], 3),
                   ratio_max=round(ratios[-1], 3), rounds=args.rounds, vs_single=round(mine / single, 2),
                   native_vs_single=round(theirs / native_single, 2))
        if peers[n]:
            fig.update(llama_cpp_python=round(statistics.median(peers[n]), 1),
                       peer_ratio=round(statistics.median(p / t for p, t in zip(peers[n], natives)), 3))
        emit(**fig)

    print("[concurrency] time to first token ...", file=sys.stderr, flush=True)
    for requests, repeat in ((4, 5), (32, 1)):
        lat = anyio.run(ttft, path, args.threads, requests, repeat)
        fig = dict(figure="ttft_ms", requests=requests, slots=4, gen_tokens=32, samples=len(lat),
                   mullama_p50=round(pct(lat, 50), 1), mullama_p99=round(pct(lat, 99), 1),
                   native_p50=None, native_p99=None)
        if requests == 4:  # all four first tokens come out of llama-batched-bench's one prompt batch
            t_pp = [row["t_pp"] * 1e3 for row in nat[4]]
            fig.update(native_p50=round(statistics.median(t_pp), 1), native_p99=round(pct(t_pp, 99), 1))
        if peer is not None:
            plat: List[float] = []
            for _ in range(repeat):
                plat += run_peer(peer, dict(task, task="ttft", tokens=32, requests=requests))["ttft_ms"]
            fig.update(llama_cpp_python_p50=round(pct(plat, 50), 1), llama_cpp_python_p99=round(pct(plat, 99), 1))
        emit(**fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
