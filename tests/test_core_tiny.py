"""Fast tests of the sync API on the tiny generated model."""

from __future__ import annotations

import gc
import sys
import warnings
import threading

import numpy as np
import pytest

import mullama
from mullama import StreamConfig


def greedy_by_hand(ctx, prompt_tokens, n):
    """Token-by-token greedy decoding through eval()/logits()."""
    ctx.eval(prompt_tokens)
    out = []
    for _ in range(n):
        tok = int(np.argmax(ctx.logits()))
        out.append(tok)
        if ctx.model.is_end_of_generation(tok):
            break
        ctx.eval([tok])
    return out


def test_info(tiny_model):
    info = tiny_model.info
    assert info.architecture == "llama"
    assert info.name == "mullama-tiny"
    assert (info.n_vocab, info.n_embd, info.n_layer, info.n_head) == (512, 64, 2, 4)
    assert info.n_ctx_train == 4096
    assert info.n_params > 0 and info.size_bytes > 0
    assert info.chat_template is None


def test_tokenize_roundtrip(tiny_model):
    text = "hello wörld, ✓ 日本"
    toks = tiny_model.tokenize(text)
    assert toks[0] == 1  # BOS
    assert tiny_model.tokenize(text, add_bos=False) == toks[1:]
    assert tiny_model.detokenize(toks[1:]) == text


def test_generate_greedy_is_deterministic_and_matches_manual_decoding(tiny_model):
    cfg = StreamConfig.greedy(48)
    with tiny_model.create_context(512, threads=1) as a, tiny_model.create_context(512, threads=1) as b, \
            tiny_model.create_context(512, threads=1) as c:
        first = a.generate("once upon", cfg)
        second = b.generate("once upon", cfg)
        assert first.tokens == second.tokens
        assert first.text == second.text
        manual = greedy_by_hand(c, tiny_model.tokenize("once upon"), 48)
        assert first.tokens == manual


def test_stream_equals_generate(tiny_model):
    cfg = StreamConfig.greedy(40)
    with tiny_model.create_context(512, threads=1) as a, tiny_model.create_context(512, threads=1) as b:
        done = a.generate("abc", cfg)
        toks = list(b.stream("abc", cfg))
    assert [t.id for t in toks] == done.tokens
    assert "".join(t.text for t in toks) == done.text
    assert toks[-1].is_final and not any(t.is_final for t in toks[:-1])
    n_prompt = len(b.model.tokenize("abc"))
    assert [t.position for t in toks] == list(range(n_prompt, n_prompt + len(toks)))


def test_completion_fields(tiny_ctx):
    c = tiny_ctx.generate("hi", StreamConfig.greedy(10, include_probabilities=True))
    assert c.finish_reason in ("length", "stop")
    assert len(c.logprobs) == len(c.tokens)
    assert all(lp <= 0.0 for lp in c.logprobs)
    t = c.timings
    assert t.prompt_tokens == len(tiny_ctx.model.tokenize("hi"))
    assert t.generated_tokens == len(c.tokens)
    assert t.prompt_ms >= 0 and t.generation_ms >= 0


def test_logprobs_match_numpy(tiny_model):
    with tiny_model.create_context(512, threads=1) as a, tiny_model.create_context(512, threads=1) as b:
        c = a.generate("xyz", StreamConfig.greedy(1, include_probabilities=True))
        b.eval(tiny_model.tokenize("xyz"))
        logits = b.logits().astype(np.float64)
        expected = logits[c.tokens[0]] - (np.log(np.exp(logits - logits.max()).sum()) + logits.max())
        assert c.logprobs[0] == pytest.approx(expected, abs=1e-4)


def test_conversation_continues(tiny_model):
    cfg = StreamConfig.greedy(8)
    with tiny_model.create_context(512, threads=1) as a, tiny_model.create_context(512, threads=1) as b:
        first = a.generate("ab", cfg)
        a.generate("cd", cfg)
        # the same conversation evaluated in one go gives the same continuation
        b.eval(tiny_model.tokenize("ab") + first.tokens)
        assert a.tokens[: b.n_past] == b.tokens
        assert a.n_past == len(a.tokens)


def test_reset(tiny_ctx):
    cfg = StreamConfig.greedy(8)
    first = tiny_ctx.generate("ab", cfg)
    tiny_ctx.reset()
    assert tiny_ctx.n_past == 0
    assert tiny_ctx.generate("ab", cfg).tokens == first.tokens


