"""`mullama serve` under asyncio (uvicorn) and trio (hypercorn), driven by the official openai client.

Each server runs as a real `mullama serve` process on a loopback port; every
test here runs against both modes.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Literal, Optional

import anyio
import httpx
import jsonschema
import numpy as np
import openai
import pydantic
import pytest

import mullama
from mullama import StreamConfig

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

# the openai client stops reading its SSE async generators (and httpx2's) at [DONE] without closing them; under
# trio they are then collected unexhausted, which trio reports as a ResourceWarning (the client's, not ours)
pytestmark = pytest.mark.filterwarnings(
    r"ignore:Async generator '(openai|httpx2|httpcore2)\..*' was garbage collected:ResourceWarning")

MODES = ["asyncio", "trio"]
PROMPTS = ["once upon", "hello there", "abc", "zz top"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
LONG = dict(model="smol", prompt="1, 2, 3, 4, 5, 6,", max_tokens=900, temperature=0)  # a greedy count: no early end
DISCONNECTED = 'mullama_generations_total{finish_reason="disconnected"}'
API_KEY = "k"


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, lines: "queue.Queue[str]", backend: str) -> None:
        self.backend = backend
        self.proc = proc
        self.url = url  # ends with /v1
        self.base = url[: -len("/v1")]
        self.lines = lines
        self.startup = ""  # what it printed until it served

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0, **kw)

    def async_client(self, **kw) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url, api_key="unused", max_retries=0, **kw)

    def metrics(self) -> Dict[str, float]:
        text = httpx.get(self.base + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def wait_for(self, predicate, what: str, timeout: float = 60.0) -> Dict[str, float]:
        """Poll /metrics until predicate(metrics) holds (a bound, not a timing assertion)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if predicate(m):
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: still not true after {timeout} s: {m}")
            time.sleep(0.05)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            self.proc.stdout.close()


def start_server(model: Path, backend: str, *args: str, **popen) -> Server:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mullama", "serve", "--model", str(model), "--port", "0", "--backend", backend,
         "--threads", "1", "--no-access-log", "--log-level", "warning", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    lines: "queue.Queue[str]" = queue.Queue()

    def pump() -> None:  # keeps the pipe drained for the server's whole life
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + 120
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        m = re.search(r"serving '.*' at (http://\S+/v1) \((\w+), (\w+)\)", line)
        if m:
            assert m.group(2) == backend and m.group(3) == {"asyncio": "uvicorn", "trio": "hypercorn"}[backend]
            server = Server(proc, m.group(1), lines, backend)
            server.startup = "".join(seen)
            return server
    proc.kill()
    raise AssertionError(f"mullama serve did not start: {''.join(seen)}")


@pytest.fixture(scope="module", params=MODES)
def tiny_server(request, tiny_model_path) -> Iterator[Server]:
    server = start_server(tiny_model_path, request.param, "--name", "tiny", "--chat-template", "chatml",
                          "--context-size", "256", "--max-concurrent", "2", "--max-queue", "8")
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module", params=MODES)
def default_server(request, default_model_path) -> Iterator[Server]:
    """The real model, one slot and no queue: a second request while one runs gets 503."""
    server = start_server(default_model_path, request.param, "--name", "smol", "--context-size", "1024",
                          "--max-concurrent", "1", "--max-queue", "0")
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module", params=MODES)
def slow_clients_server(request, tiny_model_path) -> Iterator[Server]:
    """Short limits for the tests of clients that misbehave: a request head within 0.5 s
    (keep-alive), no write or body read stalled over 1 s (io), an API key (requests answered
    401 before their body arrived). Each test leaves it with no request running."""
    server = start_server(tiny_model_path, request.param, "--name", "tiny", "--context-size", "4096",
                          "--max-concurrent", "2", "--timeout", "600", "--io-timeout", "1", "--keep-alive-timeout",
                          "0.5", "--api-key", API_KEY, "--log-level", "info")
    yield server
    assert server.stop() == 0


def expected_completion(model: mullama.Model, prompt: str, max_tokens: int,
                        config: Optional[StreamConfig] = None) -> mullama.Completion:
    with model.create_context(256, threads=1) as ctx:
        return ctx.generate(prompt, config or StreamConfig.greedy(max_tokens))


# -- the tiny model: the API's shapes and behaviour ------------------------------------------


def test_models(tiny_server):
    client = tiny_server.client()
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").owned_by == "mullama"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4")
    with pytest.raises(openai.NotFoundError, match="'gpt-4' does not exist"):
        client.completions.create(model="gpt-4", prompt="x")


def test_completion_equals_the_library(tiny_server, tiny_model):
    expected = expected_completion(tiny_model, "once upon", 24)
    got = tiny_server.client().completions.create(model="tiny", prompt="once upon", max_tokens=24, temperature=0)
    assert got.object == "text_completion" and got.model == "tiny" and got.id.startswith("cmpl-")
    assert got.choices[0].text == expected.text
    assert got.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert got.usage.prompt_tokens == len(tiny_model.tokenize("once upon"))
    assert got.usage.completion_tokens == len(expected.tokens)
    # token ids as the prompt, echo and the chosen tokens' log-probabilities
    ids = tiny_model.tokenize("once upon")
    got = tiny_server.client().completions.create(model="tiny", prompt=ids, max_tokens=24, temperature=0,
                                                  echo=True)
    assert got.choices[0].text == tiny_model.detokenize(ids) + expected.text
    got = tiny_server.client().completions.create(model="tiny", prompt=ids, max_tokens=24, temperature=0,
                                                  logprobs=0)
    assert got.choices[0].text == expected.text
    lp = got.choices[0].logprobs
    assert len(lp.token_logprobs) == len(expected.tokens) and all(v <= 0 for v in lp.token_logprobs)


def test_cached_prompt_tokens_in_usage_and_metrics(tiny_server, tiny_model):
    """A repeated long prompt is reused from the cache: OpenAI's
    usage.prompt_tokens_details.cached_tokens says how much, /metrics counts it."""
    prompt = "A long shared preamble for every request of this test. " * 3
    n = len(tiny_model.tokenize(prompt))
    client = tiny_server.client()
    before = tiny_server.metrics()
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0)
    again = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0,
                                      stream=True, stream_options={"include_usage": True})
    usage = list(again)[-1].usage
    assert first.usage.prompt_tokens == usage.prompt_tokens == n
    assert usage.prompt_tokens_details.cached_tokens == n - 2  # all but the last two, evaluated together
    after = tiny_server.metrics()
    cached = after["mullama_prompt_tokens_cached_total"] - before["mullama_prompt_tokens_cached_total"]
    evaluated = after["mullama_prompt_tokens_evaluated_total"] - before["mullama_prompt_tokens_evaluated_total"]
    assert cached >= n - 2 and cached + evaluated == 2 * n
    assert after["mullama_prompt_cache_budget_bytes"] > 0
    assert after["mullama_prompt_cache_decoded_cells_reused"] == 1  # (F32 weights: decode cells are exact)


