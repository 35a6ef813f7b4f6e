"""Unit tests of the pure-Python parts: text assembly (UTF-8 holdback, stop strings), the
hand-off between a producer thread and the event loop, request deadlines, OpenAI request
parsing and the Prometheus text of the server's metrics."""

from __future__ import annotations

import threading
from collections import Counter, deque
from types import SimpleNamespace
from typing import List, Tuple

import anyio
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import mullama
from mullama import RequestTimeoutError, StreamConfig
from mullama._generation import SpeculativeStats, _TextAssembler
from mullama._prompt_cache import PromptCacheStats
from mullama.aio._stream import Handoff, deadline
from mullama.server._metrics import ServerMetrics
from mullama.server._openai import COMPLETIONS_DEFAULT_MAX_TOKENS, ApiError, parse_request

# -- _TextAssembler -----------------------------------------------------------------------------

#: characters of 1, 2, 3 and 4 UTF-8 bytes, so that cuts often fall inside one
SOME_CHARS = st.sampled_from("ab \né€😀") | st.characters(exclude_categories=("Cs",))
TEXT = st.text(SOME_CHARS, max_size=60)


def pieces_of(data: bytes, cuts: List[int]) -> List[bytes]:
    """*data* cut at *cuts* (token pieces: any byte boundary, empty pieces too)."""
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def cut(data: st.DataObject, raw: bytes) -> List[bytes]:
    return pieces_of(raw, data.draw(st.lists(st.integers(0, len(raw)), max_size=16), label="cuts"))


@given(data=st.data(), text=TEXT)
def test_text_assembler_releases_whole_characters_as_soon_as_they_are_complete(data, text):
    raw = text.encode("utf-8")
    asm = _TextAssembler(())
    out, fed = "", 0
    for piece in cut(data, raw):
        chunk, stopped = asm.feed(piece)
        fed += len(piece)
        assert not stopped
        assert isinstance(chunk, str)
        out += chunk
        # every character complete so far, nothing more: never a replacement for half a character
        assert out == raw[:fed].decode("utf-8", "ignore")
    assert out + asm.flush() == text
    assert asm.flush() == ""


@given(data=st.data(), raw=st.binary(max_size=40))
def test_text_assembler_replaces_invalid_bytes_as_one_decode_does(data, raw):
    """Token pieces of a random model need not be UTF-8: split anywhere, the text is what
    decoding the whole with errors="replace" gives."""
    asm = _TextAssembler(())
    out = "".join(asm.feed(piece)[0] for piece in cut(data, raw)) + asm.flush()
    assert out == raw.decode("utf-8", "replace")


def streamed(stops: Tuple[str, ...], pieces: List[bytes]) -> Tuple[str, bool]:
    """What a generation returns: the released text up to the stop (or all of it, flushed)."""
    asm = _TextAssembler(stops)
    out = ""
    for piece in pieces:
        chunk, stopped = asm.feed(piece)
        out += chunk
        assert not any(s in out for s in stops)  # a stop string is never released, not even in part
        if stopped:
            return out, True
    return out + asm.flush(), False


STOP_CHARS = st.sampled_from("ab€😀")
STOPS = st.lists(st.text(STOP_CHARS, min_size=1, max_size=4), min_size=1, max_size=3, unique=True)


@given(data=st.data(), text=st.text(STOP_CHARS | st.just(" "), max_size=40), stops=STOPS)
def test_stop_strings_across_token_boundaries(data, text, stops):
    """With no stop string inside another, however the text is cut into tokens, the output is
    the text up to the first occurrence of a stop string, and stopped says whether one occurs."""
    assume(not any(a != b and a in b for a in stops for b in stops))
    out, stopped = streamed(tuple(stops), cut(data, text.encode("utf-8")))
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    assert stopped == bool(found)
    assert out == (text[:min(found)] if found else text)


