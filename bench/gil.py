#!/usr/bin/env python3
"""Another Python thread's speed while a generation runs: mullama against llama-cpp-python, in one run.

For each llama.cpp thread count (default 1, leaving a core free, and 2), a
spinner thread counts loop iterations while the main thread generates N
tokens greedily, and while it only sleeps for as long; the figure is the ratio
(1.0: the generation costs the other thread nothing). mullama generates with
``Context.generate`` (its loop runs in C without the GIL); llama-cpp-python
(built by bench/peers.py) with ``Llama.generate`` and ``detokenize`` per token,
in its own process. The native figure is the spinner's speed while llama-bench
generates as many tokens in another process (so no GIL is involved: what is
left is the competition for the cores; its window also holds the tool's start
and model load, a few percent of it). They alternate over rounds; medians are
printed as one JSON line per thread count.

Usage: python bench/gil.py [--threads 1 2] [--tokens 256] [--rounds 5] [--reps 3] [--no-peer]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import mullama
from mullama import StreamConfig

from _probes import other_thread_ratio
from decode import llama_tool
from peers import ensure_peer, run_peer


def mullama_ratio(model: mullama.Model, threads: int, tokens: int, reps: int) -> float:
    with model.create_context(context_size=tokens + 16, threads=threads) as ctx:
        bos = model.tokenize("", add_bos=True) or [0]

        def generate() -> None:
            ctx.reset()
            ctx.generate(bos, StreamConfig.greedy(tokens))

        return other_thread_ratio(generate, reps)


def native_ratio(exe, path: str, threads: int, tokens: int, reps: int) -> float:
    cmd = [str(exe), "-m", path, "-p", "0", "-n", str(tokens), "-t", str(threads), "-r", "1", "-fa", "0"]
    return other_thread_ratio(lambda: subprocess.run(cmd, check=True, capture_output=True), reps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a .gguf file (default: the default model)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3, help="busy/idle pairs per round")
    ap.add_argument("--no-peer", action="store_true", help="skip llama-cpp-python")
    args = ap.parse_args()
    path = str(args.model or mullama.default_model_path(progress=False))
    peer = None if args.no_peer else ensure_peer()
    exe = llama_tool("llama-bench")

    with mullama.Model.load(path) as model:
        for threads in args.threads:
            ours, natives, peers = [], [], []
            for r in range(args.rounds):
                ours.append(mullama_ratio(model, threads, args.tokens, args.reps))
                natives.append(native_ratio(exe, path, threads, args.tokens, args.reps))
                if peer is not None:
                    peers.append(run_peer(peer, dict(task="gil", model=path, tokens=args.tokens, threads=threads,
                                                     reps=args.reps))["ratio"])
                print(f"[gil] threads={threads} round {r + 1}: mullama {ours[-1]:.3f}, native {natives[-1]:.3f}"
                      + (f", llama-cpp-python {peers[-1]:.3f}" if peers else ""), file=sys.stderr, flush=True)
            fig = dict(figure="gil_other_thread_speed", threads=threads, tokens=args.tokens, rounds=args.rounds,
                       mullama=round(statistics.median(ours), 3), mullama_min=round(min(ours), 3),
                       mullama_max=round(max(ours), 3), native=round(statistics.median(natives), 3),
                       native_min=round(min(natives), 3), native_max=round(max(natives), 3),
                       target=0.9 if threads == 1 else None)
            if peers:
                fig.update(llama_cpp_python=round(statistics.median(peers), 3),
                           llama_cpp_python_min=round(min(peers), 3), llama_cpp_python_max=round(max(peers), 3))
            print(json.dumps(fig), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
