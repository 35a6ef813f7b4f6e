"""The OpenAI-compatible ASGI application, on :mod:`mullama.aio` (anyio only).

It owns what is served: the lifespan (the model loaded on a
:class:`~mullama.aio.Runtime`), routing, the API key, and the handlers of
``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/health``
and ``/metrics``, with the mapping of mullama's errors to HTTP answers. The
HTTP exchange itself (body limits, writes, events, timeouts, disconnect
detection) is :mod:`._asgi`'s; the OpenAI bodies are :mod:`._openai`'s.

It runs unchanged under any ASGI server on asyncio or trio (``mullama serve``
uses uvicorn or hypercorn's trio worker). Requests share one
:class:`~mullama.aio.AsyncModel`, so they are decoded together by its
continuous batching engine.

**Disconnects**: while a request is generating, a task beside it waits for
the client's ``http.disconnect``; when it comes, the request's cancel scope is
cancelled, which stops the generation inside llama.cpp within about one token
and frees its slot (mullama's cancel contract, end to end).
"""

from __future__ import annotations

import functools
import hmac
import logging
import os
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple, Union

import anyio

from .._chat import check_template
from .._tools import ChatDelta, ChatPlan, ReplyParser
from .._config import SERVER_IO_TIMEOUT_S as IO_TIMEOUT_S
from .._config import SpeculativeConfig, StreamConfig, choice_configs
from .._errors import (ChatTemplateError, ClosedError, ContextOverflowError, GrammarError, InvalidConfigError,
                       InvalidTokenError, MullamaError, OverloadedError, RequestTimeoutError)
from ..aio import AsyncConfig, AsyncModel, Runtime, TokenData, TokenStream
from . import _openai as oa
from ._asgi import Disconnected, EventTemplate, Exchange, Receive, Scope, Send, cancel_on_disconnect, sse
from ._metrics import CONTENT_TYPE, ServerMetrics

__all__ = ["create_app", "OpenAIApp"]

log = logging.getLogger("mullama.server")


