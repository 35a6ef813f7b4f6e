"""Speculative decoding (prompt lookup): the output is the output of decoding
without it, token for token, on a context and on the batching engine (asyncio
and trio); drafts are counted; bad settings are refused."""

from __future__ import annotations

import anyio
import pytest

import mullama
from mullama import InvalidConfigError, SpeculativeConfig, StreamConfig
from mullama.aio import AsyncModel
from test_engine import run_all

#: prompts whose greedy continuations (on the tiny model) repeat earlier n-grams: drafts are made,
#: some accepted, some rejected
PROMPTS = ["one two three four five six one two three four five six one two", "the cat sat on the mat " * 5]
#: drafts whatever the machine's speed (the cost model's choices depend on measured times)
SPEC = SpeculativeConfig(adaptive=False)


def plain_and_speculative(ctx, prompt, config):
    out = []
    for spec in (None, SPEC):
        ctx.reset()
        out.append(ctx.generate(prompt, config.replace(speculative=spec)))
    return out


def test_greedy_output_is_the_same_with_and_without_speculation(tiny_model):
    drafted = accepted = 0
    with tiny_model.create_context(context_size=1024, threads=1) as ctx:
        for prompt in PROMPTS:
            plain, spec = plain_and_speculative(ctx, prompt, StreamConfig.greedy(200, include_probabilities=True))
            assert spec.tokens == plain.tokens and spec.text == plain.text
            assert spec.logprobs == plain.logprobs  # bit for bit: verification computes what a decode step does
            assert spec.finish_reason == plain.finish_reason
            assert plain.timings.drafted_tokens == 0
            assert spec.timings.accepted_tokens <= spec.timings.drafted_tokens
            assert spec.metrics.drafted_tokens == spec.timings.drafted_tokens
            drafted += spec.timings.drafted_tokens
            accepted += spec.timings.accepted_tokens
    assert 0 < accepted < drafted  # drafts were made, and both accepted and rejected


@pytest.mark.parametrize("temperature", [0.1, 0.2])
def test_seeded_sampling_is_the_same_with_and_without_speculation(tiny_model, temperature):
    config = StreamConfig(max_tokens=200, seed=3, temperature=temperature, top_k=0, top_p=1.0, min_p=0.0)
    with tiny_model.create_context(context_size=1024, threads=1) as ctx:
        plain, spec = plain_and_speculative(ctx, PROMPTS[0], config)
    assert spec.tokens == plain.tokens
    assert spec.timings.drafted_tokens > 0  # (every sampled token went through the same sampler)


