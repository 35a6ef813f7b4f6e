#!/usr/bin/env python3
"""``mullama serve`` against llama-server: streaming throughput, time to first
token and short requests, in one run, on the same machine, model and slots.

The servers (``bench/_servers.py``), all running for the whole bench:

* ``mullama-uvicorn``: ``mullama serve --backend asyncio``;
* ``mullama-hypercorn``: ``mullama serve --backend trio``;
* ``llama-server``: built from the same pinned llama.cpp source and CPU
  options as mullama, flash attention off as in mullama.

Same model, ``--slots`` slots (requests decoded together) of ``--context``
tokens each, ``--threads`` compute threads (mullama's fixed at that number
unless ``--adaptive``), both with their prompt caches on (their defaults).
One client process (httpx on asyncio, a new connection per request, as
llama-server closes a connection after a stream) drives every server with the
same requests through OpenAI's ``/v1/completions``.

Figures (one JSON line each):

* ``serve_stream`` per server and client count K (1, 4, 16): K clients each
  stream a greedy completion (``--max-tokens``) of a prompt of their own,
  all sent at once (beyond the slots they queue in the server). ``tok_s``:
  the completion tokens of all K (from each stream's usage) over the span from
  the first request sent to the last stream ended; ``ttft_ms_p50`` /
  ``ttft_ms_p99``: request sent to its first non-empty text, over all requests
  of all rounds (queueing included). ``vs_llama_server``: median over rounds
  of tok_s ÷ llama-server's in the same round (range in brackets);
  ``ttft_p99_vs_llama_server``: p99 ÷ llama-server's p99. Targets: ≥ 1.0 and
  ≤ 1.0.
* ``serve_short_requests`` per server: ``--short`` non-streamed completions of
  ``--short-tokens`` tokens, ``--slots`` clients sending them one after
  another: requests/s, latency p50/p99, ``vs_llama_server`` as above.

Prompts are new in every round ("[round.client] " before one of a few story
openings) so that no server answers from a cached prompt of an earlier round.
The servers take turns, their order rotating from round to round, after a
warm-up round; the others are idle meanwhile: after its responses each server
is given the time to finish what it still does (an engine that cannot reuse
decoded KV cells exactly re-evaluates finished requests' tails for its prompt
cache), until it uses under 5% of a core; ``after_cpu_s`` is the CPU time
that took (median of rounds), work an otherwise idle server does between
requests. ``other_cpu_ms_per_request`` (both figures, median of rounds): the
server's CPU time outside its ``--threads`` busiest threads (those computing
llama.cpp's graphs) per request, from its first request sent until it is
idle: HTTP, the event loop, tokenizing (``_servers.CpuSplit``; with
``--adaptive`` mullama's compute spreads over more threads, and the figure
counts some of it). On a machine whose cores all compute, that time is taken
from the compute threads. ``same_text``: the share of
requests whose text equals llama-server's for the same prompt (greedy; both
servers batch differently, so this is informative only); the two mullama
servers must agree with each other (``mullama_texts_agree``).

``--busy N`` runs N CPU-bound processes during the whole measurement;
``--plot FILE`` draws throughput and p99 time to first token against clients.

Usage: python bench/serve_vs_llama_server.py [--rounds 3] [--clients 1 4 16] [--busy 0] [--plot FILE]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import anyio
import httpx

import mullama

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _probes import emit, pct  # noqa: E402
from _servers import CpuSplit, Server, llama_server, llama_server_binary, mullama_serve, sse_chunks  # noqa: E402

SIDES = ("mullama-uvicorn", "mullama-hypercorn", "llama-server")
REFERENCE = "llama-server"
OPENINGS = [
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The history of the old lighthouse on the northern cliff begins in 1850, when",
    "The little robot woke up in an empty workshop and the first thing it saw was",
    "Here is a short guide to growing tomatoes in a small garden. First,",
    "The train left the station at midnight, and in the last carriage a young woman",
    "Dear diary, today was the strangest day of my life. It started when",
    "The expedition reached the foot of the mountain after three weeks of walking, and",
    "In the kitchen of the busy restaurant, the new cook was about to",
]


def progress(msg: str) -> None:
    print(f"[serve vs llama-server] {msg}", file=sys.stderr, flush=True)


def prompt(rnd: int, i: int) -> str:
    return f"[{rnd}.{i}] {OPENINGS[i % len(OPENINGS)]}"


@dataclass
class Reply:
    sent: float
    first: Optional[float] = None  # the first non-empty text
    end: float = 0.0
    tokens: int = 0
    text: str = ""


@dataclass
class Figures:
    """The counted rounds of one (server, clients) figure."""

    tok_s: List[float] = field(default_factory=list)
    ttft_ms: List[float] = field(default_factory=list)
    after_cpu_s: List[float] = field(default_factory=list)  # CPU used after the last response of a round
    other_cpu_ms: List[float] = field(default_factory=list)  # CPU outside the compute threads, per request
    texts: Dict[str, str] = field(default_factory=dict)  # prompt -> text

    def add(self, rate: float, replies: List[Reply], prompts: List[str]) -> None:
        """One counted round of :func:`streams`."""
        self.tok_s.append(rate)
        self.ttft_ms += ttft_of(replies)
        self.texts.update(zip(prompts, (r.text for r in replies)))


def ttft_of(replies: List[Reply]) -> List[float]:
    """The replies' times to first token in ms, sorted."""
    return sorted((r.first - r.sent) * 1e3 for r in replies if r.first is not None)


