"""The Ray Serve deployments: a model's replicas, and the router in front of
several models. Each replica serves :class:`~mullama.server.OpenAIApp`, the
same ASGI application as ``mullama serve``; nothing of the API is written twice."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncIterator, Dict, Mapping, MutableMapping, Optional, cast

from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from .._errors import MullamaError
from ..aio import AsyncModel
from ..server._app import OpenAIApp, answer_cors, check_api_key
from ..server._asgi import Disconnected, Exchange, Receive, Scope, Send, cancel_on_disconnect
from ..server import _openai as oa
from ._metrics import RayMetricsBridge
from ._spec import ROUTER_NAME, AppConfig, ModelDeployment

__all__ = ["ModelReplica", "ModelIngress", "Router", "RouterIngress", "ReplicaUnhealthyError", "build_app"]

log = logging.getLogger("mullama.ray")

#: the response header naming the replica that answered (its Serve replica id)
REPLICA_HEADER = b"x-mullama-replica"

#: ASGI messages a forwarded request may buffer before its replica waits for the router
_FORWARD_BUFFER = 64
#: seconds a forwarded request whose client left gets to end before it is cancelled
_DISCONNECT_GRACE_S = 1.0

_SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "query_string",
               "root_path", "headers", "client", "server")


class ReplicaUnhealthyError(MullamaError):
    """A replica's model is closed or its batching engine stopped: Serve replaces the replica."""


def replica_health(app: OpenAIApp) -> None:
    """Raise :class:`ReplicaUnhealthyError` unless ``app``'s model accepts
    requests: loaded, not closed, its batching engine's driver thread not
    dead (a driver that fails records why, and the engine stops)."""
    model = app.model
    if model is None:
        raise ReplicaUnhealthyError(f"the model {app.model_id!r} is not loaded")
    if not model.is_ready():
        broken = model._engine.broken
        why = f"its batching engine's driver died: {broken!r}" if broken is not None else "it is closed"
        raise ReplicaUnhealthyError(f"the model {app.model_id!r} does not accept requests: {why}")


class ModelReplica:
    """One replica of one model: it loads the model once, serves the OpenAI
    routes to the :class:`Router` (``forward``) or, as :data:`ModelIngress`,
    over HTTP from Serve's proxy; it reports its engine's metrics to Ray's, and
    fails Serve's health checks when its model stops accepting requests."""

    async def __init__(self, spec: ModelDeployment,  # type: ignore[misc]  # (Serve awaits it)
                       app_options: Mapping[str, Any]) -> None:
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id
        self._header = (REPLICA_HEADER, self.replica_id.encode("latin-1"))
        # loaded here rather than in the ASGI lifespan, so that a failure to load is
        # the replica's constructor error, which Serve reports as the deployment's
        self.model: Optional[AsyncModel] = None
        self._metrics: Optional[RayMetricsBridge] = None
        self.model = await AsyncModel.load_with_config(spec.config, thread_name=f"mullama-{spec.name}")
        try:
            # (not `app`: Serve's ASGI wrapper has a property of that name)
            self.openai_app = OpenAIApp(self.model, model_id=spec.name, chat_template=spec.chat_template,
                                        speculative=spec.speculative, **app_options)
            self._tagged = _Tagged(self.openai_app, self._header)
            self._metrics = RayMetricsBridge(self.openai_app)
            self._metrics.start()
        except BaseException:
            await self.model.aclose()
            raise
        log.info("replica %s of %r: %s loaded", self.replica_id, spec.name, spec.config.model_path)

    def __serve_build_asgi_app__(self) -> Any:
        return self._tagged

    async def check_health(self) -> None:
        """Serve's health check (every ``health_check_period_s``)."""
        replica_health(self.openai_app)

    async def forward(self, scope: Dict[str, Any], body: bytes) -> AsyncIterator[Dict[str, Any]]:
        """Answer a request the :class:`Router` read: its ASGI response messages,
        as they are sent. Cancelling the stream (the client left) cancels the request."""
        queue: "asyncio.Queue[Optional[Dict[str, Any]]]" = asyncio.Queue(_FORWARD_BUFFER)
        sent_body = False
        left = asyncio.Event()

        async def receive() -> Dict[str, Any]:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            if not left.is_set():  # (after, nobody reads)
                await queue.put(dict(message))

        async def run() -> None:
            try:
                await self._tagged(dict(scope), receive, send)
            finally:
                if not left.is_set():
                    await queue.put(None)

        task = asyncio.get_running_loop().create_task(run())
        try:
            while True:
                message = await queue.get()
                if message is None:
                    break
                yield message
            await task  # (its exception, if any)
        finally:
            if not task.done():
                # the router's client left: the app sees the disconnect, as from an HTTP server,
                # and stops the generation; cancelled only if it does not end soon
                left.set()
                while not queue.empty():  # (unblocks a send waiting for room)
                    queue.get_nowait()
                done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_GRACE_S)
                if not done:
                    task.cancel()
                    try:
                        await task
                    except asyncio.CancelledError:
                        pass

    async def __del__(self) -> None:
        if self._metrics is not None:
            self._metrics.stop()
        if self.model is not None:
            await self.model.aclose()


#: a model's replicas as the application's ingress (one model: no router)
ModelIngress = serve.ingress()(ModelReplica)