def test_n_choices_and_a_list_of_prompts(tiny_server, tiny_model):
    """n choices of each prompt, indexed prompt by prompt as OpenAI does; choice
    j samples with seed + j, so each equals the library run alone with its seed."""
    client = tiny_server.client()
    prompts = ["once upon", "hello there"]
    got = client.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=12, temperature=1.0, seed=42)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    for c in got.choices:
        cfg = StreamConfig(max_tokens=12, temperature=1.0, top_p=1.0, seed=42 + c.index % 2)
        expected = expected_completion(tiny_model, prompts[c.index // 2], 12, cfg)
        assert c.text == expected.text
    assert got.usage.prompt_tokens == sum(len(tiny_model.tokenize(p)) for p in prompts)
    # streamed: every event names its choice; each choice ends once, then the usage
    chunks = list(client.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=12, temperature=1.0,
                                            seed=42, stream=True, stream_options={"include_usage": True}))
    texts = {i: "" for i in range(4)}
    for ch in chunks[:-1]:
        texts[ch.choices[0].index] += ch.choices[0].text
    assert texts == {c.index: c.text for c in got.choices}
    assert sorted(ch.choices[0].index for ch in chunks[:-1] if ch.choices[0].finish_reason) == [0, 1, 2, 3]
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens
    chat = client.chat.completions.create(model="tiny", messages=CHAT, n=2, max_tokens=8, temperature=1.0, seed=5)
    assert [c.index for c in chat.choices] == [0, 1]
    alone = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=1.0, seed=6)
    assert chat.choices[1].message.content == alone.choices[0].message.content


def test_embeddings_equal_the_library(tiny_server, tiny_model_path):
    client = tiny_server.client()
    texts = ["once upon a time", "hello there"]
    with mullama.Model.load(tiny_model_path) as m:
        expected = m.embed(texts)
        ids = m.tokenize("hello there")
        n_embd = m.info.n_embd
    got = client.embeddings.create(model="tiny", input=texts)  # (the client asks for base64 and decodes it)
    assert [d.index for d in got.data] == [0, 1] and got.model == "tiny"
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), expected, rtol=1e-4, atol=1e-5)
    assert got.usage.prompt_tokens == got.usage.total_tokens > 0
    floats = httpx.post(tiny_server.base + "/embeddings", json={"input": ids, "encoding_format": "float"},
                        timeout=30).json()
    np.testing.assert_allclose(floats["data"][0]["embedding"], expected[1], rtol=1e-4, atol=1e-5)
    for body, match in (({"input": ""}, "'input' must not be empty"), ({"input": ["a", 5]}, "'input' must be"),
                        ({"input": "a", "dimensions": 3}, f"this model's embeddings have {n_embd} dimensions"),
                        ({"input": "a", "encoding_format": "int8"}, "'encoding_format' must be"),
                        ({}, "'input' is required"), ({"input": "a", "pooling": "max"}, "unsupported parameter")):
        r = httpx.post(tiny_server.base + "/v1/embeddings", json=body, timeout=30)
        assert r.status_code == 400 and re.search(match, r.json()["error"]["message"]), (body, r.text)


def test_completion_stream(tiny_server, tiny_model):
    expected = expected_completion(tiny_model, "hello there", 40)
    stream = tiny_server.client().completions.create(model="tiny", prompt="hello there", max_tokens=40,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.tokens)
    assert len({c.id for c in chunks}) == 1


def test_chat(tiny_server, tiny_model):
    expected = tiny_model.chat(CHAT, StreamConfig.greedy(20), template="chatml")
    client = tiny_server.client()
    got = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=20, temperature=0, logprobs=True)
    assert got.object == "chat.completion" and got.id.startswith("chatcmpl-")
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == expected.text
    assert got.usage.completion_tokens == len(expected.tokens)
    assert len(got.choices[0].logprobs.content) == len(expected.tokens)
    stream = client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=20, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    # sampling with a seed is repeatable through the server
    kw = dict(model="tiny", messages=CHAT, max_tokens=16, temperature=1.1, top_p=0.9, seed=7,
              presence_penalty=0.5, frequency_penalty=0.3)
    assert client.chat.completions.create(**kw).choices[0].message.content == \
        client.chat.completions.create(**kw).choices[0].message.content


def test_penalties_cover_the_whole_request(tiny_server, tiny_model):
    """OpenAI's presence/frequency penalties count every token of the request, not llama.cpp's last 64."""
    whole = tiny_model.chat(CHAT, StreamConfig.greedy(150, presence_penalty=2.0, repeat_last_n=256),
                            template="chatml", context_size=256)
    last_64 = tiny_model.chat(CHAT, StreamConfig.greedy(150, presence_penalty=2.0, repeat_last_n=64),
                              template="chatml", context_size=256)
    assert whole.text != last_64.text  # the window matters for this request
    got = tiny_server.client().chat.completions.create(model="tiny", messages=CHAT, max_tokens=150, temperature=0,
                                                       presence_penalty=2.0)
    assert got.choices[0].message.content == whole.text


@pytest.mark.anyio
async def test_concurrent_streams_async_client(tiny_server, tiny_model):
    """More streams than slots (2): they share the engine or wait in its queue; each gets its own answer."""
    expected = [expected_completion(tiny_model, p, 32).text for p in PROMPTS]
    got: List[str] = [""] * len(PROMPTS)
    client = tiny_server.async_client()

    async def one(i: int) -> None:
        stream = await client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=32, temperature=0,
                                                 stream=True)
        async for chunk in stream:
            got[i] += chunk.choices[0].text

    async with client:
        async with anyio.create_task_group() as tg:
            for i in range(len(PROMPTS)):
                tg.start_soon(one, i)
    assert got == expected
    tiny_server.wait_for(lambda m: m["mullama_engine_active_requests"] == 0 and m["mullama_kv_cells_used"] == 0,
                         "slots free after the streams")


