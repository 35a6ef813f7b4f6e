"""Regression tests for bugs found in review (each failed before its fix)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import anyio
import numpy as np
import pytest

import mullama
from mullama import StreamConfig
from mullama.aio import AsyncModel


def test_logits_fresh_after_truncate(tiny_model):
    with tiny_model.create_context(256, threads=1) as a, tiny_model.create_context(256, threads=1) as b:
        a.eval([1, 5, 9, 13, 17, 21])
        a._core.truncate(3)
        a.eval([])
        b.eval([1, 5, 9])
        assert np.allclose(a.logits(), b.logits(), atol=1e-4)  # the fresh distribution, not the stale one
        assert a.generate("", StreamConfig.greedy(5)).tokens == b.generate("", StreamConfig.greedy(5)).tokens


def test_cancel_of_nothing_does_not_stick(tiny_ctx):
    tiny_ctx.eval([1, 5, 9])
    tiny_ctx._core.truncate(2)
    tiny_ctx.cancel()  # nothing runs
    assert tiny_ctx.logits().shape == (512,)


def test_tokens_while_generating_is_refused_not_racy(tiny_model):
    with tiny_model.create_context(4096, threads=1) as ctx:
        errors = 0
        done = []
        t = threading.Thread(target=lambda: done.append(ctx.generate("ab", StreamConfig.greedy(3000))))
        t.start()
        try:
            while t.is_alive():
                try:
                    toks = ctx.tokens
                    assert all(0 <= x < 512 for x in toks)
                except mullama.BusyError:
                    errors += 1
                    if errors == 20_000:  # looked often enough: stop it (not 3,000 tokens under this loop)
                        ctx.cancel()
        finally:
            t.join()
        assert errors  # it was generating while we looked
        assert done[0].finish_reason in ("cancelled", "length")


def _waited(fn, *args) -> bool:
    """Call fn(*args); whether it waited on a ``threading.Condition`` (a core waits on one,
    in ``_wait_out``, only while a thread is inside C on it)."""
    waits = (threading.Condition.wait.__code__, threading.Condition.wait_for.__code__)
    waited = []

    def hook(frame, event, arg):
        if event == "call" and frame.f_code in waits:
            waited.append(True)

    previous = sys.getprofile()
    sys.setprofile(hook)  # (this thread's calls only)
    try:
        fn(*args)
    finally:
        sys.setprofile(previous)
    return bool(waited)


def test_model_close_waits_for_tokenize(tiny_model_path):
    """close() called while another thread is inside llama_tokenize waits for it, and that
    tokenize returns its whole, right result (the vocabulary was not freed under it)."""
    text = "hello world " * 50_000
    with mullama.Model.load(tiny_model_path) as other:
        expected = other.tokenize(text)

    def tokenize(model: mullama.Model, out: list) -> None:
        try:
            out.append(model.tokenize(text))
        except mullama.ClosedError as exc:  # (close() came first: that try does not count)
            out.append(exc)

    for _ in range(20):  # (~0.2 s inside C each time: the first try nearly always counts)
        model = mullama.Model.load(tiny_model_path)
        out: list = []
        t = threading.Thread(target=tokenize, args=(model, out))
        t.start()
        while t.is_alive() and not _waited(model._core._wait_out, 0.0):  # until it is inside C
            pass
        waited = _waited(model.close)
        t.join()
        if waited:  # close() found it inside C
            break
    else:
        pytest.fail("close() never found the tokenize inside C")
    assert out == [expected]


def test_a_cancelled_generation_ends_at_the_text_released(tiny_model):
    """Text held back as a possible start of a stop string is not output until the stop string is
    ruled out; a generation cancelled meanwhile ends at the text released so far (the stream and
    the conversation agree), never with the held text duplicated, garbled or half released."""
    with tiny_model.create_context(256, threads=1) as ctx:
        first = tiny_model.detokenize(ctx.generate("ab", StreamConfig.greedy(1)).tokens)
        ctx.reset()
        stop = first + "\x01"  # begun by the first token, never completed
        stream = ctx.stream("ab", StreamConfig.greedy(200, stop=(stop,)))
        got = [next(stream)]  # the first token comes alone; its text begins the stop string: held back
        assert got[0].text == ""
        ctx.cancel()
        got += list(stream)
        assert len(got) == 1 and not got[0].is_final
        assert ctx.tokens[-1] == got[0].id  # the conversation keeps the token
    released = "".join(t.text for t in got)
    assert released == "" and stop.startswith(tiny_model.detokenize([t.id for t in got]))


def test_logits_view_keeps_model_memory_until_dropped(tiny_model_path):
    model = mullama.Model.load(tiny_model_path)
    ctx = model.create_context(64, threads=1)
    ctx.eval([1, 5])
    view = ctx.logits()
    model.close()
    assert model.closed and ctx.closed
    assert np.isfinite(view).all()  # still readable: nothing was freed under it
    del view


@pytest.mark.parametrize("what", ["generate", "prefill"])
def test_interpreter_exit_while_generating(tiny_model_path, what):
    code = textwrap.dedent(f"""
        import threading, time, mullama
        from mullama import StreamConfig
        m = mullama.Model.load({str(tiny_model_path)!r})
        ctx = m.create_context(4096, batch_size=4096, threads=2)
        started = threading.Event()
        def run():
            started.set()
            while True:
                ctx.reset()
                if {what!r} == "generate":
                    ctx.generate("ab", StreamConfig.greedy(3000))
                else:
                    ctx.eval([1] + [300] * 4000)
        threading.Thread(target=run, daemon=True).start()
        started.wait()
        time.sleep(0.2)
        print("exiting")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "exiting" in r.stdout


