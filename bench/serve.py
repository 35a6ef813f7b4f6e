#!/usr/bin/env python3
"""End-to-end streaming throughput of ``mullama serve`` against the in-process
async API, in one run, on the same machine and model.

Figure ``serve_stream_throughput`` (one JSON line per server mode and client
count): K clients (1 and 4) each stream a greedy completion of its own prompt
at once, and the aggregate rate is the completion tokens of all K over the
wall time from the first request sent to the last one finished.

* server side: a ``mullama serve`` subprocess (asyncio = uvicorn, trio =
  hypercorn; 4 slots, context 1024), driven from this process by
  ``httpx.AsyncClient`` streaming POSTs to ``/v1/completions`` (server-sent
  events, tokens counted from the final usage chunk), the client running on
  the same event loop library as the server;
* in-process side: ``AsyncModel.generate_stream`` on a model loaded in this
  process with the same settings, read with ``TokenStream.batches()``.

Figure ``serve_short_request_latency`` (one JSON line per server mode): the
latency of short requests on a kept-alive connection, where per-request
overheads show (a response whose head and body leave in two TCP segments
waits ~40 ms for the client's delayed ACK unless the server sets TCP_NODELAY):
``GET /health`` and a non-streamed one-token completion, median and p99 over
``--short-requests`` requests each; ``ratio`` = the server's one-token
completion / the same completion in process (median).

The two sides never run at the same time (each is idle while the other runs);
they alternate, one round each after a warm-up round of each. ``ratio`` =
server / in-process tokens/s: median over rounds with its min and max;
``outputs_match``: every text of both sides equals the in-process warm-up text
for the same prompt (greedy decoding is deterministic, batched or not).

Usage: python bench/serve.py [--model PATH] [--modes asyncio trio] [--clients 1 4]
                             [--rounds 5] [--max-tokens 128] [--short-requests 200]
"""

from __future__ import annotations

import argparse
import queue
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Dict, Iterator, List, Sequence, Tuple

import anyio
import httpx
from anyio.streams.buffered import BufferedByteReceiveStream

import mullama
from mullama import StreamConfig
from mullama.aio import AsyncModel

from _probes import emit
from _servers import sse_chunks

PROMPTS = [  # each runs to 128 tokens on the default model (greedy)
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The history of the old lighthouse on the northern cliff begins in 1850, when",
    "The little robot woke up in an empty workshop and the first thing it saw was",
    "Here is a short guide to growing tomatoes in a small garden. First,",
]
SERVERS = {"asyncio": "uvicorn", "trio": "hypercorn"}
MAX_CONCURRENT, CONTEXT_SIZE, TARGET = 4, 1024, 0.9
Result = Tuple[float, int, List[str]]  # tokens/s, completion tokens, text per client


@dataclass
class Samples:
    """The counted rounds of one (mode, clients) figure."""

    server: List[float] = field(default_factory=list)  # tokens/s
    inprocess: List[float] = field(default_factory=list)
    tokens: List[int] = field(default_factory=list)  # completion tokens per round, both sides
    match: bool = True


def progress(msg: str) -> None:
    print(f"[serve bench] {msg}", file=sys.stderr, flush=True)