def test_speculation_keeps_grammar_penalties_and_stop_strings(tiny_model):
    with tiny_model.create_context(context_size=1024, threads=1) as ctx:
        greedy = ctx.generate(PROMPTS[0], StreamConfig.greedy(60))
        stop = greedy.text[len(greedy.text) // 2:][:3]
        for config in (StreamConfig.greedy(120, repeat_penalty=1.3, repeat_last_n=16),
                       StreamConfig.greedy(120, grammar='root ::= ([a-z] | " ")+'),
                       StreamConfig.greedy(120, stop=[stop])):
            plain, spec = plain_and_speculative(ctx, PROMPTS[0], config)
            assert spec.tokens == plain.tokens and spec.text == plain.text
            assert spec.finish_reason == plain.finish_reason


def test_a_speculative_context_continues_exactly(tiny_model):
    """After a speculative generation the context holds its tokens and only them:
    a continuation equals the continuation of a plain run."""
    with tiny_model.create_context(context_size=1024, threads=1) as a, \
            tiny_model.create_context(context_size=1024, threads=1) as b:
        a.generate(PROMPTS[0], StreamConfig.greedy(100))
        assert b.generate(PROMPTS[0], StreamConfig.greedy(100, speculative=SPEC)).timings.accepted_tokens > 0
        assert a.tokens == b.tokens and a.kv_used() == b.kv_used()
        # (a cell a rejected draft left behind would make this decode fail: positions must follow on)
        assert a.generate(" and", StreamConfig.greedy(40)).tokens == b.generate(" and", StreamConfig.greedy(40)).tokens


def test_a_speculative_stream_left_early_keeps_what_was_seen(tiny_model):
    """Speculation hands over several tokens per step; a consumer that leaves
    the stream keeps only the tokens it saw, and the context goes on from there."""
    with tiny_model.create_context(1024, threads=1) as plain_ctx, tiny_model.create_context(1024, threads=1) as ctx:
        plain = plain_ctx.generate(PROMPTS[0], StreamConfig.greedy(200)).tokens
        seen = []
        for tok in ctx.stream(PROMPTS[0], StreamConfig.greedy(200, speculative=SPEC)):
            seen.append(tok.token_id)
            if len(seen) == 50:
                break
        assert seen == plain[:50]
        assert ctx.tokens == tiny_model.tokenize(PROMPTS[0]) + seen
        more = ctx.generate("", StreamConfig.greedy(20, speculative=SPEC)).tokens
        plain_ctx.reset()
        plain_ctx.eval(tiny_model.tokenize(PROMPTS[0]) + seen)
        assert more == plain_ctx.generate("", StreamConfig.greedy(20)).tokens


def test_speculative_settings_are_checked():
    assert StreamConfig(speculative=True).speculative == SpeculativeConfig()
    assert StreamConfig(speculative=False).speculative is None
    for bad in (dict(max_draft=0), dict(max_draft=257), dict(ngram_min=0), dict(ngram_min=4, ngram_max=3),
                dict(ngram_max=65), dict(max_draft=2.5)):
        with pytest.raises(InvalidConfigError, match="speculative"):
            SpeculativeConfig(**bad)
    with pytest.raises(InvalidConfigError, match="speculative must be"):
        StreamConfig(speculative="yes")


# -- the batching engine -------------------------------------------------------------


def expected_tokens(model_path, config):
    with mullama.Model.load(model_path) as m, m.create_context(1024, threads=1) as ctx:
        out = []
        for p in PROMPTS:
            ctx.reset()
            out.append(ctx.generate(p, config).tokens)
        return out


@pytest.mark.anyio
async def test_engine_speculation_gives_the_plain_output(tiny_model_path):
    greedy = StreamConfig.greedy(200)
    expected = expected_tokens(tiny_model_path, greedy)
    async with await AsyncModel.load(tiny_model_path, max_concurrent=2, context_size=1024, threads=1,
                                     prompt_cache_bytes=0) as model:
        alone = [await model.generate(p, config=greedy.replace(speculative=SPEC)) for p in PROMPTS]
        assert [c.tokens for c in alone] == expected
        stats = model.speculative_stats()
        assert stats.drafted_tokens == sum(c.timings.drafted_tokens for c in alone)
        assert stats.accepted_tokens == sum(c.timings.accepted_tokens for c in alone)
        assert 0 < stats.accepted_tokens < stats.drafted_tokens and stats.drafts > 0
        assert 0.0 < stats.acceptance_rate < 1.0

        # together: both speculative (drafts cut to one length), then one of them plain
        for specs in ([SPEC, SPEC], [SPEC, None]):
            results = await run_all(model, PROMPTS, [greedy.replace(speculative=spec) for spec in specs])
            assert [c.tokens for c in results] == expected


@pytest.mark.anyio
async def test_engine_speculation_is_cancelled_and_leaves_the_slot_ready(tiny_model_path):
    greedy = StreamConfig.greedy(200)
    expected = expected_tokens(tiny_model_path, greedy)
    async with await AsyncModel.load(tiny_model_path, max_concurrent=1, context_size=1024, threads=1,
                                     prompt_cache_bytes=0) as model:
        async with model.generate_stream(PROMPTS[0], greedy.replace(speculative=SPEC)) as stream:
            seen = 0
            async for _ in stream:
                seen += 1
                if seen == 30:
                    break
        # the slot is free again, and the next request (its prompt partly cached) is exact
        got = await model.generate(PROMPTS[0], config=greedy.replace(speculative=SPEC))
        assert got.tokens == expected[0]
        assert model.active_workers == 0


# -- the server --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_server_speculation_fields_default_and_metrics(tiny_model_path, tiny_model):
    import httpx

    from mullama.server import create_app

    with tiny_model.create_context(1024, threads=1) as ctx:
        expected = ctx.generate(PROMPTS[0], StreamConfig.greedy(120)).text
    body = {"prompt": PROMPTS[0], "max_tokens": 120, "temperature": 0}
    async with await AsyncModel.load(tiny_model_path, context_size=1024, threads=1, prompt_cache_bytes=0) as model:
        for default in (None, SpeculativeConfig(max_draft=4, adaptive=False)):
            app = create_app(model, model_id="t", speculative=default)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as c:
                for extra in ({}, {"speculative": True}, {"speculative": False},
                              {"speculative": {"max_draft": 6, "ngram_min": 2, "ngram_max": 4, "adaptive": False}}):
                    before = model.speculative_stats()
                    r = await c.post("/v1/completions", json={**body, **extra})
                    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
                    drafted = model.speculative_stats().drafted_tokens - before.drafted_tokens
                    on = extra.get("speculative", default is not None)
                    if on is True and default is None:  # the adaptive defaults: drafts depend on timing
                        continue
                    assert (drafted > 0) == bool(on), extra  # (on: the server's settings or the object's)
                metrics = (await c.get("/metrics")).text
                stats = model.speculative_stats()
                assert f"mullama_speculative_drafted_tokens_total {stats.drafted_tokens}" in metrics
                assert f"mullama_speculative_accepted_tokens_total {stats.accepted_tokens}" in metrics
                assert "mullama_speculative_acceptance_rate " in metrics
                for bad, param in (({"speculative": "yes"}, "speculative"),
                                   ({"speculative": {"max_draft": 0}}, "speculative"),
                                   ({"speculative": {"draft": 3}}, "speculative"),
                                   ({"speculative.n_max": 1000}, "speculative.n_max"),
                                   ({"speculative.n_max": 4, "speculative": False}, "speculative.n_max")):
                    r = await c.post("/v1/completions", json={**body, **bad})
                    assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.json())


