#!/usr/bin/env python3
"""Fuzz mullama's model loading with mutated and truncated GGUF files.

Seeds are real GGUF files: the tiny generated model (loaded, then a short
generation) and upstream's vocabulary-only files (loaded with vocab_only=True,
then a tokenization). Each mutant is truncated, has bytes flipped, a header
field overwritten with an edge value, or bytes inserted or deleted, mostly in
the header and metadata (where parsers go wrong). Mutants run in a worker
process; the contract is that each one loads or raises a MullamaError. A
worker that dies (a crash), takes too long (a hang) or raises anything else is
a finding: the mutant is saved to the output folder and the worker restarted.

Prints one JSON line with the counts. Exit code 1 if anything was found.

Usage: python bench/fuzz_gguf.py [--count 10000] [--seed 0] [--out fuzz-findings] [--timeout 30]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import selectors
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

TOOLS = Path(__file__).resolve().parent.parent / "tools"
EDGE_U32 = [0, 1, 2, 3, 4, 7, 31, 32, 33, 63, 64, 255, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]
EDGE_U64 = [0, 1, 2, 1 << 31, 1 << 32, 1 << 40, 1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]

# the worker: reads "kind<TAB>path" lines, answers "R ok" / "R mullama <Class>" / "R other <Class>: msg"
WORKER = r"""
import sys
import mullama
from mullama import StreamConfig

out = sys.stdout
sys.stdout = sys.stderr  # nothing else may write to the protocol stream
for line in sys.stdin:
    kind, path = line.rstrip("\n").split("\t", 1)
    try:
        if kind == "model":
            with mullama.Model.load(path) as m, m.create_context(context_size=64, threads=1) as ctx:
                ctx.generate("ab", StreamConfig.greedy(2))
        else:
            with mullama.Model.load(path, vocab_only=True) as m:
                m.detokenize(m.tokenize("Hello world, ünïcode 123"))
        out.write("R ok\n")
    except mullama.MullamaError as exc:
        out.write(f"R mullama {type(exc).__name__}\n")
    except BaseException as exc:
        out.write(f"R other {type(exc).__name__}: {str(exc)[:200]!r}\n")
    out.flush()
