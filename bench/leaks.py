#!/usr/bin/env python3
"""Memory over time: RSS across many generations and many load/close cycles,
and live mullama objects back to their baseline afterwards.

Each phase warms up first, then reads RSS before and after its loop:
* ``generations``: sync greedy generations on one context;
* ``async_generations``: AsyncModel requests on the batching engine (asyncio);
* ``load_close``: Model.load + create_context + a short generation + close;
* ``refused_requests``: chat requests of 20,000 messages (~0.7 MB each) to the
  server's app (in process, through httpx's ASGI transport), each answered
  400 ``context_length_exceeded``, with the cyclic garbage collector off
  during the loop: memory comes back by reference counting alone, so a
  request that left its frames in a reference cycle would show as growth.

Prints one JSON line per phase: RSS before/after, growth in percent and MiB,
and the mullama objects alive after the phase that were not alive before.

Usage: python bench/leaks.py [--generations 5000] [--cycles 300] [--refused 200] [--model PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

from _probes import rss

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def live_mullama_objects() -> Counter:
    gc.collect()
    names = Counter()
    for o in gc.get_objects():
        module = getattr(type(o), "__module__", None)  # a descriptor on some builtin types
        if isinstance(module, str) and module.startswith("mullama"):
            names[type(o).__qualname__] += 1
    return names


def figure(name: str, n: int, before: int, after: int, extra: Counter) -> dict:
    return dict(figure="leak", phase=name, iterations=n, rss_before_mb=round(before / 2**20, 1),
                rss_after_mb=round(after / 2**20, 1), growth_mb=round((after - before) / 2**20, 2),
                growth_pct=round(100 * (after - before) / before, 2), extra_objects=dict(extra))


def measure(name: str, step, n: int, warm: int) -> dict:
    for _ in range(warm):
        step()
    gc.collect()
    before_objects, before = live_mullama_objects(), rss()
    for _ in range(n):
        step()
    gc.collect()
    return figure(name, n, before, rss(), live_mullama_objects() - before_objects)


def run(model_path: Path, generations: int, cycles: int, refused: int = 200, tokens: int = 16) -> list:
    import anyio

    import mullama
    from mullama import StreamConfig
    from mullama.aio import AsyncModel

    cfg = StreamConfig.greedy(tokens)
    results = []
    with mullama.Model.load(model_path) as model, model.create_context(256, threads=1) as ctx:
        def gen() -> None:
            ctx.reset()
            ctx.generate("once upon a time", cfg)

        results.append(measure("generations", gen, generations, max(50, generations // 20)))

    async def async_phase() -> dict:
        async with await AsyncModel.load(model_path, max_concurrent=4, context_size=256, threads=1) as amodel:
            async def batch(k: int) -> None:
                async with anyio.create_task_group() as tg:
                    for _ in range(k):
                        tg.start_soon(amodel.generate, "once upon a time", None, cfg)

            warm, n = max(50, generations // 20), generations
            for _ in range(warm // 4):
                await batch(4)
            gc.collect()
            before_objects, before = live_mullama_objects(), rss()
            for _ in range(n // 4):
                await batch(4)
            gc.collect()
            return figure("async_generations", n // 4 * 4, before, rss(), live_mullama_objects() - before_objects)

    results.append(anyio.run(async_phase))

    def cycle() -> None:
        with mullama.Model.load(model_path) as m, m.create_context(64, threads=1) as c:
            c.generate("ab", StreamConfig.greedy(2))

    results.append(measure("load_close", cycle, cycles, max(10, cycles // 10)))

    async def refused_phase() -> dict:
        from mullama.server import create_app

        body = json.dumps({"messages": [{"role": "user", "content": "hi"}] * 20000}).encode()
        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
        async with await AsyncModel.load(model_path, context_size=256, threads=1) as amodel:
            app = create_app(amodel, model_id="tiny", chat_template="chatml")

            async def one() -> None:
                # the app called as an ASGI server would, with nothing kept here
                incoming = [{"type": "http.request", "body": body, "more_body": False}]
                status = []

                async def receive() -> dict:
                    if incoming:
                        return incoming.pop()
                    await anyio.sleep_forever()

                async def send(message: dict) -> None:
                    if message["type"] == "http.response.start":
                        status.append(message["status"])

                await app(scope, receive, send)
                if status != [400]:
                    raise RuntimeError(f"expected a 400, got {status}")

            for _ in range(10):
                await one()
            before_objects = live_mullama_objects()
            gc.disable()
            try:
                for _ in range(5):  # the allocator's working set for one request, with the collector off
                    await one()
                before = rss()
                for _ in range(refused):
                    await one()
                after = rss()
            finally:
                gc.enable()
            return figure("refused_requests", refused, before, after, live_mullama_objects() - before_objects)

    results.append(anyio.run(refused_phase))
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generations", type=int, default=5000)
    ap.add_argument("--cycles", type=int, default=300)
    ap.add_argument("--refused", type=int, default=200, help="refused requests (the server app)")
    ap.add_argument("--model", type=Path, default=None, help="default: the tiny generated model")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            sys.path.insert(0, str(TOOLS))
            from tiny_model import write_tiny_model

            path = write_tiny_model(Path(tmp) / "tiny.gguf")
        for r in run(path, args.generations, args.cycles, args.refused):
            print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
