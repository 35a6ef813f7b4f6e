"""bench/run_all.py's report: the side-by-side table, the per-figure tables and the two plots,
from figures shaped as the bench scripts print them (the measurements themselves are benchmarks,
run by ``python bench/run_all.py``, not tests)."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def run_all():
    spec = importlib.util.spec_from_file_location("run_all", BENCH / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cancel(binding, phase, samples):
    return dict(figure="cancel_latency_ms", script="async_overhead", backend="trio", phase=phase, binding=binding,
                samples=len(samples), p50=samples[(len(samples) - 1) // 2], p99=max(samples), max=max(samples),
                samples_ms=samples, token_ms=7.5, target_p99=17.5 if phase == "decode" else 50.0)


FIGURES = [
    dict(figure="decode_tok_s", script="decode", model="default", mullama=122.3, native=119.8, ratio=1.012,
         llama_cpp_python=114.8, peer_ratio=0.959),
    dict(figure="per_token_overhead_us", script="decode", model="tiny", native_us_per_token=45.06, mullama=3.14,
         llama_cpp_python=25.91),
    dict(figure="stream_tok_s", script="async_overhead", model="tiny", backend="asyncio", mullama=8741.9,
         mullama_sync=8540.6, native=9501.2, vs_native=0.92, llama_cpp_python=676.1, llama_cpp_python_sync=4121.8,
         peer_vs_native=0.079),
    cancel("mullama", "prefill", [1.5, 2.2, 6.3]),
    cancel("llama-cpp-python", "prefill", [8900.0, 9250.0]),
    cancel("mullama", "decode", [0.5, 0.7, 1.7]),
    *[dict(figure="aggregate_tok_s", script="concurrency", parallel=n, gen_tokens=128, threads=2, mullama=m,
           native=t, ratio=round(m / t, 3), llama_cpp_python=p)
      for n, m, t, p in ((1, 133.5, 127.0, 107.4), (2, 136.6, 135.1, 105.2), (4, 180.0, 187.0, 103.0))],
    dict(figure="ttft_ms", script="concurrency", requests=32, slots=4, mullama_p50=3629.0, mullama_p99=6476.0,
         native_p50=None, native_p99=None, llama_cpp_python_p50=5234.0, llama_cpp_python_p99=10122.0),
    dict(figure="rss_per_member_mb", script="load", context_size=2048, mullama=49.3, native=49.8,
         llama_cpp_python=158.3),
    *[dict(figure="contention_tok_s", script="contention", mode=mode, load=load, system=system, tok_s=tok_s,
           vs_idle=vs_idle, capped=capped)
      for mode, load, system, tok_s, vs_idle, capped in (
          ("single", "idle", "mullama", 120.0, 1.0, False), ("single", "idle", "native", 118.0, 1.0, False),
          ("single", "busy2", "mullama", 40.0, 0.333, False), ("single", "busy2", "native", 4.8, 0.041, True),
          ("single", "busy2", "mullama_t1", 41.0, 0.7, False))],
]


def test_summary_puts_the_bindings_side_by_side(run_all, tmp_path):
    summary = run_all.summarise(tmp_path, FIGURES, quick=False, failed=["serve"]).read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in summary.splitlines() if line.startswith("| ")}
    assert rows["decode tok/s, default model"] == "| decode tok/s, default model | 122 | 120 | 115 | 1.012 | 0.959 |"
    assert "| 3.14 µs | 45.06 µs per token | 25.91 µs |" in rows["time per token above native (µs), tiny model"]
    assert "| 8,742 (8,541) | 9,501 | 676 (4,122) | 0.92 | 0.079 |" in \
        rows["async stream tok/s, asyncio, tiny model (sync in brackets)"]
    # the peer's figure is paired with mullama's of the same backend and phase; native has no cancellation
    prefill = rows["cancel → model free p50 / p99 (ms), prefill, trio"]
    assert "| 2.2 / 6.3 | no cancellation (one decode step: 7.5 ms) | 8,900 / 9,250 |" in prefill
    assert "| 0.7 / 1.7 |" in rows["cancel → model free p50 / p99 (ms), decode, trio"]
    assert "| n/a / n/a |" not in rows["cancel → model free p50 / p99 (ms), prefill, trio"]
    assert "| 3,629 / 6,476 | n/a | 5,234 / 10,122 |" in \
        rows["time to first token p50 / p99 (ms), 32 requests at once, 4 slots"]
    assert "| 49.3 | 49.8 | 158 | 0.99 | 3.179 |" in rows["RSS per extra concurrent user (MiB), 2048-token context"]
    assert "Failed: serve" in summary
    # under contention, mullama's defaults beside llama.cpp's (an upper bound when the tool was stopped)
    assert "| 40.0 (0.333) | ≤ 4.8 (0.041) | n/a | 8.33 |" in \
        rows["decode tok/s under busy2, defaults (÷ own idle in brackets)"]
    assert "under idle" not in summary
    # every figure also gets its own table, raw samples left out (they stay in figures.jsonl)
    assert "## aggregate_tok_s (concurrency.py)" in summary
    assert "samples_ms" not in summary


def test_plots_are_drawn(run_all, tmp_path):
    run_all.summarise(tmp_path, FIGURES, quick=True, failed=[])
    for name in ("throughput.png", "cancel_latency.png", "contention.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    summary = (tmp_path / "summary.md").read_text()
    assert "![throughput.png](throughput.png)" in summary and "Quick run" in summary


def test_no_plot_without_its_figures(run_all, tmp_path):
    run_all.summarise(tmp_path, FIGURES[:2], quick=False, failed=[])
    assert not any((tmp_path / name).exists() for name in ("throughput.png", "cancel_latency.png", "contention.png"))
    assert "![" not in (tmp_path / "summary.md").read_text()


def test_plot_redraws_an_earlier_run(run_all, tmp_path, monkeypatch, capsys):
    (tmp_path / "figures.jsonl").write_text("".join(json.dumps(f) + "\n" for f in FIGURES))
    monkeypatch.setattr("sys.argv", ["run_all.py", "--plot", str(tmp_path)])
    assert run_all.main() == 0
    assert (tmp_path / "throughput.png").exists()
    assert capsys.readouterr().out.strip() == str(tmp_path / "summary.md")


CHILD = """
import sys, threading, time