@contextmanager
def server(model: Path, mode: str) -> Iterator[Tuple[str, str]]:
    """A ``mullama serve`` subprocess on a free port: yields (base URL ending in /v1, model id)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mullama", "serve", "--model", str(model), "--port", "0", "--backend", mode,
         "--max-concurrent", str(MAX_CONCURRENT), "--max-queue", "64", "--context-size", str(CONTEXT_SIZE),
         "--no-access-log", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: "queue.Queue[str]" = queue.Queue()

    def pump() -> None:  # drains the pipe for the server's whole life
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.put(line)

    pumper = threading.Thread(target=pump, daemon=True)
    pumper.start()
    try:
        seen: List[str] = []
        deadline = time.monotonic() + 120
        while True:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mullama serve did not start: {''.join(seen)}") from None
                continue
            seen.append(line)
            m = re.search(r"serving '(.*)' at (http://\S+/v1) \((\w+), (\w+)\)", line)
            if m:
                assert (m.group(3), m.group(4)) == (mode, SERVERS[mode]), line
                break
        yield m.group(2), m.group(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            progress(f"the {mode} server did not stop within 30 s: killing it")
            proc.kill()
            proc.wait()
        pumper.join(timeout=5)
        proc.stdout.close()  # type: ignore[union-attr]


async def concurrently(prompts: Sequence[str], one: Callable[[str], Awaitable[Tuple[int, str]]]) -> Result:
    """Run ``one(prompt)`` -> (tokens, text) for all prompts at once; (tokens/s, tokens, texts)."""
    out: List[Tuple[int, str]] = [(0, "")] * len(prompts)

    async def run(i: int) -> None:
        out[i] = await one(prompts[i])

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(len(prompts)):
            tg.start_soon(run, i)
    wall = time.perf_counter() - t0
    total = sum(n for n, _ in out)
    return total / wall, total, [text for _, text in out]


async def via_server(client: httpx.AsyncClient, model_id: str, prompts: Sequence[str], max_tokens: int) -> Result:
    async def one(prompt: str) -> Tuple[int, str]:
        body = {"model": model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        text: List[str] = []
        tokens = -1
        async with client.stream("POST", "/completions", json=body) as response:
            response.raise_for_status()
            async for chunk in sse_chunks(response):
                if chunk["choices"]:
                    text.append(chunk["choices"][0]["text"])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        if tokens < 0:
            raise RuntimeError("the stream ended without a usage chunk")
        return tokens, "".join(text)

    return await concurrently(prompts, one)


async def in_process(model: AsyncModel, prompts: Sequence[str], max_tokens: int) -> Result:
    config = StreamConfig.greedy(max_tokens)

    async def one(prompt: str) -> Tuple[int, str]:
        tokens, text = 0, []
        async with model.generate_stream(prompt, config) as stream:
            async for batch in stream.batches():
                tokens += len(batch)
                text.extend(t.text for t in batch)
        return tokens, "".join(text)

    return await concurrently(prompts, one)


def quantiles(ms: List[float]) -> Tuple[float, float]:
    """(median, p99) of *ms*."""
    ms = sorted(ms)
    return statistics.median(ms), ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]


async def short_requests(model: AsyncModel, client: httpx.AsyncClient, model_id: str, n: int) -> Dict[str, float]:
    """Latencies (ms) of short requests on one kept-alive connection, and the in-process peer."""
    health: List[float] = []
    served: List[float] = []
    native: List[float] = []
    body = {"model": model_id, "prompt": PROMPTS[0], "max_tokens": 1, "temperature": 0}
    # /health back to back through plain HTTP/1.1 exchanges on one socket (the request in one
    # write): the pattern in which the client's kernel delays its ACKs, so that a second segment
    # the server's Nagle algorithm holds back waits ~40 ms
    host, port = client.base_url.host, client.base_url.port
    raw = await anyio.connect_tcp(host, port)
    reader = BufferedByteReceiveStream(raw)
    for i in range(n + 5):  # back to back; the first 5: warm-up
        t0 = time.perf_counter()
        await raw.send(b"GET /health HTTP/1.1\r\nhost: bench\r\n\r\n")
        head = await reader.receive_until(b"\r\n\r\n", 65536)
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"/health answered {head[:40]!r}")
        await reader.receive_exactly(length)
        if i >= 5:
            health.append((time.perf_counter() - t0) * 1e3)
    for i in range(n + 5):
        t1 = time.perf_counter()
        (await client.post("/completions", json=body)).raise_for_status()
        t2 = time.perf_counter()
        await model.generate(PROMPTS[0], config=StreamConfig.greedy(1))
        t3 = time.perf_counter()
        if i >= 5:
            served.append((t2 - t1) * 1e3)
            native.append((t3 - t2) * 1e3)
    await raw.aclose()
    (h50, h99), (s50, s99), (n50, n99) = quantiles(health), quantiles(served), quantiles(native)
    return dict(health_ms_median=h50, health_ms_p99=h99, completion_ms_median=s50, completion_ms_p99=s99,
                inprocess_ms_median=n50, inprocess_ms_p99=n99)


async def bench_mode(path: Path, url: str, model_id: str, clients: Sequence[int], rounds: int,
                     max_tokens: int, n_short: int) -> Tuple[Dict[int, Samples], Dict[str, float]]:
    """Warm-up, then *rounds* alternating rounds per client count; raw samples per client
    count; then the short requests."""
    samples = {k: Samples() for k in clients}
    reference: Dict[str, str] = {}
    progress("loading the in-process model")
    async with await AsyncModel.load(path, max_concurrent=MAX_CONCURRENT, context_size=CONTEXT_SIZE) as model, \
            httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300.0)) as client:
        for r in range(rounds + 1):  # round 0: warm-up, not counted
            for k in clients:
                prompts = PROMPTS[:k]
                srv = await via_server(client, model_id, prompts, max_tokens)
                inp = await in_process(model, prompts, max_tokens)
                for prompt, text in zip(prompts, inp[2]):
                    reference.setdefault(prompt, text)
                s = samples[k]
                s.match &= all(reference[p] == a == b for p, a, b in zip(prompts, srv[2], inp[2]))
                progress(f"round {r or 'warm-up'}, {k} client(s): server {srv[0]:.1f} tok/s ({srv[1]} tokens), "
                         f"in-process {inp[0]:.1f} tok/s ({inp[1]} tokens)")
                if r:
                    s.server.append(srv[0])
                    s.inprocess.append(inp[0])
                    s.tokens += [srv[1], inp[1]]
        progress(f"{n_short} short requests")
        short = await short_requests(model, client, model_id, n_short)
    return samples, short


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="a .gguf file (default: the default model)")
    ap.add_argument("--modes", nargs="+", choices=list(SERVERS), default=list(SERVERS))
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 4], choices=range(1, len(PROMPTS) + 1))
    ap.add_argument("--rounds", type=int, default=5, help="alternating server/in-process rounds")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--short-requests", type=int, default=200, help="requests of each kind for the latencies")
    args = ap.parse_args()
    path = args.model or mullama.default_model_path(progress=False)

    for mode in args.modes:
        progress(f"starting the {mode} server ({SERVERS[mode]})")
        with server(path, mode) as (url, model_id):
            samples, short = anyio.run(bench_mode, path, url, model_id, args.clients, args.rounds, args.max_tokens,
                                       args.short_requests, backend=mode)
        for k in args.clients:
            s = samples[k]
            ratios = sorted(a / b for a, b in zip(s.server, s.inprocess))
            emit(figure="serve_stream_throughput", mode=mode, server=SERVERS[mode], clients=k,
                 ratio_median=round(statistics.median(ratios), 3), ratio_min=round(ratios[0], 3),
                 ratio_max=round(ratios[-1], 3), server_tok_s=round(statistics.median(s.server), 1),
                 inprocess_tok_s=round(statistics.median(s.inprocess), 1), rounds=args.rounds,
                 max_tokens=args.max_tokens, completion_tokens=round(statistics.median(s.tokens)),
                 outputs_match=s.match, target=TARGET)
        emit(figure="serve_short_request_latency", mode=mode, server=SERVERS[mode], requests=args.short_requests,
             ratio=round(short["completion_ms_median"] / short["inprocess_ms_median"], 3),
             **{k: round(v, 2) for k, v in short.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