@pytest.mark.parametrize("kwargs, match", [
    (dict(messages=[]), "messages must not be empty"),
    (dict(messages=CHAT, temperature=5), "temperature"),
    (dict(messages=CHAT, n=3), "'n'=3 is more than the 2 requests this server decodes together"),
    (dict(messages=CHAT, max_tokens=0), "max_tokens"),
    (dict(messages=CHAT, max_tokens=10_000), "maximum context length is 256 tokens"),
    (dict(messages=CHAT, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
    (dict(messages=CHAT, top_logprobs=30, logprobs=True), "between 0 and 20"),
    (dict(messages=CHAT, extra_body={"grammar": "root ::= x"}), "undefined rule 'x'"),
    (dict(messages=CHAT, extra_body={"grammar": "root ::= \"a\"", "json_schema": {}}), "at most one of"),
    (dict(messages=CHAT, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}}}), "unsupported JSON schema"),
    (dict(messages=CHAT, response_format={"type": "yaml"}), "response_format type"),
    (dict(messages=CHAT, reasoning_effort="high"), "unsupported parameter 'reasoning_effort'"),
    (dict(messages=CHAT, stop=["a", ""]), "stop strings must not be empty"),
    (dict(messages=CHAT, stop=[f"s{i}" for i in range(10_000)]), "at most 64 stop strings"),
    (dict(messages=CHAT, stop=["x" * 9000]), "8192"),
    (dict(messages=[{"role": "user", "content": "a\u0000b"}]), "NUL character"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "only text content"),
])
def test_bad_chat_requests_answer_400(tiny_server, kwargs, match):
    with pytest.raises(openai.BadRequestError, match=match) as info:
        tiny_server.client().chat.completions.create(model="tiny", **kwargs)
    assert info.value.status_code == 400
    assert info.value.body["message"] and info.value.body["type"] == "invalid_request_error"


def test_bad_requests_answer_4xx(tiny_server, tiny_model):
    client = tiny_server.client()
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model="tiny", prompt=[1, 2, tiny_model.n_vocab + 5])
    with pytest.raises(openai.BadRequestError, match="11 prompts x n=1 are more requests than this server runs"):
        client.completions.create(model="tiny", prompt=["a"] * 11)
    with pytest.raises(openai.BadRequestError, match="'echo' with 'logprobs'"):
        client.completions.create(model="tiny", prompt="a", echo=True, logprobs=0)
    with pytest.raises(openai.BadRequestError, match="context_length_exceeded|maximum context length"):
        client.completions.create(model="tiny", prompt="word " * 300)
    base = tiny_server.base
    r = httpx.post(base + "/v1/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": "many"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.get(base + "/v1/completions", timeout=10)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    r = httpx.get(base + "/v2/anything", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_finished_requests_count_as_finished(tiny_server):
    """A request answered in full is counted by its finish reason, not as a disconnect (hypercorn reports
    http.disconnect as soon as the response is sent)."""
    before = tiny_server.metrics()
    client = tiny_server.client()
    client.completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=0)
    list(client.completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=0, stream=True))
    after = tiny_server.wait_for(lambda m: m["mullama_http_requests_in_flight"] <= 1, "requests ended")
    length = 'mullama_generations_total{finish_reason="length"}'
    assert after.get(DISCONNECTED, 0) == before.get(DISCONNECTED, 0)
    assert after.get(length, 0) == before.get(length, 0) + 2


def test_stop_strings_usage_and_logprobs_when_streaming(tiny_server, tiny_model):
    expected = expected_completion(tiny_model, "once upon", 24).text
    stop = expected[5:8]  # a stop string the greedy output reaches
    client = tiny_server.client()
    got = client.completions.create(model="tiny", prompt="once upon", max_tokens=24, temperature=0, stop=[stop])
    assert got.choices[0].text == expected[: expected.index(stop)] and got.choices[0].finish_reason == "stop"
    chat = tiny_model.chat(CHAT, StreamConfig.greedy(12), template="chatml")
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0,
                                                 stream=True, logprobs=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(chat.tokens)
    assert all(c.usage is None for c in chunks[:-1])
    lps = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert len(lps) == len(chat.tokens) and "".join(c.choices[0].delta.content or "" for c in chunks
                                                     if c.choices) == chat.text


def test_health_and_metrics(tiny_server, prometheus_families):
    r = httpx.get(tiny_server.base + "/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["slots"] == 2
    before = tiny_server.metrics()
    tiny_server.client().completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=0)
    r = httpx.get(tiny_server.base + "/metrics", timeout=10)
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = prometheus_families(r.text)  # what Prometheus reads
    kinds = {name: f.type for name, f in families.items()}
    assert kinds["mullama_http_responses"] == kinds["mullama_generated_tokens"] == "counter"
    assert kinds["mullama_engine_active_requests"] == kinds["mullama_runtime_uptime_seconds"] == "gauge"
    assert kinds["mullama_time_to_first_token_seconds"] == "histogram"
    responses = [s.labels for s in families["mullama_http_responses"].samples]
    assert {"endpoint": "completions", "status": "200"} in responses
    after = tiny_server.metrics()
    key = 'mullama_http_responses_total{endpoint="completions",status="200"}'
    assert after[key] == before.get(key, 0) + 1
    assert after["mullama_generated_tokens_total"] >= before.get("mullama_generated_tokens_total", 0) + 1
    assert after["mullama_runtime_generations_total"] >= 1 and after["mullama_runtime_uptime_seconds"] > 0
    assert after["mullama_time_to_first_token_seconds_count"] >= 1
    assert after['mullama_time_to_first_token_seconds_bucket{le="+Inf"}'] == \
        after["mullama_time_to_first_token_seconds_count"]
    # the engine's compute threads and progress
    assert 1 <= after["mullama_engine_compute_threads"] <= after["mullama_engine_compute_threads_max"]
    assert after["mullama_engine_decode_steps_total"] >= before.get("mullama_engine_decode_steps_total", 0) + 5
    assert after["mullama_engine_last_step_seconds"] > 0
    assert after["mullama_engine_tokens_in_flight"] == 0
    assert "mullama_engine_watchdog_aborts_total" in after and "mullama_engine_thread_changes_total" in after


# -- the real model: disconnects and overload ---------------------------------------------------



def wait_disconnected(server: Server, before: Dict[str, float]) -> Dict[str, float]:
    """Wait until one more request ended as disconnected and every slot and KV cell is free."""
    return server.wait_for(
        lambda m: m.get(DISCONNECTED, 0) == before.get(DISCONNECTED, 0) + 1
        and m["mullama_engine_active_requests"] == 0 and m["mullama_kv_cells_used"] == 0,
        "the request the client left ended and freed its slot")


def test_client_disconnect_stops_the_generation(default_server):
    """A client that leaves mid-stream cancels its generation; the slot comes back."""
    before = default_server.metrics()
    stream = default_server.client().completions.create(stream=True, **LONG)
    received = 0
    for chunk in stream:
        received += 1
        if received == 3:
            break
    stream.close()  # closes the connection
    m = wait_disconnected(default_server, before)
    generated = m["mullama_generated_tokens_total"] - before.get("mullama_generated_tokens_total", 0)
    assert generated < 300  # it stopped, far short of the 900 tokens asked for
    time.sleep(0.3)
    assert default_server.metrics()["mullama_generated_tokens_total"] == m["mullama_generated_tokens_total"]
    # capacity came back: one slot, no queue, and this request is served
    got = default_server.client().completions.create(model="smol", prompt="The capital of France is",
                                                     max_tokens=4, temperature=0)
    assert got.choices[0].text.strip().startswith("Paris")


