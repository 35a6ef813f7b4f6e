#!/usr/bin/env python3
"""Aggregate throughput of concurrent requests: mullama's batching engine against
llama.cpp's llama-batched-bench, in one run, on the default model.

Figures (one JSON line each):

* ``aggregate_tok_s``: for 1, 2, 4 and 8 concurrent streaming requests (each a
  19-token prompt and 128 greedy tokens), generated tokens per second over all
  of them, counted from the first token to the last (the generation phase), against
  llama-batched-bench's ``speed_tg`` at the same parallelism (same threads,
  same pinned source and flags), the two alternating over several rounds.
  ``ratio`` = median over rounds of mullama / native, with its range;
  ``vs_single`` = mullama at N / mullama at 1.
* ``ttft_ms``: time to first token (queue wait included) of 32 requests
  submitted at once to an engine with 4 slots, p50/p99.
* ``pool_rss_mb``: resident memory of a 4-member ModelPool (each member has
  generated) over a process with mullama imported and no model, against one
  model (its file size) plus 4 KV caches (f16 K and V for ``context_size``
  tokens, from the model's metadata); ``ratio`` = measured / that sum
  (target <= 1.15). Each figure comes from a fresh process.

Usage: python bench/concurrency.py [--threads 2] [--tokens 128] [--rounds 7] [--context-size 2048]
"""

from __future__ import annotations

import argparse
import json
import statistics
import os
import subprocess
import sys
import time
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "bench"))

import mullama  # noqa: E402
from leaks import rss  # noqa: E402
from mullama import StreamConfig  # noqa: E402
from mullama.aio import AsyncModel  # noqa: E402

PARALLEL = (1, 2, 4, 8)
PROMPT = "The history of the city begins with a small village by the river, where farmers and traders lived"


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def pct(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def native(model: Path, npp: int, ntg: int, threads: int, npl: int) -> float:
    """llama-batched-bench's aggregate generation tokens/s at *npl* sequences."""
    import build_llama_cpp

    bdir = build_llama_cpp.build(("llama-bench", "llama-batched-bench"), tools=True)
    exe = bdir / "bin" / "llama-batched-bench"
    ctx = npl * (npp + ntg) + 256
    cmd = [str(exe), "-m", str(model), "-c", str(ctx), "-npp", str(npp), "-ntg", str(ntg),
           "-npl", str(npl), "-t", str(threads), "-fa", "off", "--output-format", "jsonl"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return rows[-1]["speed_tg"]


async def aggregate(model_path: Path, n: int, ntg: int, threads: int) -> float:
    """Generated tokens/s over *n* concurrent streams, from the first token of
    the first to the last token of the last (each stream's first token is not
    counted: it belongs to the prompt phase, as in llama-batched-bench)."""
    cfg = StreamConfig.greedy(ntg)
    async with await AsyncModel.load(model_path, max_concurrent=n, context_size=256, threads=threads,
                                     timeout_ms=None) as model:
        # token ids: the n requests are submitted in the same tick and join the same step,
        # as llama-batched-bench's sequences do (text would take a thread hop each)
        prompt = model.model.tokenize(PROMPT)
        await model.generate(prompt, config=StreamConfig.greedy(4))  # warm-up
        firsts, ends, counts = [], [], []

        async def one():
            count = 0
            async with model.generate_stream(prompt, cfg) as stream:
                async for _ in stream:
                    if count == 0:
                        firsts.append(time.perf_counter())
                    count += 1
            ends.append(time.perf_counter())
            counts.append(count - 1)

        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(one)
    return sum(counts) / (max(ends) - min(firsts))


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


async def pool_probe(model_path: Path, members: int, context_size: int, threads: int) -> None:
    """(In a fresh process) RSS with *members* pool members that have each generated."""
    from mullama.aio import AsyncConfig, ModelPool

    if members == 0:
        print(rss())
        return
    cfg = AsyncConfig(model_path, context_size=context_size, threads=threads, timeout_ms=None)
    async with ModelPool(cfg, members) as pool:
        leases = [await pool.acquire() for _ in range(members)]
        for m in leases:
            await m.generate(PROMPT, config=StreamConfig.greedy(32))
        print(rss())
        for m in leases:
            await m.release()


def pool_rss(model_path: Path, members: int, context_size: int, threads: int) -> dict:
    def probe(n: int) -> int:
        out = subprocess.run([sys.executable, __file__, "--rss-probe", str(n), "--context-size", str(context_size),
                              "--threads", str(threads)], check=True, capture_output=True, text=True).stdout
        return int(out.split()[-1])

    empty, pool = probe(0), probe(members)
    with mullama.Model.load(model_path) as m:
        meta, info = m.metadata(), m.info
    arch = info.architecture
    n_head_kv = int(meta.get(f"{arch}.attention.head_count_kv", info.n_head))
    kv = 2 * info.n_layer * context_size * (info.n_embd // info.n_head) * n_head_kv * 2  # K and V, f16
    budget = os.path.getsize(model_path) + members * kv
    return dict(members=members, context_size=context_size, measured_mb=round((pool - empty) / 2**20, 1),
                model_mb=round(os.path.getsize(model_path) / 2**20, 1), kv_cache_mb=round(kv / 2**20, 1),
                one_model_plus_kv_mb=round(budget / 2**20, 1), ratio=round((pool - empty) / budget, 3))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7, help="alternating native/mullama rounds")
    ap.add_argument("--context-size", type=int, default=2048, help="per pool member")
    ap.add_argument("--rss-probe", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_probe is not None:
        anyio.run(pool_probe, mullama.default_model_path(progress=False), args.rss_probe, args.context_size,
                  args.threads)
        return 0

    path = mullama.default_model_path(progress=False)
    with mullama.Model.load(path) as m:
        npp = len(m.tokenize(PROMPT))
    # native and mullama run back to back at each parallelism, round after
    # round: this machine's speed drifts by tens of percent within a minute,
    # and both should see the same drift
    nat: dict = {n: [] for n in PARALLEL}
    ours: dict = {n: [] for n in PARALLEL}
    for _ in range(args.rounds):
        for n in PARALLEL:  # each pair back to back
            nat[n].append(native(path, npp, args.tokens, args.threads, n))
            ours[n].append(anyio.run(aggregate, path, n, args.tokens, args.threads))
    single = statistics.median(ours[1])
    native_single = statistics.median(nat[1])
    for n in PARALLEL:
        ratios = sorted(o / t for o, t in zip(ours[n], nat[n]))
        mine, theirs = statistics.median(ours[n]), statistics.median(nat[n])
        emit(figure="aggregate_tok_s", parallel=n, prompt_tokens=npp, gen_tokens=args.tokens, threads=args.threads,
             mullama=round(mine, 1), native=round(theirs, 1), ratio=round(statistics.median(ratios), 3),
             ratio_min=round(ratios[0], 3), ratio_max=round(ratios[-1], 3), rounds=args.rounds,
             vs_single=round(mine / single, 2), native_vs_single=round(theirs / native_single, 2))
    lat = anyio.run(ttft, path, args.threads)
    emit(figure="ttft_ms", requests=len(lat), slots=4, p50=round(pct(lat, 50), 1), p99=round(pct(lat, 99), 1))
    emit(figure="pool_rss_mb", **pool_rss(path, 4, args.context_size, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