async def stream_one(client: httpx.AsyncClient, url: str, text: str, max_tokens: int) -> Reply:
    body = {"model": "bench", "prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    reply = Reply(sent=time.perf_counter())
    parts: List[str] = []
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url} answered {response.status_code}: {(await response.aread())[:300]!r}")
        async for chunk in sse_chunks(response):
            for choice in chunk.get("choices") or ():
                if choice.get("text"):
                    parts.append(choice["text"])
                    if reply.first is None:
                        reply.first = time.perf_counter()
            if chunk.get("usage"):
                reply.tokens = chunk["usage"]["completion_tokens"]
    reply.end = time.perf_counter()
    if not reply.tokens or reply.first is None:
        raise RuntimeError(f"{url}: a stream ended without text or usage")
    reply.text = "".join(parts)
    return reply


async def streams(url: str, rnd: int, k: int, max_tokens: int) -> Tuple[float, List[Reply], List[str]]:
    """*k* streams at once: (tokens/s over the span, the replies, their prompts)."""
    prompts = [prompt(rnd, i) for i in range(k)]
    replies: List[Optional[Reply]] = [None] * k
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0),
                                 limits=httpx.Limits(max_connections=k, max_keepalive_connections=0)) as client:
        async def run(i: int) -> None:
            replies[i] = await stream_one(client, url, prompts[i], max_tokens)

        async with anyio.create_task_group() as tg:
            for i in range(k):
                tg.start_soon(run, i)
    done = [r for r in replies if r is not None]
    span = max(r.end for r in done) - min(r.sent for r in done)
    return sum(r.tokens for r in done) / span, done, prompts


async def short_requests(url: str, rnd: int, n: int, workers: int, max_tokens: int) -> Tuple[float, List[float]]:
    """*n* non-streamed completions from *workers* clients in turn: (requests/s, latencies in ms)."""
    latencies: List[float] = []
    counter = iter(range(n))
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0),
                                 limits=httpx.Limits(max_connections=workers, max_keepalive_connections=0)) as client:
        async def worker() -> None:
            for i in counter:
                body = {"model": "bench", "prompt": prompt(rnd, i), "max_tokens": max_tokens, "temperature": 0}
                t0 = time.perf_counter()
                r = await client.post(url + "/v1/completions", json=body)
                if r.status_code != 200:
                    raise RuntimeError(f"{url} answered {r.status_code}: {r.text[:300]}")
                latencies.append((time.perf_counter() - t0) * 1e3)

        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(workers):
                tg.start_soon(worker)
        wall = time.perf_counter() - t0
    return n / wall, latencies