@given(data=st.data(), text=st.text(STOP_CHARS | st.just(" "), max_size=40), stops=STOPS)
def test_stop_strings_end_at_the_first_one_completed(data, text, stops):
    """Any stop strings (one may be inside another): the generation ends at the first token
    that completes one; the output is the text so far up to the earliest stop string in it."""
    pieces = cut(data, text.encode("utf-8"))
    expected, expected_stop, fed = text, False, 0
    for piece in pieces:
        fed += len(piece)
        so_far = text.encode("utf-8")[:fed].decode("utf-8", "ignore")
        hits = [so_far.find(s) for s in stops if s in so_far]
        if hits:
            expected, expected_stop = so_far[:min(hits)], True
            break
    assert streamed(tuple(stops), pieces) == (expected, expected_stop)


def test_a_held_back_stop_prefix_is_released_when_the_stop_does_not_follow():
    asm = _TextAssembler(("###",))
    assert asm.feed(b"ab#") == ("ab", False)
    assert asm.feed(b"#") == ("", False)
    assert asm.feed(b"x") == ("##x", False)
    assert asm.feed(b"\xe2\x82") == ("", False)  # half a euro sign
    assert asm.feed(b"\xac##") == ("\u20ac", False)
    assert asm.feed(b"#!") == ("", True)


# -- Handoff: a producer thread and a consumer on the event loop ------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("capacity", [1, 4])
async def test_handoff_delivers_every_batch_in_order_and_bounds_the_producer(capacity):
    n = 60
    h = Handoff(capacity)
    puts = 0

    def produce() -> None:
        nonlocal puts
        for i in range(n):
            assert h.put([i])
            puts += 1
        h.finish()

    got: List[List[int]] = []
    with anyio.fail_after(60):  # a bound, not a timing assertion
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, produce)
            while (batch := await h.get()) is not None:
                got.append(batch)
                # only this consumer takes batches out: the producer is never more than capacity ahead
                assert puts <= len(got) + capacity
                await anyio.lowlevel.checkpoint()
    assert got == [[i] for i in range(n)]
    assert h.finished and await h.get() is None  # the end stays the end
    h.dispose()


@pytest.mark.anyio
async def test_handoff_get_waits_for_the_producer():
    h = Handoff(2)
    got = []

    async def consume() -> None:
        while (batch := await h.get()) is not None:
            got.append(batch)

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await anyio.wait_all_tasks_blocked()  # get() is waiting on an empty buffer
        await anyio.to_thread.run_sync(lambda: (h.offer(["x"]), h.finish()))
    assert got == [["x"]]
    h.dispose()


@pytest.mark.anyio
async def test_handoff_gives_what_is_left_after_finish():
    h = Handoff(4)
    h.offer([1])
    h.offer([2])
    h.finish()
    assert h.finished
    assert [await h.get(), await h.get(), await h.get()] == [[1], [2], None]
    h.dispose()


@pytest.mark.anyio
async def test_handoff_close_releases_a_producer_waiting_for_room():
    h = Handoff(1)
    results = []

    def produce() -> None:
        results.append(h.put(["a"]))  # room: queued
        results.append(h.put(["b"]))  # full: waits until the consumer leaves
        results.append(h.put(["c"]))  # the consumer left: refused at once
        h.finish()

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, produce)
            while h.has_space():  # until "a" is in
                await anyio.sleep(0.005)
            h.close()
    assert results == [True, False, False]
    assert await h.get() is None  # a closed hand-off gives nothing more, not even "a"
    assert h.has_space()  # (a producer checking for room does not pause for a consumer that left)
    h.dispose()


@pytest.mark.anyio
async def test_handoff_tells_the_producer_of_room_only_when_it_was_full():
    calls = []
    h = Handoff(2, on_space=lambda: calls.append("room"))
    h.offer([1])
    h.offer([2])
    assert not h.has_space()
    assert await h.get() == [1] and calls == ["room"]  # the producer may be paused: told
    assert await h.get() == [2] and calls == ["room"]  # it was not full: not told (costs it a step)
    h.dispose()