def test_out_of_range_sampling_values_are_config_errors():
    with pytest.raises(mullama.InvalidConfigError, match="top_k"):
        StreamConfig(top_k=2**31)
    with pytest.raises(mullama.InvalidConfigError, match="repeat_last_n"):
        StreamConfig(repeat_last_n=2**31)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


@pytest.mark.anyio
async def test_leaving_conversation_stream_before_reading_skips_the_prefill(default_model_path):
    async with await AsyncModel.load(default_model_path, context_size=4096) as model:
        conv = await model.create_context()
        async with conv.generate_stream("word " * 3000, StreamConfig.greedy(5)):
            pass  # leave at once
        assert conv.n_past == 0  # the prefill was aborted, not run to the end
        assert model.active_workers == 0


@pytest.mark.anyio
async def test_aclose_does_not_wait_for_a_stalled_consumer(tiny_model_path):
    model = await AsyncModel.load(tiny_model_path, context_size=2048, threads=1)
    conv = await model.create_context()
    async with conv.generate_stream("ab", StreamConfig.greedy(1500)) as stream:
        await stream.__anext__()
        await anyio.sleep(0.1)  # the worker fills the buffer and waits
        with anyio.fail_after(10):
            await model.aclose()  # the same task still holds the stream
    assert model.active_workers == 0 and not model.is_ready()
    assert not model._conversations


@pytest.mark.anyio
async def test_process_batch_cancel_never_keeps_the_prompt(default_model_path):
    """Cancelled in the middle of a prompt's evaluation (2,000 tokens of the default model take
    seconds; the cancellation comes once the worker is inside it), nothing of the prompt stays."""
    async with await AsyncModel.load(default_model_path, context_size=4096, threads=1) as model:
        conv = await model.create_context()
        prompt = [1] + [300 + i % 100 for i in range(2000)]
        with anyio.CancelScope() as scope:
            async def cancel_once_running() -> None:
                while not conv._workers.active:
                    await anyio.sleep(0.005)
                await anyio.sleep(0.1)
                scope.cancel()

            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_once_running)
                await conv.process_batch(prompt)
        assert scope.cancelled_caught
        assert conv.n_past == 0 and model.active_workers == 0
        assert await conv.process_batch([1, 300, 301]) == 3  # and it is usable


def test_a_failed_load_with_a_progress_callback_names_its_cause(llama_cpp_dir):
    """A load that fails for its own reason is not blamed on a progress callback that never cancelled."""
    vocab = llama_cpp_dir / "models" / "ggml-vocab-llama-spm.gguf"
    with pytest.raises(mullama.InvalidModelError, match="holds no weights"):
        mullama.Model.load(vocab, progress=lambda f: None)
