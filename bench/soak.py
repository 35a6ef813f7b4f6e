#!/usr/bin/env python3
"""Soak mullama.aio: many requests with random cancellations, timeouts and abandoned streams.

Against one AsyncModel (the batching engine) and one ModelPool at once, on
asyncio or trio. Every request ends in one of: a whole completion (greedy, so
its text must equal the one computed up front for its prompt), a cancellation
(a cancel scope left after a random delay), a timeout (``fail_after``), or an
abandoned stream (the consumer leaves after a few tokens). Afterwards nothing
may be left: no request unaccounted for, no KV cells held, no worker running,
no mullama thread alive once the model is closed. A deadlock shows as the
whole run missing its deadline.

Prints one JSON line per backend. Exit code 1 if a check failed.

Usage: python bench/soak.py [--requests 1000] [--backends asyncio,trio] [--model PATH] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Dict

import anyio

TOOLS = Path(__file__).resolve().parent.parent / "tools"
PROMPTS = ["once upon", "hello there", "abc", "The capital of France is", "xyz", "q", "zz top", "mm"]


def expected_texts(model_path: Path, max_tokens: int) -> Dict[str, str]:
    import mullama

    with mullama.Model.load(model_path) as m, m.create_context(512, threads=1) as ctx:
        out = {}
        for p in PROMPTS:
            ctx.reset()
            out[p] = ctx.generate(p, mullama.StreamConfig.greedy(max_tokens)).text
        return out


async def soak(model_path: Path, requests: int, seed: int, max_tokens: int = 48, parallel: int = 24,
               deadline_s: float = 600.0) -> dict:
    """Run *requests* random requests; returns the counts and the checks' results."""
    import mullama
    from mullama.aio import AsyncConfig, AsyncModel, ModelPool

    rng = random.Random(seed)
    expected = await anyio.to_thread.run_sync(expected_texts, model_path, max_tokens)
    cfg = mullama.StreamConfig.greedy(max_tokens)
    outcomes: Counter = Counter()
    wrong = []
    limit = anyio.Semaphore(parallel)
    t0 = time.perf_counter()

    async with await AsyncModel.load(model_path, max_concurrent=4, context_size=512, threads=1,
                                     max_queue=requests, timeout_ms=None) as model, \
            ModelPool(AsyncConfig(model_path, context_size=512, threads=1, timeout_ms=None), 2) as pool:

        async def complete(target: str, prompt: str) -> str:
            if target == "model":
                return await model.generate_text(prompt, config=cfg)
            async with pool.acquire() as member:
                return await member.generate_text(prompt, config=cfg)

        async def stream_some(target: str, prompt: str, keep: int) -> None:
            async def read(stream) -> None:
                seen = 0
                async for _ in stream:
                    seen += 1
                    if seen >= keep:
                        break  # the consumer leaves early

            if target == "model":
                async with model.generate_stream(prompt, cfg) as stream:
                    await read(stream)
            else:
                async with pool.acquire() as member, member.generate_stream(prompt, cfg) as stream:
                    await read(stream)

        async def one(i: int) -> None:
            prompt = rng.choice(PROMPTS)
            target = "pool" if rng.random() < 0.3 else "model"
            kind = rng.choice(["complete", "complete", "cancel", "timeout", "abandon"])
            delay = rng.uniform(0, 0.02)
            async with limit:
                if kind == "complete":
                    text = await complete(target, prompt)
                    if text != expected[prompt]:
                        wrong.append((i, target, prompt, text))
                    outcomes["completed"] += 1
                elif kind == "cancel":
                    with anyio.move_on_after(delay) as scope:
                        await complete(target, prompt)
                    outcomes["cancelled" if scope.cancelled_caught else "completed_before_cancel"] += 1
                elif kind == "timeout":
                    try:
                        with anyio.fail_after(delay):
                            await complete(target, prompt)
                        outcomes["completed_before_timeout"] += 1
                    except TimeoutError:
                        outcomes["timed_out"] += 1
                else:
                    await stream_some(target, prompt, rng.randint(1, 8))
                    outcomes["abandoned"] += 1

        with anyio.fail_after(deadline_s):  # a deadlock shows here
            async with anyio.create_task_group() as tg:
                for i in range(requests):
                    tg.start_soon(one, i)
        left = dict(model_kv=model.kv_used(), model_workers=model.active_workers, model_waiting=model.waiting,
                    pool_kv=pool.kv_used(), pool_in_use=pool.stats().in_use, pool_waiting=pool.stats().waiting)
    threads = [t.name for t in threading.enumerate() if t.name.startswith("mullama")]
    ended = sum(outcomes.values())
    ok = (ended == requests and not wrong and not threads and all(v == 0 for v in left.values()))
    return dict(requests=requests, ended=ended, outcomes=dict(outcomes), wrong_outputs=len(wrong),
                left=left, mullama_threads_alive=threads, seconds=round(time.perf_counter() - t0, 1), ok=ok,
                first_wrong=wrong[:3])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000, help="per backend")
    ap.add_argument("--backends", default="asyncio,trio")
    ap.add_argument("--model", type=Path, default=None, help="default: the tiny generated model")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            sys.path.insert(0, str(TOOLS))
            from tiny_model import write_tiny_model

            path = write_tiny_model(Path(tmp) / "tiny.gguf")
        failed = False
        for backend in args.backends.split(","):
            result = anyio.run(soak, path, args.requests, args.seed, backend=backend)
            print(json.dumps(dict(figure="soak", backend=backend, **result)), flush=True)
            failed |= not result["ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
