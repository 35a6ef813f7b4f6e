"""mullama on Ray Serve (``mullama.ray``), on a local Ray cluster on loopback.

One cluster for the module (8 logical CPUs on this 2-core machine: the
replicas reserve CPUs, the tiny model hardly uses them), three applications on
it under their own route prefixes: the tiny model on 2 replicas, the tiny
model on 1 replica (so that its /health and /metrics are the replica's), and
two models behind the router. Requests go through Serve's HTTP proxy, with
the official openai client where the test is about the API.

Ray is part of the test extra; these tests are skipped (with the reason) only
on a platform Ray publishes no wheels for, never because it was not installed.
"""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import httpx
import openai
import pytest

if sys.platform not in ("linux", "darwin") or platform.machine().lower() not in ("x86_64", "amd64", "aarch64",
                                                                                   "arm64"):
    pytest.skip(f"Ray publishes no wheels for {sys.platform}/{platform.machine()}", allow_module_level=True)
with warnings.catch_warnings():  # (Ray's modules warn on import: pydantic deprecations)
    warnings.simplefilter("ignore")
    try:
        import ray
        from ray import serve
    except ImportError as exc:  # the test extra installs it: not installed is a broken environment, not a skip
        raise ImportError(f"Ray is missing: pip install -e '.[test]' installs it ({exc})") from exc
    from mullama.ray import (REPLICA_HEADER, AppConfig, ModelDeployment, ReplicaUnhealthyError, deployed,
                             load_config, replica_threads)
    from mullama.ray._serve import replica_health

import mullama
from mullama import InvalidConfigError
from mullama._config import default_threads
from mullama.aio import AsyncConfig
from mullama.server import create_app

from test_server import start_server