def test_disconnect_during_a_whole_response(default_server):
    """A non-streaming request whose client gives up is cancelled too."""
    before = default_server.metrics()
    with pytest.raises(openai.APITimeoutError):
        default_server.client(timeout=1.0).completions.create(**LONG)
    m = wait_disconnected(default_server, before)
    generated = m["mullama_generated_tokens_total"] - before.get("mullama_generated_tokens_total", 0)
    assert generated < 900  # stopped before its end


def test_full_queue_answers_503_at_once(default_server):
    client = default_server.client()
    stream = client.completions.create(stream=True, **LONG)
    next(iter(stream))  # the one slot is busy generating
    try:
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert info.value.status_code == 503
        assert info.value.body["code"] == "overloaded" and info.value.response.headers["retry-after"] == "1"
    finally:
        stream.close()
    default_server.wait_for(lambda m: m["mullama_engine_active_requests"] == 0, "the slot is free again")
    assert client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4).choices[0].message.content


def test_default_model_chat(default_server, default_model):
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    expected = default_model.chat(msgs, StreamConfig.greedy(32))
    got = default_server.client().chat.completions.create(model="smol", messages=msgs, max_tokens=32, temperature=0)
    assert got.choices[0].message.content == expected.text and "Paris" in expected.text
    assert got.choices[0].finish_reason == "stop"


# -- clients that misbehave: not reading, half-sent heads -------------------------------------------


def non_reading_clients(server: Server, n: int, max_tokens: int = 4000, api_key: str = "") -> List[socket.socket]:
    """*n* streaming requests whose clients never read (a tiny receive buffer): the tiny model
    writes faster than they take, so the server's writes to them block (under trio; uvicorn's
    kernel send buffer takes megabytes first)."""
    host, port = server.base[len("http://"):].rsplit(":", 1)
    body = json.dumps({"model": "tiny", "prompt": "a b", "max_tokens": max_tokens, "stream": True, "temperature": 0,
                       "logprobs": 0}).encode()
    socks = []
    for _ in range(n):
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        c.connect((host, int(port)))
        auth = f"authorization: Bearer {api_key}\r\n".encode() if api_key else b""
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n" + auth +
                  b"content-length: %d\r\n\r\n" % len(body) + body)
        socks.append(c)
    return socks


def wait_streaming(sock: socket.socket, timeout: float = 60.0) -> None:
    """Wait until a token event is in *sock*'s receive buffer (peeked: the client still reads nothing).
    Once there it stays, so this cannot miss it, however briefly the request ran."""
    deadline = time.monotonic() + timeout
    sock.settimeout(timeout)
    while b"\ndata: {" not in sock.recv(4096, socket.MSG_PEEK):
        assert time.monotonic() < deadline, "no token event arrived"
        time.sleep(0.02)


def read_until_closed(sock: socket.socket, timeout: float = 60.0) -> None:
    """Read until the server closes the connection (a bound, not a timing assertion)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(1 << 16):
            pass
    except ConnectionResetError:
        pass
    finally:
        sock.close()


@pytest.mark.parametrize("mode", MODES)
def test_clients_that_stop_reading_lose_their_slots_at_the_request_timeout(tiny_model_path, mode):
    """Two streams whose clients never read free their slots and KV cells at --timeout (the
    server's writes to them block: on trio uncancellably), the server goes on serving, and
    SIGTERM exits after --graceful-timeout instead of waiting for them."""
    server = start_server(tiny_model_path, mode, "--name", "tiny", "--context-size", "4096", "--max-concurrent",
                          "2", "--max-queue", "0", "--timeout", "1", "--io-timeout", "600", "--graceful-timeout", "0")
    socks = non_reading_clients(server, 2)
    try:
        for c in socks:  # both streams had a slot and generated (no queue: else they were refused)
            wait_streaming(c)
        server.wait_for(lambda m: m["mullama_engine_active_requests"] == 0 and m["mullama_kv_cells_used"] == 0,
                        "the stuck streams' slots were freed by the request timeout")
        got = server.client().completions.create(model="tiny", prompt="a b", max_tokens=4, temperature=0)
        assert got.choices[0].finish_reason == "length"  # both slots serve again
        assert server.stop() == 0  # (stop() waits 60 s at most: before, trio never exited)
    finally:
        for c in socks:
            c.close()
        if server.proc.poll() is None:
            server.proc.kill()


def test_a_client_that_stops_reading_is_disconnected_after_the_io_timeout(slow_clients_server):
    """A client that stops reading cannot hold its slot, long before --timeout: the client reads
    nothing until its request has ended and freed its slot and KV cells, then finds the connection
    closed. On trio the server's socket takes at most 16 KiB of unsent bytes (trio's
    TCP_NOTSENT_LOWAT), so its writes block and the response is cut after --io-timeout without
    progress. Under uvicorn the kernel's send buffer (megabytes on loopback) takes this whole
    response: the request ends normally and the connection is closed at the keep-alive timeout."""
    server = slow_clients_server
    before = server.metrics()

    def ended(m: Dict[str, float]) -> float:
        return sum(v - before.get(k, 0) for k, v in m.items() if k.startswith("mullama_generations_total"))

    (sock,) = non_reading_clients(server, 1, max_tokens=1500, api_key=API_KEY)  # (~55 KB of events)
    try:
        m = server.wait_for(lambda m: ended(m) == 1 and m["mullama_http_requests_in_flight"] == 1  # (/metrics)
                            and m["mullama_engine_active_requests"] == 0 and m["mullama_kv_cells_used"] == 0,
                            "the request ended and freed its slot")
        if server.backend == "trio":  # its writes blocked: cut at the io timeout, long before its 1500 tokens
            assert m.get(DISCONNECTED, 0) == before.get(DISCONNECTED, 0) + 1
            assert m["mullama_generated_tokens_total"] - before["mullama_generated_tokens_total"] < 1500
    finally:
        read_until_closed(sock)  # (closes it too)


def half_sent_heads(server: Server, n: int) -> List[socket.socket]:
    """*n* connections that send half a request head and then nothing (slowloris)."""
    host, port = server.base[len("http://"):].rsplit(":", 1)
    socks = []
    for _ in range(n):
        c = socket.create_connection((host, int(port)))
        c.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nx-slow: ")
        socks.append(c)
    return socks


def test_half_sent_request_heads_are_closed_after_the_keep_alive_timeout(slow_clients_server):
    """uvicorn on its own never closed a connection that sent half a request head."""
    server = slow_clients_server
    for c in half_sent_heads(server, 5):
        read_until_closed(c)
    assert httpx.get(server.base + "/health", timeout=30).status_code == 200
    # `mullama serve` states its limits (and its own loggers print at --log-level)
    assert "INFO:mullama.server: limits: a request head within 0.5 s (keep-alive), no write or body read " \
           "stalled over 1 s" in server.startup


def test_a_body_trickling_after_an_early_answer_is_cut(slow_clients_server):
    """A request answered before its body arrived (here 401) whose client then trickles the body
    a byte at a time: the connection is closed (keep-alive timeout, or the body's io timeout)."""
    host, port = slow_clients_server.base[len("http://"):].rsplit(":", 1)
    c = socket.create_connection((host, int(port)))
    try:
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\nabc")
        assert c.recv(1000).startswith(b"HTTP/1.1 401")
        c.settimeout(0.2)
        deadline = time.monotonic() + 60
        while True:  # a bound, not a timing assertion
            assert time.monotonic() < deadline, "the trickling connection was never closed"
            try:
                c.sendall(b"x")
                if c.recv(100) == b"":
                    break
            except socket.timeout:
                pass
            except OSError:  # reset
                break
    finally:
        c.close()


@pytest.mark.parametrize("mode", MODES)
def test_connections_beyond_the_limit_are_closed_at_once(tiny_model_path, mode):
    """The fourth connection is closed at once (not at the keep-alive timeout, 600 s here), and the
    held ones' places come back as soon as their clients close them (on trio they came back only at
    the keep-alive timeout: hypercorn's idle timer kept a connection its client had closed)."""
    server = start_server(tiny_model_path, mode, "--name", "tiny", "--keep-alive-timeout", "600",
                          "--max-connections", "3")
    try:
        held = half_sent_heads(server, 3)
        try:
            (extra,) = half_sent_heads(server, 1)
            read_until_closed(extra, timeout=30)
            for c in held:  # the extra one was closed while these are still open: by the limit
                c.setblocking(False)
                with pytest.raises(BlockingIOError):
                    c.recv(1)
        finally:
            for c in held:
                c.close()
        deadline = time.monotonic() + 60  # a bound, far below the keep-alive timeout
        while True:  # the held connections' places come back as the server sees them closed
            try:
                if httpx.get(server.base + "/health", timeout=10).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "no connection admitted after the others closed"
                time.sleep(0.05)
    finally:
        assert server.stop() == 0


def _fd_limit(n: int):
    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))

    return limit


