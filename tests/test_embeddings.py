"""Embeddings: Model.embed, AsyncModel.embed (asyncio and trio) and their semantics,
which are llama.cpp's llama-embedding's (its pooling, its Euclidean normalisation)."""

from __future__ import annotations

import anyio
import numpy as np
import pytest

import mullama
from mullama import StreamConfig
from mullama.aio import AsyncModel

TEXTS = ["hello world", "The cat sat on the mat.", "Embeddings map text to vectors.", "x"]


@pytest.fixture
def model(default_model_path):
    """A model of the test's own: its embedding contexts close with it."""
    with mullama.Model.load(default_model_path) as m:
        yield m


def test_pooling_is_llama_cpps(model):
    """Mean, first (cls) and last pooling of the per-token embeddings (pooling
    none), then each row divided by its Euclidean norm."""
    tokens = model.embed(TEXTS, normalize=False, pooling="none")
    assert [t.shape for t in tokens] == [(len(model.tokenize(s)), 576) for s in TEXTS]
    for pooling, pick in (("mean", lambda t: t.mean(0)), ("cls", lambda t: t[0]), ("last", lambda t: t[-1])):
        raw = model.embed(TEXTS, normalize=False, pooling=pooling)
        assert raw.dtype == np.float32 and raw.shape == (len(TEXTS), 576)
        np.testing.assert_allclose(raw, np.stack([pick(t) for t in tokens]), rtol=1e-5, atol=1e-5)
        unit = model.embed(TEXTS, pooling=pooling)
        np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)
    # a generative model names no pooling: mean
    np.testing.assert_array_equal(model.embed(TEXTS), model.embed(TEXTS, pooling="mean"))
    normed = model.embed(TEXTS[:2], pooling="none")
    np.testing.assert_allclose(np.linalg.norm(normed[1], axis=1), 1.0, rtol=1e-5)  # each token's row


def same_directions(a, b) -> bool:
    """Rows equal up to float32 rounding: batching changes the attention's
    shapes, hence llama.cpp's kernels and the last bits (llama-embedding's too)."""
    cos = np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return bool(np.all(cos > 0.99999)) and np.allclose(a, b, atol=3e-3)


def test_batches_equal_one_text_at_a_time(model):
    together = model.embed(TEXTS * 3)
    alone = np.concatenate([model.embed(t) for t in TEXTS])
    assert same_directions(together, np.concatenate([alone] * 3))
    assert not same_directions(alone[:1], alone[1:2])  # (different texts are told apart)
    # more texts than one batch holds, and token ids as input; progress after each batch
    seen = []
    many = model.embed([model.tokenize(t) for t in TEXTS] * 40, progress=lambda d, n: seen.append((d, n)))
    assert many.shape == (160, 576) and seen[-1] == (160, 160) and len(seen) >= 3
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert same_directions(many, np.concatenate([alone] * 40))


def test_bad_input_is_a_clear_error(model, default_model_path, tiny_model_path):
    with pytest.raises(mullama.ContextOverflowError, match="input 1 has .* tokens, more than the embedding "
                                                          "context's 16"):
        model.embed(["short", "word " * 40], context_size=16)
    with pytest.raises(mullama.InvalidConfigError, match="input 0 is empty"):
        model.embed([""])
    with pytest.raises(mullama.InvalidConfigError, match="pooling must be one of none, mean, cls, last"):
        model.embed("x", pooling="max")
    with pytest.raises(mullama.InvalidConfigError, match="normalize must be a bool"):
        model.embed("x", normalize="yes")
    with pytest.raises(mullama.InvalidTokenError):
        model.embed([[1, 2, model.n_vocab]])
    with mullama.Model.load(default_model_path, vocab_only=True) as vocab:
        with pytest.raises(mullama.InvalidModelError, match="vocab_only"):
            vocab.embed("x")
    m = mullama.Model.load(default_model_path)
    m.embed("x")
    m.close()  # its embedding context with it
    with pytest.raises(mullama.ClosedError):
        m.embed("x")
    with mullama.Model.load(tiny_model_path) as tiny:
        assert tiny.embed(["a", "b"]).shape[0] == 2


@pytest.mark.anyio
async def test_async_embed_equals_sync_and_leaves_generation_alone(default_model_path, model):
    with model.create_context(512) as ctx:
        expected_text = ctx.generate("The sky is", StreamConfig.greedy(16)).text
    expected = model.embed(TEXTS)
    async with await AsyncModel.load(default_model_path, max_concurrent=2, context_size=512) as amodel:
        results = {}

        async def generate():
            results["gen"] = await amodel.generate("The sky is", config=StreamConfig.greedy(16))

        async def embed():
            results["emb"] = await amodel.embed(TEXTS)

        async with anyio.create_task_group() as tg:
            tg.start_soon(generate)
            tg.start_soon(embed)
        assert results["gen"].text == expected_text
        assert same_directions(results["emb"], expected)


@pytest.mark.anyio
async def test_cancelling_an_embedding_stops_it_and_the_model_goes_on(default_model_path):
    long = ["A sentence about nothing in particular, repeated for length. " * 20] * 200
    async with await AsyncModel.load(default_model_path, max_concurrent=1) as model:
        with anyio.move_on_after(0.3) as scope:
            await model.embed(long)
        assert scope.cancelled_caught  # (200 texts of 300 tokens take seconds)
        assert model.active_workers == 0  # the worker has returned
        got = await model.embed(TEXTS[:2])
        assert got.shape == (2, 576)
        # a cancelled call never cancels another one
        with anyio.move_on_after(0.05):
            await model.embed(long)
        assert (await model.embed(TEXTS[:2])).shape == (2, 576)