pytestmark = [
    # Ray's own modules warn on import and at shutdown (its deprecations, its unclosed sockets)
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

EOS = 2  # the tiny model's end of sequence (tools/tiny_model.py)
LONG = dict(prompt="once upon", max_tokens=3000, temperature=0, logit_bias={str(EOS): -100})
REPLICA = REPLICA_HEADER.decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], what: str, timeout: float = 60.0) -> object:
    """Poll until predicate() is truthy (a bound, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still not true after {timeout} s")
        time.sleep(0.05)


def tiny(path: Path, **config) -> AsyncConfig:
    return AsyncConfig(path, threads=1, context_size=4096, **config)


@pytest.fixture(scope="module")
def cluster() -> Iterator[int]:
    """A local Ray cluster and Serve's HTTP proxy; yields the port of Ray's Prometheus metrics."""
    metrics_port = free_port()
    os.environ.setdefault("RAY_worker_niceness", "0")  # (as mullama.ray.deployed does)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        yield metrics_port
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def two_replicas(cluster, tiny_model_path) -> Iterator[str]:
    app = AppConfig(models=ModelDeployment(tiny(tiny_model_path, max_concurrent=2), name="tiny", replicas=2,
                                           chat_template="chatml"), name="two", route_prefix="/two")
    with deployed(app) as url:
        yield url


@pytest.fixture(scope="module")
def one_replica(cluster, tiny_model_path) -> Iterator[str]:
    app = AppConfig(models=ModelDeployment(tiny(tiny_model_path), name="tiny", health_check_period_s=1),
                    name="one", route_prefix="/one")
    with deployed(app) as url:
        yield url


@pytest.fixture(scope="module")
def other_tiny_path(tmp_path_factory) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    from tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("ray") / "other.gguf", seed=99)


@pytest.fixture(scope="module")
def two_models(cluster, tiny_model_path, other_tiny_path) -> Iterator[str]:
    app = AppConfig(models=(ModelDeployment(tiny(tiny_model_path), name="a"),
                            ModelDeployment(tiny(other_tiny_path), name="b")), name="multi", route_prefix="/multi",
                    cors_origins="https://app.example")
    with deployed(app) as url:
        yield url


def client(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, **kw)


def replica_health_of(url: str) -> Dict:
    return httpx.get(url + "/health", timeout=10).json()


def metrics_of(url: str) -> Dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


# -- what a deployment is made of (no cluster) ---------------------------------------------------


def test_deployment_options_are_derived_from_the_engine(tiny_model_path):
    m = ModelDeployment(AsyncConfig(tiny_model_path, max_concurrent=3, max_queue=5, threads=2), replicas=2)
    opts = m.serve_options()
    assert m.name == tiny_model_path.stem
    assert opts["ray_actor_options"] == {"num_cpus": 2.0}  # threads
    assert opts["max_ongoing_requests"] == 3 and opts["max_queued_requests"] == 10  # slots; queue x replicas
    assert opts["num_replicas"] == 2 and "autoscaling_config" not in opts
    scaled = ModelDeployment(AsyncConfig(tiny_model_path, max_concurrent=3), num_cpus=0.5,
                             autoscaling={"min_replicas": 1, "max_replicas": 4},
                             deployment_options={"graceful_shutdown_timeout_s": 3}).serve_options()
    assert scaled["autoscaling_config"] == {"target_ongoing_requests": 3, "min_replicas": 1, "max_replicas": 4}
    assert "num_replicas" not in scaled and scaled["ray_actor_options"] == {"num_cpus": 0.5}
    assert scaled["max_queued_requests"] == 64 * 4 and scaled["graceful_shutdown_timeout_s"] == 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(replicas=0), "replicas must be an integer of 1 or more"),
    (dict(autoscaling={"max_replica": 2}), r"unknown autoscaling field\(s\) \['max_replica'\]"),
    (dict(num_cpus=-1), "num_cpus must be"),
    (dict(max_ongoing_requests=0), "max_ongoing_requests must be"),
    (dict(name=""), "name must be a non-empty string"),
    (dict(health_check_period_s=0), "health_check_period_s must be"),
])
def test_bad_deployment_options_are_named(tiny_model_path, kwargs, match):
    with pytest.raises(InvalidConfigError, match=match):
        ModelDeployment(AsyncConfig(tiny_model_path), **kwargs)


def test_bad_application_configs_are_named(tiny_model_path):
    a = ModelDeployment(AsyncConfig(tiny_model_path), name="a")
    with pytest.raises(InvalidConfigError, match="two models are named 'a'"):
        AppConfig(models=(a, a))
    with pytest.raises(InvalidConfigError, match="any_model_name needs a single model"):
        AppConfig(models=(a, ModelDeployment(AsyncConfig(tiny_model_path), name="b")), any_model_name=True)
    with pytest.raises(InvalidConfigError, match="models must be one or more ModelDeployment"):
        AppConfig(models=())
    with pytest.raises(InvalidConfigError, match="route_prefix must start with '/'"):
        AppConfig(models=a, route_prefix="x")
    with pytest.raises(InvalidConfigError, match="port must be 1-65535"):
        AppConfig(models=a, port=0)


def test_config_file(tmp_path, tiny_model_path):
    (tmp_path / "m").mkdir()
    os.symlink(tiny_model_path, tmp_path / "m" / "t.gguf")
    path = tmp_path / "mullama.yaml"
    path.write_text("port: 8123\napi_key: k\nmodels:\n"
                    "  - path: m/t.gguf\n    name: small\n    threads: 1\n    replicas: 2\n    context_size: 512\n"
                    "    speculative: {max_draft: 8}\n"
                    "  - path: m/t.gguf\n    name: big\n    threads: 2\n"
                    "    autoscaling: {min_replicas: 1, max_replicas: 3}\n")
    app = load_config(path, port=9000, api_key=None)  # (None: not overridden)
    assert app.port == 9000 and app.api_key == "k" and [m.name for m in app.models] == ["small", "big"]
    small, big = app.models
    assert Path(small.config.model_path) == tmp_path / "m" / "t.gguf"  # relative to the file
    assert small.replicas == 2 and small.config.context_size == 512 and small.speculative.max_draft == 8
    assert big.config.threads == 2 and big.serve_options()["autoscaling_config"]["max_replicas"] == 3
    json_path = tmp_path / "c.json"
    json_path.write_text(json.dumps({"models": [{"path": str(tiny_model_path), "replicas": 2}]}))
    only = load_config(json_path).models[0]
    assert only.name == tiny_model_path.stem
    assert only.config.threads == replica_threads(2) == max(1, default_threads() // 2)  # cores, shared
    for text, match in [("models: []", "needs 'models'"), ("models: [{name: x}]", r"models\[0\] needs 'path'"),
                        ("models: [{path: a.gguf, threds: 2}]", r"unknown field\(s\) \['threds'\]"),
                        ("port: 1\nmodel: []", r"unknown top-level field\(s\) \['model'\]"),
                        ("models: [{path: a.gguf, speculative: 3}]", "speculative must be true, false or a mapping"),
                        ("models: [{path: a.gguf, speculative: {max_drat: 3}}]", "speculative"),
                        ("models: [a", "is not valid YAML"), ("- 1", "must be a mapping")]:
        path.write_text(text)
        with pytest.raises(InvalidConfigError, match=match):
            load_config(path)
    with pytest.raises(InvalidConfigError, match="cannot read the config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(InvalidConfigError, match=r"unknown override\(s\) \['prot'\]"):
        load_config(json_path, prot=1)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # (Serve's replicas run asyncio)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # (the driver made to die)
async def test_replica_health_follows_the_engine(anyio_backend, tiny_model_path):
    """A replica is healthy while its model accepts requests; a dead driver thread
    or a closed model fails Serve's health check, which replaces the replica."""
    from mullama.aio import AsyncModel

    model = await AsyncModel.load_with_config(tiny(tiny_model_path))
    app = create_app(model, model_id="tiny")
    try:
        replica_health(app)
        await model.generate("hi", 2)  # (the driver thread runs)
        replica_health(app)
    finally:
        await model.aclose()
    with pytest.raises(ReplicaUnhealthyError, match="it is closed"):
        replica_health(app)

    model = await AsyncModel.load_with_config(tiny(tiny_model_path))
    app = create_app(model, model_id="tiny")

    def dies() -> None:
        raise RuntimeError("boom")
    model._engine._drive_loop = dies  # its driver thread, started by the first request, fails at once
    try:
        with pytest.raises(mullama.MullamaError, match="the batching engine stopped"):
            await model.generate("hi", 2)
        model._engine._thread.join(10)
        assert not model._engine._thread.is_alive()
        with pytest.raises(ReplicaUnhealthyError, match="its batching engine's driver died: RuntimeError"):
            replica_health(app)
    finally:
        await model.aclose()


