#!/usr/bin/env python3
"""Every benchmark in one run, on this machine: figures collected as JSON lines and a markdown table.

Runs, one after the other (never two at once: they would share the 2 cores),
each bench script of this folder and keeps what it prints:

* ``decode.py --peer``: single-stream decode and prompt tokens/s, mullama /
  llama-bench / llama-cpp-python, default and tiny model;
* ``gil.py``: another Python thread's speed during a generation, mullama /
  llama-cpp-python;
* ``async_overhead.py``: async streaming (asyncio, trio) against sync, and
  cancellation latency during decode and prefill;
* ``concurrency.py``: aggregate throughput at 1/2/4/8 requests against
  llama-batched-bench, time to first token under load, RSS of a 4-member pool;
* ``serve.py``: ``mullama serve`` end to end against the in-process API.

Output goes to ``bench/results/<UTC time>/``: ``figures.jsonl`` (every line,
tagged with its script), ``summary.md`` (one table per figure name) and each
script's stderr log. ``--quick`` runs fewer rounds (to check the pipeline, not
for numbers). A script that fails is reported and the others still run.

Usage: python bench/run_all.py [--quick] [--only decode gil ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent

#: script -> (arguments, arguments with --quick)
SCRIPTS: Dict[str, tuple] = {
    "decode": (["--peer"], ["--peer", "--rounds", "1", "--reps", "1"]),
    "gil": ([], ["--rounds", "1", "--reps", "1"]),
    "async_overhead": ([], ["--reps", "1", "--cancels", "10"]),
    "concurrency": ([], ["--rounds", "1"]),
    "serve": ([], ["--rounds", "1"]),
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
    for row in rows:
        keys += [k for k in row if k not in keys and k not in ("figure", "script")]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join("" if r.get(k) is None else str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one round each: checks the pipeline, not for numbers")
    ap.add_argument("--only", nargs="+", choices=list(SCRIPTS), help="run only these scripts")
    args = ap.parse_args()
    out_dir = HERE / "results" / datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir.mkdir(parents=True)
    figures: List[dict] = []
    failed = []
    names = args.only or list(SCRIPTS)
    for i, name in enumerate(names, 1):
        argv = SCRIPTS[name][1 if args.quick else 0]
        print(f"[run_all] {i}/{len(names)} {name}.py {' '.join(argv)} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        with open(out_dir / f"{name}.log", "w") as log:
            proc = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *argv], stdout=subprocess.PIPE,
                                  stderr=log, text=True)
        got = [dict(json.loads(line), script=name) for line in proc.stdout.splitlines() if line.startswith("{")]
        figures += got
        took = time.monotonic() - t0
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {name}.log)"
        if proc.returncode:
            failed.append(name)
        print(f"[run_all] {name}: {len(got)} figures in {took:.0f} s, {status}", file=sys.stderr, flush=True)
    with open(out_dir / "figures.jsonl", "w") as f:
        for fig in figures:
            f.write(json.dumps(fig) + "\n")
    by_name: Dict[str, List[dict]] = {}
    for fig in figures:
        by_name.setdefault(fig["figure"], []).append(fig)
    parts = [f"# mullama benchmarks, {out_dir.name}", "", f"Machine: {machine()}.", ""]
    if args.quick:
        parts += ["**Quick run (one round each): checks the pipeline; these are not figures to quote.**", ""]
    if failed:
        parts += [f"Failed: {', '.join(failed)} (see their logs).", ""]
    for name, rows in by_name.items():
        parts += [f"## {name} ({rows[0]['script']}.py)", "", table(rows), ""]
    (out_dir / "summary.md").write_text("\n".join(parts))
    print(out_dir / "summary.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