@pytest.mark.anyio
async def test_handoff_wait_finished_discards_and_lets_the_producer_run_to_its_end():
    h = Handoff(1)
    results = []

    def produce() -> None:
        for i in range(30):
            results.append(h.put([i]))
        h.finish()

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, produce)
            await h.wait_finished()
            assert h.finished
    assert results == [True] * 30
    h.dispose()


def test_handoff_producer_calls_after_dispose_are_harmless():
    h = Handoff(1)
    h.dispose()
    h.offer([1])  # the wake-up goes nowhere, without an error
    h.finish()
    assert h.put([2]) is False


@pytest.mark.anyio
async def test_handoff_get_keeps_the_last_batch_when_the_producer_finishes_meanwhile():
    """The producer thread may offer its last batch and finish between get()'s look at the
    buffer (empty) and its look at the end flag: that batch must still be delivered. The
    interleaving is forced here; under the GIL no switch happens between the two looks today,
    but nothing in the code keeps it so (a free-threaded build, or any call added between them)."""
    h = Handoff(4)

    class Items(deque):
        armed = True

        def __len__(self) -> int:
            n = super().__len__()
            if n == 0 and self.armed:  # get() found it empty; the producer runs now
                self.armed = False
                t = threading.Thread(target=lambda: (h.offer(["last"]), h.finish()))
                t.start()
                t.join()
            return n

    h._items = Items()
    with anyio.fail_after(60):
        assert await h.get() == ["last"]
        assert await h.get() is None
    h.dispose()


# -- deadline -----------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("timeout_ms", [None, 0])
async def test_deadline_none_or_zero_is_no_deadline(timeout_ms):
    with anyio.CancelScope() as scope:
        async with deadline(timeout_ms):
            await anyio.lowlevel.checkpoint()
            done = True
    assert done and not scope.cancel_called


@pytest.mark.anyio
async def test_deadline_expiring_raises_request_timeout_error():
    reached = False
    with anyio.fail_after(60):  # a bound
        with pytest.raises(RequestTimeoutError, match="timeout_ms=1$"):
            async with deadline(1):
                await anyio.sleep_forever()
                reached = True
    assert not reached


@pytest.mark.anyio
async def test_deadline_lets_the_callers_own_timeout_through():
    with pytest.raises(TimeoutError) as info:
        async with deadline(600_000):
            with anyio.fail_after(0):  # the caller's own deadline, inside
                await anyio.sleep_forever()
    assert type(info.value) is TimeoutError  # not the request's RequestTimeoutError


@pytest.mark.anyio
async def test_deadline_lets_an_outer_cancellation_through():
    with anyio.CancelScope() as outer:
        async with deadline(600_000):
            outer.cancel()
            await anyio.sleep_forever()
    assert outer.cancelled_caught


@pytest.mark.anyio
async def test_deadline_lets_errors_through():
    with pytest.raises(KeyError):
        async with deadline(600_000):
            raise KeyError("x")


# -- parse_request ------------------------------------------------------------------------------

CHAT = [{"role": "user", "content": "hi"}]


def test_parse_minimal_requests_takes_openais_defaults():
    req = parse_request({"messages": CHAT}, chat=True)
    assert (req.chat, req.model, req.messages, req.prompts, req.n) == (True, None, CHAT, [], 1)
    assert req.max_tokens is None  # as many as fit
    assert (req.stream, req.include_usage, req.logprobs, req.echo) == (False, False, False, False)
    assert req.sampling == {"temperature": 1.0, "top_p": 1.0}
    req = parse_request({"prompt": "hi", "model": "m"}, chat=False)
    assert (req.chat, req.model, req.prompts, req.max_tokens) == (False, "m", ["hi"], COMPLETIONS_DEFAULT_MAX_TOKENS)
    req = parse_request({"prompt": ["a", [5, 6], "b"], "n": 3}, chat=False)
    assert (req.prompts, req.n) == (["a", [5, 6], "b"], 3)
    assert parse_request({"prompt": [[7]]}, chat=False).prompts == [[7]]


