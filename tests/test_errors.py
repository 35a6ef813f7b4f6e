"""Bad input raises a named MullamaError, never a crash."""

from __future__ import annotations

import os

import pytest

import mullama
from mullama import StreamConfig


def test_missing_file(tmp_path):
    with pytest.raises(mullama.ModelNotFoundError, match="not found"):
        mullama.Model.load(tmp_path / "nope.gguf")


def test_directory(tmp_path):
    with pytest.raises(mullama.InvalidModelError, match="directory"):
        mullama.Model.load(tmp_path)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    with pytest.raises(mullama.InvalidModelError, match="empty"):
        mullama.Model.load(p)


def test_not_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(mullama.InvalidModelError, match="not a GGUF"):
        mullama.Model.load(p)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_unreadable(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGUF")
    p.chmod(0)
    with pytest.raises(mullama.InvalidModelError, match="cannot read"):
        mullama.Model.load(p)


@pytest.mark.parametrize("size", [4, 24, 1000, 200_000])
def test_truncated_gguf(tiny_model_path, tmp_path, size):
    p = tmp_path / "t.gguf"
    p.write_bytes(tiny_model_path.read_bytes()[:size])
    with pytest.raises(mullama.InvalidModelError):
        mullama.Model.load(p)


def test_unsupported_architecture(tmp_path):
    import gguf

    p = tmp_path / "arch.gguf"
    w = gguf.GGUFWriter(str(p), "not-an-architecture")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(mullama.UnsupportedModelError, match="not-an-architecture"):
        mullama.Model.load(p)


def test_wrong_path_type():
    with pytest.raises(mullama.InvalidConfigError):
        mullama.Model.load(42)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -3}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": 2}, "min_p"),
        ({"repeat_penalty": 0}, "repeat_penalty"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop": [3]}, "stop"),
        ({"include_probabilities": "yes"}, "include_probabilities"),
    ],
)
def test_bad_sampling_values(kwargs, match):
    with pytest.raises(mullama.InvalidConfigError, match=match):
        StreamConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"context_size": -1}, "context_size"),
        ({"threads": 0}, "threads"),
        ({"batch_size": 0}, "batch_size"),
        ({"context_size": "big"}, "context_size"),
    ],
)
def test_bad_context_values(tiny_model, kwargs, match):
    with pytest.raises(mullama.InvalidConfigError, match=match):
        tiny_model.create_context(**kwargs)


def test_token_ids_outside_vocabulary(tiny_model, tiny_ctx):
    with pytest.raises(mullama.InvalidTokenError, match="512"):
        tiny_ctx.eval([1, 512])
    with pytest.raises(mullama.InvalidTokenError, match="-1"):
        tiny_ctx.generate([1, -1])
    with pytest.raises(mullama.InvalidTokenError):
        tiny_model.detokenize([10**6])
    with pytest.raises(mullama.InvalidTokenError):
        tiny_model.token_to_piece(99999)
    with pytest.raises(mullama.InvalidConfigError):
        tiny_ctx.eval(["a"])
    assert tiny_ctx.n_past == 0


def test_wrong_types(tiny_model, tiny_ctx):
    with pytest.raises(mullama.InvalidConfigError):
        tiny_model.tokenize(b"bytes")
    with pytest.raises(mullama.InvalidConfigError):
        tiny_ctx.generate("x", config={"max_tokens": 3})


def test_empty_prompt_on_empty_context(tiny_ctx):
    with pytest.raises(mullama.MullamaError, match="empty"):
        tiny_ctx.generate([])


def test_logits_before_any_eval(tiny_ctx):
    with pytest.raises(mullama.MullamaError, match="empty"):
        tiny_ctx.logits()


def test_use_after_close(tiny_model_path):
    model = mullama.Model.load(tiny_model_path)
    ctx = model.create_context(64, threads=1)
    ctx.close()
    ctx.close()
    for call in (lambda: ctx.generate("a"), lambda: ctx.eval([1]), ctx.logits, ctx.reset,
                 lambda: list(ctx.stream("a"))):
        with pytest.raises(mullama.ClosedError):
            call()
    model.close()
    for call in (lambda: model.tokenize("a"), lambda: model.create_context(), lambda: model.info,
                 lambda: model.detokenize([1])):
        with pytest.raises(mullama.ClosedError):
            call()


def test_state_errors(tiny_model, tiny_ctx, tmp_path):
    with pytest.raises(mullama.StateError, match="not found"):
        tiny_ctx.load_state(tmp_path / "missing")
    bad = tmp_path / "bad.state"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(mullama.StateError):
        tiny_ctx.load_state(bad)
    assert tiny_ctx.n_past == 0
    with pytest.raises(mullama.StateError):
        tiny_ctx.save_state(tmp_path / "no" / "such" / "dir" / "s")


def test_state_from_another_model(tiny_ctx, default_model, tmp_path):
    p = tmp_path / "other.state"
    with default_model.create_context(256) as other:
        other.eval(default_model.tokenize("hello"))
        other.save_state(p)
    with pytest.raises(mullama.StateError):
        tiny_ctx.load_state(p)
    assert tiny_ctx.generate("ab", StreamConfig.greedy(2)).tokens