def test_sampling_seed_reproducible(tiny_model):
    cfg = StreamConfig(max_tokens=32, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    with tiny_model.create_context(512, threads=1) as a, tiny_model.create_context(512, threads=1) as b:
        x = a.generate("q", cfg).tokens
        y = b.generate("q", cfg).tokens
        assert x == y
        b.reset()
        z = b.generate("q", cfg.replace(seed=8)).tokens
        assert z != x


def test_max_tokens_and_context_full(tiny_model):
    with tiny_model.create_context(32, threads=1) as ctx:
        c = ctx.generate("ab", StreamConfig.greedy(1000))  # greedy on the tiny model: no end-of-generation
        assert c.finish_reason == "context_full"
        assert ctx.n_past == ctx.n_ctx == 256  # llama.cpp pads the size up (to 256)
        c2 = ctx.generate("", StreamConfig.greedy(5))
        assert c2.finish_reason == "context_full" and c2.tokens == []


def test_prompt_longer_than_context(tiny_model):
    with tiny_model.create_context(16, threads=1) as ctx:
        with pytest.raises(mullama.ContextOverflowError, match=str(ctx.n_ctx)):
            ctx.generate("a" * 1000)
        assert ctx.n_past == 0  # nothing half-evaluated is left behind
        assert ctx.generate("ab", StreamConfig.greedy(3)).tokens


def test_eval_and_logits_zero_copy(tiny_ctx):
    tiny_ctx.eval([1, 300, 301])
    a = tiny_ctx.logits()
    b = tiny_ctx.logits()
    assert a.dtype == np.float32 and a.shape == (512,)
    assert np.shares_memory(a, b)  # both view llama.cpp's buffer
    before = a.copy()
    tiny_ctx.eval([302])
    assert not np.array_equal(before, tiny_ctx.logits())


def test_logits_view_outlives_close(tiny_model):
    ctx = tiny_model.create_context(64, threads=1)
    ctx.eval([1, 5])
    view = ctx.logits()
    ctx.close()  # the view keeps the buffer until it is dropped
    assert np.isfinite(view).all()
    del view
    gc.collect()


def test_stream_abandoned_keeps_conversation_consistent(tiny_ctx):
    it = tiny_ctx.stream("ab", StreamConfig.greedy(100))
    seen = [next(it) for _ in range(5)]
    it.close()
    assert tiny_ctx.n_past == seen[-1].position + 1
    # the context is free again
    assert tiny_ctx.generate("c", StreamConfig.greedy(2)).tokens


def test_busy_context(tiny_ctx):
    it = tiny_ctx.stream("ab", StreamConfig.greedy(50))
    next(it)
    with pytest.raises(mullama.BusyError):
        tiny_ctx.generate("x")
    it.close()


def test_cancel_from_another_thread(tiny_model):
    with tiny_model.create_context(4096, threads=1) as ctx:
        got = []

        def consume():
            for tok in ctx.stream("ab", StreamConfig.greedy(100000)):
                got.append(tok)
                if len(got) == 10:
                    started.set()

        started = threading.Event()
        t = threading.Thread(target=consume)
        t.start()
        assert started.wait(30)
        ctx.cancel()
        t.join(30)
        assert not t.is_alive()
        assert 10 <= len(got) < 4000
        c = ctx.generate("z", StreamConfig.greedy(3))  # the cancel does not stick
        assert c.finish_reason == "length"


def test_cancelled_generation_reports_cancelled(tiny_model):
    with tiny_model.create_context(4096, threads=1) as ctx:
        result = {}

        def run():
            result["c"] = ctx.generate("ab", StreamConfig.greedy(100000))

        t = threading.Thread(target=run)
        t.start()
        while ctx.n_past < 50:
            threading.Event().wait(0.001)
        ctx.cancel()
        t.join(30)
        assert result["c"].finish_reason == "cancelled"
        assert 0 < len(result["c"].tokens) < 4000


def test_close_while_generating_in_another_thread(tiny_model):
    ctx = tiny_model.create_context(4096, threads=1)
    errors = []

    def run():
        try:
            ctx.generate("ab", StreamConfig.greedy(100000))
        except mullama.MullamaError as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    while ctx.n_past < 20:
        threading.Event().wait(0.001)
    ctx.close()  # aborts and waits for the worker to leave C
    t.join(30)
    assert not t.is_alive()
    assert all(isinstance(e, mullama.ClosedError) for e in errors)
    with pytest.raises(mullama.ClosedError):
        ctx.generate("x")


def test_objects_die_in_any_order(tiny_model_path):
    model = mullama.Model.load(tiny_model_path)
    ctx = model.create_context(64, threads=1)
    del model
    gc.collect()
    assert ctx.generate("ab", StreamConfig.greedy(3)).tokens  # the context keeps its model alive
    with pytest.warns(ResourceWarning) as caught:  # dropped open: each is closed, and says so
        del ctx
        gc.collect()
    assert sorted(str(w.message).split()[1] for w in caught) == ["<mullama.Context", "<mullama.Model"]

    model = mullama.Model.load(tiny_model_path)
    ctx = model.create_context(64, threads=1)
    model.close()  # closes its contexts
    assert ctx.closed
    with pytest.raises(mullama.ClosedError):
        ctx.generate("ab")
    model.close()  # idempotent
    ctx.close()


@pytest.mark.skipif(sys.implementation.name != "cpython" or sys.version_info < (3, 10),
                    reason="PyType_GetSlot on static types: CPython 3.10+")
def test_owners_have_no_tp_clear():
    """The owners are @cython.no_gc_clear: the garbage collector never clears
    their references (a context's model, an engine's samplers) before their
    __dealloc__ frees C memory with them. Cython takes that directive from the
    class definitions in _core.pyx, not from _core.pxd: this checks it stuck."""
    import ctypes

    from mullama import _core

    get_slot = ctypes.pythonapi.PyType_GetSlot
    get_slot.restype = ctypes.c_void_p
    get_slot.argtypes = [ctypes.py_object, ctypes.c_int]
    py_tp_clear, py_tp_traverse = 51, 71  # typeslots.h
    assert get_slot(_core._InC, py_tp_clear) is not None  # the slot is read right: _InC has one
    for owner in (_core.LlamaModel, _core.SamplerChain, _core._Decoder, _core.LlamaContext, _core.BatchEngine):
        assert get_slot(owner, py_tp_clear) is None, owner.__name__
    assert get_slot(_core.LlamaContext, py_tp_traverse) is not None  # still tracked by the collector


def test_other_thread_runs_during_generation(tiny_model):
    """The GIL is released inside C: another Python thread runs during one C call.

    The switch interval is made huge, so the main thread only lets the other
    thread run when it releases the GIL itself; if the evaluation held the
    GIL, the other thread would count nothing while it runs.
    """
    import sys
    import time

    with tiny_model.create_context(4096, batch_size=4096, threads=1) as ctx:
        prompt = [1] + [300 + (i % 200) for i in range(4000)]
        state = {"inside": False, "stop": False, "ticks": 0}

        def spin():
            while not state["stop"]:
                if state["inside"]:
                    state["ticks"] += 1
                time.sleep(0)  # give the GIL back whenever the main thread wants it

        old = sys.getswitchinterval()
        sys.setswitchinterval(100.0)
        t = threading.Thread(target=spin)
        try:
            t.start()
            state["inside"] = True
            ctx.eval(prompt)  # a single call into llama.cpp, GIL released
            state["inside"] = False
        finally:
            state["stop"] = True
            sys.setswitchinterval(old)
            t.join()
        assert state["ticks"] > 10


def test_progress_callback(tiny_model_path):
    seen = []
    with mullama.Model.load(tiny_model_path, progress=seen.append):
        pass
    assert seen and seen[-1] == pytest.approx(1.0)


def test_progress_exception_is_reraised(tiny_model_path):
    class Boom(Exception):
        pass

    def progress(p):
        raise Boom("from the callback")

    with pytest.raises(Boom, match="from the callback"):
        mullama.Model.load(tiny_model_path, progress=progress)


def test_progress_false_cancels_load(tiny_model_path):
    with pytest.raises(mullama.ModelLoadError, match="cancelled"):
        mullama.Model.load(tiny_model_path, progress=lambda p: False)


def test_llama_log_goes_to_logging(tiny_model_path, caplog):
    import logging

    with caplog.at_level(logging.DEBUG, logger="mullama.llama_cpp"):
        with mullama.Model.load(tiny_model_path):
            pass
    assert any(r.name == "mullama.llama_cpp" for r in caplog.records)


def test_save_and_load_state(tiny_model, tmp_path):
    cfg = StreamConfig.greedy(20)
    path = tmp_path / "state.bin"
    with tiny_model.create_context(512, threads=1) as a, tiny_model.create_context(512, threads=1) as b:
        a.eval(tiny_model.tokenize("hello there"))
        a.save_state(path)
        expected = a.generate("", cfg)
        b.load_state(path)
        assert b.tokens == tiny_model.tokenize("hello there")
        assert b.generate("", cfg).tokens == expected.tokens


def test_an_owner_dropped_open_warns_and_is_closed(tiny_model_path):
    """A model or context dropped without close() is closed by the garbage
    collector with a ResourceWarning naming it; one closed warns nothing."""
    from mullama import _core

    model = mullama.Model.load(tiny_model_path)
    ctx = model.create_context(64, threads=1)
    cores = [model._core, ctx._core]
    with pytest.warns(ResourceWarning, match=r"unclosed <mullama\.Context 0/\d+ tokens>"):
        del ctx
    assert cores[1].closed and not cores[0].closed
    with pytest.warns(ResourceWarning, match=r"unclosed <mullama\.Model .*tiny\.gguf>"):
        del model
    assert cores[0].closed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with mullama.Model.load(tiny_model_path) as m:
            m.create_context(64, threads=1).close()
        del m
        gc.collect()
    assert all(o.closed for o in _core._live if o in cores)