class OpenAIApp:
    """An ASGI application serving one model with OpenAI's HTTP API.

    Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST
    /v1/completions``, ``POST /v1/chat/completions`` (both with ``"stream":
    true`` as server-sent events), the same without the ``/v1`` prefix (as
    llama-server and others also serve them), llama-server's ``POST /tokenize``,
    ``POST /detokenize`` and ``POST /apply-template``, ``GET /health`` and
    ``GET /metrics`` (Prometheus text format).

    Args:
        model: a ``.gguf`` path or an :class:`~mullama.aio.AsyncConfig`, loaded
            at the ASGI lifespan's startup (on a :class:`~mullama.aio.Runtime`
            whose metrics ``/metrics`` exposes) and closed at its shutdown; or
            an :class:`~mullama.aio.AsyncModel` you loaded and close yourself.
        model_id: the name clients use in ``"model"`` (default: the file's stem).
        chat_template: a Jinja chat template or a llama.cpp built-in format name
            for ``/v1/chat/completions`` (default: the model's own).
        api_key: if set, every request but ``/health`` and ``/metrics`` needs
            ``Authorization: Bearer <api_key>`` (compared as UTF-8 bytes, in constant time).
        any_model_name: answer requests whatever their ``"model"`` names (as
            llama-server does when it serves one model), for clients that send
            a fixed placeholder; by default another name is a ``404``.
        cors_origins: origins a browser may call the API from (``"*"`` for
            any): their preflight ``OPTIONS`` requests are answered, and the
            responses allow them. None by default (no cross-origin access).
        io_timeout: seconds a client may go without sending anything of its
            request body (then ``408``) or receiving anything of the response
            (then it counts as disconnected: its generation is cancelled).
        speculative: speculative decoding for the requests that do not ask
            for it or against it, and its settings for those that send
            ``"speculative": true`` (requests may also send false, an object
            of :class:`~mullama.SpeculativeConfig`'s fields, or llama.cpp's
            ``"speculative.n_max"``). None: off unless asked.
    """

    def __init__(self, model: Union[str, "os.PathLike[str]", AsyncConfig, AsyncModel], *,
                 model_id: Optional[str] = None, chat_template: Optional[str] = None,
                 api_key: Optional[str] = None, io_timeout: float = IO_TIMEOUT_S,
                 any_model_name: bool = False, cors_origins: Sequence[str] = (),
                 speculative: Optional[SpeculativeConfig] = None) -> None:
        if not (isinstance(io_timeout, (int, float)) and io_timeout > 0):
            raise InvalidConfigError(f"io_timeout must be a positive number of seconds, got {io_timeout!r}")
        self._given: Optional[AsyncModel] = None
        if isinstance(model, AsyncModel):
            self._given = model
            self._config = model.config
        elif isinstance(model, AsyncConfig):
            self._config = model
        else:
            self._config = AsyncConfig(model_path=model)
        self.model_id = model_id or Path(self._config.model_path).stem
        if chat_template is not None:
            check_template(chat_template)  # a broken template fails here, not on every request
        self.chat_template = chat_template
        self.api_key = api_key
        self.any_model_name = bool(any_model_name)
        if isinstance(cors_origins, str) or not all(isinstance(o, str) and o for o in cors_origins):
            raise InvalidConfigError(f"cors_origins must be a list of origins, got {cors_origins!r}")
        self.cors_origins = frozenset(o.rstrip("/") for o in cors_origins)
        self.io_timeout = float(io_timeout)
        if speculative is not None and not isinstance(speculative, SpeculativeConfig):
            raise InvalidConfigError(f"speculative must be a SpeculativeConfig or None, got {speculative!r}")
        self.speculative = speculative
        self.model: Optional[AsyncModel] = self._given
        self.runtime: Optional[Runtime] = None
        self.metrics = ServerMetrics()
        #: called once the model is loaded and requests are served
        self.on_startup: Optional[Callable[[], None]] = None
        #: why the lifespan startup failed, if it did
        self.startup_error: Optional[BaseException] = None
        self._created = int(time.time())
        api: Dict[str, Tuple[str, Dict[str, Callable[[Exchange], Awaitable[None]]]]] = {
            "/models": ("models", {"GET": self._list_models}),
            "/completions": ("completions", {"POST": self._completions}),
            "/chat/completions": ("chat_completions", {"POST": self._chat_completions}),
            "/embeddings": ("embeddings", {"POST": self._embeddings}),
        }
        self._routes: Dict[str, Tuple[str, Dict[str, Callable[[Exchange], Awaitable[None]]]]] = {
                        **{"/v1" + path: route for path, route in api.items()}, **api,
                        "/tokenize": ("tokenize", {"POST": self._tokenize}),
                        "/detokenize": ("detokenize", {"POST": self._detokenize}),
                        "/apply-template": ("apply_template", {"POST": self._apply_template}),
                        "/health": ("health", {"GET": self._health}),
                        "/metrics": ("metrics", {"GET": self._metrics})}

    # -- ASGI ---------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(Exchange(scope, receive, send, self.io_timeout))
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        else:  # websocket: not served
            await send({"type": "websocket.close", "code": 1000})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        started = False
        try:
            async with AsyncExitStack() as stack:
                if self._given is None:  # (a model given has no Runtime here whose metrics would mean anything)
                    self.runtime = rt = await stack.enter_async_context(Runtime(thread_name="mullama-serve"))
                    self.model = await rt.load_model(self._config)
                started = True
                await send({"type": "lifespan.startup.complete"})
                if self.on_startup is not None:
                    self.on_startup()
                await receive()  # lifespan.shutdown: leaving the runtime closes the model
        except BaseException as exc:
            if started:
                raise
            self.startup_error = exc
            log.error("could not load %s: %s", self._config.model_path, exc)
            await send({"type": "lifespan.startup.failed", "message": f"{type(exc).__name__}: {exc}"})
            return
        finally:
            if self._given is None:
                self.model = None
        await send({"type": "lifespan.shutdown.complete"})

    async def _http(self, ex: Exchange) -> None:
        path = ex.path
        route = self._routes.get(path)
        if route is None and (path.startswith("/v1/models/") or path.startswith("/models/")):
            route = ("models", {"GET": self._get_model})
        endpoint = route[0] if route else "other"
        self.metrics.in_flight += 1
        try:
            if await self._cors(ex, route):
                return  # a preflight, answered
            if route is None:
                raise oa.ApiError(404, f"no such endpoint: {ex.scope['method']} {path}", code="not_found")
            handler = route[1].get(ex.scope["method"])
            if handler is None:
                raise oa.ApiError(405, f"{path} does not allow {ex.scope['method']}; use {', '.join(route[1])}",
                                  headers=[("allow", ", ".join(route[1]))])
            if path not in ("/health", "/metrics"):
                self._check_key(ex)
            await handler(ex)
        except oa.ApiError as exc:
            if not ex.started:
                await self._error(ex, exc)
        except Disconnected:
            ex.status = ex.status if ex.started else 499  # nginx's "client closed request"
        except Exception as exc:
            log.exception("error answering %s %s", ex.scope["method"], path)
            if not ex.started:
                await self._error(ex, oa.ApiError(500, f"internal error: {type(exc).__name__}: {exc}",
                                                  type="server_error"))
        except anyio.get_cancelled_exc_class():
            ex.status = ex.status if ex.started else 499  # cut off (shutdown): never answered
            raise
        finally:
            self.metrics.in_flight -= 1
            # nothing sent and none of the above: an error escaped, which the HTTP server answers with 500
            self.metrics.response(endpoint, ex.status or 500)

    async def _cors(self, ex: Exchange, route: Optional[Tuple[str, Dict[str, Any]]]) -> bool:
        return await answer_cors(ex, self.cors_origins, list(route[1]) if route else None)

    async def _error(self, ex: Exchange, exc: oa.ApiError) -> None:
        try:
            await ex.respond_json(exc.status, exc.body(), exc.headers)
        except Disconnected:
            pass

    def _check_key(self, ex: Exchange) -> None:
        check_api_key(ex, self.api_key)

    def _ready(self) -> AsyncModel:
        model = self.model
        if model is None or not model.is_ready():
            raise oa.ApiError(503, "the model is not loaded (starting or shutting down)", type="server_error",
                              code="model_not_ready", headers=[("retry-after", "1")])
        return model

    def _check_model_name(self, name: Optional[str]) -> None:
        if name is not None and name != self.model_id and not self.any_model_name:
            raise oa.ApiError(404, f"the model {name!r} does not exist; this server serves {self.model_id!r}",
                              param="model", code="model_not_found")

    # -- endpoints ------------------------------------------------------------------------

    def _model_card(self) -> Dict[str, Any]:
        return oa.model_card(self.model_id, self._created)

    async def _list_models(self, ex: Exchange) -> None:
        await ex.respond_json(200, {"object": "list", "data": [self._model_card()]})

    async def _get_model(self, ex: Exchange) -> None:
        self._check_model_name(ex.path.split("/models/", 1)[1])
        await ex.respond_json(200, self._model_card())

    async def _embeddings(self, ex: Exchange) -> None:
        """OpenAI's embeddings: ``input`` a string, token ids, or a list of either;
        ``encoding_format`` float or base64 (little-endian float32)."""
        body = oa.body_object(await ex.json())
        self._check_model_name(oa.body_field(body, "model", (str,), "a string"))
        inputs = oa.embedding_inputs(body)
        fmt = oa.body_field(body, "encoding_format", (str,), "a string") or "float"
        if fmt not in ("float", "base64"):
            raise oa.ApiError(400, f"'encoding_format' must be 'float' or 'base64', got {fmt!r}",
                              param="encoding_format")
        model = self._ready()
        dims = oa.body_field(body, "dimensions", (int,), "an integer")
        async with cancel_on_disconnect(ex) as watch:
            seqs = [await model.tokenize(t) if isinstance(t, str) else t for t in inputs]
            try:
                rows = await model.embed(seqs)
            except MullamaError as exc:
                raise _api_error(exc, "input") from None
            if dims is not None and dims != rows.shape[1]:
                raise oa.ApiError(400, f"'dimensions'={dims} is not supported: this model's embeddings have "
                                       f"{rows.shape[1]} dimensions and are not shortened", param="dimensions")
            n = sum(len(t) for t in seqs)
            await ex.respond_json(200, {
                "object": "list", "model": self.model_id, "usage": {"prompt_tokens": n, "total_tokens": n},
                "data": [{"object": "embedding", "index": i,
                          "embedding": oa.encode_embedding(row, fmt)} for i, row in enumerate(rows)]})
        if watch.disconnected:
            raise Disconnected()

    # llama-server's own endpoints, with its shapes

    async def _tokenize(self, ex: Exchange) -> None:
        body = oa.body_object(await ex.json())
        content = oa.body_field(body, "content", (str,), "a string", required=True)
        add_special = bool(oa.body_field(body, "add_special", (bool,), "a boolean"))
        parse_special = oa.body_field(body, "parse_special", (bool,), "a boolean")
        with_pieces = bool(oa.body_field(body, "with_pieces", (bool,), "a boolean"))
        model = self._ready()
        tokens = await model.tokenize(content, add_bos=add_special, special=parse_special is not False)
        if with_pieces:
            piece = functools.partial(model.model.token_to_piece, special=True)
            out: List[Any] = [{"id": t, "piece": piece(t).decode("utf-8", "replace")} for t in tokens]
        else:
            out = tokens
        await ex.respond_json(200, {"tokens": out})

    async def _detokenize(self, ex: Exchange) -> None:
        body = oa.body_object(await ex.json())
        tokens = oa.body_field(body, "tokens", (list,), "a list of token ids", required=True)
        model = self._ready()
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise oa.ApiError(400, "'tokens' must be a list of token ids", param="tokens")
        try:
            text = await model.detokenize(tokens)
        except (InvalidTokenError, InvalidConfigError) as exc:
            raise oa.ApiError(400, str(exc), param="tokens") from None
        await ex.respond_json(200, {"content": text})

    async def _apply_template(self, ex: Exchange) -> None:
        """The prompt a chat request's messages make (``{"prompt": ...}``), as /v1/chat/completions renders it."""
        req = oa.parse_request(await ex.json(), chat=True)
        model = self._ready()
        plan = await self._plan(model, req)
        if plan is not None:
            prompt = plan.prompt
        else:
            try:
                prompt = await model.apply_chat_template(req.messages or [], template=self.chat_template,
                                                         chat_template_kwargs=req.chat_template_kwargs)
            except ChatTemplateError as exc:
                raise oa.ApiError(400, str(exc), param="messages", code="chat_template") from None
        await ex.respond_json(200, {"prompt": prompt})

    async def _health(self, ex: Exchange) -> None:
        model = self.model
        if model is None or not model.is_ready():
            await ex.respond_json(503, {"status": "unavailable", "model": self.model_id})
            return
        await ex.respond_json(200, {"status": "ok", "model": self.model_id, "slots": model.config.max_concurrent,
                                    "active": model.active_workers, "waiting": model.waiting})

    async def _metrics(self, ex: Exchange) -> None:
        text = self.metrics.render(self.model, self.runtime)
        await ex.respond(200, text.encode("utf-8"), CONTENT_TYPE)

    async def _completions(self, ex: Exchange) -> None:
        await self._generate(ex, chat=False)

    async def _chat_completions(self, ex: Exchange) -> None:
        await self._generate(ex, chat=True)

    # -- generation -----------------------------------------------------------------------

    async def _generate(self, ex: Exchange, chat: bool) -> None:
        req = oa.parse_request(await ex.json(), chat=chat)
        self._check_model_name(req.model)
        model = self._ready()
        cfg = model.config
        if req.n > cfg.max_concurrent:
            raise oa.ApiError(400, f"'n'={req.n} is more than the {cfg.max_concurrent} requests this server "
                                   "decodes together (--max-concurrent)", param="n")
        if len(req.prompts) * req.n > cfg.max_concurrent + cfg.max_queue:
            raise oa.ApiError(400, f"{len(req.prompts)} prompts x n={req.n} are more requests than this server "
                                   f"runs and queues at once ({cfg.max_concurrent} + {cfg.max_queue}); send "
                                   "fewer at a time", param="prompt")
        async with cancel_on_disconnect(ex) as watch:
            plan = await self._plan(model, req) if req.chat else None
            prompts = [plan.tokens] if plan is not None else await self._prompt_tokens(model, req)
            if req.sampling.get("frequency_penalty") or req.sampling.get("presence_penalty"):
                # OpenAI's penalties count every token so far, not only the last 64
                req.sampling.setdefault("repeat_last_n", min(model.request_context_size, 1 << 16))
            fields = req.config_fields(self._max_tokens(model, req, max(len(p) for p in prompts)))
            if fields.get("speculative", True) is True:  # absent, or true: the server's settings
                fields["speculative"] = self.speculative or fields.get("speculative")
            try:
                config = await model.make_config(**fields)
            except (GrammarError, InvalidConfigError) as exc:
                raise oa.ApiError(400, str(exc), param=req.constraint) from None
            if plan is not None:
                try:
                    config = plan.config(config)  # the tool-call grammar and the template's stop strings
                except InvalidConfigError as exc:
                    raise oa.ApiError(400, str(exc), param="tools") from None
            configs = choice_configs(config, req.n) if req.n > 1 else [config]
            choices = [_Choice(i * req.n + j, i, tokens, configs[j]) for i, tokens in enumerate(prompts)
                       for j in range(req.n)]
            ids = oa.ResponseIds(chat, self.model_id)
            t0 = time.perf_counter()
            try:
                async with AsyncExitStack() as stack:
                    for c in choices:
                        c.parser = plan.reply_parser() if plan is not None else None
                        c.stream = await stack.enter_async_context(model.generate_stream(c.tokens, c.config))
                    if req.stream:
                        await self._stream_events(ex, model, req, choices, ids)
                    else:
                        await self._respond_whole(ex, model, req, choices, ids)
            except Disconnected:  # (a write failed, or made no progress for io_timeout)
                watch.disconnected = True
                raise
            except anyio.get_cancelled_exc_class():
                if ex.started and not ex.complete and not watch.disconnected:
                    # cut off by the server's shutdown: the stream still ends as a stream does
                    with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                        try:
                            await _end_stream_with(ex, ClosedError("the server is shutting down"),
                                                   "messages" if chat else "prompt")
                        except Disconnected:
                            pass
                raise
            except Exception as exc:
                param = "messages" if chat else "prompt"
                if ex.started:  # a stream has answered 200 already: the error goes into it, as OpenAI does
                    try:
                        await _end_stream_with(ex, exc, param)
                    except Disconnected:
                        watch.disconnected = True
                        raise
                elif isinstance(exc, MullamaError):
                    # (raised where it is made: an exception kept in a local of this frame
                    # would hold the frame, and with it the prompt, in a reference cycle)
                    raise _api_error(exc, param) from None
                else:
                    raise
            finally:
                for c in choices:
                    if c.parser is not None:
                        c.parser.close()
                    if c.stream is not None:
                        self.metrics.generation(c.stream.metrics(), time.perf_counter() - t0,
                                                "disconnected" if watch.disconnected else None)
        if watch.disconnected:
            raise Disconnected()

    async def _plan(self, model: AsyncModel, req: oa.GenerationRequest) -> Optional[ChatPlan]:
        """A chat with tools (or a thinking template) rendered by llama.cpp's chat library; None for plain chat."""
        try:
            return await model.plan_chat(req.messages or [], template=self.chat_template, tools=req.tools,
                                         tool_choice=req.tool_choice, parallel_tool_calls=req.parallel_tool_calls,
                                         chat_template_kwargs=req.chat_template_kwargs)
        except ChatTemplateError as exc:
            raise oa.ApiError(400, str(exc), param="tools" if req.tools else "messages",
                              code="chat_template") from None
        except InvalidConfigError as exc:
            text = str(exc)
            param = next((p for p in ("tool_choice", "parallel_tool_calls", "chat_template_kwargs") if p in text),
                         "messages" if text.startswith("messages") else "tools")
            raise oa.ApiError(400, text, param=param) from None

    async def _prompt_tokens(self, model: AsyncModel, req: oa.GenerationRequest) -> List[List[int]]:
        """The prompt of a chat, or each prompt of a completions request, as token ids."""
        try:
            if req.chat:
                return [await model.tokenize_chat(req.messages, template=self.chat_template,  # type: ignore[arg-type]
                                                  chat_template_kwargs=req.chat_template_kwargs)]
            return [await model.tokenize(p) if isinstance(p, str) else list(p) for p in req.prompts]
        except ChatTemplateError as exc:
            raise oa.ApiError(400, str(exc), param="messages", code="chat_template") from None

    def _max_tokens(self, model: AsyncModel, req: oa.GenerationRequest, n_prompt: int) -> int:
        limit = model.request_context_size
        wanted = req.max_tokens
        room = limit - n_prompt
        if room < 1 or (wanted is not None and wanted > room):
            asked = f"{n_prompt + wanted} tokens ({n_prompt} in the prompt, {wanted} for the completion)" \
                if wanted is not None else f"{n_prompt} tokens in the prompt, leaving no room for the completion"
            raise oa.ApiError(400, f"this model's maximum context length is {limit} tokens; however you "
                                   f"requested {asked}. Shorten the prompt or lower max_tokens.",
                              param="messages" if req.chat else "prompt", code="context_length_exceeded")
        return wanted if wanted is not None else room

    async def _echoes(self, model: AsyncModel, req: oa.GenerationRequest) -> List[str]:
        """What each completions prompt echoes before its text ("" without ``echo``)."""
        if not req.echo:
            return [""] * max(len(req.prompts), 1)
        return [p if isinstance(p, str) else await model.detokenize(p) for p in req.prompts]

    def _logprobs(self, model: AsyncModel, req: oa.GenerationRequest, toks: List[TokenData],
                  offset: int) -> Optional[Dict[str, Any]]:
        if not req.logprobs or not toks:
            return None
        piece = functools.partial(model.model.token_to_piece, special=True)
        if req.chat:
            return oa.chat_logprobs(toks, piece)
        return oa.completion_logprobs(toks, piece, offset)

    @staticmethod
    def _finish(choice: "_Choice") -> Any:
        """The choice's completion, parsed for a chat with tools."""
        assert choice.stream is not None
        done = choice.stream.completion()
        if done.finish_reason == "cancelled":  # not by us: the model was closed under it
            raise ClosedError("the server is shutting down")
        if choice.parser is not None:
            choice.parser.feed(done.text, final=True, cut=done.finish_reason != "stop")
            done = choice.parser.completion(done)
        return done

    @staticmethod
    def _usage(choices: List["_Choice"]) -> Dict[str, Any]:
        """OpenAI's usage: each prompt counted once, with its tokens reused from the cache (its choices' least)."""
        prompts = {c.prompt: len(c.tokens) for c in choices}
        cached = sum(min(c.cached for c in choices if c.prompt == p) for p in prompts)
        return oa.usage(sum(prompts.values()), sum(c.generated for c in choices), cached)

    async def _respond_whole(self, ex: Exchange, model: AsyncModel, req: oa.GenerationRequest,
                             choices: List["_Choice"], ids: oa.ResponseIds) -> None:
        echoes = await self._echoes(model, req)
        bodies: Dict[int, Dict[str, Any]] = {}

        async def one(c: _Choice) -> None:
            assert c.stream is not None
            toks: List[TokenData] = []
            async for batch in c.stream.batches():
                toks.extend(batch)
            done = self._finish(c)
            c.cached, c.generated = done.timings.cached_tokens, len(done.tokens)
            if req.chat:
                bodies[c.index] = oa.chat_choice(c.index, done, self._logprobs(model, req, toks, 0))
            else:
                echo = echoes[c.prompt]
                bodies[c.index] = oa.completion_choice(c.index, echo + done.text, done,
                                                       self._logprobs(model, req, toks, len(echo)))

        await _each(choices, one)
        await ex.respond_json(200, oa.response(ids, req.chat, [bodies[i] for i in sorted(bodies)],
                                               self._usage(choices)))

    async def _stream_events(self, ex: Exchange, model: AsyncModel, req: oa.GenerationRequest,
                             choices: List["_Choice"], ids: oa.ResponseIds) -> None:
        echoes = await self._echoes(model, req)
        await ex.start(200, [("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache"),
                             ("x-accel-buffering", "no")])
        usage = req.include_usage
        if len(choices) == 1:
            send: Callable[[bytes], Awaitable[None]] = ex.send_event
        else:  # several choices write events at once: one whole event at a time
            lock = anyio.Lock()

            async def send(data: bytes) -> None:
                async with lock:
                    await ex.send_event(data)

        def event(obj: Any) -> Awaitable[None]:
            return send(sse(obj))

        def chunk(c: _Choice, text: str, **kw: Any) -> Any:
            return (oa.chat_chunk(ids, {"content": text}, with_usage=usage, index=c.index, **kw) if req.chat
                    else oa.completion_chunk(ids, text, with_usage=usage, index=c.index, **kw))

        for c in choices:
            if req.chat:
                await event(oa.chat_chunk(ids, {"role": "assistant", "content": ""}, with_usage=usage,
                                          index=c.index))
            elif echoes[c.prompt]:
                await event(chunk(c, echoes[c.prompt]))

        async def one(c: _Choice) -> None:
            assert c.stream is not None
            offset = len(echoes[c.prompt])
            template = EventTemplate(chunk(c, EventTemplate.MARK))
            async for batch in c.stream.batches():
                text = "".join(t.text for t in batch)
                lp = self._logprobs(model, req, batch, offset)
                offset += len(text)
                if c.parser is not None:  # content, reasoning and tool-call pieces, as OpenAI streams them
                    for d in c.parser.feed(text) or [ChatDelta()] * (lp is not None):
                        await event(oa.chat_chunk(ids, oa.chat_delta(d), logprobs=lp, with_usage=usage,
                                                  index=c.index))
                        lp = None
                elif lp is not None:
                    await event(chunk(c, text, logprobs=lp))
                elif text:  # (no text: bytes held back, part of a character or of a stop string)
                    await send(template.render(text))
            done = c.stream.completion()
            if done.finish_reason == "cancelled":  # not by us: the model was closed under it
                raise ClosedError("the server is shutting down")
            if c.parser is not None:
                for d in c.parser.feed("", final=True, cut=done.finish_reason != "stop"):
                    await event(oa.chat_chunk(ids, oa.chat_delta(d), with_usage=usage, index=c.index))
                done = c.parser.completion(done)
            c.cached, c.generated = done.timings.cached_tokens, len(done.tokens)
            reason = oa.finish_reason(done.finish_reason)
            await event(oa.chat_chunk(ids, {}, finish=reason, with_usage=usage, index=c.index) if req.chat
                        else oa.completion_chunk(ids, "", finish=reason, with_usage=usage, index=c.index))

        await _each(choices, one)
        if usage:
            await event(oa.usage_chunk(ids, req.chat, self._usage(choices)))
        await ex.end_events()


