"""The batching engine's prompt cache: reused KV cells give the outputs an
uncached run gives (asyncio and trio)."""

from __future__ import annotations

import mmap

import anyio
import pytest

import mullama
from mullama import StreamConfig, _core
from mullama import _engine
from mullama._engine import SAVE_MIN_TOKENS
from mullama._prompt_cache import HostPromptCache, default_prompt_cache_bytes
from mullama.aio import AsyncModel

pytestmark = pytest.mark.anyio

GREEDY = StreamConfig.greedy(12)
SYSTEM = "You are a careful assistant who answers in one short sentence. " * 6


def cold(model_path, prompts, config=GREEDY):
    """Each prompt on a fresh context: nothing cached."""
    with mullama.Model.load(model_path) as m:
        out = []
        for p in prompts:
            with m.create_context(1024, threads=1) as ctx:
                out.append(ctx.generate(p, config).tokens)
        return out


async def in_order(model, prompts, config=GREEDY):
    return [await model.generate(p, config=config) for p in prompts]


async def together(model, prompts, config=GREEDY):
    results = [None] * len(prompts)

    async def one(i):
        results[i] = await model.generate(prompts[i], config=config)

    async with anyio.create_task_group() as tg:
        for i in range(len(prompts)):
            tg.start_soon(one, i)
    return results


async def test_a_repeated_prefix_is_reused_and_changes_nothing(tiny_model_path):
    prompts = [SYSTEM + "alpha", SYSTEM + "alpha", SYSTEM + "beta", SYSTEM + "alpha gamma"]
    expected = cold(tiny_model_path, prompts)
    async with await AsyncModel.load(tiny_model_path, max_concurrent=2, context_size=1024, threads=1) as model:
        got = await in_order(model, prompts)
        assert [c.tokens for c in got] == expected
        cached = [c.timings.cached_tokens for c in got]
        assert cached[0] == 0 and all(n > 0 for n in cached[1:])
        # the second prompt was evaluated before: all of it but the last two tokens
        assert cached[1] == got[1].timings.prompt_tokens - 2
        assert got[3].metrics.cached_tokens == cached[3]
        engine = model._engine
        assert engine.cached_prompt_tokens == sum(cached)
        assert engine.evaluated_prompt_tokens == sum(c.timings.prompt_tokens for c in got) - sum(cached)
        assert model.kv_used() == 0 and engine.cached_cells > 0  # no request holds cells; the cache does


async def test_requests_sharing_a_prompt_evaluate_it_once(tiny_model_path):
    """Requests arriving together copy the shared prefix from the first one's sequence."""
    prompts = [SYSTEM + s for s in ("one", "two", "three", "four")]
    expected = cold(tiny_model_path, prompts)
    async with await AsyncModel.load(tiny_model_path, max_concurrent=4, context_size=1024, threads=1) as model:
        got = await together(model, prompts)
        assert [c.tokens for c in got] == expected
        toks = [await model.tokenize(p) for p in prompts]
        shared = min(_core.common_prefix(toks[0], t) for t in toks[1:])
        assert shared > 40
        cached = sorted(c.timings.cached_tokens for c in got)
        # one request evaluated the shared part; the others copied it from its sequence
        assert cached[0] == 0 and all(n >= shared for n in cached[1:])
        assert model._engine.evaluated_prompt_tokens == sum(len(t) for t in toks) - sum(cached)