@pytest.mark.parametrize("body, chat, expected", [
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]},
     True, {"messages": [{"role": "user", "content": "ab"}]}),
    ({"messages": [{"role": "user", "content": None}]}, True, {"messages": [{"role": "user", "content": ""}]}),
    ({"messages": CHAT, "max_tokens": 5, "max_completion_tokens": 7}, True, {"max_tokens": 7}),
    ({"messages": CHAT, "logprobs": True, "top_logprobs": 0}, True, {"logprobs": True}),
    ({"messages": CHAT, "tools": [], "tool_choice": "none", "response_format": {"type": "text"}}, True, {}),
    ({"messages": CHAT, "stream": True, "stream_options": {"include_usage": True}}, True,
     {"stream": True, "include_usage": True}),
    ({"messages": CHAT, "user": "u", "metadata": {"a": "b"}, "store": False, "n": 1, "logit_bias": {}}, True, {}),
    ({"prompt": ["x"]}, False, {"prompts": ["x"]}),
    ({"prompt": [[1, 2, 3]]}, False, {"prompts": [[1, 2, 3]]}),
    ({"prompt": [5, 6], "logprobs": 0}, False, {"prompts": [[5, 6]], "logprobs": True}),
    ({"prompt": "x", "echo": True, "suffix": "", "best_of": 1}, False, {"echo": True}),
])
def test_parse_valid_requests(body, chat, expected):
    req = parse_request(body, chat=chat)
    for name, value in expected.items():
        assert getattr(req, name) == value, name


def test_parse_sampling_values_reach_the_config():
    body = {"messages": CHAT, "temperature": 0, "top_p": 0.5, "top_k": 7, "min_p": 0.1, "seed": 2**40 + 3,
            "frequency_penalty": 0.5, "presence_penalty": -1, "repeat_penalty": 1.1, "repeat_last_n": 32,
            "stop": "END"}
    config = parse_request(body, chat=True).config(9)
    assert config == StreamConfig(max_tokens=9, temperature=0, top_p=0.5, top_k=7, min_p=0.1,
                                  seed=(2**40 + 3) % 0xFFFFFFFF, frequency_penalty=0.5, presence_penalty=-1,
                                  repeat_penalty=1.1, repeat_last_n=32, stop=("END",))


HUGE = 10**400  # valid JSON (an integer), beyond any float


