#!/usr/bin/env python3
"""Model load time and memory: mullama against the bare llama.cpp calls and llama-cpp-python, in one run.

Figures (one JSON line each), on the default model (its file in the page
cache: the warm-up load puts it there):

* ``load_ms``: median time to a model ready to generate, in two stages:
  ``model`` (mullama's ``Model.load``, which checks the file first, against
  ``llama_model_load_from_file`` alone, called through ``_core`` with nothing
  around it) and ``model_context`` (the same plus a context of
  ``--context-size`` tokens: ``create_context`` against
  ``llama_init_from_model`` alone, and llama-cpp-python's ``Llama(...)``, which
  always creates both). The three alternate over rounds.
* ``pool_rss_mb``: resident memory of a 4-member ModelPool (each member has
  generated) over a process with mullama imported and no model, against one
  model (its file size) plus 4 KV caches (f16 K and V for ``--context-size``
  tokens, from the model's metadata); ``ratio`` = measured / that sum
  (target <= 1.15).
* ``rss_per_member_mb``: what one more concurrent model user costs:
  (RSS with 4 - RSS with 1) / 3 for mullama's pool members, for
  llama-cpp-python ``Llama`` objects, and for bare llama.cpp contexts on one
  model (``llama_init_from_model`` through ``_core``, nothing around it: the
  native figure); each has evaluated the prompt and 32 more tokens.

Each RSS comes from a fresh process.

Usage: python bench/load.py [--rounds 5] [--reps 3] [--context-size 2048] [--threads 2] [--no-peer]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "bench"))

import mullama  # noqa: E402
from mullama import StreamConfig, _core  # noqa: E402
from _probes import emit, rss  # noqa: E402
from peers import ensure_peer, run_peer  # noqa: E402

PROMPT = "The history of the city begins with a small village by the river, where farmers and traders lived"
MEMBERS = 4


def timed(fn: Callable[[], None], reps: int) -> float:
    """Median seconds of *reps* calls of *fn*."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def load_times(path: Path, context_size: int, threads: int, reps: int) -> Dict[str, float]:
    """Median seconds of each way to load, after a warm-up load."""
    spath = str(path)

    def mullama_model() -> None:
        mullama.Model.load(path).close()

    def mullama_context() -> None:
        with mullama.Model.load(path) as model:
            model.create_context(context_size=context_size, threads=threads).close()

    def native_model() -> None:
        _core.LlamaModel.load(spath).close()

    def native_context() -> None:
        model = _core.LlamaModel.load(spath)
        _core.LlamaContext(model, context_size, 512, threads, threads).close()
        model.close()

    mullama_context()  # warm-up: the file is in the page cache from here on
    return {name: timed(fn, reps) for name, fn in (("mullama_model", mullama_model), ("native_model", native_model),
                                                   ("mullama_context", mullama_context),
                                                   ("native_context", native_context))}


async def pool_probe(model_path: Path, members: int, context_size: int, threads: int) -> None:
    """(In a fresh process) print the RSS with *members* pool members that have each generated."""
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


def probe_rss(kind: str, n: int, context_size: int, threads: int) -> int:
    """RSS of a fresh process running ``--{kind}-probe n``."""
    out = subprocess.run([sys.executable, __file__, f"--{kind}-probe", str(n), "--context-size", str(context_size),
                          "--threads", str(threads)], check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1])


