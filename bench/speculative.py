#!/usr/bin/env python3
"""Speculative decoding (prompt lookup) on the default model: its speed-up on
input-grounded work, its cost on free-form text, against llama-bench's decode
speed in the same run.

Tasks (greedy, the model's chat template):

* ``edit``: "rewrite this file with one change", a chat request: the first
  ``--lines`` lines of a Python file of this repository
  (mullama/_engine.py), one method renamed, the whole file asked back;
* ``copy``: the same file, then its new version continued from its first
  line (plain completion, as an editor applying an edit prompts);
* ``free``: free-form text that does not repeat its prompt.

Each round runs every task without and with speculation, one after the other
(``Context.generate``; ``--engine`` also the batching engine of
``AsyncModel``), and llama-bench's tg (``-p 0 -n 64 -d DEPTH``, the native loop's
decode speed at the task's context) on the same model and threads. Figures (one JSON line each):

* ``speculative_tok_s``: per task, generated tokens per second of the
  generation phase, median over rounds: plain, speculative, their ratio
  (``speedup``, with its range), speculative over llama-bench's tg at the
  task's context depth (``-d``: the prompt and half the reply;
  ``vs_llama_bench``), the acceptance rate, and ``identical``: the
  speculative output equalled the plain one in every round (greedy);
* with ``--plot FILE``: speed-up against acceptance rate, every (task,
  round, max_draft) point, for docs/performance.md.

``--busy N`` runs N CPU-bound processes during the whole measurement.

Usage: python bench/speculative.py [--rounds 3] [--lines 300] [--threads 2] [--engine] [--busy 0] [--plot FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import anyio  # noqa: E402

import mullama  # noqa: E402
from mullama import Message, SpeculativeConfig, StreamConfig  # noqa: E402
from mullama._chat import chat_tokens  # noqa: E402
from _probes import emit  # noqa: E402
from decode import llama_tool  # noqa: E402


def msg(role: str, content: str) -> Message:
    return {"role": role, "content": content}


def tasks(model: "mullama.Model", lines: int) -> Dict[str, Tuple[List[int], int]]:
    """Each task's prompt tokens and max_tokens."""
    source = "\n".join((ROOT / "mullama" / "_engine.py").read_text().splitlines()[:lines])
    names = re.findall(r"^    def (\w+)\(", source, flags=re.M)
    old = max(names, key=source.count) if names else "submit"
    file_tokens = len(model.tokenize(source, add_bos=False))
    first = source.splitlines()[0]
    return {
        # the example, as a chat request (the reply is the file: max_tokens lets it end, not loop on)
        "edit": (chat_tokens(model, [
            msg("system", "You are a careful code editor. You output the whole file and nothing else."),
            msg("user", f"Rename the method `{old}` to `{old}_now` everywhere in this file. Output the whole "
                        f"file.\n\n```python\n{source}\n```")]), file_tokens + 32),
        # an editor's "apply": the file, then its new version continued from its first line
        "copy": (model.tokenize(f"# file: engine.py (original)\n{source}\n\n# file: engine_v2.py (the same "
                                f"file, with `{old}` renamed to `{old}_now`)\n{first}\n"), file_tokens + 16),
        "free": (chat_tokens(model, [msg("user", "Write a short story about a lighthouse keeper who finds a "
                                                 "message in a bottle. Make it vivid and original.")]), 400),
    }