@pytest.mark.parametrize("mode", MODES)
def test_many_slow_connections_under_a_small_descriptor_limit(tiny_model_path, mode):
    """300 half-sent heads against a server limited to 128 file descriptors: by default the
    server admits only what leaves room for its requests, so a normal request is served (once
    the slow ones time out), never answered 500 'Too many open files'."""
    server = start_server(tiny_model_path, mode, "--name", "tiny", "--max-concurrent", "2", "--max-queue", "4",
                          "--keep-alive-timeout", "0.5", preexec_fn=_fd_limit(128))
    slow = half_sent_heads(server, 300)
    try:
        client = server.client(timeout=30)
        deadline = time.monotonic() + 120
        while True:
            try:
                got = client.completions.create(model="tiny", prompt="a b", max_tokens=4, temperature=0)
                break
            except openai.APIConnectionError:  # closed at once while the slow ones hold the connections
                assert time.monotonic() < deadline, "never served"
                time.sleep(0.05)
        assert got.choices[0].finish_reason == "length"
        assert not [k for k in server.metrics() if 'status="5' in k]
    finally:
        for c in slow:
            c.close()
        assert server.stop() == 0


@pytest.mark.parametrize("mode", MODES)
def test_running_out_of_descriptors_is_logged_once(tiny_model_path, mode):
    """With a connection limit above the descriptor limit, accept() fails with EMFILE; that is
    logged once a minute without a traceback, not on every retry (asyncio retries each second,
    trio ten times a second)."""
    server = start_server(tiny_model_path, mode, "--name", "tiny", "--keep-alive-timeout", "3",
                          "--max-connections", "1000", preexec_fn=_fd_limit(128))
    slow = half_sent_heads(server, 200)
    report = "cannot accept connections: out of file descriptors"
    seen: List[str] = []
    try:
        deadline = time.monotonic() + 60
        while not any(report in line for line in seen):  # a bound, not a timing assertion
            assert time.monotonic() < deadline, "EMFILE was never reported"
            try:
                seen.append(server.lines.get(timeout=1))
            except queue.Empty:
                pass
        time.sleep(1)  # asyncio retries each second, trio ten times a second: more tries, not more lines
    finally:
        for c in slow:
            c.close()
    assert server.stop() == 0
    log = "".join(seen) + "".join(server.lines.queue)
    assert log.count(report) == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def test_accept_retries_left_at_shutdown_are_not_logged(caplog):
    """After accept() failed for lack of descriptors, asyncio retries it a second later; a retry
    still pending when the server closes its listener runs on the closed socket and fails
    (ValueError). That is no error of the server, and it logged a traceback at shutdown (the
    test above failed now and then): the retry is run here on a closed listener, as asyncio does."""
    import asyncio

    from mullama.server._run import _logging, bind

    def failing_callbacks() -> List[logging.LogRecord]:
        loop = asyncio.new_event_loop()
        try:
            listener = bind("127.0.0.1", 0)
            listener.close()  # (shutdown)
            caplog.clear()
            loop.call_soon(loop._start_serving, asyncio.Protocol, listener)  # the pending retry
            loop.call_soon(lambda: 1 / 0)  # any other failing callback
            loop.run_until_complete(asyncio.sleep(0))
        finally:
            loop.close()
        return [r for r in caplog.records if r.name == "asyncio"]

    with caplog.at_level("ERROR", logger="asyncio"):
        unfiltered = failing_callbacks()
        assert [r.exc_info[0] for r in unfiltered] == [ValueError, ZeroDivisionError]  # what asyncio logs
        with _logging("warning"):
            kept = failing_callbacks()
    assert [r.exc_info[0] for r in kept] == [ZeroDivisionError]


# -- the app in-process (any ASGI server), the CLI's errors, the examples -------------------------


@pytest.mark.anyio
async def test_app_on_a_loaded_model_with_an_api_key(tiny_model_path, tiny_model):
    from mullama.aio import AsyncModel
    from mullama.server import create_app

    expected = tiny_model.chat(CHAT, StreamConfig.greedy(8), template="chatml")
    auth = {"authorization": "Bearer s3cret"}
    async with await AsyncModel.load(tiny_model_path, context_size=256, threads=1) as model:
        app = create_app(model, model_id="t", api_key="s3cret")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as c:
            r = await c.get("/v1/models")
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            r = await c.get("/v1/models", headers={"authorization": "Bearer wrong"})
            assert r.status_code == 401
            assert (await c.get("/v1/models", headers=auth)).json()["data"][0]["id"] == "t"
            assert (await c.get("/health")).json()["status"] == "ok"  # no key needed
            # the tiny model has no chat template and none was configured
            r = await c.post("/v1/chat/completions", json={"messages": CHAT}, headers=auth)
            assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
        app = create_app(model, model_id="t", chat_template="chatml")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as c:
            r = await c.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected.text
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as c:
        assert (await c.get("/health")).status_code == 503  # the model was closed
        r = await c.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"