# -- on the cluster --------------------------------------------------------------------------------


def test_two_replicas_answer_as_the_single_process_server(two_replicas, tiny_model_path):
    """The same greedy requests through Serve's proxy and 2 replicas, and through `mullama serve`:
    the same answers (text, tokens, logprobs, finish reasons, token counts); both replicas serve."""
    server = start_server(tiny_model_path, "asyncio", "--name", "tiny", "--chat-template", "chatml",
                          "--context-size", "4096")
    try:
        ours, theirs = client(two_replicas), server.client()
        for prompt in ["once upon", "hello there", "abc"]:
            req = dict(model="tiny", prompt=prompt, max_tokens=12, temperature=0, logprobs=2)
            a, b = ours.completions.create(**req), theirs.completions.create(**req)
            assert a.choices[0].text == b.choices[0].text and a.choices[0].finish_reason == b.choices[0].finish_reason
            assert a.choices[0].logprobs.token_logprobs == b.choices[0].logprobs.token_logprobs
            # (cached_tokens depend on what the serving replica's prompt cache holds from earlier requests)
            assert (a.usage.prompt_tokens, a.usage.completion_tokens, a.usage.total_tokens) == \
                (b.usage.prompt_tokens, b.usage.completion_tokens, b.usage.total_tokens)
            streamed = "".join(c.choices[0].text for c in ours.completions.create(stream=True, **req) if c.choices)
            assert streamed == b.choices[0].text
            chat = dict(model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=8, temperature=0)
            assert (ours.chat.completions.create(**chat).choices[0].message.content
                    == theirs.chat.completions.create(**chat).choices[0].message.content)
        assert [m.id for m in ours.models.list()] == ["tiny"]
    finally:
        assert server.stop() == 0
    # a replica takes its 2 slots' worth of requests: of 3 at once, the other replica gets one at least
    with ExitStack() as streams:
        seen = {streams.enter_context(ours.completions.with_streaming_response.create(
            model="tiny", stream=True, **LONG)).headers[REPLICA] for _ in range(3)}
    assert len(seen) == 2