@pytest.mark.parametrize("flash_attention,mixed", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("prefill_chunk", [256, 8])
def test_prompts_evaluated_together_are_computed_as_alone(tiny_model_path, prefill_chunk, flash_attention, mixed):
    """Several prompts' chunks share a decode (equal lengths, so llama.cpp
    never computes a token in a piece of one token per sequence): each
    prompt's logits are bit for bit those of the prompt evaluated alone in
    its slot, and its cells count as reusable. Prompts one token apart would leave a last
    token alone in a batch of unequal chunks; a one-token prompt goes alone;
    a sequence continuing 300 cached cells shares the decode (a longer KV view).
    With flash attention chunks go one by one. *mixed*: the engine probed its
    decode cells (probe_decode_cells, exact for these F32 weights): chunks of
    any lengths share a decode, and the results are still those of each
    prompt alone (decoding tokens with chunks: the next test)."""
    from mullama._generation import new_sampler

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    cfg = StreamConfig.greedy(1, include_probabilities=True)
    with mullama.Model.load(tiny_model_path) as m:
        prompts = [m.tokenize(" ".join(words[(i * 3 + k) % 10] for k in range(n)))
                   for i, n in enumerate((23, 24, 37, 11))] + [m.tokenize("")]
        assert len(prompts[1]) == len(prompts[0]) + 1 and len(prompts[4]) == 1

        long = m.tokenize(" ".join(words[k % 7] for k in range(400)))[:300]

        def run(slots):
            engine = _core.BatchEngine(m._core, 5, 512, 512, 1, flash_attention, prefill_chunk)
            try:
                assert engine.probe_decode_cells([5, 6, 7, 8]) if mixed else not engine.decode_exact
                # slot 2 holds 300 cells (its KV view is longer than the others'), its prompt continues them
                engine.start(2, long, new_sampler(m._core, cfg), 1, True)
                while engine.run(5.0):
                    pass
                engine.release(2)
                for i in slots:
                    if i == 2:
                        engine.start(2, long + prompts[2], new_sampler(m._core, cfg), 1, True, reuse=len(long))
                    else:
                        engine.start(i, prompts[i], new_sampler(m._core, cfg), 1, True)
                decoded = []
                while n := engine.run(5.0):  # (returns when a request finishes)
                    decoded.append(n)
                return [engine.drain(i)[::2] for i in slots], [engine.cached(i) for i in slots], decoded
            finally:
                engine.close()

        alone = [run([i])[0][0] for i in range(5)]
        together, cached, decoded = run(range(5))
        assert together == alone
        assert cached[:4] == prompts[:2] + [long + prompts[2]] + prompts[3:4]
        if prefill_chunk == 256 and mixed:  # all five prompts' chunks in one decode, as many tokens as fit
            assert decoded[0] == min(256, sum(len(p) for p in prompts))
        elif prefill_chunk == 256 and not flash_attention:
            # the one-token prompt alone, then the four together (the shortest ends them)
            assert decoded[:2] == [1, 4 * len(prompts[3])]


async def test_host_cache_under_a_tiny_budget_keeps_outputs_exact(tiny_model_path):
    """One slot, three conversations in turn: the host cache saves and restores
    them, evicting under its budget, and every reply equals the cold one."""
    convs = [f"Conversation {i}. " + SYSTEM * 2 for i in range(3)]
    order = [0, 1, 0, 2, 1, 2, 0, 0, 1]
    prompts = [convs[c] + "x" * i for i, c in enumerate(order)]
    expected = cold(tiny_model_path, prompts)
    async with await AsyncModel.load(tiny_model_path, max_concurrent=1, context_size=1024, threads=1) as model:
        probe = await model.generate(prompts[0], config=GREEDY)
        engine = model._engine
        entry = len(engine._core.save_sequence(0))  # the state of one conversation's sequence
    budget = int(entry * 1.5)  # room for one entry, not two
    async with await AsyncModel.load(tiny_model_path, max_concurrent=1, context_size=1024, threads=1,
                                     prompt_cache_bytes=budget) as model:
        engine = model._engine
        got = []
        for p in prompts:
            got.append(await model.generate(p, config=GREEDY))
            assert engine.host_cache.bytes <= budget
        assert [c.tokens for c in got] == expected
        assert probe.tokens == expected[0]
        cache = engine.host_cache
        assert cache.saves >= 3 and cache.evictions >= 1 and len(cache) == 1
        assert cache.restores >= 1  # the conversation saved last came back from host memory
        assert any(c.timings.cached_tokens > SAVE_MIN_TOKENS for c in got[3:])


async def test_host_cache_restores_alternating_prompts_exactly(tiny_model_path):
    a, b = SYSTEM + "first topic", "A different start entirely, " * 8
    prompts = [a, b, a + " more", b + " more", a]
    expected = cold(tiny_model_path, prompts)
    async with await AsyncModel.load(tiny_model_path, max_concurrent=1, context_size=1024, threads=1,
                                     prompt_cache_bytes=64 << 20) as model:
        got = await in_order(model, prompts)
        assert [c.tokens for c in got] == expected
        assert all(c.timings.cached_tokens > SAVE_MIN_TOKENS for c in got[2:])
        stats = model.prompt_cache_stats()
        assert stats.host_budget == 64 << 20 and stats.host_restores >= 2 and stats.host_saves >= 2
        assert 0 < stats.host_bytes == model._engine.host_cache.bytes and stats.host_entries >= 1
        assert stats.cached_prompt_tokens == sum(c.timings.cached_tokens for c in got)
        assert 0.5 < stats.hit_ratio < 1
        # saved states are mappings of their own (freed pages go back to the system, never kept by malloc)
        assert all(isinstance(e.data, mmap.mmap) for e in model._engine.host_cache._entries.values())

        assert model.clear_prompt_cache() == stats.host_bytes
        after = model.prompt_cache_stats()
        assert after.host_bytes == 0 and after.host_entries == 0 and after.host_restores == stats.host_restores
        assert (await model.generate(b + " again", config=GREEDY)).tokens == cold(tiny_model_path, [b + " again"])[0]
        assert model.prompt_cache_stats().host_restores == stats.host_restores  # nothing left to restore


async def test_no_host_cache_when_its_budget_is_zero(tiny_model_path):
    async with await AsyncModel.load(tiny_model_path, max_concurrent=1, context_size=512, threads=1,
                                     prompt_cache_bytes=0) as model:
        assert model.config.prompt_cache_bytes == 0 and model._engine.host_cache is None
        await in_order(model, [SYSTEM + "a", "other " * 40, SYSTEM + "a"])
        assert model._engine.cached_cells > 0  # the slot still keeps its own cells


async def test_a_cancelled_request_leaves_no_poisoned_cache(default_model_path):
    """Cancelled during its prompt's evaluation or its generation, a request
    leaves cells that are exactly what they claim: the next one is exact."""
    prompt = (SYSTEM + "Tell me about the sea. ") * 12
    expected = cold(default_model_path, [prompt])[0]
    async with await AsyncModel.load(default_model_path, max_concurrent=1, context_size=1024, timeout_ms=None) as model:
        for wait in (0.05, 0.3, 1.0):
            with anyio.move_on_after(wait):
                async with model.generate_stream(prompt, GREEDY) as stream:
                    async for _ in stream:
                        pass
            c = await model.generate(prompt, config=GREEDY)
            assert c.tokens == expected
        assert model.kv_used() == 0


@pytest.fixture
def refreshing(monkeypatch):
    """Engines made meanwhile take decode cells for inexact (as for Q4_K weights): generated
    tokens are refreshed. The tiny and the default model's decode cells are exact in mullama's build."""
    monkeypatch.setattr(_engine, "probe_decode_cells", lambda core, n_vocab: False)


async def idle(model) -> None:
    """Wait until the engine has refreshed its free slots (a bound, not a timing assertion)."""
    with anyio.fail_after(120):
        while model._engine._core.idle_work():
            await anyio.sleep(0.01)


@pytest.mark.parametrize("pause", [False, True])
async def test_a_chat_hits_the_cache_on_every_turn(default_model_path, pause, refreshing):
    """A growing conversation through AsyncModel.chat: each turn reuses the last
    one's cells, and every reply equals the reply computed from scratch. With
    a pause between turns (a user reading), the reply's own tokens, evaluated
    again while the engine is idle, are reused too; without one, that work
    may be cut short by the next turn, which evaluates the rest itself."""
    last_prompt = 0
    questions = ["Name a planet.", "How far is it from the sun?", "And its largest moon?", "Thanks!"]
    cfg = StreamConfig.greedy(24)
    messages = [{"role": "system", "content": "You answer briefly."}]
    async with await AsyncModel.load(default_model_path, max_concurrent=2, context_size=2048, timeout_ms=None) as model:
        with mullama.Model.load(default_model_path) as m:
            for i, q in enumerate(questions):
                messages.append({"role": "user", "content": q})
                reply = await model.chat(messages, cfg)
                with m.create_context(2048) as ctx:
                    assert reply.text == ctx.chat(messages, cfg).text
                if i and pause:  # the last turn's prompt and (some of) its reply
                    assert reply.timings.cached_tokens > last_prompt
                elif i:  # the last turn's prompt
                    assert reply.timings.cached_tokens >= last_prompt - 2
                last_prompt = reply.timings.prompt_tokens
                messages.append({"role": "assistant", "content": reply.text})
                if pause:
                    await idle(model)
        assert model.prompt_cache_stats().refreshed_tokens > 0
        assert not model.prompt_cache_stats().decoded_cells_reused


async def test_an_agent_reuses_each_reply_at_once_and_exactly(default_model_path):
    """The default model's decode steps compute cells as a prompt does (the engine's probe): a
    conversation whose next turn is sent the moment a reply ends (an agent) reuses the whole
    last turn, its reply included, with nothing evaluated again, and every reply equals the
    reply computed from scratch."""
    cfg = StreamConfig.greedy(24)
    messages = [{"role": "system", "content": "You answer briefly."}]
    last_prompt = 0
    asked = []
    async with await AsyncModel.load(default_model_path, max_concurrent=2, context_size=2048, timeout_ms=None) as model:
        assert model.prompt_cache_stats().decoded_cells_reused
        for i, q in enumerate(["Name a planet.", "How far is it from the sun?", "And its largest moon?"]):
            messages.append({"role": "user", "content": q})
            reply = await model.chat(messages, cfg)  # the next turn at once
            if i:  # the last turn's prompt and its reply
                assert reply.timings.cached_tokens > last_prompt + 2
            last_prompt = reply.timings.prompt_tokens
            asked.append((list(messages), reply.text))
            messages.append({"role": "assistant", "content": reply.text})
        assert not model._engine._core.idle_work() and model.prompt_cache_stats().refreshed_tokens == 0
    with mullama.Model.load(default_model_path) as m:
        for history, text in asked:
            with m.create_context(2048) as ctx:
                assert text == ctx.chat(history, cfg).text


async def test_refreshed_tails_are_exact_and_give_way_to_requests(tiny_model_path, refreshing):
    """A lone request's generated tokens are evaluated again once it ends, and
    a follow-up reuses them; requests arriving right after one another stop
    that work. Every output equals the uncached one."""
    long = StreamConfig.greedy(60)
    async with await AsyncModel.load(tiny_model_path, max_concurrent=1, context_size=1024, threads=1) as model:
        start = await model.tokenize(SYSTEM + "a")
        first = await model.generate(start, config=long)
        await idle(model)
        decoded = len(first.tokens) - 1  # its last token was sampled, never decoded
        assert model.prompt_cache_stats().refreshed_tokens == decoded
        follow = start + first.tokens + await model.tokenize(" and then", add_bos=False)
        got = [await model.generate(follow, config=long)]
        assert got[0].timings.cached_tokens == len(start) + decoded
        got += await in_order(model, [SYSTEM + "b", SYSTEM + "a", follow], long)
    expected = cold(tiny_model_path, [follow, SYSTEM + "b", SYSTEM + "a", follow], long)
    assert [c.tokens for c in got] == expected


def test_host_prompt_cache_budget_lru_and_prefixes():
    cache = HostPromptCache(100)
    assert cache.put([1, 2, 3], b"a" * 40)
    assert cache.put([7, 8], b"b" * 40)
    assert cache.best([1, 2, 3, 4]) == (0, 3) and cache.best([9]) == (None, 0)
    cache.get(0)  # [1, 2, 3] is now the most recently used
    assert cache.put([5], b"c" * 40)  # over budget: [7, 8] (least recently used) goes
    assert cache.bytes == 80 and cache.evictions == 1 and cache.best([7, 8])[1] == 0
    assert cache.put([1, 2, 3, 4], b"d" * 30)  # replaces its prefix [1, 2, 3]
    assert len(cache) == 2 and cache.bytes == 70 and cache.holds([1, 2]) and not cache.holds([1, 3])
    assert not cache.put([6], b"e" * 101)  # alone over the budget: not kept
    assert cache.make_room(60) and cache.bytes <= 40 and not cache.make_room(101)  # room before allocating
    assert 0 < default_prompt_cache_bytes() <= 2 << 30


async def test_n_choices_equal_their_seeds_run_alone_and_share_the_prompt(tiny_model_path):
    cfg = StreamConfig(max_tokens=16, temperature=1.0, seed=11)
    prompt = SYSTEM + "Pick a word."
    async with await AsyncModel.load(tiny_model_path, max_concurrent=4, context_size=1024, threads=1) as model:
        choices = await model.generate_many(prompt, 4, cfg)
        n = len(await model.tokenize(prompt))
        stats = model.prompt_cache_stats()
        # evaluated once; each other choice evaluates only its last two tokens (copied cells before them)
        assert stats.evaluated_prompt_tokens == n + 3 * 2 and stats.cached_prompt_tokens == 3 * (n - 2)
        alone = [await model.generate(prompt, config=cfg.replace(seed=11 + i)) for i in range(4)]
        assert [c.tokens for c in choices] == [c.tokens for c in alone]
        assert len({tuple(c.tokens) for c in choices}) > 1  # different seeds, different samples
        with pytest.raises(mullama.InvalidConfigError, match="n must be"):
            await model.generate_many(prompt, 5, cfg)
        assert len(await model.generate_many(prompt, 2, cfg.replace(seed=None))) == 2


async def test_an_inexact_cache_reuses_generated_cells_at_once(tiny_model_path):
    long = StreamConfig.greedy(40)
    async with await AsyncModel.load(tiny_model_path, max_concurrent=1, context_size=1024, threads=1,
                                     prompt_cache_exact=False) as model:
        start = await model.tokenize(SYSTEM + "a")
        first = await model.generate(start, config=long)
        follow = start + first.tokens + await model.tokenize(" and then", add_bos=False)
        again = await model.generate(follow, config=long)
        assert again.timings.cached_tokens == len(start) + len(first.tokens) - 1  # no wait, no re-evaluation
        assert model.prompt_cache_stats().refreshed_tokens == 0
    with pytest.raises(mullama.InvalidConfigError, match="prompt_cache_exact must be a bool"):
        await AsyncModel.load(tiny_model_path, prompt_cache_exact="no")


@pytest.mark.parametrize("decode_exact", [False, True])
async def test_tails_of_stopped_and_concurrent_requests_refresh_exactly(tiny_model_path, decode_exact, monkeypatch):
    """Requests ended by a stop string (their last sampled token never decoded)
    or decoded together (one token per sequence per step) leave tails that are
    refreshed, then reused exactly; or, when the model's decode steps compute
    cells as a prompt does, reused at once."""
    if not decode_exact:
        monkeypatch.setattr(_engine, "probe_decode_cells", lambda core, n_vocab: False)
    async with await AsyncModel.load(tiny_model_path, max_concurrent=2, context_size=1024, threads=1) as model:
        assert model.prompt_cache_stats().decoded_cells_reused == decode_exact
        starts = [await model.tokenize(SYSTEM + w) for w in ("a", "b")]
        free = StreamConfig.greedy(48)
        probe = await model.generate(starts[0], config=free)
        stop = model.model.detokenize(probe.tokens[20:22])  # a stop string the reply reaches
        configs = [free.replace(stop=(stop,)), free]
        firsts = [None, None]

        async def first(i):
            firsts[i] = await model.generate(starts[i], config=configs[i])

        engine = model._engine
        async with anyio.create_task_group() as tg:
            with engine._cv:  # (re-entrant) the driver admits both at once, decoding them together
                for i in range(2):
                    tg.start_soon(first, i)
                with anyio.fail_after(60):
                    while len(engine._queue) < 2:
                        await anyio.sleep(0.001)
        await idle(model)
        follows = [starts[i] + firsts[i].tokens + await model.tokenize(" next", add_bos=False) for i in range(2)]
        got = [await model.generate(f, config=free) for f in follows]
        for c, s, f in zip(got, starts, firsts):
            assert c.timings.cached_tokens >= len(s) + len(f.tokens) - 2  # the tail came back (refreshed or kept)
        assert (model.prompt_cache_stats().refreshed_tokens == 0) == decode_exact
    assert firsts[0].finish_reason == "stop"
    assert [c.tokens for c in got] == cold(tiny_model_path, follows, free)


async def test_the_decode_cells_probe_checks_its_input_and_runs_before_requests_only(tiny_model_path):
    async with await AsyncModel.load(tiny_model_path, max_concurrent=2, context_size=64, threads=1) as model:
        core = model._engine._core
        assert core.decode_exact and model.model._decode_cells_exact  # probed once per model (F32 weights)
        most = min(core.n_ctx_seq, core.n_batch)
        for tokens, tail in (([5, 6, 7], 3), ([5] * (most + 1), 3), ([5, 6], 0)):
            with pytest.raises(mullama.InvalidConfigError, match="probe_decode_cells takes"):
                core.probe_decode_cells(tokens, tail)
        with pytest.raises(mullama.InvalidTokenError):
            core.probe_decode_cells([5, 6, 7, model.model.n_vocab])
        assert core.probe_decode_cells(list(range(5, 37))) is True
        await model.generate(SYSTEM + "a", config=StreamConfig.greedy(4))
        with pytest.raises(mullama.MullamaError, match="before the first request"):
            core.probe_decode_cells(list(range(5, 37)))
    with mullama.Model.load(tiny_model_path) as m:  # flash attention: never exact (not probed)
        engine = _core.BatchEngine(m._core, 2, 256, 64, 1, True)
        try:
            assert engine.probe_decode_cells(list(range(5, 37))) is False and not engine.decode_exact
        finally:
            engine.close()


def test_a_decoding_request_shares_its_steps_with_prompts_and_nothing_changes(tiny_model_path):
    """With exact decode cells, a request decoding shares each step's decode with the prompt
    chunks of requests arriving meanwhile (one llama_decode per step); every token, logprob and
    cached cell is what each request gives alone."""
    from mullama._generation import new_sampler

    cfg = StreamConfig.greedy(24, include_probabilities=True)
    with mullama.Model.load(tiny_model_path) as m:
        prompts = [m.tokenize(w) for w in ("once upon a time", "the second prompt here is longer",
                                           "and a third one, which is longer than both of them")]
        lengths = [len(p) for p in prompts]
        assert len(set(lengths)) == 3

        def run(slots):
            engine = _core.BatchEngine(m._core, 3, 512, 512, 1)
            try:
                assert engine.probe_decode_cells(list(range(5, 37)))
                steps = []
                for i in slots:
                    engine.start(i, prompts[i], new_sampler(m._core, cfg), 24 if i == 0 else 4, True)
                    steps.append(engine.run(0.0))  # one step each: slot 0 decodes while the others come
                while n := engine.run(0.0):
                    steps.append(n)
                return [engine.drain(i)[::2] for i in slots], [engine.cached(i) for i in slots], steps
            finally:
                engine.close()

        alone = [run([i])[0][0] for i in range(3)]
        together, cached, steps = run(range(3))
        assert together == alone
        assert [len(c) for c in cached] == [lengths[0] + 23, lengths[1] + 3, lengths[2] + 3]
        # slot 0's prompt, then its token with each newcomer's whole prompt, then the three decoding together
        assert steps[:3] == [lengths[0], 1 + lengths[1], 2 + lengths[2]] and steps[3] == 3


async def test_the_probe_finds_q4_k_weights_inexact_and_the_engine_refreshes(tmp_path):
    """Q4_K weights, which ggml repacks and multiplies along another path for one row than for
    several: the probe finds decode cells inexact (checked against the logits the context API
    gives), and the engine then refreshes generated tails; outputs equal an uncached run."""
    from tiny_model import write_tiny_model

    f32 = write_tiny_model(tmp_path / "f32.gguf", n_embd=256, n_ff=512)
    q4k = tmp_path / "q4k.gguf"
    _core.quantize_model(str(f32), str(q4k), 15)  # LLAMA_FTYPE_MOSTLY_Q4_K_M, pure: Q4_K everywhere
    with mullama.Model.load(q4k) as m:
        tokens = [(1 + i * 7919) % m.n_vocab for i in range(16)]
        with m.create_context(256, threads=1) as ctx:
            ctx._core.decode(tokens)
            batched = bytes(ctx._core.logits())
            ctx._core.truncate(15)
            ctx._core.decode(tokens[15:])
            alone = bytes(ctx._core.logits())
        if batched == alone:
            pytest.skip("this CPU computes Q4_K weights alike for one row and several (no repacked kernel)")
        engine = _engine.Engine(m, 2, 256, 1)
        try:
            assert engine.decode_cells_exact is False and not engine._core.decode_exact
            assert not engine.prompt_cache_stats().decoded_cells_reused
        finally:
            engine.close()
    cfg = StreamConfig.greedy(24)
    async with await AsyncModel.load(q4k, max_concurrent=2, context_size=256, threads=1) as model:
        first = await model.generate(SYSTEM[:60], config=cfg)
        await idle(model)
        follow = await model.tokenize(SYSTEM[:60])
        follow += first.tokens + await model.tokenize(" next", add_bos=False)
        again = await model.generate(follow, config=cfg)
        assert model.prompt_cache_stats().refreshed_tokens > 0
    assert [again.tokens] == cold(q4k, [follow], cfg)