@pytest.mark.anyio
async def test_refused_requests_leave_no_reference_cycles(tiny_model_path, cyclic_garbage):
    """A request refused inside the disconnect watch (here a context overflow) keeps
    nothing alive once answered: its prompt, tokens and frames are freed at once, not
    at some later run of the cyclic collector (a 7 MB request each, that was gigabytes)."""
    from mullama.aio import AsyncModel
    from mullama.server import create_app
    from mullama.server._openai import ApiError

    body = {"messages": [{"role": "user", "content": "hi"}] * 20000}
    async with await AsyncModel.load(tiny_model_path, context_size=256, threads=1) as model:
        app = create_app(model, model_id="t", chat_template="chatml")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as c:
            await c.get("/health")  # anything created once per app or client, before counting
            for _ in range(2):
                with cyclic_garbage() as garbage:
                    r = await c.post("/v1/chat/completions", json=body)
                    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
                    del r
                # (only what a leak looks like: other tests' leftovers may be collected meanwhile)
                assert [repr(o)[:200] for o in garbage if isinstance(o, (ApiError, BaseExceptionGroup))] == []
                assert [len(o) for o in garbage if isinstance(o, list) and len(o) > 1000] == []
                del garbage


@pytest.mark.anyio
async def test_a_response_write_that_never_completes_ends_the_request(tiny_model_path):
    """The app's own bound on writes (io_timeout), for any ASGI server whose writes wait
    for the client (uvicorn): the request ends as disconnected, its slot is freed."""
    from mullama.aio import AsyncModel
    from mullama.server import create_app

    body = json.dumps({"prompt": "a b", "max_tokens": 2000, "stream": True, "temperature": 0}).encode()
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    sent: List[dict] = []
    requests = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        if requests:
            return requests.pop()
        await anyio.sleep_forever()  # the client neither sends more nor leaves

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            await anyio.sleep_forever()  # it stopped reading: the write waits for ever

    async with await AsyncModel.load(tiny_model_path, context_size=4096, threads=1) as model:
        app = create_app(model, model_id="tiny", io_timeout=0.5)
        with anyio.move_on_after(60) as bound:  # a bound, not a timing assertion
            await app(scope, receive, send)
        assert not bound.cancelled_caught
        assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
        assert app.metrics.generations == {"disconnected": 1}
        assert model.active_workers == 0 and model.kv_used() == 0


def test_listening_socket_turns_nagle_off():
    """asyncio turns TCP_NODELAY on for accepted sockets only when the listener says it is TCP
    (proto=IPPROTO_TCP, not 0); without it /health took ~44 ms on a kept-alive connection."""
    from mullama.server._run import bind

    with bind("127.0.0.1", 0) as sock:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


@pytest.mark.anyio
async def test_internal_errors_are_logged_and_counted_as_500(tiny_model_path, caplog, monkeypatch):
    from mullama.aio import AsyncModel
    from mullama.server import create_app

    async with await AsyncModel.load(tiny_model_path, context_size=256, threads=1) as model:
        def broken(*args, **kwargs):
            raise RuntimeError("a bug")

        monkeypatch.setattr(model, "tokenize", broken)
        app = create_app(model, model_id="t", api_key="clé-ünïcode")
        auth = {"authorization": "Bearer clé-ünïcode".encode("utf-8")}  # a UTF-8 client
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as c:
            with caplog.at_level("ERROR", logger="mullama"):
                r = await c.post("/v1/completions", json={"prompt": "x"}, headers=auth)
            assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
            assert "RuntimeError: a bug" in caplog.text and "Traceback" in caplog.text
            r = await c.post("/v1/completions", json={"prompt": "x"}, headers={"authorization": "Bearer cl"})
            assert r.status_code == 401
        assert app.metrics.responses[("completions", "500")] == 1


@pytest.mark.anyio
async def test_hostile_json_answers_400(tiny_model_path):
    """JSON that parses into what Python cannot handle is a 400 naming the problem, not a 500."""
    from mullama.aio import AsyncModel
    from mullama.server import create_app

    bodies = {
        "nested too deeply": b"[" * 100_000 + b"]" * 100_000,
        "Exceeds the limit": b'{"prompt": "a", "max_tokens": ' + b"1" * 5000 + b"}",
        "top_p must be": b'{"prompt": "a", "top_p": 1' + b"0" * 400 + b"}",  # an integer beyond any float
        "lone surrogate": b'{"prompt": "a", "\\ud800": 1}',
        "lone surrogate ('\\ud800')": b'{"prompt": "a\\ud800b", "echo": true, "max_tokens": 2}',
    }
    async with await AsyncModel.load(tiny_model_path, context_size=256, threads=1) as model:
        app = create_app(model, model_id="t")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as c:
            for match, body in bodies.items():
                r = await c.post("/v1/completions", content=body, headers={"content-type": "application/json"})
                assert r.status_code == 400, (match, r.text[:300])
                assert match in r.json()["error"]["message"]
            r = await c.post("/v1/completions", json={"prompt": "caf\u00e9", "max_tokens": 2, "echo": True})
            assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("caf\u00e9")


