"""Server subprocesses for the benches: ``mullama serve`` and llama-server.

llama-server is built once per machine from the same pinned llama.cpp source
and CPU options as mullama (``tools/build_llama_cpp.py``, the tools build).
Both are started on a free loopback port, with their output discarded, and
are ready when ``/health`` answers 200.

Sizes: ``mullama serve --context-size`` is the tokens of one request;
llama-server's ``-c`` is the whole KV cache, which it splits between its
``-np`` slots (its KV cache is not unified when ``-np`` is given), so the two
get the same cells per request with ``-c = slots x context``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import AsyncIterator, Dict, Sequence

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server_binary() -> Path:
    """llama-server from the cached tools build (built first if missing)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import build_llama_cpp

    bdir = build_llama_cpp.build(("llama-server",), tools=True)
    found = [p for p in bdir.rglob("llama-server") if p.is_file()]
    if not found:
        raise SystemExit(f"llama-server was not built in {bdir}")
    return found[0]


async def sse_chunks(response: httpx.Response) -> AsyncIterator[dict]:
    """The JSON chunks of a streamed (server-sent events) completion, up to ``[DONE]``;
    RuntimeError on an error chunk or a stream that ends without ``[DONE]``."""
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            return
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise RuntimeError(f"server error: {chunk['error']}")
        yield chunk
    raise RuntimeError("the stream ended without [DONE]")


def cpu_seconds(pid: int) -> float:
    """The CPU time process *pid* has used so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int) -> Dict[int, float]:
    """The CPU time each live thread of process *pid* has used so far, by
    thread id, to the nanosecond (the scheduler's count, ``schedstat``; the
    ``stat`` files count 10 ms ticks)."""
    out: Dict[int, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]) / 1e9
        except OSError:  # (it ended meanwhile)
            continue
    return out


class CpuSplit:
    """A server's CPU time over a span, split into its *compute* busiest threads
    and all its other threads (HTTP, the event loop, tokenizing, worker
    threads). With the server's compute threads fixed at *compute* (one pool),
    the busiest are those running llama.cpp's graphs, the thread that calls
    ``llama_decode`` among them (its own bookkeeping counts as compute). A
    thread that ends within the span is not counted."""

    def __init__(self, server: "Server", compute: int) -> None:
        self._pid, self._compute = server.proc.pid, compute
        self._threads = thread_cpu_seconds(self._pid)

    def other_seconds(self) -> float:
        """The CPU seconds of the threads other than the *compute* busiest since this was made."""
        used = sorted((t - self._threads.get(tid, 0.0) for tid, t in thread_cpu_seconds(self._pid).items()),
                      reverse=True)
        return sum(used[self._compute:])


class Server:
    """A server subprocess listening on 127.0.0.1:*port*; ``url`` has no path."""

    def __init__(self, what: str, cmd: Sequence[str], port: int) -> None:
        self.what = what
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(list(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{what} exited with {self.proc.returncode}: {' '.join(cmd)}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.close()
        raise SystemExit(f"{what} did not start within 120 s: {' '.join(cmd)}")

    def cpu_seconds(self) -> float:
        """The CPU time the server process has used so far (all its threads)."""
        return cpu_seconds(self.proc.pid)

    def quiesce(self, window: float = 0.2, timeout: float = 60.0) -> float:
        """Wait until the server uses under 5% of a core over *window* seconds (work it still does
        after its responses, such as re-evaluating finished requests' tails for a prompt cache);
        the CPU seconds it used meanwhile. Raises RuntimeError if it is still busy after *timeout*."""
        start = last = self.cpu_seconds()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(window)
            now = self.cpu_seconds()
            if now - last < 0.05 * window:
                return now - start
            last = now
        raise RuntimeError(f"{self.what} was still busy {timeout:.0f} s after its responses")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mullama_serve(model: Path, slots: int, context: int, threads: int, backend: str = "asyncio",
                  fixed_threads: bool = True, extra: Sequence[str] = ()) -> Server:
    """``mullama serve`` with *slots* requests of *context* tokens each and *threads* compute threads
    (fewer when the machine is busy unless *fixed_threads*), served by uvicorn (asyncio) or hypercorn
    (trio); the model id is ``bench``."""
    port = free_port()
    return Server(f"mullama serve ({backend})", [
        sys.executable, "-m", "mullama", "serve", "--model", str(model), "--port", str(port), "--backend", backend,
        "--context-size", str(context), "--max-concurrent", str(slots), "--threads", str(threads),
        *(["--fixed-threads"] if fixed_threads else []), "--no-access-log", "--log-level", "warning",
        "--name", "bench", *extra], port)


def llama_server(binary: Path, model: Path, slots: int, context: int, threads: int,
                 extra: Sequence[str] = ()) -> Server:
    """llama-server with *slots* slots of *context* tokens each and *threads* threads (prompt and
    generation), flash attention off as in mullama's default."""
    port = free_port()
    return Server("llama-server", [
        str(binary), "-m", str(model), "-c", str(slots * context), "-np", str(slots), "-t", str(threads),
        "-tb", str(threads), "--flash-attn", "off", "--host", "127.0.0.1", "--port", str(port), *extra], port)
