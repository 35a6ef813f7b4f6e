#!/usr/bin/env python3
"""Async streaming against sync streaming, and cancellation latency, in one run.

Figures (one JSON line each):

* ``stream_tok_s``: tokens/s of ``AsyncModel.generate_stream`` under asyncio
  and under trio against the sync ``Context.stream`` on the same model
  (greedy, same prompt, same token count; median over rounds that interleave
  the three); ``ratio`` = async / sync.
* ``cancel_latency_ms``: time from cancelling a request to the moment its
  ``async with`` has exited (its worker thread is done and the context is
  free), during decode and during a 2,000-token prompt evaluation; p50/p99
  over many cancellations at random moments, with the decode token time and
  the target measured in the same run.

Usage: python bench/async_overhead.py [--reps 5] [--tokens 256] [--cancels 50]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import mullama  # noqa: E402
from mullama import StreamConfig  # noqa: E402
from mullama.aio import AsyncModel  # noqa: E402

PROMPT = "Once upon a time"


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def pct(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def sync_stream_rate(path: Path, tokens: int, reps: int, threads: int) -> List[float]:
    """tokens/s of *reps* sync streams (after one warm-up)."""
    cfg = StreamConfig.greedy(tokens)
    rates = []
    with mullama.Model.load(path) as model, model.create_context(context_size=tokens + 64, threads=threads) as ctx:
        for i in range(reps + 1):
            ctx.reset()
            t0 = time.perf_counter()
            n = sum(1 for _ in ctx.stream(PROMPT, cfg))
            if i:
                rates.append(n / (time.perf_counter() - t0))
    return rates


async def async_stream_rate(path: Path, tokens: int, reps: int, threads: int) -> List[float]:
    """tokens/s of *reps* async streams (after one warm-up)."""
    cfg = StreamConfig.greedy(tokens)
    rates = []
    async with await AsyncModel.load(path, context_size=tokens + 64, threads=threads, max_concurrent=1) as model:
        for i in range(reps + 1):
            t0 = time.perf_counter()
            n = 0
            async with model.generate_stream(PROMPT, cfg) as stream:
                async for _ in stream:
                    n += 1
            if i:
                rates.append(n / (time.perf_counter() - t0))
    return rates


def stream_rates(path: Path, tokens: int, rounds: int, threads: int) -> Dict[str, float]:
    """Median tokens/s of sync, asyncio and trio streaming, measured in interleaved
    rounds so that drift of the machine affects all three alike."""
    samples: Dict[str, List[float]] = {"sync": [], "asyncio": [], "trio": []}
    for _ in range(rounds):
        samples["sync"] += sync_stream_rate(path, tokens, 2, threads)
        for backend in ("asyncio", "trio"):
            samples[backend] += anyio.run(async_stream_rate, path, tokens, 2, threads, backend=backend)
    return {k: statistics.median(v) for k, v in samples.items()}


async def cancel_latencies(path: Path, phase: str, count: int, threads: int) -> list:
    """Cancel *count* requests at random moments of *phase* ("decode" or "prefill")."""
    rng = random.Random(1)
    out = []
    async with await AsyncModel.load(path, context_size=4096, threads=threads, max_concurrent=1,
                                     timeout_ms=None) as model:
        long_prompt = (await model.tokenize("word " * 4000))[:2000]
        for _ in range(count):
            marks = {}
            with anyio.CancelScope() as scope:
                if phase == "decode":
                    async with model.generate_stream(PROMPT, StreamConfig.greedy(3000)) as stream:
                        stop_at = rng.randint(5, 40)
                        async for tok in stream:
                            if tok.position >= stop_at:
                                marks["cancel"] = time.perf_counter()
                                scope.cancel()
                else:
                    async def cancel_later():
                        await anyio.sleep(rng.uniform(0.01, 0.3))
                        marks["cancel"] = time.perf_counter()
                        scope.cancel()

                    async with anyio.create_task_group() as tg:
                        tg.start_soon(cancel_later)
                        async with model.generate_stream(long_prompt, StreamConfig.greedy(1)) as stream:
                            async for _ in stream:
                                pass
                        tg.cancel_scope.cancel()  # the prefill finished first: not a sample
            end = time.perf_counter()
            assert model.active_workers == 0
            if "cancel" in marks and scope.cancelled_caught:
                out.append((end - marks["cancel"]) * 1e3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="interleaved rounds (2 runs each)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--cancels", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from tiny_model import write_tiny_model

    default = mullama.default_model_path(progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = write_tiny_model(Path(tmp) / "tiny.gguf")
        for name, path, tokens in (("default", default, args.tokens), ("tiny", tiny, 2000)):
            rates = stream_rates(path, tokens, args.reps, args.threads)
            for backend in ("asyncio", "trio"):
                emit(figure="stream_tok_s", model=name, backend=backend, tokens=tokens,
                     async_=round(rates[backend], 1), sync=round(rates["sync"], 1),
                     ratio=round(rates[backend] / rates["sync"], 3))

    token_ms = 1e3 / statistics.median(sync_stream_rate(default, 64, 3, args.threads))
    for backend in ("asyncio", "trio"):
        for phase, target in (("decode", token_ms + 10), ("prefill", 50.0)):
            lat = anyio.run(cancel_latencies, default, phase, args.cancels, args.threads, backend=backend)
            emit(figure="cancel_latency_ms", backend=backend, phase=phase, samples=len(lat),
                 p50=round(pct(lat, 50), 2), p99=round(pct(lat, 99), 2), max=round(max(lat), 2),
                 token_ms=round(token_ms, 2), target_p99=round(target, 2), met=pct(lat, 99) <= target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
