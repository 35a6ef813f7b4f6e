#!/usr/bin/env python3
"""Every benchmark in one run, on this machine: figures collected as JSON lines and a markdown table.

Runs, one after the other (never two at once: they would share the 2 cores),
each bench script of this folder and keeps what it prints:

* ``decode.py --peer``: single-stream decode and prompt tokens/s, mullama /
  llama-bench / llama-cpp-python, default and tiny model, and the per-token
  overhead;
* ``gil.py``: another Python thread's speed during a generation, mullama /
  llama-bench (another process) / llama-cpp-python;
* ``async_overhead.py``: async streaming (asyncio, trio) against sync and
  native, and cancellation latency during decode and prefill, mullama /
  llama-cpp-python;
* ``concurrency.py``: aggregate throughput at 1/2/4/8 requests against
  llama-batched-bench and llama-cpp-python, time to first token under load;
* ``load.py``: model load time, RSS of a 4-member pool, RSS per extra member;
* ``serve.py``: ``mullama serve`` end to end against the in-process API;
* ``contention.py``: throughput under competing CPU load (0, 1, 2 busy
  processes, another llama-bench), mullama's defaults against fixed thread
  counts, llama-bench and llama-batched-bench;
* ``structured.py``: the cost per token of a JSON schema's grammar, mullama
  against llama-server;
* ``cache.py``: the prompt cache (a 10-turn chat's time to first token, a
  shared system prompt, n=4 choices, a memory soak), mullama against
  llama-server with ``cache_prompt``;
* ``speculative.py``: prompt-lookup speculative decoding against plain
  decoding and llama-bench's tg at the same context depth;
* ``serve_vs_llama_server.py``: ``mullama serve`` (uvicorn and hypercorn)
  against llama-server, 1/4/16 streaming clients and short requests;
* ``ray_scale.py``: ``mullama serve`` on Ray Serve (1 replica x 2 threads, 2
  replicas x 1 thread) against ``mullama serve`` alone, and cancellation
  through Serve's proxy (needs the ``ray`` extra);
* ``handoff.py``: the batching engine with its hand-off overlapped with the
  next decode step (a variant made in the bench) against the engine as it is.

Output goes to ``bench/results/<UTC time>/``: ``figures.jsonl`` (every line,
tagged with its script), ``summary.md`` (one table per figure name, the
machine described, the plots linked), three PNG plots (``throughput.png``:
aggregate throughput against concurrent requests, with the native curve;
``cancel_latency.png``: the cancellation latency distributions;
``contention.png``: throughput against competing load) and each
script's stderr log. Progress lines of the scripts are echoed as they come.
``--quick`` runs fewer rounds (to check the pipeline, not for numbers). A
script that fails is reported and the others still run. ``--plot DIR`` redraws
the plots and summary of an earlier run.

Needs the ``bench`` extra: ``pip install -e ".[bench]"``.

Usage: python bench/run_all.py [--quick] [--only decode gil ...] [--plot DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent

#: script -> (arguments, arguments with --quick)
SCRIPTS: Dict[str, tuple] = {
    "decode": (["--peer"], ["--peer", "--rounds", "1", "--reps", "1"]),
    "gil": ([], ["--rounds", "1", "--reps", "1"]),
    "async_overhead": ([], ["--reps", "1", "--cancels", "10", "--peer-prefill-cancels", "2"]),
    "concurrency": ([], ["--rounds", "1"]),
    "load": ([], ["--rounds", "1", "--reps", "1"]),
    "serve": ([], ["--rounds", "1"]),
    "contention": ([], ["--rounds", "1", "--tokens", "24", "--cap", "5", "--steps", "12"]),
    "structured": ([], ["--rounds", "1", "--max-tokens", "32"]),
    "cache": ([], ["--rounds", "1", "--turns", "4", "--reply-tokens", "32", "--think", "0.5", "--shared", "4",
                   "--soak", "100"]),
    "speculative": (["--engine"], ["--rounds", "1", "--lines", "40", "--only", "edit", "free"]),
    "serve_vs_llama_server": ([], ["--rounds", "1", "--clients", "1", "4", "--max-tokens", "32", "--short", "16"]),
    "ray_scale": ([], ["--rounds", "1", "--clients", "1", "4", "--max-tokens", "32", "--cancels", "3"]),
    "handoff": ([], ["--pairs", "1", "--requests", "4", "--threads", "2", "--tokens", "32"]),
}


def machine() -> str:
    """The CPU, the cores this process may use, Python and the OS."""
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.exists():
        cpu = next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores, Python {platform.python_version()}, {platform.system()} {platform.release()}"


def table(rows: List[dict]) -> str:
    keys: List[str] = []
    for row in rows:  # lists (raw samples) stay in figures.jsonl
        keys += [k for k in row if k not in keys and k not in ("figure", "script") and not isinstance(row[k], list)]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join("" if r.get(k) is None else str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


PEERS = (("mullama", "mullama", "o-"), ("native", "llama.cpp (llama-batched-bench)", "s--"),
         ("llama_cpp_python", "llama-cpp-python", "^:"))


def plot_throughput(figures: List[dict], out: Path) -> bool:
    """Aggregate generated tokens/s against concurrent requests, one line per binding."""
    import matplotlib.pyplot as plt

    rows = sorted((f for f in figures if f["figure"] == "aggregate_tok_s"), key=lambda f: f["parallel"])
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, label, style in PEERS:
        points = [(r["parallel"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["parallel"] for r in rows], [str(r["parallel"]) for r in rows])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("generated tokens/s, all requests")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Aggregate decode throughput ({rows[0]['gen_tokens']} tokens each, {rows[0]['threads']} threads)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


def plot_cancel(figures: List[dict], out: Path) -> bool:
    """The distribution (empirical CDF) of cancellation latencies, one panel per phase."""
    import matplotlib.pyplot as plt

    rows = [f for f in figures if f["figure"] == "cancel_latency_ms" and f.get("samples_ms")]
    phases = sorted({r["phase"] for r in rows}, key=["decode", "prefill"].index)
    if not rows:
        return False
    fig, axes = plt.subplots(1, len(phases), figsize=(6.0 * len(phases), 4.2), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        for r in (r for r in rows if r["phase"] == phase):
            values = sorted(r["samples_ms"])
            ys = [(i + 1) / len(values) for i in range(len(values))]
            style = "-" if r.get("binding", "mullama") == "mullama" else "--"
            ax.step(values, ys, style, where="post", label=f"{r.get('binding', 'mullama')}, {r['backend']}")
        target = next(r["target_p99"] for r in rows if r["phase"] == phase)
        ax.axvline(target, color="grey", linestyle=":", label=f"target p99 ({target:g} ms)")
        ax.set_xscale("log")
        ax.set_xlabel("cancel → model free (ms, log scale)")
        ax.set_ylabel("fraction of cancellations")
        ax.set_title(f"Cancellation during {phase}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


CONTENTION = (("mullama", "mullama (defaults)", "o-"), ("mullama_t1", "mullama, threads=1 fixed", "o:"),
              ("mullama_t2", "mullama, threads=2 fixed", "o--"), ("native", "llama.cpp, default threads", "s-"),
              ("native_t1", "llama.cpp, -t 1", "s:"), ("native_t2", "llama.cpp, -t 2", "s--"))


def plot_contention(figures: List[dict], out: Path) -> bool:
    """Throughput against competing load, one line per system; single stream and 4 requests."""
    import matplotlib.pyplot as plt

    rows = [f for f in figures if f["figure"] == "contention_tok_s"]
    if not rows:
        return False
    loads = list(dict.fromkeys(r["load"] for r in rows))
    modes = [m for m in ("single", "aggregate") if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.0 * len(modes), 4.4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for key, label, style in CONTENTION:
            pts = {r["load"]: r for r in rows if r["mode"] == mode and r["system"] == key}
            if pts:
                # nothing within the cap (0) is drawn at the bottom of the log scale
                ax.plot(range(len(loads)), [max(pts[ld]["tok_s"], 0.1) if ld in pts else float("nan") for ld in loads],
                        style, label=label + (" (≤: stopped at the cap)" if any(p["capped"] for p in pts.values())
                                              else ""))
        ax.set_xticks(range(len(loads)), ["idle" if ld == "idle" else ("+ " + ld) for ld in loads])
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.1)
        ax.set_xlabel("competing load")
        ax.set_ylabel("generated tokens/s (log scale)")
        ax.set_title("one stream" if mode == "single" else "4 concurrent requests (aggregate)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small", loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


def _v(x, unit: str = "") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and abs(x) >= 100:
        x = round(x)
    return f"{x:,}{unit}" if isinstance(x, (int, float)) else str(x)


def _pair(row: dict, a: str, b: str, unit: str = "") -> str:
    return "n/a" if row.get(a) is None else f"{_v(row[a])} / {_v(row[b])}{unit}"


def side_by_side(figures: List[dict]) -> str:
    """One table of every figure: mullama, native and llama-cpp-python side by side, with the
    ratios to native (medians of per-round ratios where the script alternates rounds)."""
    lines = ["| figure | mullama | native | llama-cpp-python | mullama ÷ native | llama-cpp-python ÷ native |",
             "|---|---|---|---|---|---|"]

    def add(label, ours, native, peer, ratio=None, peer_ratio=None):
        lines.append(f"| {label} | {ours} | {native} | {peer} | {_v(ratio)} | {_v(peer_ratio)} |")

    for f in figures:
        kind = f["figure"]
        if kind in ("decode_tok_s", "prompt_tok_s"):
            what = "decode" if kind == "decode_tok_s" else f"prompt ({f['tokens']} tokens)"
            add(f"{what} tok/s, {f['model']} model", _v(f["mullama"]), _v(f["native"]), _v(f.get("llama_cpp_python")),
                f["ratio"], f.get("peer_ratio"))
        elif kind == "per_token_overhead_us":
            add(f"time per token above native (µs), {f['model']} model", _v(f["mullama"], " µs"),
                _v(f["native_us_per_token"], " µs per token"), _v(f.get("llama_cpp_python"), " µs"))
        elif kind == "stream_tok_s":
            add(f"async stream tok/s, {f['backend']}, {f['model']} model (sync in brackets)",
                f"{_v(f['mullama'])} ({_v(f['mullama_sync'])})", _v(f["native"]),
                f"{_v(f.get('llama_cpp_python'))} ({_v(f.get('llama_cpp_python_sync'))})", f["vs_native"],
                f.get("peer_vs_native"))
        elif kind == "aggregate_tok_s":
            add(f"aggregate decode tok/s, {f['parallel']} concurrent", _v(f["mullama"]), _v(f["native"]),
                _v(f.get("llama_cpp_python")), f["ratio"], f.get("peer_ratio"))
        elif kind == "ttft_ms":
            add(f"time to first token p50 / p99 (ms), {f['requests']} requests at once, 4 slots",
                _pair(f, "mullama_p50", "mullama_p99"), _pair(f, "native_p50", "native_p99"),
                _pair(f, "llama_cpp_python_p50", "llama_cpp_python_p99"))
        elif kind == "cancel_latency_ms" and f.get("binding", "mullama") == "mullama":
            peer = next((g for g in figures if g["figure"] == kind and g.get("binding") == "llama-cpp-python"
                         and g["backend"] == f["backend"] and g["phase"] == f["phase"]), {})
            add(f"cancel → model free p50 / p99 (ms), {f['phase']}, {f['backend']}", _pair(f, "p50", "p99"),
                f"no cancellation (one decode step: {_v(f['token_ms'])} ms)", _pair(peer, "p50", "p99"))
        elif kind == "gil_other_thread_speed":
            add(f"another Python thread's speed during generation, {f['threads']} llama.cpp thread(s)",
                _v(f["mullama"]), f"{_v(f['native'])} (another process)", _v(f.get("llama_cpp_python")))
        elif kind == "load_ms":
            add(f"load time (ms), {f['stage']}", _v(f["mullama"]), _v(f["native"]), _v(f.get("llama_cpp_python")),
                f["ratio"], f.get("peer_ratio"))
        elif kind == "contention_tok_s" and f["system"] == "mullama" and f["load"] != "idle":
            native = next((g for g in figures if g["figure"] == kind and g["system"] == "native"
                           and g["mode"] == f["mode"] and g["load"] == f["load"]), None)
            if native is not None:
                add(f"{'decode' if f['mode'] == 'single' else 'aggregate decode (4 requests)'} tok/s under {f['load']}, "
                    f"defaults (÷ own idle in brackets)", f"{_v(f['tok_s'])} ({_v(f['vs_idle'])})",
                    f"{'≤ ' if native['capped'] else ''}{_v(native['tok_s'])} ({_v(native['vs_idle'])})", "n/a",
                    round(f["tok_s"] / native["tok_s"], 2))
        elif kind == "rss_per_member_mb":
            add(f"RSS per extra concurrent user (MiB), {f['context_size']}-token context", _v(f["mullama"]),
                _v(f["native"]), _v(f.get("llama_cpp_python")), round(f["mullama"] / f["native"], 3),
                round(f["llama_cpp_python"] / f["native"], 3) if f.get("llama_cpp_python") else None)
    return "\n".join(lines)


def summarise(out_dir: Path, figures: List[dict], quick: bool, failed: List[str]) -> Path:
    """Write the plots and summary.md of a run into *out_dir*."""
    plots = [name for name, draw in (("throughput.png", plot_throughput), ("cancel_latency.png", plot_cancel),
                                     ("contention.png", plot_contention))
             if draw(figures, out_dir / name)]
    by_name: Dict[str, List[dict]] = {}
    for fig in figures:
        by_name.setdefault(fig["figure"], []).append(fig)
    parts = [f"# mullama benchmarks, {out_dir.name}", "", f"Machine: {machine()}.", ""]
    if quick:
        parts += ["**Quick run (one round each): checks the pipeline; these are not figures to quote.**", ""]
    if failed:
        parts += [f"Failed: {', '.join(failed)} (see their logs).", ""]
    parts += [f"![{name}]({name})" for name in plots] + ["", "## Side by side", "", side_by_side(figures), ""]
    for name, rows in by_name.items():
        parts += [f"## {name} ({rows[0]['script']}.py)", "", table(rows), ""]
    summary = out_dir / "summary.md"
    summary.write_text("\n".join(parts))
    return summary


def run(name: str, argv: List[str], log_path: Path) -> tuple:
    """Run one script: its JSON lines, exit code; its stderr goes to *log_path*, progress lines echoed."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(HERE / f"{name}.py"), *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        stdout: List[str] = []
        reader = threading.Thread(target=lambda: stdout.extend(proc.stdout), daemon=True)
        reader.start()
        for line in proc.stderr:
            log.write(line)
            if line.startswith("[") and not line.startswith(("[peer] reusing", "[mullama build] reusing")):
                print("    " + line.rstrip(), file=sys.stderr, flush=True)
        rc = proc.wait()
        reader.join()
    return [dict(json.loads(line), script=name) for line in stdout if line.startswith("{")], rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one round each: checks the pipeline, not for numbers")
    ap.add_argument("--only", nargs="+", choices=list(SCRIPTS), help="run only these scripts")
    ap.add_argument("--plot", type=Path, metavar="DIR", help="redraw the plots and summary of an earlier run")
    args = ap.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        raise SystemExit('run_all.py draws plots with matplotlib: pip install -e ".[bench]"') from None
    if args.plot:
        lines = (args.plot / "figures.jsonl").read_text().splitlines()
        print(summarise(args.plot, [json.loads(line) for line in lines], False, []))
        return 0
    out_dir = HERE / "results" / datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir.mkdir(parents=True)
    figures: List[dict] = []
    failed = []
    names = args.only or list(SCRIPTS)
    t_start = time.monotonic()
    for i, name in enumerate(names, 1):
        argv = SCRIPTS[name][1 if args.quick else 0]
        print(f"[run_all] {i}/{len(names)} {name}.py {' '.join(argv)} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        got, rc = run(name, argv, out_dir / f"{name}.log")
        figures += got
        with open(out_dir / "figures.jsonl", "a") as f:  # kept as it comes: nothing lost if a later script dies
            f.writelines(json.dumps(fig) + "\n" for fig in got)
        status = "ok" if rc == 0 else f"FAILED (exit {rc}, see {name}.log)"
        if rc:
            failed.append(name)
        print(f"[run_all] {name}: {len(got)} figures in {time.monotonic() - t0:.0f} s, {status} "
              f"({time.monotonic() - t_start:.0f} s so far)", file=sys.stderr, flush=True)
    print(summarise(out_dir, figures, args.quick, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