def native_tg(exe: Path, model: Path, threads: int, depth: int) -> float:
    """llama-bench's tg (-n 64, median of 2) after *depth* tokens of context (-d)."""
    cmd = [str(exe), "-m", str(model), "-p", "0", "-n", "64", "-d", str(depth), "-t", str(threads), "-r", "2",
           "-fa", "0", "-o", "jsonl"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return statistics.median(rows[-1].get("samples_ts") or [rows[-1]["avg_ts"]])


def run(ctx: "mullama.Context", prompt: List[int], max_tokens: int,
        spec: Optional[SpeculativeConfig]) -> mullama.Completion:
    ctx.reset()
    return ctx.generate(prompt, StreamConfig.greedy(max_tokens, speculative=spec))


async def run_engine(model_path: Path, prompt: List[int], max_tokens: int, threads: int, n_ctx: int,
                     spec: Optional[SpeculativeConfig]) -> mullama.Completion:
    from mullama.aio import AsyncModel

    async with await AsyncModel.load(model_path, context_size=n_ctx, max_concurrent=1, threads=threads,
                                     prompt_cache_bytes=0, timeout_ms=None) as model:
        return await model.generate(prompt, config=StreamConfig.greedy(max_tokens, speculative=spec))


def rate(c: mullama.Completion) -> float:
    return c.timings.tokens_per_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lines", type=int, default=300, help="lines of the file the edit task rewrites")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-draft", type=int, nargs="+", default=[16],
                    help="max_draft settings measured (the first one is the figures'; all go into the plot)")
    ap.add_argument("--engine", action="store_true", help="also measure the batching engine (AsyncModel)")
    ap.add_argument("--only", nargs="+", choices=["edit", "copy", "free"], default=None)
    ap.add_argument("--busy", type=int, default=0, help="CPU-bound processes running meanwhile")
    ap.add_argument("--plot", type=Path, default=None, help="write the speed-up against acceptance plot here")
    a = ap.parse_args()

    path = mullama.default_model_path(progress=False)
    exe = llama_tool("llama-bench")
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.busy)]
    points: List[Tuple[str, int, float, float]] = []  # (task, max_draft, acceptance, speed-up)
    try:
        with mullama.Model.load(path) as model:
            prompts = {k: (p, min(n, model.info.n_ctx_train - len(p))) for k, (p, n) in tasks(model, a.lines).items()
                       if a.only is None or k in a.only}
            n_ctx = max(len(p) + n for p, n in prompts.values())
            rows: Dict[Tuple[str, str], List[float]] = {}
            same: Dict[str, bool] = {}
            with model.create_context(context_size=n_ctx, threads=a.threads) as ctx:
                for r in range(a.rounds):
                    for name, (prompt, n) in prompts.items():
                        # the native loop's decode speed at this task's context: a depth of its prompt and
                        # half its reply (decoding slows down as the context grows)
                        native = native_tg(exe, path, a.threads, len(prompt) + n // 2)
                        rows.setdefault((name, "native"), []).append(native)
                        plain = run(ctx, prompt, n, None)
                        rows.setdefault((name, "plain"), []).append(rate(plain))
                        for i, d in enumerate(a.max_draft):
                            spec = run(ctx, prompt, n, SpeculativeConfig(max_draft=d))
                            speedup = rate(spec) / rate(plain)
                            points.append((name, d, spec.timings.acceptance_rate, speedup))
                            same[name] = same.get(name, True) and spec.tokens == plain.tokens
                            if i == 0:
                                rows.setdefault((name, "spec"), []).append(rate(spec))
                                rows.setdefault((name, "speedup"), []).append(speedup)
                                rows.setdefault((name, "vs_native"), []).append(rate(spec) / native)
                                rows.setdefault((name, "acceptance"), []).append(spec.timings.acceptance_rate)
                                rows.setdefault((name, "tokens"), []).append(len(spec.tokens))
                            print(f"[speculative] round {r + 1}/{a.rounds} {name} max_draft={d}: "
                                  f"{len(plain.tokens)} tokens, plain {rate(plain):.1f} tok/s, speculative "
                                  f"{rate(spec):.1f} tok/s ({speedup:.2f}x), acceptance "
                                  f"{spec.timings.acceptance_rate:.2f}, llama-bench tg {native:.1f}, "
                                  f"identical {spec.tokens == plain.tokens}", file=sys.stderr, flush=True)
                        if a.engine:
                            ep = anyio.run(run_engine, path, prompt, n, a.threads, n_ctx, None)
                            es = anyio.run(run_engine, path, prompt, n, a.threads, n_ctx,
                                           SpeculativeConfig(max_draft=a.max_draft[0]))
                            rows.setdefault((name, "engine_speedup"), []).append(rate(es) / rate(ep))
                            rows.setdefault((name, "engine_vs_native"), []).append(rate(es) / native)
                            same[name] = same[name] and es.tokens == ep.tokens == plain.tokens
            for name in prompts:
                med = {k: statistics.median(rows[(name, k)]) for k in ("plain", "spec", "acceptance", "tokens")}
                speedups = sorted(rows[(name, "speedup")])
                extra = {}
                if a.engine:
                    extra = dict(engine_speedup=round(statistics.median(rows[(name, "engine_speedup")]), 3),
                                 engine_vs_llama_bench=round(statistics.median(rows[(name, "engine_vs_native")]), 3))
                emit(figure="speculative_tok_s", task=name, busy=a.busy, threads=a.threads, max_draft=a.max_draft[0],
                     tokens=int(med["tokens"]), plain=round(med["plain"], 1), speculative=round(med["spec"], 1),
                     speedup=round(statistics.median(speedups), 3), speedup_min=round(speedups[0], 3),
                     speedup_max=round(speedups[-1], 3),
                     vs_llama_bench=round(statistics.median(rows[(name, "vs_native")]), 3),
                     llama_bench_tg=round(statistics.median(rows[(name, "native")]), 1),
                     acceptance=round(med["acceptance"], 3), identical=same[name], rounds=a.rounds, **extra)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    if a.plot is not None:
        plot(points, a.plot, a.busy)
    return 0


def plot(points: List[Tuple[str, int, float, float]], out: Path, busy: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for task, marker in (("edit", "o"), ("copy", "s"), ("free", "^")):
        pts = [(acc, s) for t, _, acc, s in points if t == task]
        if pts:
            ax.plot(*zip(*pts), marker, linestyle="", label=task)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("acceptance rate (accepted / drafted tokens)")
    ax.set_ylabel("speed-up over plain decoding")
    ax.set_title("Prompt-lookup speculation, default model" + (f", {busy} busy process(es)" if busy else ""))
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"[speculative] plot written to {out}", file=sys.stderr)


if __name__ == "__main__":
    t0 = time.perf_counter()
    rc = main()
    print(f"[speculative] {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    sys.exit(rc)