# -- a draft model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_tiny_path(tmp_path_factory):
    """A tiny model with the same tokens and other weights: a draft model that is sometimes right."""
    from tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("draft") / "other.gguf", seed=99)


@pytest.mark.parametrize("draft", ["same", "other"])
def test_a_draft_model_drafts_and_the_output_is_unchanged(tiny_model, tiny_model_path, other_tiny_path, draft):
    path = tiny_model_path if draft == "same" else other_tiny_path
    config = StreamConfig.greedy(150)
    with tiny_model.create_context(1024, threads=1) as plain_ctx, \
            tiny_model.create_context(1024, threads=1, draft_model=path) as ctx:
        for prompt in PROMPTS:
            plain_ctx.reset()
            ctx.reset()
            plain = plain_ctx.generate(prompt, config)
            spec = ctx.generate(prompt, config.replace(speculative=SPEC))  # "auto": the draft model
            assert spec.tokens == plain.tokens
            t = spec.timings
            assert t.drafted_tokens > 0
            if draft == "same":  # the model drafting for itself is always right
                assert t.accepted_tokens == t.drafted_tokens
            else:
                assert t.accepted_tokens < t.drafted_tokens
            # prompt lookup on the same context still works
            ctx.reset()
            lookup = ctx.generate(prompt, config.replace(speculative=SpeculativeConfig(method="prompt_lookup", adaptive=False)))
            assert lookup.tokens == plain.tokens


def test_a_draft_model_needs_the_same_tokens(tiny_model, default_model_path, tiny_model_path):
    from mullama import IncompatibleDraftModelError

    with pytest.raises(IncompatibleDraftModelError, match="cannot draft for .*token"):
        tiny_model.create_context(512, threads=1, draft_model=default_model_path)
    with mullama.Model.load(default_model_path) as big, pytest.raises(IncompatibleDraftModelError, match="tokens"):
        big.create_context(512, threads=1, draft_model=tiny_model)
    with pytest.raises(mullama.ModelNotFoundError):
        tiny_model.create_context(512, threads=1, draft_model=str(tiny_model_path) + ".missing")
    with tiny_model.create_context(512, threads=1) as ctx, \
            pytest.raises(InvalidConfigError, match="needs a draft model"):
        ctx.generate("x", StreamConfig.greedy(4, speculative=SpeculativeConfig(method="draft_model")))
    with pytest.raises(InvalidConfigError, match="speculative.method"):
        SpeculativeConfig(method="medusa")


