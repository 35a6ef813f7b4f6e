"""Leaving while generating: Ctrl-C in `mullama run`, interpreter exit with an event loop generating."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest


@pytest.mark.integration
def test_ctrl_c_stops_mullama_run(default_model_path):
    p = subprocess.Popen([sys.executable, "-m", "mullama", "run", "Once upon a time", "-n", "3000", "-c", "4096"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.read(1)  # it is streaming
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)  # a hang fails here
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_interpreter_exit_while_an_event_loop_generates(tiny_model_path, backend):
    """The event loop runs in a daemon thread with requests in flight on the engine and on a
    conversation (each has its first token); the main thread returns: the process must exit
    cleanly, not crash or hang."""
    code = textwrap.dedent(f"""
        import threading, anyio, mullama
        from mullama import StreamConfig
        from mullama.aio import AsyncModel

        started = threading.Event()

        async def main():
            generating = 0

            async with await AsyncModel.load({str(tiny_model_path)!r}, context_size=4096, threads=1,
                                             timeout_ms=None) as model:
                conv = await model.create_context()

                async def generate(open_stream):
                    nonlocal generating
                    async with open_stream("ab", StreamConfig.greedy(3000)) as stream:
                        await stream.__anext__()
                        generating += 1
                        if generating == 4:  # all four are generating: the main thread returns
                            started.set()
                        async for _ in stream:
                            pass

                async with anyio.create_task_group() as tg:
                    for _ in range(3):
                        tg.start_soon(generate, model.generate_stream)
                    tg.start_soon(generate, conv.generate_stream)

        threading.Thread(target=anyio.run, args=(main,), kwargs={{"backend": {backend!r}}}, daemon=True).start()
        if not started.wait(60):
            raise SystemExit("the four requests never were all generating")
        print("exiting")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "exiting" in r.stdout
