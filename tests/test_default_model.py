"""Integration tests on the real default model (SmolLM2-135M-Instruct Q4_1)."""

from __future__ import annotations

import numpy as np
import pytest

import mullama
from mullama import StreamConfig

pytestmark = pytest.mark.integration

PROMPT = "The capital of France is"


def test_info(default_model):
    info = default_model.info
    assert info.architecture == "llama"
    assert info.n_vocab == 49152
    assert info.n_layer == 30
    assert info.n_ctx_train == 8192
    assert info.chat_template and "im_start" in info.chat_template
    assert 130e6 < info.n_params < 140e6


def test_greedy_deterministic_and_equal_to_token_by_token(default_model):
    cfg = StreamConfig.greedy(24)
    with default_model.create_context(512) as a, default_model.create_context(512) as b:
        first = a.generate(PROMPT, cfg)
        again = b.generate(PROMPT, cfg)
        assert first.tokens == again.tokens and first.text == again.text
        assert "Paris" in first.text
        b.reset()
        b.eval(default_model.tokenize(PROMPT))
        manual = []
        for _ in range(24):
            tok = int(np.argmax(b.logits()))
            manual.append(tok)
            if default_model.is_end_of_generation(tok):
                break
            b.eval([tok])
        assert manual == first.tokens


def test_stop_string_spanning_tokens(default_model):
    cfg = StreamConfig.greedy(40)
    with default_model.create_context(512) as ctx:
        toks = list(ctx.stream(PROMPT, cfg))
        texts = [t.text for t in toks]
        # a stop string made of the end of one token and the start of the next
        k = next(i for i in range(3, len(texts) - 1) if len(texts[i]) >= 2 and len(texts[i + 1]) >= 2)
        stop = texts[k][-2:] + texts[k + 1][:2]
        full = "".join(texts)
        ctx.reset()
        c = ctx.generate(PROMPT, cfg.replace(stop=(stop, "never-generated-xyz")))
        assert c.finish_reason == "stop"
        assert c.text == full[: full.index(stop)]
        assert stop not in c.text
        # the conversation ends with the token that completed the stop string
        assert ctx.tokens[-1] == c.tokens[-1] == toks[k + 1].id


def test_utf8_split_across_tokens(default_model):
    with default_model.create_context(512) as ctx:
        toks = list(ctx.stream("🦙🦙🦙🦙🦙", StreamConfig.greedy(30)))
    pieces = [default_model.token_to_piece(t.id) for t in toks]
    assert any(p and not _valid_utf8(p) for p in pieces), "expected emoji split across byte tokens"
    for i, t in enumerate(toks):
        if not _valid_utf8(b"".join(pieces[: i + 1])):
            assert "\ufffd" not in t.text  # incomplete characters are held back, never mangled
    text = "".join(t.text for t in toks)
    assert text == b"".join(pieces).decode("utf-8", "replace")
    assert "🦙" in text


def _valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_state_save_load_restores_continuation(default_model, tmp_path):
    cfg = StreamConfig.greedy(20)
    path = tmp_path / "conv.state"
    with default_model.create_context(512) as a, default_model.create_context(512) as b:
        a.generate("My favourite colour is", StreamConfig.greedy(8))
        a.save_state(path)
        expected = a.generate(" And yours?", cfg)
        b.load_state(path)
        assert b.n_past == len(a.tokens) - len(expected.tokens) - len(default_model.tokenize(" And yours?", add_bos=False))
        got = b.generate(" And yours?", cfg)
        assert got.tokens == expected.tokens


def test_sampled_generation_is_seeded(default_model):
    cfg = StreamConfig(max_tokens=16, temperature=0.9, seed=42)
    with default_model.create_context(256) as a, default_model.create_context(256) as b:
        assert a.generate(PROMPT, cfg).tokens == b.generate(PROMPT, cfg).tokens


def test_cancel_during_long_prefill(default_model, caplog):
    import logging
    import threading

    caplog.set_level(logging.DEBUG, logger="mullama.llama_cpp")
    with default_model.create_context(4096, batch_size=2048) as ctx:
        prompt = default_model.tokenize("word " * 3000)
        result = {}

        def run():
            try:
                ctx.eval(prompt)
                result["r"] = "done"
            except mullama.AbortedError:
                result["r"] = "aborted"

        t = threading.Thread(target=run)
        t.start()
        threading.Event().wait(0.05)
        ctx.cancel()
        t.join(60)
        assert result["r"] == "aborted"
        assert ctx.n_past == 0  # the aborted evaluation left nothing behind
        # llama.cpp's complaints about the abort we asked for are not errors
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert any("ret = 2" in r.getMessage() for r in caplog.records)
        assert "Paris" in ctx.generate(PROMPT, StreamConfig.greedy(8)).text