class _Choice:
    """One choice of a request: prompt *prompt* (its index in the request) with
    its own sampling (its seed), stream and reply parser."""

    __slots__ = ("index", "prompt", "tokens", "config", "parser", "stream", "cached", "generated")

    def __init__(self, index: int, prompt: int, tokens: List[int], config: StreamConfig) -> None:
        self.index = index
        self.prompt = prompt
        self.tokens = tokens
        self.config = config
        self.parser: Optional[ReplyParser] = None
        self.stream: Optional[TokenStream] = None
        self.cached = 0
        self.generated = 0


async def _each(choices: List[_Choice], run: Callable[[_Choice], Awaitable[None]]) -> None:
    """``run(choice)`` for every choice at once; the first error cancels the others and is raised alone."""
    if len(choices) == 1:
        await run(choices[0])
        return
    failed: List[BaseException] = []
    async with anyio.create_task_group() as tg:
        async def guarded(c: _Choice) -> None:
            try:
                await run(c)
            except Exception as exc:
                failed.append(exc)
                tg.cancel_scope.cancel()

        for c in choices:
            tg.start_soon(guarded, c)
    if failed:
        exc = failed[0]
        failed.clear()  # (nothing of this frame keeps it: no reference cycle through the traceback)
        try:
            raise exc
        finally:
            del exc