def kv_cache_bytes(path: Path, context_size: int) -> int:
    """f16 K and V for *context_size* tokens, from the model's metadata."""
    with mullama.Model.load(path) as m:
        meta, info = m.metadata(), m.info
    n_head_kv = int(meta.get(f"{info.architecture}.attention.head_count_kv", info.n_head))
    return 2 * info.n_layer * context_size * (info.n_embd // info.n_head) * n_head_kv * 2


def native_probe(model_path: Path, contexts: int, context_size: int, threads: int) -> None:
    """(In a fresh process) print the RSS with one model and *contexts* bare llama.cpp contexts,
    each having evaluated the prompt and 32 single tokens."""
    model = _core.LlamaModel.load(str(model_path))
    prompt = mullama.Model(model, False).tokenize(PROMPT)
    ctxs = [_core.LlamaContext(model, context_size, 512, threads, threads) for _ in range(contexts)]
    for ctx in ctxs:
        ctx.claim()
        ctx.decode(prompt)
        for i in range(32):
            ctx.decode(prompt[i % len(prompt):][:1])
        ctx.release()
    print(rss())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="alternating mullama/native/peer rounds")
    ap.add_argument("--reps", type=int, default=3, help="loads of each kind per round")
    ap.add_argument("--context-size", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-peer", action="store_true", help="skip llama-cpp-python")
    ap.add_argument("--pool-probe", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--native-probe", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    path = mullama.default_model_path(progress=False)
    if args.pool_probe is not None:
        anyio.run(pool_probe, path, args.pool_probe, args.context_size, args.threads)
        return 0
    if args.native_probe is not None:
        native_probe(path, args.native_probe, args.context_size, args.threads)
        return 0
    peer = None if args.no_peer else ensure_peer()
    task = dict(model=str(path), prompt=PROMPT, threads=args.threads, n_ctx=args.context_size)

    samples: Dict[str, List[float]] = {}
    for r in range(args.rounds):
        got = load_times(path, args.context_size, args.threads, args.reps)
        if peer is not None:
            got["peer_context"] = run_peer(peer, dict(task, task="load", reps=args.reps))["load_s"]
        for k, v in got.items():
            samples.setdefault(k, []).append(v * 1e3)
        print(f"[load] round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in got.items()),
              file=sys.stderr, flush=True)
    ms = {k: round(statistics.median(v), 1) for k, v in samples.items()}
    emit(figure="load_ms", stage="model", mullama=ms["mullama_model"], native=ms["native_model"],
         llama_cpp_python=None, ratio=round(ms["mullama_model"] / ms["native_model"], 3), rounds=args.rounds)
    emit(figure="load_ms", stage=f"model + {args.context_size}-token context", mullama=ms["mullama_context"],
         native=ms["native_context"], llama_cpp_python=ms.get("peer_context"),
         ratio=round(ms["mullama_context"] / ms["native_context"], 3),
         peer_ratio=round(ms["peer_context"] / ms["native_context"], 3) if "peer_context" in ms else None,
         rounds=args.rounds)

    print("[load] memory: fresh processes with 0, 1 and 4 pool members, 1 and 4 bare contexts ...", file=sys.stderr,
          flush=True)
    empty, one, pool = (probe_rss("pool", n, args.context_size, args.threads) for n in (0, 1, MEMBERS))
    native_one, native_pool = (probe_rss("native", n, args.context_size, args.threads) for n in (1, MEMBERS))
    kv = kv_cache_bytes(path, args.context_size)
    budget = os.path.getsize(path) + MEMBERS * kv
    mib = 2 ** 20
    emit(figure="pool_rss_mb", members=MEMBERS, context_size=args.context_size,
         measured_mb=round((pool - empty) / mib, 1), model_mb=round(os.path.getsize(path) / mib, 1),
         kv_cache_mb=round(kv / mib, 1), one_model_plus_kv_mb=round(budget / mib, 1),
         ratio=round((pool - empty) / budget, 3), target=1.15)
    fig = dict(figure="rss_per_member_mb", context_size=args.context_size, kv_cache_mb=round(kv / mib, 1),
               mullama=round((pool - one) / (MEMBERS - 1) / mib, 1),
               native=round((native_pool - native_one) / (MEMBERS - 1) / mib, 1))
    if peer is not None:
        p1, p4 = (run_peer(peer, dict(task, task="rss", members=n))["rss"] for n in (1, MEMBERS))
        fig.update(llama_cpp_python=round((p4 - p1) / (MEMBERS - 1) / mib, 1))
    emit(**fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