def test_a_client_that_leaves_frees_its_slot_on_the_replica(one_replica):
    """A disconnect mid-stream, through Serve's proxy: the replica's generation stops
    (far short of what was asked) and its slot is free; the next request is served."""
    before = metrics_of(one_replica)
    stream = client(one_replica).completions.create(model="tiny", stream=True, **LONG)
    for received, _ in enumerate(stream, 1):
        if received == 3:
            break
    stream.close()
    # (Serve's proxy forwards the disconnect and cancels the replica's task: either ends it first)
    keys = [f'mullama_generations_total{{finish_reason="{r}"}}' for r in ("disconnected", "cancelled")]
    m = wait_until(lambda: (lambda m: sum(m.get(k, 0) - before.get(k, 0) for k in keys) == 1 and m)(
        metrics_of(one_replica)), "the generation ended, the client gone")
    wait_until(lambda: replica_health_of(one_replica)["active"] == 0, "the slot is free")
    assert m["mullama_generated_tokens_total"] - before.get("mullama_generated_tokens_total", 0) < 3000
    got = client(one_replica).completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0)
    assert got.choices[0].finish_reason == "length"


def test_a_client_that_leaves_during_the_prompt_stops_its_evaluation(cluster, default_model_path):
    """Cancellation through Serve covers the prompt too: a client that leaves while a long prompt
    is being evaluated (in chunks, one decode step each) stops it after fewer steps than the
    prompt takes, and nothing is generated. (The real model: its prompt of about 3,000 tokens
    takes seconds on a CPU, the client leaves after 0.3 s.)"""
    app = AppConfig(models=ModelDeployment(AsyncConfig(default_model_path, threads=2, context_size=4096),
                                           name="smol"), name="smol", route_prefix="/smol")
    with deployed(app) as url:
        prompt = "The quick brown fox jumps over the lazy dog. " * 300
        n = len(httpx.post(url + "/tokenize", json={"content": prompt}).json()["tokens"])
        chunks = -(-n // 256)
        assert n > 2000
        # (a first request: the engine's one-time checks at its first request are not this one's steps)
        client(url).completions.create(model="smol", prompt="Hi", max_tokens=1)
        before = metrics_of(url)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", timeout=httpx.Timeout(30, read=0.3),
                       json={"model": "smol", "prompt": prompt, "max_tokens": 8, "stream": True})
        wait_until(lambda: replica_health_of(url)["active"] == 0, "the slot is free")
        after = metrics_of(url)
        steps = after["mullama_engine_decode_steps_total"] - before["mullama_engine_decode_steps_total"]
        assert 0 < steps < chunks, f"{steps} decode steps for a prompt of {chunks} chunks"
        assert after["mullama_generated_tokens_total"] == before.get("mullama_generated_tokens_total", 0)


def test_serve_health_check_runs_the_engines_check(one_replica):
    """Serve's health check of a replica is mullama's (it answers None while the engine runs)."""
    handle = serve.get_deployment_handle("tiny", app_name="one")
    assert handle.check_health.remote().result(timeout_s=30) is None


def test_a_killed_replica_fails_only_its_requests_and_is_replaced(two_replicas):
    """Kill one replica's process mid-stream: that stream fails, a stream on the other replica
    completes, Serve starts a new replica, and requests are served by both again."""
    c = client(two_replicas)
    streams: Dict[str, object] = {}
    tries = 0
    while len(streams) < 2:  # a stream on each replica
        tries += 1
        assert tries < 50, "Serve sent every stream to the same replica"
        raw = c.completions.with_streaming_response.create(model="tiny", stream=True, **LONG)
        response = raw.__enter__()
        rid = response.headers[REPLICA]
        if rid in streams:
            raw.__exit__(None, None, None)
            continue
        streams[rid] = (raw, response, response.parse())
    (dead, (raw_d, _, s_dead)), (alive, (raw_a, _, s_alive)) = streams.items()
    next(iter(s_dead))
    ray.kill(ray.get_actor(f"SERVE_REPLICA::two#tiny#{dead}", namespace="serve"), no_restart=True)
    with pytest.raises((httpx.HTTPError, openai.APIError)):
        for _ in s_dead:
            pass
    raw_d.__exit__(None, None, None)
    chunks = list(s_alive)  # the other replica's stream is whole
    raw_a.__exit__(None, None, None)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"

    def replaced() -> bool:
        status = serve.status().applications["two"].deployments["tiny"]
        return status.replica_states.get("RUNNING", 0) == 2
    wait_until(replaced, "Serve runs 2 replicas again", timeout=120)
    def answering() -> set:
        return {httpx.get(two_replicas + "/v1/models").headers[REPLICA] for _ in range(20)}
    wait_until(lambda: len(answering()) == 2, "both replicas answer (Serve's proxy learns of the new one)")
    seen = answering() | answering()
    assert dead not in seen and alive in seen


