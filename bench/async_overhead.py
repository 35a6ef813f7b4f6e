#!/usr/bin/env python3
"""Async streaming against sync streaming and the native loop, and cancellation latency, in one run.

Figures (one JSON line each):

* ``stream_tok_s``: tokens/s of ``AsyncModel.generate_stream`` under asyncio
  and under trio against the sync ``Context.stream`` on the same model, and
  against llama-bench's tg (the native loop, no prompt) for the same token
  count (greedy, same prompt, same token count; rounds interleave all of
  them); ``ratio`` = async / sync and ``vs_native`` = async / native, each the
  median of the per-round ratios, with its range. With the peer,
  llama-cpp-python's streaming ``create_completion``, sync and async the way
  its server streams (each chunk fetched in a worker thread; see
  bench/_peer_llama_cpp.py), in the same rounds.
* ``cancel_latency_ms``: time from cancelling a request (at a random moment
  after its first token, or at a random moment of a 2,000-token prompt
  evaluation) to the moment its ``async with`` has exited (its worker thread
  is done and the model free for the next request); p50/p99 and every sample,
  with the decode token time and the target measured in the same run, for
  mullama and (with the peer) llama-cpp-python. llama.cpp's own tools cannot
  cancel a request: one decode step (``token_ms``) is the native reference.

Usage: python bench/async_overhead.py [--reps 5] [--tokens 256] [--cancels 50] [--peer-prefill-cancels 8]
                                      [--no-peer]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
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
from decode import llama_tool, native_rate  # noqa: E402
from peers import ensure_peer, run_peer  # noqa: E402
from _probes import cancel_latency_ms, emit, pct  # noqa: E402

PROMPT = "Once upon a time"
PREFILL_TOKENS = 2000
DELAYS_S = {"decode": (0.02, 0.3), "prefill": (0.01, 0.3)}  # the cancel's random moment


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


def stream_rates(path: Path, tokens: int, rounds: int, threads: int, exe: Path,
                 peer: Optional[Path]) -> List[Dict[str, float]]:
    """Tokens/s of sync, asyncio and trio streaming, native and the peer's, one dict per round
    (medians within the round): the rounds interleave them so that drift of the machine affects
    all alike, and ratios are taken within each round."""
    out = []
    for r in range(rounds):
        got = {"sync": sync_stream_rate(path, tokens, 2, threads)}
        for backend in ("asyncio", "trio"):
            got[backend] = anyio.run(async_stream_rate, path, tokens, 2, threads, backend=backend)
        got["native"] = [native_rate(exe, path, "tg", tokens, threads, 2)]
        if peer is not None:
            rates = run_peer(peer, dict(task="stream", model=str(path), prompt=PROMPT, tokens=tokens,
                                        threads=threads, reps=2))
            got.update({f"peer_{k}": [v] for k, v in rates.items()})
        out.append({k: statistics.median(v) for k, v in got.items()})
        print(f"[async_overhead] {path.name} round {r + 1}/{rounds}: "
              + ", ".join(f"{k} {v:.0f}" for k, v in out[-1].items()), file=sys.stderr, flush=True)
    return out


def per_round(rounds: List[Dict[str, float]], name: str, num: str, den: str) -> dict:
    """The median over rounds of rounds[num] / rounds[den] as *name*, with its range."""
    ratios = sorted(r[num] / r[den] for r in rounds)
    return {name: round(statistics.median(ratios), 3), f"{name}_min": round(ratios[0], 3),
            f"{name}_max": round(ratios[-1], 3)}


async def cancel_latencies(path: Path, phase: str, count: int, threads: int) -> list:
    """Cancel *count* requests at random moments of *phase* ("decode": after the first token,
    or "prefill": during a 2,000-token prompt)."""
    rng = random.Random(1)
    out = []
    async with await AsyncModel.load(path, context_size=4096, threads=threads, max_concurrent=1,
                                     timeout_ms=None) as model:
        long_prompt = (await model.tokenize("word " * 4000))[:PREFILL_TOKENS]
        prompt, max_tokens = (PROMPT, 3000) if phase == "decode" else (long_prompt, 1)

        async def consume(on_token) -> None:
            async with model.generate_stream(prompt, StreamConfig.greedy(max_tokens)) as stream:
                async for _ in stream:
                    on_token()

        for _ in range(count):
            ms = await cancel_latency_ms(consume, phase, DELAYS_S[phase], rng)
            assert model.active_workers == 0
            if ms is not None:
                out.append(ms)
    return out


def latency_fields(lat: List[float]) -> dict:
    return dict(samples=len(lat), p50=round(pct(lat, 50), 2), p99=round(pct(lat, 99), 2), max=round(max(lat), 2),
                samples_ms=[round(x, 3) for x in lat])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="interleaved rounds (2 runs each)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--cancels", type=int, default=50)
    ap.add_argument("--peer-prefill-cancels", type=int, default=8,
                    help="llama-cpp-python cannot abort a prompt: each of its samples lasts a whole prefill")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-peer", action="store_true", help="skip llama-cpp-python")
    args = ap.parse_args()

    from tiny_model import write_tiny_model

    exe = llama_tool("llama-bench")
    peer = None if args.no_peer else ensure_peer()
    default = mullama.default_model_path(progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = write_tiny_model(Path(tmp) / "tiny.gguf")
        for name, path, tokens in (("default", default, args.tokens), ("tiny", tiny, 2000)):
            rounds = stream_rates(path, tokens, args.reps, args.threads, exe, peer)
            rate = {k: round(statistics.median(r[k] for r in rounds), 1) for k in rounds[0]}
            for backend in ("asyncio", "trio"):
                fig = dict(figure="stream_tok_s", model=name, backend=backend, tokens=tokens, mullama=rate[backend],
                           mullama_sync=rate["sync"], native=rate["native"],
                           **per_round(rounds, "ratio", backend, "sync"),
                           **per_round(rounds, "vs_native", backend, "native"),
                           sync_vs_native=per_round(rounds, "r", "sync", "native")["r"], rounds=args.reps)
                if peer is not None:
                    fig.update(llama_cpp_python=rate[f"peer_{backend}"], llama_cpp_python_sync=rate["peer_sync"],
                               peer_ratio=per_round(rounds, "r", f"peer_{backend}", "peer_sync")["r"],
                               peer_vs_native=per_round(rounds, "r", f"peer_{backend}", "native")["r"])
                emit(**fig)

    token_ms = 1e3 / statistics.median(sync_stream_rate(default, 64, 3, args.threads))
    for backend in ("asyncio", "trio"):
        for phase, target in (("decode", token_ms + 10), ("prefill", 50.0)):
            print(f"[async_overhead] cancellation during {phase} under {backend} ...", file=sys.stderr, flush=True)
            lat = anyio.run(cancel_latencies, default, phase, args.cancels, args.threads, backend=backend)
            fig = dict(figure="cancel_latency_ms", backend=backend, phase=phase, binding="mullama",
                       **latency_fields(lat), token_ms=round(token_ms, 2), target_p99=round(target, 2),
                       met=pct(lat, 99) <= target)
            emit(**fig)
            if peer is not None:
                count = args.cancels if phase == "decode" else args.peer_prefill_cancels
                lat = run_peer(peer, dict(task="cancel", model=str(default), prompt=PROMPT, threads=args.threads,
                                          phase=phase, count=count, prefill_tokens=PREFILL_TOKENS,
                                          delay_s=DELAYS_S[phase], backend=backend))["latency_ms"]
                emit(**dict(fig, binding="llama-cpp-python", **latency_fields(lat), met=pct(lat, 99) <= target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
