#!/usr/bin/env python3
"""Aggregate throughput of concurrent requests: mullama's batching engine against
llama.cpp's llama-batched-bench, in one run, on the default model.

Figures (one JSON line each):

* ``aggregate_tok_s``: for 1, 2, 4 and 8 concurrent requests (each a ~32-token
  prompt and 128 greedy tokens), generated tokens per second over all of them,
  counted from the first token to the last (the generation phase), against
  llama-batched-bench's ``speed_tg`` at the same parallelism (same threads,
  same pinned source and flags). ``ratio`` = mullama / native; ``vs_single``
  = mullama at N / mullama at 1.
* ``ttft_ms``: time to first token (queue wait included) of 32 requests
  submitted at once to an engine with 4 slots, p50/p99.

Usage: python bench/concurrency.py [--threads 2] [--tokens 128] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "bench"))

import mullama  # noqa: E402
from mullama import StreamConfig  # noqa: E402
from mullama.aio import AsyncModel  # noqa: E402

PARALLEL = (1, 2, 4, 8)
PROMPT = "The history of the city begins with a small village by the river, where farmers and traders lived"


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def pct(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def native(model: Path, npp: int, ntg: int, threads: int) -> dict:
    import build_llama_cpp

    bdir = build_llama_cpp.build(("llama-bench", "llama-batched-bench"), tools=True)
    exe = bdir / "bin" / "llama-batched-bench"
    ctx = max(PARALLEL) * (npp + ntg) + 256
    cmd = [str(exe), "-m", str(model), "-c", str(ctx), "-npp", str(npp), "-ntg", str(ntg),
           "-npl", ",".join(map(str, PARALLEL)), "-t", str(threads), "-fa", "off", "--output-format", "jsonl"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {row["pl"]: row["speed_tg"] for row in rows}


async def aggregate(model_path: Path, n: int, ntg: int, threads: int) -> float:
    cfg = StreamConfig.greedy(ntg)
    async with await AsyncModel.load(model_path, max_concurrent=n, context_size=256, threads=threads,
                                     timeout_ms=None) as model:
        await model.generate(PROMPT, config=StreamConfig.greedy(4))  # warm-up
        results = []

        async def one():
            results.append(await model.complete(PROMPT, config=cfg))

        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(one)
    # generation phase: first token of the first request to the last token of the last
    starts = [r.metrics.time_to_first_token_ms for r in results]
    ends = [r.metrics.time_to_first_token_ms + r.timings.generation_ms for r in results]
    tokens = sum(len(r.tokens) - 1 for r in results)
    return tokens / ((max(ends) - min(starts)) / 1e3)


async def ttft(model_path: Path, threads: int, requests: int = 32, slots: int = 4) -> list:
    async with await AsyncModel.load(model_path, max_concurrent=slots, context_size=256, threads=threads,
                                     timeout_ms=None) as model:
        results = []

        async def one():
            results.append(await model.complete(PROMPT, config=StreamConfig.greedy(32)))

        async with anyio.create_task_group() as tg:
            for _ in range(requests):
                tg.start_soon(one)
    return [r.metrics.time_to_first_token_ms for r in results]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    path = mullama.default_model_path(progress=False)
    with mullama.Model.load(path) as m:
        npp = len(m.tokenize(PROMPT))
    nat = native(path, npp, args.tokens, args.threads)
    ours = {}
    for n in PARALLEL:
        ours[n] = statistics.median(anyio.run(aggregate, path, n, args.tokens, args.threads) for _ in range(args.reps))
    for n in PARALLEL:
        emit(figure="aggregate_tok_s", parallel=n, prompt_tokens=npp, gen_tokens=args.tokens, threads=args.threads,
             mullama=round(ours[n], 1), native=round(nat[n], 1), ratio=round(ours[n] / nat[n], 3),
             vs_single=round(ours[n] / ours[1], 2), native_vs_single=round(nat[n] / nat[1], 2))
    lat = anyio.run(ttft, path, args.threads)
    emit(figure="ttft_ms", requests=len(lat), slots=4, p50=round(pct(lat, 50), 1), p99=round(pct(lat, 99), 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