def test_serve_names_a_missing_model(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mullama", "serve", "--model", str(tmp_path / "nope.gguf")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "model file not found" in r.stderr


@pytest.mark.parametrize("args, match", [
    (["--chat-template", "chatlm"], "unknown chat template 'chatlm'"),
    (["--chat-template", "{% for m in messages %}"], "not valid Jinja"),
    (["--port", "70000"], "port must be between 0 and 65535"),
    (["--speculative", "--draft-max", "0"], "--draft-max must be between 1 and 256"),
    (["--draft-max", "8"], "--draft-max needs --speculative or --draft-model"),
])
def test_serve_refuses_bad_options(tiny_model_path, args, match):
    r = subprocess.run([sys.executable, "-m", "mullama", "serve", "--model", str(tiny_model_path), *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and re.search(match, r.stderr), r.stderr


@pytest.mark.parametrize("mode", MODES)
def test_serve_reports_a_model_that_fails_to_load(llama_cpp_dir, mode):
    """A well-formed GGUF file that cannot generate (vocabulary only) fails at the server's startup."""
    vocab = llama_cpp_dir / "models" / "ggml-vocab-llama-spm.gguf"
    r = subprocess.run([sys.executable, "-m", "mullama", "serve", "--model", str(vocab), "--port", "0",
                        "--backend", mode], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "mullama: error: the server did not start:" in r.stderr and "holds no weights" in r.stderr
    assert "Traceback" not in r.stderr


def test_examples_run(default_model_path):
    root = Path(__file__).resolve().parent.parent / "examples"
    model = ["--model", str(default_model_path)]
    r = subprocess.run([sys.executable, str(root / "asyncio_chat.py"), *model], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "What is 2 + 2? ->" in r.stdout and "generations still running: 0" in r.stdout
    r = subprocess.run([sys.executable, str(root / "trio_nursery.py"), *model, "--deadline", "1.0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert ": 1.0 s" in r.stdout and "generations still running: 0" in r.stdout and "next request: '" in r.stdout


@pytest.mark.parametrize("mode", MODES)
def test_openai_client_example(default_model_path, mode):
    root = Path(__file__).resolve().parent.parent / "examples"
    server = start_server(default_model_path, mode, "--context-size", "1024",
                          "--chat-template-file", str(root / "chatml_tools.jinja"))
    try:
        r = subprocess.run([sys.executable, str(root / "openai_client.py"), "--url", server.url],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert "chat: " in r.stdout and "stream: " in r.stdout and "completion: ' the planet of Neptune" in r.stdout
        assert "structured: name=" in r.stdout
        assert "tool call: get_weather {'city': 'Paris'}" in r.stdout and "after the call: " in r.stdout
    finally:
        assert server.stop() == 0


def test_embed_server_example(default_model_path):
    import socket

    with socket.socket() as s:  # a free port (the example takes a fixed one, as a real app would)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parent.parent / "examples"
    proc = subprocess.Popen([sys.executable, str(root / "embed_server.py"), "--model", str(default_model_path),
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the embedded server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list()] == ["local"]
        assert client.completions.create(model="local", prompt="The capital of France is", max_tokens=3,
                                         temperature=0).choices[0].text.strip().startswith("Paris")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


@pytest.mark.parametrize("mode", MODES)
def test_sigterm_while_streaming_exits_cleanly(default_model_path, mode):
    """Shutdown with a generation running: open requests get --graceful-timeout seconds (here 0),
    then the generation is stopped, the stream ends as a stream does (an error event saying
    so, then [DONE]) instead of being cut, and the process exits 0 (no crash, no hang)."""
    server = start_server(default_model_path, mode, "--name", "smol", "--context-size", "1024",
                          "--graceful-timeout", "0")
    events: List[str] = []
    with httpx.stream("POST", server.url + "/completions", json={**LONG, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(line[6:])
                break
        server.proc.send_signal(signal.SIGTERM)
        for line in lines:
            if line.startswith("data: "):
                events.append(line[6:])
    assert server.proc.wait(timeout=60) == 0
    server.proc.stdout.close()
    assert events[-1] == "[DONE]", events[-3:]
    assert "shutting down" in json.loads(events[-2])["error"]["message"]
    assert not any('"finish_reason":"length"' in e for e in events)  # cut short, not run to its end


@pytest.mark.parametrize("chat", [True, False])
def test_event_template_equals_the_whole_chunk(chat):
    """Token events are rendered from a template: byte for byte what encoding the whole chunk gives."""
    from mullama.server import _openai as oa
    from mullama.server._asgi import EventTemplate, _dumps

    ids = oa.ResponseIds(chat, "m")
    make = (lambda t: oa.chat_chunk(ids, {"content": t}, with_usage=True)) if chat else \
        (lambda t: oa.completion_chunk(ids, t))
    template = EventTemplate(make(EventTemplate.MARK))
    for text in ["plain", 'quote " and \\ backslash', "new\nline", "\x00\x1f", "héllo 日本 🙂", "\x01mullama\x01"]:
        assert template.render(text) == b"data: " + _dumps(make(text)) + b"\n\n"


SMALL = {"type": "object", "additionalProperties": False, "required": ["n", "ok"],
         "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}}}


class Small(pydantic.BaseModel):
    n: int = pydantic.Field(ge=0, le=99)
    ok: bool


def test_structured_output_through_the_openai_client(tiny_server):
    client = tiny_server.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "small", "schema": SMALL, "strict": True}}
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=CHAT, response_format=fmt, seed=seed,
                                           max_tokens=60)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SMALL)
    chunks = client.chat.completions.create(model="tiny", messages=CHAT, response_format=fmt, seed=7,
                                            max_tokens=60, stream=True)
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)), SMALL)
    # the client's own pydantic parsing
    parsed = client.chat.completions.parse(model="tiny", messages=CHAT, response_format=Small, max_tokens=60)
    assert isinstance(parsed.choices[0].message.parsed, Small)
    # /v1/completions: response_format, and llama.cpp's json_schema and grammar fields
    r = client.completions.create(model="tiny", prompt="x", max_tokens=60, extra_body={"response_format": fmt})
    jsonschema.validate(json.loads(r.choices[0].text), SMALL)
    r = client.completions.create(model="tiny", prompt="x", max_tokens=60, extra_body={"json_schema": SMALL})
    jsonschema.validate(json.loads(r.choices[0].text), SMALL)
    r = client.completions.create(model="tiny", prompt="x", max_tokens=8,
                                  extra_body={"grammar": 'root ::= "yes" | "no"'})
    assert r.choices[0].text in ("yes", "no") and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8,
                                       response_format={"type": "json_object", "schema": {"enum": [1, 2]}})
    assert json.loads(r.choices[0].message.content) in (1, 2)
    with pytest.raises(openai.BadRequestError, match=r"line 1, column 11: expecting newline or end \(near .\).") as info:
        client.completions.create(model="tiny", prompt="x", max_tokens=8, extra_body={"grammar": "root ::= |)"})
    assert info.value.body["param"] == "grammar"


# -- tool calls through the official client ---------------------------------------------

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather of a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a city",
                                           "parameters": {"type": "object", "required": ["city"],
                                                          "properties": {"city": {"enum": ["x", "y"]}}}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module", params=MODES)
def tools_server(request, tiny_model_path, llama_cpp_dir) -> Iterator[Server]:
    """The tiny model with Qwen 2.5's chat template (from the fetched llama.cpp tree), which has tool calls."""
    template = llama_cpp_dir / "models" / "templates" / "Qwen-Qwen2.5-7B-Instruct.jinja"
    server = start_server(tiny_model_path, request.param, "--name", "tiny", "--chat-template-file", str(template),
                          "--context-size", "4096", "--max-concurrent", "2")
    yield server
    assert server.stop() == 0


def _assemble_chunks(chunks) -> "tuple[str, list, str]":
    content, calls, finish = "", {}, None
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for c in choice.delta.tool_calls or []:
            if c.index not in calls:
                assert c.id and c.type == "function" and c.function.name
                calls[c.index] = {"id": c.id, "name": c.function.name, "arguments": c.function.arguments or ""}
            else:
                assert c.id is None and c.function.name is None
                calls[c.index]["arguments"] += c.function.arguments
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_tool_calls_round_trip_through_the_openai_client(tools_server):
    client = tools_server.client()
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                       temperature=0, max_tokens=300)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id and call.function.name in ("get_weather", "get_time")
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), schema)
    # the same, streamed: the pieces assemble into the same call
    chunks = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                            temperature=0, max_tokens=300, stream=True)
    content, calls, finish = _assemble_chunks(chunks)
    assert finish == "tool_calls" and content == ""
    assert [(c["name"], c["arguments"]) for c in calls] == [(call.function.name, call.function.arguments)]
    # a named function
    named = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, temperature=0, max_tokens=300,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert named.choices[0].message.tool_calls[0].function.name == "get_time"
    # the call and its result go back into the conversation
    history = ASK + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    again = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, tool_choice="none",
                                           temperature=0, max_tokens=8)
    assert again.choices[0].message.tool_calls is None and again.choices[0].finish_reason == "length"
    assert again.choices[0].message.content


