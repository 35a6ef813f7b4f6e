#!/usr/bin/env python3
"""mullama on Ray Serve against ``mullama serve`` alone: what Serve's proxy
(and the router of several models) costs, one replica of 2 threads against 2
replicas of 1 thread, and how soon a client that leaves frees its slot through Serve.

Four servers of the same model, all up for the whole bench, measured in turn
(the others idle), their order rotating by round after a warm-up round:

* ``serve``: ``mullama serve`` (uvicorn), ``--threads`` threads, ``--slots`` slots;
* ``ray-1x2``: a local Ray cluster, Serve's HTTP proxy, one replica of
  ``--threads`` threads and ``--slots`` slots (``mullama.ray``);
* ``ray-2x1``: the same cluster, two replicas of ``--threads / 2`` threads and
  ``--slots / 2`` slots each (the same slots in all);
* ``ray-router``: the same cluster, an application of two models, so that requests
  cross the router (``mullama-router``) on their way to ``bench``, one replica as
  ``ray-1x2``'s (the other model, 1 thread, stays idle).

Every thread count is fixed (``adaptive_threads`` off), so the three compute
alike; the Ray cluster gets as many logical CPUs as the replicas reserve.

Figures (one JSON line each):

* ``ray_stream`` per server and client count K: K clients each stream a greedy
  completion of ``--max-tokens`` tokens at once, as in
  ``serve_vs_llama_server.py``: aggregate ``tok_s``, TTFT p50/p99 over all
  rounds; ``vs_serve``: median over rounds of tok_s ÷ ``serve``'s in the same
  round (range in brackets), and ``ttft_p99_vs_serve``; ``server_cpu_ms_per_token``:
  the CPU time of the server's process (a Ray side's replicas) per token streamed,
  ``proxy_cpu_ms_per_token`` Serve's proxy's, ``router_cpu_ms_per_token`` the
  router's (mean of rounds), and for a Ray side ``proxy_cpu_share``, the proxy's
  and router's over the replicas'. Target: Serve's proxy costs
  ≤ 10% of a replica's streaming (``target_met``: ``proxy_cpu_share`` ≤ 0.10;
  ``vs_serve`` ≥ 0.90 is the same target by wall time, which this 2-core
  machine's noise blurs).
* ``ray_cancel`` per single-replica server (``serve``, ``ray-1x2``): a stream
  is read until its ``--cancel-after``-th token, then its connection closed;
  ``cancel_ms``: from the close to the replica's ``/health`` showing no active
  request (polled every 2 ms, so ±2 ms and one poll's round trip), p50/p99
  over ``--cancels`` streams a round; ``token_ms``: the stream's mean interval
  between tokens before the close. Target (Ray): p99 ≤ token_ms + 50 ms.

``--busy N`` runs N CPU-bound processes during the whole measurement.

Usage: python bench/ray_scale.py [--rounds 3] [--clients 1 4 8] [--busy 0]
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Dict, List, Tuple

import anyio
import httpx

import mullama
from mullama.aio import AsyncConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _probes import emit, pct  # noqa: E402
from _servers import cpu_seconds, free_port, mullama_serve  # noqa: E402
from serve_vs_llama_server import Figures, streams, ttft_of  # noqa: E402

SIDES = ("serve", "ray-1x2", "ray-2x1", "ray-router")
COUNT = "1, 2, 3, 4, 5, 6,"  # the default model counts on, greedy, for hundreds of tokens


def progress(msg: str) -> None:
    print(f"[ray scale] {msg}", file=sys.stderr, flush=True)


def pids_of(title: str) -> List[int]:
    """The processes whose command line (a Ray worker's title) contains *title*."""
    out = subprocess.run(["pgrep", "-f", title], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if int(p) != os.getpid()]


def ray_apps(path: Path, slots: int, context: int, threads: int, stack: ExitStack) -> Dict[str, str]:
    """Both Ray sides on one local cluster: their base URLs."""
    import ray
    from ray import serve

    from mullama.ray import AppConfig, ModelDeployment, deployed

    os.environ.setdefault("RAY_worker_niceness", "0")  # (as mullama.ray.deployed does)
    ray.init(num_cpus=4 * threads, include_dashboard=False, log_to_driver=False)  # (what the replicas reserve)
    stack.callback(ray.shutdown)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    stack.callback(serve.shutdown)
    urls = {}
    for side, replicas in (("ray-1x2", 1), ("ray-2x1", 2)):
        config = AsyncConfig(path, context_size=context, threads=threads // replicas,
                             max_concurrent=slots // replicas, adaptive_threads=False)
        app = AppConfig(models=(ModelDeployment(config, name="bench", replicas=replicas),),
                        name=side, route_prefix=f"/{side}", port=port)
        urls[side] = stack.enter_context(deployed(app))
    # two models behind the router: "bench" as ray-1x2's, and an idle second one
    bench = AsyncConfig(path, context_size=context, threads=threads, max_concurrent=slots, adaptive_threads=False)
    other = AsyncConfig(path, context_size=context, threads=1, max_concurrent=1)
    app = AppConfig(models=(ModelDeployment(bench, name="bench"), ModelDeployment(other, name="other")),
                    name="ray-router", route_prefix="/ray-router", port=port)
    urls["ray-router"] = stack.enter_context(deployed(app))
    return urls


async def cancel_once(url: str, text: str, after: int, max_tokens: int) -> Tuple[float, float]:
    """(ms from closing the stream to /health showing no active request, mean ms between its tokens)."""
    body = {"model": "bench", "prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    async with httpx.AsyncClient(timeout=60) as client:
        times: List[float] = []
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"{url} answered {response.status_code}: {(await response.aread())[:300]!r}")
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    times.append(time.perf_counter())
                    if len(times) > after:
                        break
        if len(times) <= after:
            raise RuntimeError(f"{url}: the stream ended after {len(times)} tokens, before it was left")
        closed = time.perf_counter()  # (leaving the block closed the connection)
        while (await client.get(url + "/health")).json()["active"]:
            await anyio.sleep(0.002)
            if time.perf_counter() - closed > 30:
                raise RuntimeError(f"{url}: the request was still active 30 s after its client left")
        freed = time.perf_counter()
    return (freed - closed) * 1e3, (times[-1] - times[1]) / (len(times) - 2) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="a .gguf file (default: the default model)")
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 4, 8])
    ap.add_argument("--slots", type=int, default=4, help="requests decoded together, all replicas of a side")
    ap.add_argument("--context", type=int, default=1024, help="tokens per slot")
    ap.add_argument("--threads", type=int, default=2, help="threads of a side (split between its replicas)")
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds after a warm-up round")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--cancels", type=int, default=10, help="cancelled streams per side and round")
    ap.add_argument("--cancel-after", type=int, default=16, help="tokens read before a stream is left")
    ap.add_argument("--busy", type=int, default=0, help="CPU-bound processes running meanwhile")
    a = ap.parse_args()
    if a.threads < 2 or a.threads % 2 or a.slots < 2 or a.slots % 2:
        ap.error("--threads and --slots must be even (the 2-replica side splits them)")
    path = a.model or mullama.default_model_path(progress=False)

    figs = {(s, k): Figures() for s in SIDES for k in a.clients}
    cancel_ms: Dict[str, List[float]] = {"serve": [], "ray-1x2": []}
    token_ms: Dict[str, List[float]] = {"serve": [], "ray-1x2": []}
    cpu_ms: Dict[Tuple[str, int, str], float] = collections.defaultdict(float)  # summed over rounds
    busy: List[subprocess.Popen] = []
    with ExitStack() as stack:
        progress("starting mullama serve")
        server = stack.enter_context(mullama_serve(path, a.slots, a.context, a.threads))
        progress("starting the Ray cluster and deploying")
        urls = {"serve": server.url, **ray_apps(path, a.slots, a.context, a.threads, stack)}
        # whose CPU time per token is counted: the server, or a Ray side's replicas and Serve's proxy
        pids = {"serve": {"server": [server.proc.pid]},
                **{side: {"server": pids_of(f"ServeReplica:{side}:bench"), "proxy": pids_of("ray::ProxyActor")}
                   for side in ("ray-1x2", "ray-2x1", "ray-router")}}
        pids["ray-router"]["router"] = pids_of("ServeReplica:ray-router:mullama-router")
        progress(f"processes measured: {pids}")
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.busy)]
        stack.callback(lambda: [(p.kill(), p.wait()) for p in busy])
        for rnd in range(a.rounds + 1):  # round 0 warms up
            order = SIDES[rnd % len(SIDES):] + SIDES[:rnd % len(SIDES)]
            for k in a.clients:
                for side in order:
                    cpu0 = {who: sum(cpu_seconds(p) for p in ps) for who, ps in pids[side].items()}
                    rate, replies, prompts = anyio.run(streams, urls[side], rnd, k, a.max_tokens)
                    tokens = sum(r.tokens for r in replies)
                    progress(f"round {rnd or 'warm-up'}, {k} client(s), {side}: {rate:.1f} tok/s, "
                             f"TTFT p50 {pct(ttft_of(replies), 50):.0f} ms")
                    if rnd:
                        figs[side, k].add(rate, replies, prompts)
                        for who, ps in pids[side].items():
                            cpu_ms[side, k, who] += (sum(cpu_seconds(p) for p in ps) - cpu0[who]) * 1e3 / tokens
            for side in [s for s in order if s in cancel_ms]:
                for i in range(a.cancels):
                    ms, tok = anyio.run(cancel_once, urls[side], COUNT, a.cancel_after,
                                        a.context // 2)
                    if rnd:
                        cancel_ms[side].append(ms)
                        token_ms[side].append(tok)
                if a.cancels:
                    progress(f"round {rnd or 'warm-up'}, cancellations, {side}: "
                             f"max {max(cancel_ms[side] or [0]):.1f} ms so far")

    common = dict(rounds=a.rounds, slots=a.slots, threads=a.threads, busy=a.busy, max_tokens=a.max_tokens)
    for k in a.clients:
        ref = figs["serve", k]
        for side in SIDES:
            f = figs[side, k]
            ratios = sorted(x / y for x, y in zip(f.tok_s, ref.tok_s))
            row = dict(figure="ray_stream", server=side, clients=k, tok_s=round(statistics.median(f.tok_s), 1),
                       ttft_ms_p50=round(pct(f.ttft_ms, 50), 1), ttft_ms_p99=round(pct(f.ttft_ms, 99), 1),
                       vs_serve=round(statistics.median(ratios), 3), vs_serve_min=round(ratios[0], 3),
                       vs_serve_max=round(ratios[-1], 3),
                       ttft_p99_vs_serve=round(pct(f.ttft_ms, 99) / pct(ref.ttft_ms, 99), 3),
                       same_text_as_serve=round(sum(f.texts[p] == ref.texts[p] for p in ref.texts) / len(ref.texts),
                                                2), **common)
            for who in ("server", "proxy", "router"):
                if (side, k, who) in cpu_ms:
                    row[f"{who}_cpu_ms_per_token"] = round(cpu_ms[side, k, who] / a.rounds, 2)
            if side != "serve":
                overhead = cpu_ms[side, k, "proxy"] + cpu_ms.get((side, k, "router"), 0.0)
                row["proxy_cpu_share"] = round(overhead / cpu_ms[side, k, "server"], 3)
                row["target_met"] = row["proxy_cpu_share"] <= 0.10
            emit(**row)
    for side, ms in cancel_ms.items():
        if not ms:  # (--cancels 0)
            continue
        tok = statistics.median(token_ms[side])
        row = dict(figure="ray_cancel", server=side, cancels=len(ms), cancel_ms_p50=round(pct(ms, 50), 1),
                   cancel_ms_p99=round(pct(ms, 99), 1), token_ms=round(tok, 1), **common)
        if side != "serve":
            row["target_met"] = pct(ms, 99) <= tok + 50
        emit(**row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