def test_the_router_serves_each_model_by_name(two_models, tiny_model_path, other_tiny_path):
    """Two models behind the router: each request reaches the model it names, and
    answers as that model alone does; unknown names are the API's 404."""
    c = client(two_models)
    assert [m.id for m in c.models.list()] == ["a", "b"]
    assert c.models.retrieve("b").id == "b"
    texts = {}
    for name, path in (("a", tiny_model_path), ("b", other_tiny_path)):
        with mullama.Model.load(path) as model, model.create_context(256, threads=1) as ctx:
            want = ctx.generate("once upon", mullama.StreamConfig.greedy(8)).text
        texts[name] = c.completions.create(model=name, prompt="once upon", max_tokens=8, temperature=0).choices[0].text
        assert texts[name] == want
        streamed = c.completions.create(model=name, prompt="once upon", max_tokens=8, temperature=0, stream=True)
        assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == want
    assert texts["a"] != texts["b"]
    with pytest.raises(openai.NotFoundError, match="the model 'zz' does not exist") as info:
        c.completions.create(model="zz", prompt="x", max_tokens=2)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("zz")
    r = httpx.post(two_models + "/v1/completions", content=b"{bad")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(two_models + "/v1/completions", json={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):  # the replica's own checks
        c.completions.create(model="a", prompt="x", max_tokens=-1)


def test_the_router_answers_cors(two_models):
    """Browsers' preflights and the router's own answers carry CORS; forwarded ones the replica's."""
    origin = {"origin": "https://app.example"}
    r = httpx.options(two_models + "/v1/chat/completions", headers={**origin, "access-control-request-method": "POST"})
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "https://app.example"
    assert r.headers["access-control-allow-methods"] == "POST, OPTIONS"
    assert httpx.get(two_models + "/v1/models", headers=origin).headers["access-control-allow-origin"] == \
        "https://app.example"
    r = httpx.post(two_models + "/v1/completions", headers=origin,
                   json={"model": "b", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 200 and r.headers.get_list("access-control-allow-origin") == ["https://app.example"]
    assert "access-control-allow-origin" not in httpx.get(two_models + "/v1/models",
                                                           headers={"origin": "https://evil.example"}).headers


def test_a_client_that_leaves_the_router_frees_the_replicas_slot(two_models):
    """Cancellation crosses the router: the model's replica stops the generation."""
    handle = serve.get_deployment_handle("a", app_name="multi").options(stream=True)

    def health() -> Dict:
        messages = list(handle.forward.remote({"type": "http", "method": "GET", "path": "/health",
                                               "headers": [], "query_string": b""}, b""))
        return json.loads(b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body"))

    stream = client(two_models).completions.create(model="a", stream=True, **LONG)
    for received, _ in enumerate(stream, 1):
        if received == 3:
            break
    assert health()["active"] == 1
    stream.close()
    wait_until(lambda: health()["active"] == 0, "the replica's slot is free")


def test_autoscaling_on_busy_slots(cluster, tiny_model_path):
    """A replica whose engine slot is busy asks for another (target_ongoing_requests defaults to
    the slots): under a steady load of 3 clients, Serve scales from 1 to 2 replicas."""
    auto = {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 0, "metrics_interval_s": 0.5,
            "look_back_period_s": 2, "downscale_delay_s": 600}
    app = AppConfig(models=ModelDeployment(tiny(tiny_model_path, max_concurrent=1), name="tiny", autoscaling=auto),
                    name="auto", route_prefix="/auto")
    stop = threading.Event()

    def load() -> None:
        c = client(url, timeout=60)
        while not stop.is_set():
            for _ in c.completions.create(model="tiny", stream=True, **LONG):
                if stop.is_set():
                    break

    with deployed(app) as url:
        assert serve.status().applications["auto"].deployments["tiny"].replica_states.get("RUNNING") == 1
        clients = [threading.Thread(target=load) for _ in range(3)]
        for t in clients:
            t.start()
        try:
            wait_until(lambda: serve.status().applications["auto"].deployments["tiny"].replica_states.get(
                "RUNNING") == 2, "Serve scaled to 2 replicas", timeout=120)
        finally:
            stop.set()
            for t in clients:
                t.join(60)


def test_a_deployment_that_cannot_start_is_named_and_removed(cluster, tmp_path):
    """A replica that cannot load its model fails the deployment with DeploymentError naming the
    cause, and leaves no application behind."""
    from mullama.ray import DeploymentError

    app = AppConfig(models=ModelDeployment(AsyncConfig(tmp_path / "missing.gguf", threads=1), name="gone"),
                    name="broken", route_prefix="/broken")
    with pytest.raises(DeploymentError, match="could not deploy 'broken'") as info:
        with deployed(app):
            pass
    assert "missing.gguf" in str(info.value)
    assert "broken" not in serve.status().applications


def test_replica_metrics_reach_rays_prometheus(cluster, one_replica):
    """The replica's engine metrics are in Ray's metrics export, tagged with the model."""
    client(one_replica).completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0)

    def exported() -> List[str]:
        text = httpx.get(f"http://127.0.0.1:{cluster}/metrics", timeout=10).text
        return [line for line in text.splitlines()
                if line.startswith(("ray_mullama_generated_tokens_total", "ray_mullama_engine_slots",
                                    "ray_mullama_time_to_first_token_seconds_count")) and 'model="tiny"' in line
                and 'application="one"' in line]

    lines = wait_until(lambda: len({re.match(r"\w+", x).group() for x in exported()}) == 3 and exported(),
                       "Ray exports the replica's metrics", timeout=90)
    slots = [x for x in lines if x.startswith("ray_mullama_engine_slots")]
    assert float(slots[0].rsplit(" ", 1)[1]) == 4


def test_mullama_serve_ray_starts_serves_and_leaves_nothing(tiny_model_path, tmp_path):
    """`mullama serve --ray` in its own process: it starts a Ray cluster, serves, and on
    SIGINT deletes the application and stops every Ray process it started."""
    ray_tmp = tempfile.mkdtemp(prefix="mr", dir="/tmp")  # (short: Ray's socket paths must fit)
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mullama", "serve", "--ray", "--model", str(tiny_model_path),
                             "--name", "tiny", "--replicas", "2", "--port", str(port),  # (threads: cores / 2)
                             "--context-size", "512"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    lines: List[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        url = wait_until(lambda: next((m.group(1) for x in list(lines)
                                       if (m := re.search(r"serving 'tiny' at (http://\S+)/v1 \(Ray Serve\)", x))),
                                      None) or proc.poll() is not None and "exited",
                         "mullama serve --ray is ready", timeout=180)
        assert url != "exited", "".join(lines)
        got = client(url).completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0)
        assert got.choices[0].finish_reason == "length"
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    assert rc == 0, "".join(lines)

    def ours() -> List[str]:
        out = subprocess.run(["pgrep", "-af", ray_tmp], capture_output=True, text=True).stdout
        return [x for x in out.splitlines() if "pgrep" not in x]
    wait_until(lambda: not ours(), "no process of the Ray cluster it started is left", timeout=30)


def test_cli_ray_flags_are_checked(tiny_model_path, tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mullama", "serve", *args], capture_output=True, text=True,
                              timeout=120)
    for args, match in [(("--replicas", "2"), "--replicas need(s) --ray"),
                        (("--ray", "--backend", "trio"), "--backend: not options of --ray"),
                        (("--ray", "--replicas", "3", "--max-replicas", "2"), "--max-replicas at least"),
                        (("--ray", "--config", "c.yaml", "--threads", "2"), "--model, --threads: the config file"),
                        (("--ray", "--max-concurrent", "0"), "max_concurrent must be")]:
        r = run("--model", str(tiny_model_path), *args)
        assert r.returncode == 1 and match in r.stderr, r.stderr
    r = run("--ray", "--config", str(tmp_path / "none.yaml"))
    assert r.returncode == 1 and "cannot read the config file" in r.stderr, r.stderr