def test_a_loaded_draft_model_is_shared_and_left_open(tiny_model, other_tiny_path):
    expected = None
    with tiny_model.create_context(512, threads=1) as ctx:
        expected = ctx.generate(PROMPTS[0], StreamConfig.greedy(40)).tokens
    with mullama.Model.load(other_tiny_path) as draft:
        with tiny_model.create_context(512, threads=1, draft_model=draft) as ctx:
            assert ctx.generate(PROMPTS[0], StreamConfig.greedy(40, speculative=SPEC)).tokens == expected
        assert not draft.closed  # the context borrowed it
        with tiny_model.create_context(512, threads=1, draft_model=draft) as ctx:
            draft.close()  # closed under the context: no more drafts, the same output
            done = ctx.generate(PROMPTS[0], StreamConfig.greedy(40, speculative=SPEC))
            assert done.tokens == expected and done.timings.drafted_tokens == 0


def test_a_draft_model_loaded_by_a_context_closes_with_its_model(tiny_model_path, other_tiny_path):
    model = mullama.Model.load(tiny_model_path)
    ctx = model.create_context(512, threads=1, draft_model=other_tiny_path)
    drafter, draft = ctx._draft
    model.close()
    assert ctx.closed and drafter.closed and draft.closed


def test_a_bad_speculative_setting_leaves_the_context_untouched(tiny_model):
    with tiny_model.create_context(512, threads=1) as ctx:
        with pytest.raises(InvalidConfigError, match="needs a draft model"):
            ctx.generate(PROMPTS[0], StreamConfig.greedy(4, speculative=SpeculativeConfig(method="draft_model")))
        assert ctx.n_past == 0


@pytest.mark.parametrize("batch_size, max_tokens, context_size", [
    (4, 150, 1024),   # drafts cut to the batch (3 tokens after the pending one)
    (512, 1, 1024),   # one token: nothing to verify
    (512, 2, 1024),
    (512, 37, 1024),  # the last drafts cut to the tokens left
    (512, 500, 0),    # into a full context (context_size 0: prompt + a few hundred tokens, below)
])
def test_long_drafts_at_the_edges(tiny_model, tiny_model_path, batch_size, max_tokens, context_size):
    """The model drafting for itself: every draft is accepted, as long as the
    limits allow (the batch, max_tokens, the context's end)."""
    n_ctx = context_size or len(tiny_model.tokenize(PROMPTS[1])) + 120
    config = StreamConfig.greedy(max_tokens)
    with tiny_model.create_context(n_ctx, threads=1, batch_size=batch_size) as plain_ctx, \
            tiny_model.create_context(n_ctx, threads=1, batch_size=batch_size, draft_model=tiny_model) as ctx:
        for prompt in PROMPTS:
            plain_ctx.reset()
            ctx.reset()
            plain = plain_ctx.generate(prompt, config)
            spec = ctx.generate(prompt, config.replace(speculative=SPEC))
            assert spec.tokens == plain.tokens and spec.finish_reason == plain.finish_reason
            assert ctx.tokens == plain_ctx.tokens and ctx.kv_used() == plain_ctx.kv_used()
            assert spec.timings.accepted_tokens == spec.timings.drafted_tokens
            if max_tokens > 2:
                assert spec.timings.drafted_tokens > 0


@pytest.mark.anyio
@pytest.mark.parametrize("draft", ["same", "other"])
async def test_engine_with_a_draft_model(tiny_model_path, other_tiny_path, draft):
    greedy = StreamConfig.greedy(150)
    expected = expected_tokens(tiny_model_path, greedy)
    async with await AsyncModel.load(tiny_model_path, max_concurrent=2, context_size=1024, threads=1,
                                     prompt_cache_bytes=0,
                                     draft_model=tiny_model_path if draft == "same" else other_tiny_path) as model:
        results = await run_all(model, PROMPTS, [greedy.replace(speculative=SPEC)] * 2)
        assert [c.tokens for c in results] == expected
        assert model.speculative_stats().drafted_tokens > 0
        if draft == "same":  # always right: both slots draft, verified side by side
            assert all(0 < c.timings.accepted_tokens == c.timings.drafted_tokens for c in results)
    async with await AsyncModel.load(tiny_model_path, max_concurrent=1, context_size=512, threads=1) as model:
        with pytest.raises(InvalidConfigError, match="needs a draft model"):
            await model.generate("x", config=StreamConfig.greedy(4, speculative=SpeculativeConfig(method="draft_model")))