"""


@dataclass
class Seed:
    name: str
    kind: str  # "model" or "vocab"
    data: bytes
    header_end: int  # where the tensor data starts (mutations favour what comes before)


@dataclass
class Counts:
    inputs: int = 0
    loaded: int = 0
    mullama_errors: int = 0
    crashes: int = 0
    hangs: int = 0
    other_errors: int = 0
    errors_by_class: Dict[str, int] = field(default_factory=dict)
    findings: List[str] = field(default_factory=list)


def default_seeds(workdir: Path) -> List[Seed]:
    """The tiny model and the smallest upstream vocabulary files."""
    sys.path.insert(0, str(TOOLS))
    from fetch_llama_cpp import ensure_llama_cpp
    from tiny_model import write_tiny_model

    from mullama._gguf import read_gguf

    paths = [("tiny-model", "model", write_tiny_model(workdir / "tiny.gguf"))]
    models = ensure_llama_cpp() / "models"
    for name in ("bert-bge", "llama-spm", "phi-3"):
        p = models / f"ggml-vocab-{name}.gguf"
        if p.is_file():
            paths.append((f"vocab-{name}", "vocab", p))
    return [Seed(n, k, p.read_bytes(), read_gguf(str(p)).data_offset) for n, k, p in paths]


def mutate(seed: Seed, rng: random.Random) -> Tuple[bytes, str]:
    """One mutant of *seed* and a word on how it was made."""
    data = bytearray(seed.data)
    end = seed.header_end if rng.random() < 0.9 else len(data)  # mostly the header and metadata
    how = rng.choice(["truncate", "flip", "u32", "u64", "insert", "delete", "splice"])
    if how == "truncate":
        cut = rng.randrange(0, len(data))
        return bytes(data[:cut]), f"truncate@{cut}"
    if how == "flip":
        spots = [rng.randrange(0, end) for _ in range(rng.randint(1, 8))]
        for i in spots:
            data[i] ^= 1 << rng.randrange(8)
        return bytes(data), f"flip@{spots}"
    if how in ("u32", "u64"):
        size, values = (4, EDGE_U32) if how == "u32" else (8, EDGE_U64)
        at = rng.randrange(4, max(5, end - size))
        v = rng.choice(values) if rng.random() < 0.8 else rng.randrange(1 << (8 * size))
        data[at:at + size] = struct.pack("<I" if size == 4 else "<Q", v)
        return bytes(data), f"{how}@{at}={v}"
    if how == "insert":
        at = rng.randrange(4, end)
        blob = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        return bytes(data[:at] + blob + data[at:]), f"insert@{at}+{len(blob)}"
    if how == "delete":
        at = rng.randrange(4, end)
        n = rng.randint(1, 16)
        return bytes(data[:at] + data[at + n:]), f"delete@{at}-{n}"
    # splice: copy a run of the header over another place in it
    a, b = rng.randrange(4, end), rng.randrange(4, end)
    n = rng.randint(4, 64)
    data[b:b + n] = data[a:a + n]
    return bytes(data), f"splice@{a}->{b}+{n}"


class Worker:
    def __init__(self) -> None:
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        env = dict(os.environ, PYTHONFAULTHANDLER="0")
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, bufsize=1, env=env)

    def run(self, kind: str, path: Path, timeout: float) -> str:
        """The worker's answer, or "crash" / "hang"."""
        if self.proc is None or self.proc.poll() is not None:
            self.stop()
            self.start()
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(f"{kind}\t{path}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.stop()
            return "crash"
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while True:
                if not sel.select(timeout):
                    self.stop(kill=True)
                    return "hang"
                line = self.proc.stdout.readline()
                if not line:  # the worker died
                    self.stop()
                    return "crash"
                if line.startswith("R "):
                    return line[2:].strip()

    def stop(self, kill: bool = False) -> None:
        """End the worker (asking it nicely unless *kill*) and close its pipes."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if kill:
            proc.kill()
        for pipe in (proc.stdin, proc.stdout):
            try:
                pipe.close()
            except OSError:  # a broken pipe to a dead worker
                pass
        proc.wait(timeout=60)


def campaign(count: int, seed: int = 0, out: Optional[Path] = None, timeout: float = 30.0,
             progress: bool = False) -> Counts:
    """Run *count* mutants; findings are saved under *out* (if given)."""
    rng = random.Random(seed)
    counts = Counts()
    worker = Worker()
    with tempfile.TemporaryDirectory(prefix="mullama-fuzz-") as tmp:
        work = Path(tmp)
        seeds = default_seeds(work)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=count, unit="input", desc="fuzzing GGUF loads", file=sys.stderr, mininterval=2.0)
        try:
            for i in range(count):
                s = seeds[i % len(seeds)]
                data, how = mutate(s, rng)
                path = work / "mutant.gguf"
                path.write_bytes(data)
                answer = worker.run(s.kind, path, timeout)
                counts.inputs += 1
                if answer == "ok":
                    counts.loaded += 1
                elif answer.startswith("mullama "):
                    counts.mullama_errors += 1
                    cls = answer.split()[1]
                    counts.errors_by_class[cls] = counts.errors_by_class.get(cls, 0) + 1
                else:
                    kind = answer if answer in ("crash", "hang") else "other"
                    if kind == "crash":
                        counts.crashes += 1
                    elif kind == "hang":
                        counts.hangs += 1
                    else:
                        counts.other_errors += 1
                    note = f"{kind}: {s.name} {how}: {answer}"
                    counts.findings.append(note)
                    if out is not None:
                        out.mkdir(parents=True, exist_ok=True)
                        (out / f"{kind}-{i:06d}-{s.name}.gguf").write_bytes(data)
                        with open(out / "findings.txt", "a") as f:
                            f.write(f"{i:06d} {note}\n")
                if bar is not None:
                    bar.update()
                    if answer == "crash" or answer == "hang" or answer.startswith("other"):
                        bar.set_postfix(crashes=counts.crashes, hangs=counts.hangs, other=counts.other_errors)
        finally:
            if bar is not None:
                bar.close()
            worker.stop()
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("fuzz-findings"))
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per input before it counts as a hang")
    args = ap.parse_args()
    c = campaign(args.count, args.seed, args.out, args.timeout, progress=True)
    print(json.dumps(dict(figure="fuzz_gguf", inputs=c.inputs, loaded=c.loaded, mullama_errors=c.mullama_errors,
                          crashes=c.crashes, hangs=c.hangs, other_errors=c.other_errors,
                          errors_by_class=c.errors_by_class, seed=args.seed)), flush=True)
    for note in c.findings[:20]:
        print(note, file=sys.stderr)
    return 1 if c.crashes or c.hangs or c.other_errors else 0


if __name__ == "__main__":
    sys.exit(main())