async def _end_stream_with(ex: Exchange, exc: Exception, param: str) -> None:
    """End a started event stream with an error event (OpenAI's way), then ``[DONE]``."""
    if isinstance(exc, MullamaError):
        body = _api_error(exc, param).body()
    else:
        log.exception("error while streaming a response")
        body = oa.ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").body()
    await ex.event(body)
    await ex.end_events()


async def answer_cors(ex: Exchange, origins: "frozenset[str]", methods: Optional[Sequence[str]]) -> bool:
    """Let an accepted origin read this exchange's response; answer its
    preflight (``OPTIONS`` with ``Access-Control-Request-Method``, for a path
    allowing ``methods``; None: no such path) and return True."""
    origin = ex.raw_header(b"origin")
    if not origins or origin is None:
        return False
    text = origin.decode("latin-1").rstrip("/")
    if "*" not in origins and text not in origins:
        return False
    ex.extra_headers += [("access-control-allow-origin", "*" if "*" in origins else text), ("vary", "origin")]
    if ex.scope["method"] != "OPTIONS" or methods is None or not ex.raw_header(b"access-control-request-method"):
        return False
    asked = (ex.raw_header(b"access-control-request-headers") or b"authorization, content-type").decode("latin-1")
    await ex.start(204, [("access-control-allow-methods", ", ".join([*methods, "OPTIONS"])),
                         ("access-control-allow-headers", asked), ("access-control-max-age", "600")])
    await ex.send({"type": "http.response.body", "body": b""})
    return True