@pytest.mark.anyio
async def test_tool_calls_through_the_async_openai_client(tools_server):
    async with tools_server.async_client() as client:
        r = await client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS[:1], temperature=0,
                                                 tool_choice="required", max_tokens=300)
        stream = await client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS[:1], temperature=0,
                                                      tool_choice="required", max_tokens=300, stream=True)
        _, calls, finish = _assemble_chunks([c async for c in stream])
    call = r.choices[0].message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    assert finish == "tool_calls" and calls[0]["arguments"] == call.function.arguments


@pytest.mark.parametrize("kwargs, param, match", [
    (dict(tools=[{"type": "function", "function": {"name": "bad name"}}]), "tools", "1-64 letters"),
    (dict(tool_choice="required"), "tool_choice", "needs 'tools'"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice",
     "not among the tools"),
    (dict(tools=TOOLS, response_format={"type": "json_object"}), "tools", "not both"),
    (dict(tools=TOOLS, extra_body={"functions": [{"name": "f"}]}), "functions", "send them as 'tools'"),
])
def test_bad_tool_requests_answer_400(tools_server, kwargs, param, match):
    with pytest.raises(openai.BadRequestError, match=match) as info:
        tools_server.client().chat.completions.create(model="tiny", messages=ASK, max_tokens=8, **kwargs)
    assert info.value.body["param"] == param


def test_tools_with_a_template_that_has_none_answer_400(tiny_server):
    with pytest.raises(openai.BadRequestError, match="describes no tool calls") as info:
        tiny_server.client().chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=8)
    assert info.value.body["param"] == "tools" and info.value.body["code"] == "chat_template"


def test_langchain_structured_output_and_tools(tools_server):
    """langchain-openai's with_structured_output (json_schema and function_calling) and bind_tools."""
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=tools_server.url, api_key="unused", model="tiny", temperature=0, max_tokens=300,
                     max_retries=0)
    for method in ("json_schema", "function_calling"):
        out = llm.with_structured_output(Small, method=method).invoke("Give n and ok.")
        assert isinstance(out, Small), method

    class GetWeather(pydantic.BaseModel):
        """The weather of a city."""

        city: str = pydantic.Field(max_length=8)
        unit: Literal["c", "f"]

    msg = llm.bind_tools([GetWeather], tool_choice="any").invoke("What is the weather in Paris?")
    (call,) = msg.tool_calls
    assert call["name"] == "GetWeather" and call["id"]
    GetWeather.model_validate(call["args"])


def test_top_logprobs_through_the_openai_client(tiny_server):
    client = tiny_server.client()
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == entry.logprob
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].bytes == entry.bytes
    chunks = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                            top_logprobs=2, stream=True)
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [len(e.top_logprobs) for e in streamed] == [2] * 4
    done = client.completions.create(model="tiny", prompt="once upon", max_tokens=3, temperature=0, logprobs=2)
    lp = done.choices[0].logprobs
    assert len(lp.top_logprobs) == 3 and all(len(d) <= 2 for d in lp.top_logprobs)
    assert [max(d.values()) for d in lp.top_logprobs] == pytest.approx(lp.token_logprobs)


def test_llama_server_routes_and_unprefixed_openai_routes(tiny_server, tiny_model):
    base = tiny_server.base
    r = httpx.get(base + "/models", timeout=10)
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"
    assert httpx.get(base + "/models/tiny", timeout=10).status_code == 200
    r = httpx.post(base + "/completions", json={"prompt": "once upon", "max_tokens": 3, "temperature": 0}, timeout=30)
    assert r.status_code == 200 and r.json()["object"] == "text_completion"
    r = httpx.post(base + "/chat/completions", json={"messages": CHAT, "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    # llama-server's /tokenize, /detokenize and /apply-template
    r = httpx.post(base + "/tokenize", json={"content": "hello there"}, timeout=10)
    tokens = r.json()["tokens"]
    assert tokens == tiny_model.tokenize("hello there", add_bos=False, special=True)
    r = httpx.post(base + "/tokenize", json={"content": "hello", "add_special": True, "with_pieces": True},
                   timeout=10)
    pieces = r.json()["tokens"]
    assert [p["id"] for p in pieces] == tiny_model.tokenize("hello", add_bos=True, special=True)
    assert "".join(p["piece"] for p in pieces[1:]).strip() == "hello"
    r = httpx.post(base + "/detokenize", json={"tokens": tokens}, timeout=10)
    assert r.status_code == 200 and r.json()["content"].strip() == "hello there"
    r = httpx.post(base + "/apply-template", json={"messages": CHAT}, timeout=10)
    assert r.json()["prompt"] == tiny_model.apply_chat_template(CHAT, template="chatml")
    for path, body, param in (("/tokenize", {}, "content"), ("/detokenize", {"tokens": [1, "x"]}, "tokens"),
                              ("/detokenize", {"tokens": [10 ** 9]}, "tokens"), ("/tokenize", [1], None)):
        r = httpx.post(base + path, json=body, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, body, r.text)


def test_any_model_name_is_a_choice(tiny_model_path):
    from mullama.server import create_app
    from mullama.server._openai import ApiError

    strict = create_app(str(tiny_model_path), model_id="tiny")
    with pytest.raises(ApiError, match="does not exist"):
        strict._check_model_name("gpt-4o")
    create_app(str(tiny_model_path), model_id="tiny", any_model_name=True)._check_model_name("gpt-4o")
    r = subprocess.run([sys.executable, "-m", "mullama", "serve", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert "--any-model-name" in r.stdout


def test_logit_bias_through_the_openai_client(tiny_server, tiny_model):
    client = tiny_server.client()
    with tiny_model.create_context(256, threads=1) as ctx:
        first = ctx.generate("once upon", StreamConfig.greedy(1)).tokens[0]
    forced = client.completions.create(model="tiny", prompt="once upon", max_tokens=4, temperature=0,
                                       logit_bias={str(first + 1): 100})
    assert forced.choices[0].text == tiny_model.token_to_piece(first + 1).decode() * 4
    for bias, match in (({"x": 1}, "keys must be token ids"), ({"5": 1000}, r"logit_bias\[5\] must be")):
        with pytest.raises(openai.BadRequestError, match=match) as info:
            client.completions.create(model="tiny", prompt="a", max_tokens=2, logit_bias=bias)
        assert info.value.body["param"] == "logit_bias"
