#!/usr/bin/env python3
"""Single-stream decode speed: mullama against llama.cpp's llama-bench, in one run.

Builds ``llama-bench`` from the same pinned llama.cpp source (cached, outside
the package build), then measures on the default model and on the tiny
generated model:

* native: ``llama-bench -p 0 -n N`` (tg: one token per llama_decode, no sampling);
* mullama: ``Context.generate`` greedy from a one-token prompt, timing the
  generation phase (decode + greedy sampling + token-to-piece + Python side);
* per-token overhead (figure ``per_token_overhead_us``): each binding's time
  per generated token minus llama-bench's, median over rounds (what the
  binding adds to every token; most visible on the tiny model);
* prompt processing (figure ``prompt_tok_s``): ``llama-bench -p P -n 0`` against
  ``Context.eval`` of a P-token prompt, both in batches of 512.

* with ``--peer``: llama-cpp-python built from the same pinned sdist in its own
  environment (bench/peers.py), greedy ``Llama.generate`` with detokenize per
  token, timed the same way.

They alternate over several rounds (this machine's speed drifts by tens of
percent within a minute). Prints one JSON line per figure; ``ratio`` is the
median over rounds of mullama / native, with its range (``peer_ratio`` the
same for llama-cpp-python / native).

Usage: python bench/decode.py [--rounds 7] [--reps 3] [--tokens 128] [--threads 2] [--tiny-threads 2] [--peer]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import mullama  # noqa: E402
from mullama import StreamConfig  # noqa: E402
from _probes import emit, prompt_rate, prompt_tokens  # noqa: E402
from peers import ensure_peer, run_peer  # noqa: E402


def llama_tool(name: str) -> Path:
    """llama.cpp's ``llama-bench`` or ``llama-batched-bench``, built (cached) from the pinned source."""
    import build_llama_cpp

    bdir = build_llama_cpp.build(("llama-bench", "llama-batched-bench"), tools=True)
    exe = bdir / "bin" / name
    if not exe.is_file():
        raise SystemExit(f"{name} was not built in {bdir}")
    return exe


def native_rate(exe: Path, model: Path, kind: str, tokens: int, threads: int, reps: int) -> float:
    """Median tokens/s of llama-bench's tg (decode) or pp (prompt) test (it runs its own warm-up)."""
    p, n = (0, tokens) if kind == "tg" else (tokens, 0)
    cmd = [str(exe), "-m", str(model), "-p", str(p), "-n", str(n), "-t", str(threads), "-b", "512", "-ub", "512",
           "-r", str(reps), "-fa", "0", "-o", "jsonl"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    samples = rows[-1].get("samples_ts") or [rows[-1]["avg_ts"]]
    return statistics.median(samples)


def mullama_tg(ctx, tokens: int, reps: int) -> float:
    """Median tokens/s of greedy generation (generation phase only) on *ctx*."""
    rates = []
    bos = ctx.model.tokenize("", add_bos=True) or [0]
    cfg = StreamConfig.greedy(tokens)
    for i in range(reps + 1):  # the first run is the warm-up
        ctx.reset()
        t0 = time.perf_counter()
        done = ctx.generate(bos, cfg)
        elapsed = done.timings.generation_ms / 1e3 or (time.perf_counter() - t0)
        if i:
            rates.append(len(done.tokens) / elapsed)
    return statistics.median(rates)


def mullama_pp(ctx, tokens: int, reps: int) -> float:
    """Median tokens/s of evaluating a *tokens*-long prompt (batches of 512) on *ctx*."""
    return prompt_rate(ctx.reset, ctx.eval, prompt_tokens(ctx.model.n_vocab, tokens), reps)


def compare(exe: Path, path: Path, kind: str, tokens: int, threads: int, rounds: int, reps: int,
            peer: Optional[Path] = None) -> dict:
    """Native, mullama (and the peer) in alternating rounds, so that the machine's drift hits all alike.

    *kind* is ``"tg"`` (decode from one token) or ``"pp"`` (a *tokens*-long prompt)."""
    natives, ours, peers = [], [], []
    ours_fn = mullama_tg if kind == "tg" else mullama_pp
    with mullama.Model.load(path) as model, model.create_context(context_size=tokens + 16, threads=threads,
                                                                  batch_size=512) as ctx:
        for r in range(rounds):
            natives.append(native_rate(exe, path, kind, tokens, threads, reps))
            ours.append(ours_fn(ctx, tokens, reps))
            if peer is not None:
                peers.append(run_peer(peer, dict(task="decode" if kind == "tg" else "prompt", model=str(path),
                                                 tokens=tokens, threads=threads, reps=reps))["tok_s"])
            print(f"[decode] {path.name} {kind} round {r + 1}/{rounds}: mullama {ours[-1]:.0f}, native "
                  f"{natives[-1]:.0f}" + (f", llama-cpp-python {peers[-1]:.0f}" if peers else "") + " tok/s",
                  file=sys.stderr, flush=True)
    out = dict(mullama=round(statistics.median(ours), 1), native=round(statistics.median(natives), 1),
               **_ratios("ratio", ours, natives), rounds=rounds)
    if peers:
        out.update(llama_cpp_python=round(statistics.median(peers), 1), **_ratios("peer_ratio", peers, natives))
    if kind == "tg":  # time per token above the native loop's, round by round
        out["overhead_us"] = dict(native=round(statistics.median(1e6 / n for n in natives), 2),
                                  mullama=_overhead_us(ours, natives))
        if peers:
            out["overhead_us"]["llama_cpp_python"] = _overhead_us(peers, natives)
    return out


def _overhead_us(values: List[float], natives: List[float]) -> float:
    return round(statistics.median(1e6 / v - 1e6 / n for v, n in zip(values, natives)), 2)


def _ratios(name: str, values: List[float], natives: List[float]) -> dict:
    ratios = sorted(v / n for v, n in zip(values, natives))
    return {name: round(statistics.median(ratios), 3), f"{name}_min": round(ratios[0], 3),
            f"{name}_max": round(ratios[-1], 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7, help="alternating native/mullama rounds")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per round")
    ap.add_argument("--tokens", type=int, default=128, help="tokens decoded")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="prompt length of the prompt figure")
    ap.add_argument("--threads", type=int, default=2, help="threads on the default model")
    ap.add_argument("--tiny-threads", type=int, default=2, help="threads on the tiny model")
    ap.add_argument("--peer", action="store_true",
                    help="also measure llama-cpp-python (built once from the pinned sdist: bench/peers.py)")
    args = ap.parse_args()

    exe = llama_tool("llama-bench")
    peer = ensure_peer() if args.peer else None
    from tiny_model import write_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tiny = write_tiny_model(Path(tmp) / "tiny.gguf")
        cases = [("default", mullama.default_model_path(progress=False), args.threads),
                 ("tiny", tiny, args.tiny_threads)]
        for name, path, threads in cases:
            tg = compare(exe, path, "tg", args.tokens, threads, args.rounds, args.reps, peer)
            overhead = tg.pop("overhead_us")
            emit(figure="decode_tok_s", model=name, threads=threads, tokens=args.tokens, **tg)
            emit(figure="per_token_overhead_us", model=name, threads=threads, native_us_per_token=overhead["native"],
                 **{k: v for k, v in overhead.items() if k != "native"})
            emit(figure="prompt_tok_s", model=name, threads=threads, tokens=args.prompt_tokens,
                 **compare(exe, path, "pp", args.prompt_tokens, threads, args.rounds, args.reps, peer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