def check_api_key(ex: Exchange, api_key: Optional[str]) -> None:
    """ApiError 401 unless the request carries ``Authorization: Bearer <api_key>`` (None: no key needed)."""
    if api_key is None:
        return
    auth = ex.raw_header(b"authorization") or b""
    if not hmac.compare_digest(auth, f"Bearer {api_key}".encode("utf-8")):
        raise oa.ApiError(401, "invalid or missing API key (Authorization: Bearer <key>)", code="invalid_api_key")


def _api_error(exc: MullamaError, param: str) -> oa.ApiError:
    """The HTTP answer to an error of the model."""
    if isinstance(exc, OverloadedError):
        return oa.ApiError(503, str(exc), type="server_error", code="overloaded", headers=[("retry-after", "1")])
    if isinstance(exc, ContextOverflowError):
        return oa.ApiError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, (InvalidTokenError, InvalidConfigError)):
        return oa.ApiError(400, str(exc), param=param)
    if isinstance(exc, GrammarError):  # a GBNF grammar's syntax is checked when its request starts
        return oa.ApiError(400, str(exc), param="grammar")
    if isinstance(exc, RequestTimeoutError):
        return oa.ApiError(504, str(exc), type="timeout_error", code="timeout")
    if isinstance(exc, ClosedError):
        return oa.ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
    return oa.ApiError(500, str(exc), type="server_error")


def create_app(model: Union[str, "os.PathLike[str]", AsyncConfig, AsyncModel], **options: Any) -> OpenAIApp:
    """The ASGI application serving *model* (see :class:`OpenAIApp`)."""
    return OpenAIApp(model, **options)