def ratio_summary(ours: Sequence[float], theirs: Sequence[float]) -> Dict[str, float]:
    ratios = sorted(a / b for a, b in zip(ours, theirs))
    return {"vs_llama_server": round(statistics.median(ratios), 3), "vs_llama_server_min": round(ratios[0], 3),
            "vs_llama_server_max": round(ratios[-1], 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="a .gguf file (default: the default model)")
    ap.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES),
                    help=f"servers measured ({REFERENCE} always is)")
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--slots", type=int, default=4, help="requests each server decodes together")
    ap.add_argument("--context", type=int, default=1024, help="tokens per slot")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--adaptive", action="store_true", help="mullama with adaptive threads (its default)")
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds after a warm-up round")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--short", type=int, default=64, help="short requests per server and round (0: none)")
    ap.add_argument("--short-tokens", type=int, default=4)
    ap.add_argument("--busy", type=int, default=0, help="CPU-bound processes running meanwhile")
    ap.add_argument("--plot", type=Path, default=None, help="draw throughput and p99 TTFT against clients here")
    a = ap.parse_args()
    if min(a.clients) < 1 or a.rounds < 1 or a.slots < 1:
        ap.error("--clients, --rounds and --slots must be at least 1")
    path = a.model or mullama.default_model_path(progress=False)
    binary = llama_server_binary()
    sides = [s for s in SIDES if s in a.sides or s == REFERENCE]

    servers: Dict[str, Server] = {}
    busy: List[subprocess.Popen] = []
    try:
        for side in sides:
            progress(f"starting {side}")
            if side == REFERENCE:
                servers[side] = llama_server(binary, path, a.slots, a.context, a.threads)
            else:
                servers[side] = mullama_serve(path, a.slots, a.context, a.threads,
                                              "trio" if side.endswith("hypercorn") else "asyncio",
                                              fixed_threads=not a.adaptive)
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.busy)]
        stream_figs = {(s, k): Figures() for s in sides for k in a.clients}
        short_rate: Dict[str, List[float]] = {s: [] for s in sides}
        short_ms: Dict[str, List[float]] = {s: [] for s in sides}
        short_other_ms: Dict[str, List[float]] = {s: [] for s in sides}
        for rnd in range(a.rounds + 1):  # round 0 warms up
            order = sides[rnd % len(sides):] + sides[:rnd % len(sides)]
            for k in a.clients:
                for side in order:
                    split = CpuSplit(servers[side], a.threads)
                    rate, replies, prompts = anyio.run(streams, servers[side].url, rnd, k, a.max_tokens)
                    after = servers[side].quiesce()
                    other_ms = split.other_seconds() * 1e3 / k
                    ttft = ttft_of(replies)
                    progress(f"round {rnd or 'warm-up'}, {k} client(s), {side}: {rate:.1f} tok/s, "
                             f"TTFT p50 {pct(ttft, 50):.0f} ms, max {ttft[-1]:.0f} ms; {after:.2f} CPU s after; "
                             f"{other_ms:.1f} CPU ms per request outside the compute threads")
                    if rnd:
                        stream_figs[side, k].add(rate, replies, prompts)
                        stream_figs[side, k].after_cpu_s.append(after)
                        stream_figs[side, k].other_cpu_ms.append(other_ms)
            if a.short:
                for side in order:
                    split = CpuSplit(servers[side], a.threads)
                    rate, ms = anyio.run(short_requests, servers[side].url, rnd, a.short, a.slots, a.short_tokens)
                    servers[side].quiesce()
                    other_ms = split.other_seconds() * 1e3 / a.short
                    progress(f"round {rnd or 'warm-up'}, {a.short} short requests, {side}: {rate:.1f} req/s; "
                             f"{other_ms:.1f} CPU ms per request outside the compute threads")
                    if rnd:
                        short_rate[side].append(rate)
                        short_ms[side] += ms
                        short_other_ms[side].append(other_ms)
    finally:
        for p in busy:
            p.kill()
            p.wait()
        for s in servers.values():
            s.close()

    common = dict(rounds=a.rounds, slots=a.slots, threads=a.threads, adaptive=a.adaptive, busy=a.busy)
    mullama_sides = [s for s in sides if s != REFERENCE]
    for k in a.clients:
        ref = stream_figs[REFERENCE, k]
        agree = all(stream_figs[s, k].texts == stream_figs[mullama_sides[0], k].texts for s in mullama_sides)
        for side in sides:
            f = stream_figs[side, k]
            row = dict(figure="serve_stream", server=side, clients=k, max_tokens=a.max_tokens,
                       tok_s=round(statistics.median(f.tok_s), 1), ttft_ms_p50=round(pct(f.ttft_ms, 50), 1),
                       ttft_ms_p99=round(pct(f.ttft_ms, 99), 1),
                       after_cpu_s=round(statistics.median(f.after_cpu_s), 2),
                       other_cpu_ms_per_request=round(statistics.median(f.other_cpu_ms), 2), **common)
            if side != REFERENCE:
                row.update(ratio_summary(f.tok_s, ref.tok_s),
                           ttft_p99_vs_llama_server=round(pct(f.ttft_ms, 99) / pct(ref.ttft_ms, 99), 3),
                           same_text=round(sum(f.texts[p] == ref.texts[p] for p in ref.texts) / len(ref.texts), 2),
                           mullama_texts_agree=agree, targets_met=None)
                row["targets_met"] = row["vs_llama_server"] >= 1.0 and row["ttft_p99_vs_llama_server"] <= 1.0
            emit(**row)
    if a.short:
        for side in sides:
            row = dict(figure="serve_short_requests", server=side, requests=a.short, max_tokens=a.short_tokens,
                       req_s=round(statistics.median(short_rate[side]), 1),
                       ms_p50=round(pct(short_ms[side], 50), 1), ms_p99=round(pct(short_ms[side], 99), 1),
                       other_cpu_ms_per_request=round(statistics.median(short_other_ms[side]), 2), **common)
            if side != REFERENCE:
                row.update(ratio_summary(short_rate[side], short_rate[REFERENCE]))
            emit(**row)
    if a.plot is not None:
        plot(stream_figs, sides, a.clients, a.plot, a.busy)
    return 0


def plot(figs: Dict[Tuple[str, int], Figures], sides: Sequence[str], clients: Sequence[int], out: Path,
         busy: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"mullama-uvicorn": "o-", "mullama-hypercorn": "^-", "llama-server": "s--"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for side in sides:
        left.plot(clients, [statistics.median(figs[side, k].tok_s) for k in clients], styles[side], label=side)
        right.plot(clients, [pct(figs[side, k].ttft_ms, 99) for k in clients], styles[side], label=side)
    for ax, label in ((left, "aggregate tokens/s (median of rounds)"), (right, "time to first token, p99 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(clients), [str(k) for k in clients])
        ax.set_xlabel("streaming clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend()
    fig.suptitle("mullama serve against llama-server, default model" + (f", {busy} busy process(es)" if busy else ""))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    progress(f"plot: {out}")


if __name__ == "__main__":
    sys.exit(main())