@pytest.mark.parametrize("body, chat, param, match", [
    ([CHAT], True, None, "must be a JSON object, got list"),
    ({"messages": CHAT, "mirostat": 2}, True, "mirostat", "unsupported parameter 'mirostat'"),
    ({"messages": CHAT, "grammar": 5}, True, "grammar", "'grammar' must be a string"),
    ({"prompt": "x", "json_schema": [1]}, False, "json_schema", "'json_schema' must be an object"),
    ({"prompt": "x", "json_schema": {"properties": {"a": {"minLength": 3, "maxLength": 1}}}}, False, "json_schema",
     r"JSON schema error at #/properties/a: minLength 3 is above maxLength 1"),
    ({"prompt": "x", "grammar": "a ::= b", "json_schema": {}}, False, "grammar", "at most one of json_schema"),
    ({"prompt": "x", "messages": CHAT}, False, "messages", "unsupported parameter 'messages'"),
    ({}, True, "messages", "'messages' is required"),
    ({}, False, "prompt", "'prompt' is required"),
    ({"messages": []}, True, "messages", "must not be empty"),
    ({"messages": [{"role": "", "content": "x"}]}, True, "messages", r"\['role'\] must be a non-empty string"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, True, "messages", "only text content"),
    ({"prompt": ""}, False, "prompt", "must not be empty"),
    ({"prompt": ["a", ""]}, False, "prompt", r"'prompt'\[1\] must not be empty"),
    ({"prompt": ["a", [1, "x"]]}, False, "prompt", r"'prompt'\[1\] must be a non-empty string or"),
    ({"prompt": ["a"] * 200, "n": 2}, False, "prompt", "200 prompts x n=2 make more than 256 choices"),
    ({"prompt": "x", "n": 0}, False, "n", "'n' must be between 1 and 256"),
    ({"prompt": [1, True]}, False, "prompt", "list of token ids"),
    ({"prompt": "x", "max_tokens": 0}, False, "max_tokens", "at least 1"),
    ({"messages": CHAT, "max_completion_tokens": 0}, True, "max_completion_tokens", "at least 1"),
    ({"prompt": "x", "max_tokens": 1.5}, False, "max_tokens", "must be an integer"),
    ({"prompt": "x", "max_tokens": 10**30}, False, "max_tokens", "max_tokens must be between 1 and"),
    ({"prompt": "x", "temperature": "hot"}, False, "temperature", "must be a number"),
    ({"prompt": "x", "temperature": 2.5}, False, "temperature", "between 0 and 2"),
    ({"prompt": "x", "top_p": float("nan")}, False, "top_p", "finite"),
    ({"prompt": "x", "top_p": HUGE}, False, "top_p", "top_p must be"),
    ({"prompt": "x", "presence_penalty": -HUGE}, False, "presence_penalty", "presence_penalty must be"),
    ({"prompt": "x", "min_p": 2}, False, "min_p", "min_p must be"),
    ({"prompt": "x", "seed": "7"}, False, "seed", "must be an integer"),
    ({"prompt": "x", "stream": 1}, False, "stream", "must be a boolean"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, False, "stream_options", "only allowed with"),
    ({"prompt": "x", "logit_bias": {"5": 1000}}, False, "logit_bias", r"logit_bias\[5\] must be"),
    ({"prompt": "x", "logit_bias": {"five": 1}}, False, "logit_bias", "keys must be token ids"),
    ({"prompt": "x", "logit_bias": [1]}, False, "logit_bias", "must be an object"),
    ({"prompt": "x", "stop": ["a", 5]}, False, "stop", "a string or a list of strings"),
    ({"prompt": "x", "stop": ["a", ""]}, False, "stop", "must not be empty"),
    ({"prompt": "x", "stop": ["s"] * 65}, False, "stop", "at most 64 stop strings"),
    ({"prompt": "x", "stop": ["x" * 9000]}, False, "stop", "8192"),
    ({"prompt": "x", "logprobs": 21}, False, "logprobs", "between 0 and 20"),
    ({"prompt": "x", "echo": True, "logprobs": 0}, False, "echo", "'echo' with 'logprobs'"),
    ({"prompt": "x", "suffix": "y"}, False, "suffix", "not supported"),
    ({"prompt": "x", "best_of": 2}, False, "best_of", "best_of must be 1"),
    ({"messages": CHAT, "tools": [{"type": "function"}]}, True, "tools", r"tools\[0\]\['function'\] must be a dict"),
    ({"messages": CHAT, "tool_choice": "auto"}, True, "tool_choice", "needs 'tools'"),
    ({"messages": CHAT, "tools": [], "parallel_tool_calls": 1}, True, "parallel_tool_calls", "must be a boolean"),
    ({"messages": CHAT, "chat_template_kwargs": []}, True, "chat_template_kwargs", "must be an object"),
    ({"prompt": "x", "chat_template_kwargs": {}}, False, "chat_template_kwargs",
     "unsupported parameter 'chat_template_kwargs'"),
    ({"messages": CHAT, "functions": [{"name": "f"}]}, True, "functions", "send them as 'tools'"),
    ({"messages": CHAT, "response_format": {"type": "jsonish"}}, True, "response_format", "response_format type"),
    ({"messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}}, True,
     "response_format", "must be a dict"),
    ({"messages": CHAT, "top_logprobs": 2}, True, "top_logprobs", "needs 'logprobs': true"),
    ({"messages": CHAT, "logprobs": True, "top_logprobs": 21}, True, "top_logprobs", "between 0 and 20"),
    ({"messages": CHAT, "logprobs": 1}, True, "logprobs", "must be a boolean"),
    ({"messages": CHAT, "model": 5}, True, "model", "must be a string"),
])
def test_parse_invalid_requests_name_the_parameter(body, chat, param, match):
    with pytest.raises(ApiError, match=match) as info:
        parse_request(body, chat=chat)
    error = info.value
    assert (error.status, error.param, error.type) == (400, param, "invalid_request_error")
    assert error.body() == {"error": {"message": error.message, "type": "invalid_request_error", "param": param,
                                      "code": None}}


_JSON_LEAF = (st.none() | st.booleans() | st.integers() | st.sampled_from([HUGE, -HUGE, 2**63, 2**32])
              | st.floats() | st.text(max_size=6))
JSON = st.recursive(_JSON_LEAF, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
PARAMS = sorted({"model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
                 "stream", "stream_options", "stop", "seed", "frequency_penalty", "presence_penalty", "logprobs",
                 "top_logprobs", "logit_bias", "top_k", "min_p", "repeat_penalty", "repeat_last_n", "user", "echo",
                 "suffix", "best_of", "tools", "tool_choice", "response_format", "grammar", "json_schema",
                 "parallel_tool_calls", "chat_template_kwargs"})


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(chat=st.booleans(), fields=st.dictionaries(st.sampled_from(PARAMS), JSON, max_size=5))
def test_parse_any_body_gives_a_request_or_a_400(chat, fields):
    """Whatever JSON a client sends, the answer is a request or a 400 naming the problem (never a 500)."""
    body = {"messages": CHAT} if chat else {"prompt": "hi"}
    body.update(fields)
    try:
        req = parse_request(body, chat=chat)
    except ApiError as exc:
        assert exc.status == 400 and exc.message
        return
    assert isinstance(req.config(req.max_tokens or 1), StreamConfig)


NUMBER = st.integers() | st.sampled_from([HUGE, -HUGE, 2**31, 2**32, 2**63, -1, 0]) | st.floats()


@given(chat=st.booleans(), fields=st.dictionaries(st.sampled_from(
    ["max_tokens", "max_completion_tokens", "temperature", "top_p", "frequency_penalty", "presence_penalty", "seed",
     "top_k", "min_p", "repeat_penalty", "repeat_last_n", "n", "logprobs", "top_logprobs", "best_of"]), NUMBER,
    max_size=3))
def test_parse_any_numbers_give_a_request_or_a_400(chat, fields):
    """Numbers of any size in the numeric fields (where the values reach the sampling config)."""
    test_parse_any_body_gives_a_request_or_a_400.hypothesis.inner_test(chat, fields)


@pytest.mark.parametrize("kwargs", [{"top_p": HUGE}, {"temperature": -HUGE}, {"top_k": HUGE}, {"max_tokens": 10**5000}])
def test_stream_config_refuses_huge_integers_by_name(kwargs):
    """The Python API's own checks: an integer beyond any float (or too long to print) is
    an InvalidConfigError naming the field, not an OverflowError or a ValueError from str()."""
    (name,) = kwargs
    with pytest.raises(mullama.InvalidConfigError, match=f"^{name} must be"):
        StreamConfig(**kwargs)


# -- the Prometheus text ------------------------------------------------------------------------

LABEL_TEXT = st.text(st.sampled_from('ab"\\\n{},= é'), min_size=1, max_size=8)
REQUEST_METRICS = st.builds(
    SimpleNamespace, finish_reason=st.sampled_from(["stop", "length", "", "timeout"]),
    prompt_tokens=st.integers(0, 5000), generated_tokens=st.integers(0, 5000),
    queue_ms=st.floats(0, 1e7), time_to_first_token_ms=st.floats(0, 1e7),
    prompt_tokens_per_s=st.floats(0, 1e9), generation_tokens_per_s=st.floats(0, 1e9))
HISTOGRAMS = {"mullama_request_queue_seconds": "queue", "mullama_time_to_first_token_seconds": "first_token",
              "mullama_generation_duration_seconds": "duration", "mullama_prompt_tokens_per_second": "prompt_rate",
              "mullama_generation_tokens_per_second": "generation_rate"}


def fake_model(n: int) -> SimpleNamespace:
    stats = SimpleNamespace(threads=1, max_threads=2, steps=n * 10, changes=n, watchdog_aborts=0, last_step_ms=1.5)
    cache = PromptCacheStats(cached_prompt_tokens=n * 50, evaluated_prompt_tokens=n * 70, slot_cells=n * 9,
                             host_bytes=n << 20, host_budget=1 << 30, host_entries=n, host_saves=n + 1,
                             host_restores=n, host_evictions=1)
    return SimpleNamespace(config=SimpleNamespace(max_concurrent=4, max_queue=64), active_workers=n, waiting=0,
                           kv_used=lambda: n * 100, tokens_in_flight=n * 3, thread_stats=lambda: stats,
                           prompt_cache_stats=lambda: cache,
                           speculative_stats=lambda: SpeculativeStats(drafts=n, drafted_tokens=n * 8,
                                                                      accepted_tokens=n * 6))


def fake_runtime() -> SimpleNamespace:
    m = SimpleNamespace(active_tasks=1, completed_tasks=9, worker_threads=2, blocking_threads=0, total_generations=7,
                        avg_generation_ms=12.5, uptime_seconds=3.25)
    return SimpleNamespace(metrics=lambda: m)


@settings(max_examples=60)
@given(responses=st.lists(st.tuples(LABEL_TEXT, st.sampled_from([200, 400, 503])), max_size=8),
       generations=st.lists(st.tuples(REQUEST_METRICS, st.floats(0, 1e4), st.none() | LABEL_TEXT), max_size=8),
       in_flight=st.integers(0, 10), live=st.booleans())
def test_metrics_text_parses_as_prometheus_and_says_what_was_counted(
        prometheus_families, responses, generations, in_flight, live):
    metrics = ServerMetrics()
    for endpoint, status in responses:
        metrics.response(endpoint, status)
    for m, seconds, reason in generations:
        metrics.generation(m, seconds, reason)
    metrics.in_flight = in_flight
    families = prometheus_families(metrics.render(fake_model(3) if live else None, fake_runtime() if live else None))

    def samples(name: str) -> Counter:
        return Counter({tuple(sorted(s.labels.items())): s.value for s in families[name].samples})

    assert samples("mullama_http_responses") == Counter(
        {(("endpoint", e), ("status", str(s))): n for (e, s), n in Counter(responses).items()})
    reasons = Counter(r or m.finish_reason or "unknown" for m, _, r in generations)
    assert samples("mullama_generations") == Counter({(("finish_reason", r),): n for r, n in reasons.items()})
    assert families["mullama_http_requests_in_flight"].samples[0].value == in_flight
    assert families["mullama_generated_tokens"].samples[0].value == sum(m.generated_tokens for m, _, _ in generations)
    observed = {"queue": len(generations), "duration": len(generations),
                "first_token": sum(1 for m, _, _ in generations if m.generated_tokens),
                "generation_rate": sum(1 for m, _, _ in generations if m.generated_tokens > 1)}
    for name, attr in HISTOGRAMS.items():
        count = {s.name: s.value for s in families[name].samples}[name + "_count"]
        assert count == getattr(metrics, attr).n == observed.get(attr, count)
    assert ("mullama_engine_active_requests" in families) == live
    assert ("mullama_runtime_uptime_seconds" in families) == live
    if live:
        assert families["mullama_kv_cells_used"].samples[0].value == 300
        assert families["mullama_prompt_tokens_cached"].samples[0].value == 150
        assert families["mullama_prompt_tokens_evaluated"].samples[0].value == 210
        assert families["mullama_prompt_cache_bytes"].samples[0].value == 3 << 20
        assert families["mullama_prompt_cache_entries"].samples[0].value == 3
        assert families["mullama_engine_decode_steps"].type == "counter"
        assert families["mullama_speculative_drafts"].samples[0].value == 3
        assert families["mullama_speculative_drafted_tokens"].samples[0].value == 24
        assert families["mullama_speculative_accepted_tokens"].samples[0].value == 18
        assert families["mullama_speculative_acceptance_rate"].samples[0].value == 0.75
        assert families["mullama_runtime_uptime_seconds"].samples[0].value == 3.25


def test_histogram_buckets_count_values_at_most_their_bound(prometheus_families):
    metrics = ServerMetrics()
    for seconds in (0.005, 0.0051, 1.0, 500.0):
        metrics.duration.observe(seconds)
    buckets = {s.labels["le"]: s.value for s in prometheus_families(metrics.render(None, None))[
        "mullama_generation_duration_seconds"].samples if s.name.endswith("_bucket")}
    assert buckets["0.005"] == 1 and buckets["0.01"] == 2 and buckets["1.0"] == 3 and buckets["120.0"] == 3
    assert buckets["+Inf"] == 4


@pytest.mark.anyio
async def test_cors_preflight_and_allowed_origins(tiny_model_path):
    """--cors-origins: a browser's preflight OPTIONS is answered for an allowed origin, and
    responses let that origin read them; other origins get no CORS headers."""
    from mullama.server import create_app

    async def call(app, method, path, headers):
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": method, "path": path, "headers": [
            (k.encode(), v.encode()) for k, v in headers.items()], "query_string": b""}
        await app(scope, receive, send)
        start = sent[0]
        return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}

    app = create_app(str(tiny_model_path), cors_origins=["https://app.example"])
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization, content-type"}
    status, headers = await call(app, "OPTIONS", "/v1/chat/completions", preflight)
    assert status == 204 and headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in headers["access-control-allow-methods"]
    assert headers["access-control-allow-headers"] == "authorization, content-type"
    status, headers = await call(app, "GET", "/health", {"origin": "https://app.example"})
    assert headers["access-control-allow-origin"] == "https://app.example"
    status, headers = await call(app, "OPTIONS", "/v1/chat/completions", {**preflight, "origin": "https://evil.example"})
    assert status == 405 and "access-control-allow-origin" not in headers
    status, headers = await call(create_app(str(tiny_model_path), cors_origins=["*"]), "GET", "/health",
                                 {"origin": "https://any.example"})
    assert headers["access-control-allow-origin"] == "*"
    status, headers = await call(create_app(str(tiny_model_path)), "OPTIONS", "/v1/models", preflight)
    assert status == 405 and "access-control-allow-origin" not in headers
    with pytest.raises(mullama.InvalidConfigError, match="cors_origins"):
        create_app(str(tiny_model_path), cors_origins="*")


@pytest.mark.parametrize("path, root, seen", [
    ("/v1/models", "", "/v1/models"),
    ("/app/v1/models", "/app", "/v1/models"),  # (Ray Serve's proxy keeps the route prefix in path)
    ("/app", "/app", "/"),
    ("/v1/models", "/app", "/v1/models"),  # (servers that strip root_path from path)
    ("/application/v1", "/app", "/application/v1"),  # a longer segment is not the prefix
])
def test_exchange_path_is_below_the_root_path(path, root, seen):
    from mullama.server._asgi import Exchange

    async def never():  # pragma: no cover - not called
        raise AssertionError

    assert Exchange({"type": "http", "path": path, "root_path": root}, never, never).path == seen