def spin(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
    spun.wait()
    leave.wait()

spun, leave = threading.Barrier(3), threading.Event()
workers = [threading.Thread(target=spin, args=(s,)) for s in (0.4, 0.1)]
print("ready", flush=True)
sys.stdin.readline()
for w in workers:
    w.start()
spun.wait()
print("done", flush=True)
sys.stdin.readline()
leave.set()
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir() or not Path("/proc/self/schedstat").exists(),
                    reason="needs Linux's per-thread scheduler counts (/proc/<pid>/task/<tid>/schedstat)")
def test_cpu_split_counts_all_but_the_busiest_threads():
    """bench/_servers.py's CpuSplit: the CPU of a server's threads other than its N busiest, over a span
    (a process whose two threads use 0.4 s and 0.1 s of CPU: amounts of CPU, not speeds)."""
    import subprocess
    import sys
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("_servers", BENCH / "_servers.py")
    servers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(servers)
    with subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as child:
        try:
            assert child.stdout.readline() == "ready\n"
            splits = {n: servers.CpuSplit(SimpleNamespace(proc=child), n) for n in (0, 1, 2)}
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.stdout.readline() == "done\n"
            other = {n: split.other_seconds() for n, split in splits.items()}
        finally:
            child.kill()
    assert 0.5 <= other[0] < 0.6  # every thread (the main one waits)
    assert 0.1 <= other[1] < 0.2  # the 0.4 s thread is the compute one
    assert other[2] < 0.05  # both spinning threads are