class _Tagged:
    """An ASGI application whose responses carry one more header."""

    def __init__(self, app: OpenAIApp, header: "tuple[bytes, bytes]") -> None:
        self._app = app
        self._header = header

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        async def tagged(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), self._header]
            await send(message)

        await self._app(scope, receive, tagged)


class _RouterApp:
    """The ASGI application of the :class:`Router`: the model list and health
    itself, every other request through the replicas of the model it names."""

    def __init__(self, config: AppConfig, handles: Mapping[str, DeploymentHandle]) -> None:
        self._config = config
        self._origins = frozenset(o.rstrip("/") for o in config.cors_origins)
        self._streams = {name: h.options(stream=True) for name, h in handles.items()}
        self._names = list(handles)
        self._created = int(time.time())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] != "http":
            return
        ex = Exchange(scope, receive, send, self._config.io_timeout)
        try:
            await self._http(ex)
        except oa.ApiError as exc:
            if not ex.started:
                try:
                    await ex.respond_json(exc.status, exc.body(), exc.headers)
                except Disconnected:
                    pass
        except Disconnected:
            pass

    async def _http(self, ex: Exchange) -> None:
        path, method = ex.path, ex.scope["method"]
        local = path == "/health" or path.startswith(("/v1/models", "/models"))
        if await answer_cors(ex, self._origins, ["GET"] if local else ["POST"]):
            return  # a preflight, answered (a forwarded request's replica answers its own CORS)
        if path == "/health":
            await ex.respond_json(200, {"status": "ok", "models": self._names})
            return
        check_api_key(ex, self._config.api_key)
        if path in ("/v1/models", "/models") and method == "GET":
            await ex.respond_json(200, {"object": "list", "data": [oa.model_card(n, self._created) for n in self._names]})
            return
        for prefix in ("/v1/models/", "/models/"):
            if path.startswith(prefix) and method == "GET":
                name = path[len(prefix):]
                if name not in self._streams:
                    raise self._unknown(name)
                await ex.respond_json(200, oa.model_card(name, self._created))
                return
        if path == "/metrics":
            raise oa.ApiError(404, "with several models, the replicas' metrics are in Ray's (Prometheus), "
                                   "not here; see the README's Ray section", code="not_found")
        if method != "POST":
            raise oa.ApiError(404, f"no such endpoint: {method} {path}", code="not_found")
        body = await ex.body()
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise oa.ApiError(400, f"the request body is not valid JSON: {exc}") from None
        model = obj.get("model") if isinstance(obj, dict) else None
        if not isinstance(model, str):
            raise oa.ApiError(400, f"'model' must name one of the models served: {', '.join(self._names)}",
                              param="model")
        if model not in self._streams:
            raise self._unknown(model)
        await self._forward(ex, self._streams[model], body)

    def _unknown(self, name: str) -> oa.ApiError:
        return oa.ApiError(404, f"the model {name!r} does not exist; this server serves "
                                f"{', '.join(repr(n) for n in self._names)}", param="model", code="model_not_found")

    async def _forward(self, ex: Exchange, handle: DeploymentHandle, body: bytes) -> None:
        scope = {k: ex.scope[k] for k in _SCOPE_KEYS if k in ex.scope}
        responses = cast(DeploymentResponseGenerator, handle.forward.remote(scope, body))
        try:
            async with cancel_on_disconnect(ex):  # a client that leaves cancels the replica's request
                while True:
                    try:
                        message = await responses.__anext__()
                    except StopAsyncIteration:
                        return
                    except Exception as exc:  # the replica died, or Serve could not reach one
                        if not ex.started:
                            raise oa.ApiError(503, f"the replica serving this request failed: "
                                                   f"{type(exc).__name__}: {exc}", type="server_error",
                                              code="replica_failed", headers=[("retry-after", "1")]) from None
                        log.warning("a replica of %s failed mid-response: %r", ex.scope["path"], exc)
                        raise Disconnected() from exc  # the connection is cut, as a crashed server's is
                    if message["type"] == "http.response.start":
                        ex.started = True
                        ex.status = message["status"]
                    await ex.send(message)
        finally:
            responses.cancel()


class Router:
    """The ingress of an application of several models (see :func:`build_app`)."""

    def __init__(self, config: AppConfig, handles: Dict[str, DeploymentHandle]) -> None:
        self._app = _RouterApp(config, handles)

    def __serve_build_asgi_app__(self) -> Any:
        return self._app


RouterIngress = serve.ingress()(Router)


def build_app(config: AppConfig) -> "serve.Application":
    """The Serve application of ``config``: with one model, its replicas
    answer HTTP; with several, a :class:`Router` in front of them."""
    app_options = config.app_options()
    if len(config.models) == 1:
        m = config.models[0]
        return serve.deployment(**m.serve_options())(ModelIngress).bind(m, app_options)
    bound = {str(m.name): serve.deployment(**m.serve_options())(ModelReplica).bind(m, app_options)
             for m in config.models}
    # the router holds every request the models' replicas run and queue
    max_ongoing = sum(o["max_ongoing_requests"] * m.most_replicas() + max(o["max_queued_requests"], 0)
                      for m in config.models for o in [m.serve_options()])
    router = serve.deployment(name=ROUTER_NAME, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=max_ongoing)
    return router(RouterIngress).bind(config, bound)
