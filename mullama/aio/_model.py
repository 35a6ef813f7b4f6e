"""AsyncModel and AsyncContext: the sync API behind worker threads, on anyio."""

from __future__ import annotations

import functools
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import (TYPE_CHECKING, Any, AsyncContextManager, AsyncIterator, Callable, List, Mapping, NamedTuple,
                    Optional, Protocol, Sequence, Union)

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

from .._chat import Message, chat_tokens, check_messages
from .._config import StreamConfig, check_int, choice_configs, resolve_threads, token_list
from .._context import Context, Prompt, ThreadStats
from .._embed import EmbedCall
from .._generation import Completion, SpeculativeStats
from .._tools import ChatCompletion, ChatDelta, ChatPlan, ReplyParser, plain_completion, plan_chat
from .._errors import InvalidConfigError
from .._engine import MAX_SEQUENCES, Engine
from .._prompt_cache import PromptCacheStats, default_prompt_cache_bytes
from .._model import Model, ModelInfo
from .._owner import Owner, Uncopyable

if TYPE_CHECKING:
    from .._tools import ToolChoice
from ._loop import LoopBinding, LoopLimiters
from ._stream import (TokenStream, Workers, check_open, deadline, open_engine_stream, open_token_stream,
                      run_cancellable, run_in_thread, unwrap_single)

__all__ = ["AsyncConfig", "AsyncModel", "AsyncContext"]

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class AsyncConfig:
    """How to load a model for async use.

    Args:
        model_path: the ``.gguf`` file.
        gpu_layers: layers offloaded to the GPU (needs a GPU build; -1 = all).
        context_size: tokens per request context.
        threads: threads per generation (default: the cores this process may use;
            more is capped, with a ``RuntimeWarning``).
        flash_attention: use flash attention.
        max_concurrent: requests decoded together (continuous batching), 1 to 256
            (llama.cpp's most sequences in a context); more wait their turn.
        timeout_ms: deadline of each request in milliseconds (0 or None = none).
        max_queue: requests that may wait for a turn; beyond, OverloadedError at once.
        adaptive_threads: decode with fewer threads while the machine is busy
            (see :meth:`mullama.Model.create_context`); ``False`` always uses ``threads``.
        prompt_cache_bytes: the engine's host-memory prompt cache, in bytes:
            sequences of KV cells saved when their slot is given to another
            prompt, restored for a later prompt with the same start (least
            recently used evicted first). Default (None): a tenth of the
            machine's memory, at most 2 GiB; 0: none. The slots' own cells
            are reused either way (see the README's "Prompt cache").
        prompt_cache_exact: reuse only the KV cells an uncached run computes
            bit for bit, so that outputs never depend on the cache (default).
            False also reuses the cells of tokens a request decoded alone, one
            at a time, as llama-server does: a follow-up sent the moment a
            reply ends (an agent's next call) starts sooner, but its output
            may differ from an uncached run's where two tokens are nearly tied.
        draft_model: a smaller model with this model's tokens (a ``.gguf``
            path) that drafts for the engine's requests that ask for
            speculative decoding (``StreamConfig(speculative=True)``);
            without one they draft by prompt lookup.
    """

    model_path: PathLike
    gpu_layers: int = 0
    context_size: int = 2048
    threads: Optional[int] = field(default=None)
    flash_attention: bool = False
    max_concurrent: int = 4
    timeout_ms: Optional[int] = 30000
    max_queue: int = 64
    adaptive_threads: bool = True
    prompt_cache_bytes: Optional[int] = None
    prompt_cache_exact: bool = True
    draft_model: Optional[PathLike] = None

    def __post_init__(self) -> None:
        if not isinstance(self.model_path, (str, os.PathLike)):
            raise InvalidConfigError(f"model_path must be a str or os.PathLike, got {type(self.model_path).__name__}")
        check_int("gpu_layers", self.gpu_layers, minimum=-1)
        check_int("context_size", self.context_size, minimum=1, maximum=1 << 24)
        object.__setattr__(self, "threads", resolve_threads("threads", self.threads, stacklevel=4))
        if not isinstance(self.flash_attention, bool):
            raise InvalidConfigError(f"flash_attention must be a bool, got {type(self.flash_attention).__name__}")
        check_int("max_concurrent", self.max_concurrent, minimum=1, maximum=MAX_SEQUENCES)
        if self.timeout_ms is not None:
            check_int("timeout_ms", self.timeout_ms, minimum=0)
        check_int("max_queue", self.max_queue, minimum=0)
        if not isinstance(self.adaptive_threads, bool):
            raise InvalidConfigError(f"adaptive_threads must be a bool, got {type(self.adaptive_threads).__name__}")
        if self.prompt_cache_bytes is None:
            object.__setattr__(self, "prompt_cache_bytes", default_prompt_cache_bytes())
        check_int("prompt_cache_bytes", self.prompt_cache_bytes, minimum=0)
        if not isinstance(self.prompt_cache_exact, bool):
            raise InvalidConfigError(
                f"prompt_cache_exact must be a bool, got {type(self.prompt_cache_exact).__name__}")
        if self.draft_model is not None and not isinstance(self.draft_model, (str, os.PathLike)):
            raise InvalidConfigError(
                f"draft_model must be a str or os.PathLike, got {type(self.draft_model).__name__}")


class _Results:
    """``generate``, ``generate_text`` and ``chat`` of an object that streams
    (:class:`AsyncModel`, :class:`AsyncContext`): each runs its stream to the end."""

    __slots__ = ()

    def generate_stream(self, prompt: Prompt,
                        config: Optional[StreamConfig] = None) -> AsyncContextManager[TokenStream]:
        raise NotImplementedError

    def _open_chat(self, messages: Sequence[Message], config: StreamConfig, template: Optional[str],
                   args: ToolArgs) -> "AsyncContextManager[tuple[TokenStream, Optional[ReplyParser]]]":
        """Stream a chat reply, with the parser of a chat with tools (None for plain chat)."""
        raise NotImplementedError

    def _threads(self) -> anyio.CapacityLimiter:
        raise NotImplementedError

    async def generate(self, prompt: Prompt, max_tokens: Optional[int] = None,
                       config: Optional[StreamConfig] = None) -> Completion:
        """Generate from *prompt* (text or token ids) and return the :class:`~mullama.Completion`."""
        return await drain(self.generate_stream(prompt, _with_max_tokens(config, max_tokens)))

    async def generate_text(self, prompt: Prompt, max_tokens: Optional[int] = None,
                            config: Optional[StreamConfig] = None) -> str:
        """The convenience: :meth:`generate`'s text alone."""
        return (await self.generate(prompt, max_tokens, config)).text

    def chat_stream(self, messages: Sequence[Message], config: Optional[StreamConfig] = None, *,
                    template: Optional[str] = None, tools: Optional[Sequence[Any]] = None,
                    tool_choice: "ToolChoice" = None, parallel_tool_calls: Optional[bool] = None,
                    chat_template_kwargs: Optional[Mapping[str, Any]] = None) -> AsyncContextManager[TokenStream]:
        """Stream the tokens of the assistant's answer to *messages*:
        ``async with m.chat_stream(messages) as s: async for tok in s:``. The
        keywords are :meth:`chat`'s; :meth:`chat_deltas` streams the answer parsed."""
        args = ToolArgs(tools, tool_choice, parallel_tool_calls, chat_template_kwargs)
        return _stream_only(self._open_chat(messages, _with_max_tokens(config, None), template, args))

    async def chat(self, messages: Sequence[Message], config: Optional[StreamConfig] = None, *,
                   max_tokens: Optional[int] = None, template: Optional[str] = None,
                   tools: Optional[Sequence[Any]] = None, tool_choice: "ToolChoice" = None,
                   parallel_tool_calls: Optional[bool] = None,
                   chat_template_kwargs: Optional[Mapping[str, Any]] = None) -> ChatCompletion:
        """The assistant's answer to *messages* as a :class:`~mullama.ChatCompletion`:
        ``content``, ``reasoning_content`` and ``tool_calls`` (see
        :meth:`mullama.Context.chat` for *tools*, *tool_choice*,
        *parallel_tool_calls* and *chat_template_kwargs*)."""
        args = ToolArgs(tools, tool_choice, parallel_tool_calls, chat_template_kwargs)
        async with self._open_chat(messages, _with_max_tokens(config, max_tokens), template, args) as (stream, parser):
            async for _ in stream.batches():
                pass
            done = stream.completion()
            if parser is None:
                return plain_completion(done)
            await run_in_thread(parser.feed, done.text, True, done.finish_reason != "stop", limiter=self._threads())
            return parser.completion(done)

    def chat_deltas(self, messages: Sequence[Message], config: Optional[StreamConfig] = None, *,
                    max_tokens: Optional[int] = None, template: Optional[str] = None,
                    tools: Optional[Sequence[Any]] = None, tool_choice: "ToolChoice" = None,
                    parallel_tool_calls: Optional[bool] = None,
                    chat_template_kwargs: Optional[Mapping[str, Any]] = None
                    ) -> AsyncContextManager[AsyncIterator[ChatDelta]]:
        """Stream the answer to *messages* as :class:`~mullama.ChatDelta` pieces:
        ``async with m.chat_deltas(messages, tools=...) as deltas: async for d in deltas:``
        (content and reasoning text, then each tool call's id and name once and
        pieces of its arguments; the last delta has ``finish_reason``)."""
        args = ToolArgs(tools, tool_choice, parallel_tool_calls, chat_template_kwargs)
        return _deltas_only(self._open_chat(messages, _with_max_tokens(config, max_tokens), template, args))


class ToolArgs(NamedTuple):
    """The tool-calling keywords of a chat request (in Context._prepare's order)."""

    tools: Optional[Sequence[Any]] = None
    tool_choice: "ToolChoice" = None
    parallel_tool_calls: Optional[bool] = None
    chat_template_kwargs: Optional[Mapping[str, Any]] = None


@asynccontextmanager
async def _stream_only(opened: "AsyncContextManager[tuple[TokenStream, Optional[ReplyParser]]]"
                       ) -> AsyncIterator[TokenStream]:
    async with opened as (stream, _):
        yield stream


@asynccontextmanager
async def _deltas_only(opened: "AsyncContextManager[tuple[TokenStream, Optional[ReplyParser]]]"
                       ) -> AsyncIterator[AsyncIterator[ChatDelta]]:
    async with opened as (stream, parser):
        yield chat_deltas_of(stream, parser)


async def chat_deltas_of(stream: TokenStream, parser: Optional[ReplyParser]) -> AsyncIterator[ChatDelta]:
    """The :class:`~mullama.ChatDelta` pieces of a chat stream (*parser*: None for plain chat)."""
    async for batch in stream.batches():
        text = "".join(t.text for t in batch)
        if parser is None:
            if text:
                yield ChatDelta(content=text)
            continue
        for d in parser.feed(text):
            yield d
    if parser is None:
        yield ChatDelta(finish_reason=stream.completion().finish_reason)
        return
    done = stream.completion()
    for d in parser.feed("", final=True, cut=done.finish_reason != "stop"):
        yield d
    yield ChatDelta(finish_reason=parser.completion(done).finish_reason)


class AsyncModel(_Results, Owner):
    """A model served to async code under asyncio or trio.

    Many tasks may share one AsyncModel: a continuous batching engine decodes
    up to ``max_concurrent`` requests together, one ``llama_decode`` per step
    for all of them, each with its own sampling settings; more wait in a
    bounded FIFO queue. Every call into llama.cpp runs off the event loop, so
    the loop never blocks.

    **Cancellation**: cancelling a request (cancel scope, ``move_on_after``,
    ``fail_after``, a trio nursery cancel, asyncio ``Task.cancel``) stops its
    generation inside llama.cpp within about one token, also during a long
    prompt evaluation; when the cancellation has propagated, the worker thread
    is done and the model serves the next request normally.

    An AsyncModel may serve several event loops at once (each request has its
    own hand-off). It cannot be pickled or copied (:class:`~mullama.NotCopyableError`).
    """

    _copy_hint = "pass the AsyncConfig (or the path) and load it in the other process"

    def __init__(self, model: Model, engine: Engine, config: AsyncConfig, limiters: LoopLimiters) -> None:
        self._model = model
        self._engine = engine
        self._config = config
        self._limiters = limiters
        self._conversations: "set[AsyncContext]" = set()
        self._info: Optional[ModelInfo] = None
        self._closed = False
        self._conv_generations = 0
        self._conv_generation_ms = 0.0
        self._embedding = Workers()  # embed() calls on worker threads
        self._embed_limiters = LoopLimiters(1)  # one at a time, waiting on the loop (never in a thread)
        self._embed_calls: "set[EmbedCall]" = set()

    # -- loading ----------------------------------------------------------------

    @classmethod
    async def load(cls, path: PathLike, *, progress: Optional[Callable[[float], None]] = None,
                   **config: object) -> "AsyncModel":
        """Load *path* (file I/O and parsing on a worker thread); see :class:`AsyncConfig` for options."""
        return await cls.load_with_config(AsyncConfig(model_path=path, **config), progress=progress)  # type: ignore[arg-type]

    @classmethod
    async def load_with_config(cls, config: AsyncConfig,
                               progress: Optional[Callable[[float], None]] = None,
                               thread_name: Optional[str] = None) -> "AsyncModel":
        """Load the model *config* names.

        Args:
            progress: called on the event loop with the load fraction in [0, 1].
            thread_name: the name of its batching engine's driver thread
                (default ``"mullama-engine"``).

        **Cancellation**: cancelling the load stops llama.cpp's loader at its
        next progress report and frees what it had loaded; nothing half-loaded
        is left.

        Raises:
            InsufficientMemoryError: the batching engine's KV cache
                (``max_concurrent x context_size`` tokens) cannot fit in the
                memory available; checked before it is allocated.
        """
        if not isinstance(config, AsyncConfig):
            raise InvalidConfigError(f"config must be an AsyncConfig, got {type(config).__name__}")

        def load() -> "tuple[Model, Engine]":
            model = load_model(config, progress)
            try:
                assert config.threads is not None and config.prompt_cache_bytes is not None  # resolved by AsyncConfig
                engine = Engine(model, config.max_concurrent, config.context_size, config.threads,
                                config.flash_attention, config.max_queue, adaptive_threads=config.adaptive_threads,
                                prompt_cache_bytes=config.prompt_cache_bytes,
                                exact_prompt_cache=config.prompt_cache_exact, draft_model=config.draft_model)
                if thread_name is not None:
                    engine.thread_name = thread_name
            except BaseException:
                model.close()
                raise
            return model, engine

        limiters = _model_limiters(config)
        model, engine = await anyio.to_thread.run_sync(load, limiter=limiters.current())
        return cls(model, engine, config, limiters)

    def _threads(self) -> anyio.CapacityLimiter:
        """The worker-thread slots of its own blocking calls, for the calling
        loop (see :func:`_model_limiters`)."""
        return self._limiters.current()

    # -- lifetime ---------------------------------------------------------------

    def is_ready(self) -> bool:
        """True while the model is loaded and accepts requests: False once it
        is closed (also when its sync :attr:`model` was closed directly) or
        its batching engine stopped."""
        return not self._closed and not self._model.closed and self._engine.broken is None

    @property
    def config(self) -> AsyncConfig:
        return self._config

    @property
    def model(self) -> Model:
        """The underlying sync :class:`~mullama.Model`."""
        return self._model

    @property
    def active_workers(self) -> int:
        """Requests being generated now (engine slots in use and conversation workers)."""
        return (self._engine.active + self._embedding.active
                + sum(c._workers.active for c in self._conversations))

    @property
    def waiting(self) -> int:
        """Requests queued for a free slot."""
        return self._engine.waiting

    @property
    def request_context_size(self) -> int:
        """Tokens one request may hold: its prompt plus ``max_tokens``."""
        return self._engine.ctx_per_seq

    def kv_used(self) -> int:
        """KV cells in use: the engine's requests' (0 when none runs) and its
        open conversations' (:meth:`AsyncContext.kv_used`)."""
        return self._engine.kv_cells + sum(c.kv_used() for c in list(self._conversations) if not c.closed)

    @property
    def tokens_in_flight(self) -> int:
        """Tokens generated so far by the requests holding an engine slot: their progress."""
        return self._engine.tokens_in_flight

    def prompt_cache_stats(self) -> PromptCacheStats:
        """The batching engine's prompt cache: tokens reused and evaluated, and
        the memory it holds (see the README's "Prompt cache")."""
        return self._engine.prompt_cache_stats()

    def speculative_stats(self) -> SpeculativeStats:
        """Speculative decoding (``StreamConfig.speculative``) of the engine's
        requests that ended so far: drafts, tokens drafted and accepted."""
        return self._engine.speculative_stats()

    def clear_prompt_cache(self) -> int:
        """Drop every sequence the host-memory prompt cache holds, giving its
        memory back to the system; returns the bytes it held. (The KV cells
        free slots keep cost nothing more: the context's KV cache is allocated
        once, and they are reused or overwritten as requests need.) It waits
        for the engine's driver to finish admitting requests, as submitting one does."""
        check_open(self._closed, "AsyncModel")
        return self._engine.clear_prompt_cache()

    def thread_stats(self) -> ThreadStats:
        """The batching engine's compute threads (fewer than ``threads`` while the machine is busy)."""
        check_open(self._closed, "AsyncModel")
        return self._engine.thread_stats()

    def generation_stats(self) -> "tuple[int, float]":
        """Generations finished (engine requests that reached a slot, and
        conversation calls) and their total wall time in milliseconds."""
        engine = self._engine
        return engine.generations + self._conv_generations, engine.generation_ms + self._conv_generation_ms

    def _record_generation(self, ms: float) -> None:
        self._conv_generations += 1
        self._conv_generation_ms += ms

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"active={self.active_workers} waiting={self.waiting}"
        return f"<mullama.aio.AsyncModel {state} {os.fspath(self._config.model_path)}>"

    def _close_unclosed(self) -> None:
        self._closed = True
        self._engine.close()  # cancels its requests, joins its thread
        self._model.close()   # and the conversations' contexts

    async def aclose(self) -> None:
        """Cancel running requests, wait for their threads, free everything.

        Shielded from cancellation and idempotent; later calls raise ClosedError.
        """
        if self._closed:
            return
        for conv in self._conversations:  # before anything is closed: LoopConflictError
            conv._loop.check()
        self._closed = True
        with anyio.CancelScope(shield=True):
            for call in list(self._embed_calls):
                call.cancel()
            await self._embedding.wait_idle()
            for conv in list(self._conversations):
                await conv.aclose()
            # (the engine's close cancels its requests and joins its thread)
            await anyio.to_thread.run_sync(self._engine.close, limiter=self._threads())
            await anyio.to_thread.run_sync(self._model.close, limiter=self._threads())

    async def __aenter__(self) -> "AsyncModel":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- requests ------------------------------------------------------------------

    def generate_stream(self, prompt: Prompt,
                        config: Optional[StreamConfig] = None) -> AsyncContextManager[TokenStream]:
        """Stream a generation: ``async with model.generate_stream(p) as s: async for tok in s:``.

        The request joins the batching engine at its next step, or waits in the
        queue (OverloadedError at once if the queue is full). The deadline
        (``timeout_ms``) covers the wait and the generation and raises
        RequestTimeoutError. A request whose prompt plus ``max_tokens`` cannot
        fit in ``context_size`` is refused with ContextOverflowError.
        """
        if isinstance(prompt, str):
            return self._open_stream(functools.partial(self._model.tokenize, prompt), config)
        return self._open_stream(token_list(prompt), config)

    async def generate_many(self, prompt: Prompt, n: int, config: Optional[StreamConfig] = None, *,
                            max_tokens: Optional[int] = None) -> List[Completion]:
        """*n* completions of one prompt, decoded together.

        Choice ``i`` samples with seed ``config.seed + i`` (from a random base
        seed when ``config.seed`` is None): it equals :meth:`generate` with that
        seed. The prompt is evaluated once; the other choices copy its KV cells
        from the first one's sequence (see the README's "Prompt cache").

        Raises:
            InvalidConfigError: *n* is not between 1 and ``max_concurrent`` (the
                choices run together, one slot each).
        """
        check_int("n", n, minimum=1, maximum=self._config.max_concurrent)
        tokens = await self.tokenize(prompt) if isinstance(prompt, str) else token_list(prompt)
        configs = choice_configs(_with_max_tokens(config, max_tokens), n)
        results: List[Optional[Completion]] = [None] * n

        async def one(i: int) -> None:
            results[i] = await drain(self.generate_stream(tokens, configs[i]))

        with unwrap_single():  # (an error of one choice, OverloadedError say, comes out as itself)
            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(one, i)
        return [c for c in results if c is not None]

    def _open_chat(self, messages: Sequence[Message], config: StreamConfig, template: Optional[str],
                   args: ToolArgs) -> "AsyncContextManager[tuple[TokenStream, Optional[ReplyParser]]]":
        """The reply to *messages* formatted with the model's chat template (or
        *template*: Jinja source or a llama.cpp built-in name), or with llama.cpp's
        chat library for a chat with tools. ChatTemplateError without a template."""
        messages = check_messages(messages)  # checked once: the renderer takes them as they are

        def prepare() -> "tuple[List[int], Optional[StreamConfig], Optional[ChatPlan]]":
            return self._model._prepare_chat(messages, config, template, *args)

        return self._open(prepare)

    def _open_stream(self, tokens: Union[List[int], Callable[[], List[int]]],
                     config: Optional[StreamConfig]) -> AsyncContextManager[TokenStream]:
        """*tokens*, or a function that makes them on a worker thread (tokenizing)."""
        cfg = _with_max_tokens(config, None)

        def prepare() -> "tuple[List[int], StreamConfig, Optional[ChatPlan]]":
            return (tokens() if callable(tokens) else tokens), cfg, None

        return _stream_only(self._open(prepare if callable(tokens) else prepare()))

    @asynccontextmanager
    async def _open(self, prepare: Any
                    ) -> "AsyncIterator[tuple[TokenStream, Optional[ReplyParser]]]":
        """Run *prepare* (tokens, config and plan; a function runs on a worker
        thread) and stream the request, with the plan's reply parser."""
        check_open(self._closed, "AsyncModel")
        async with deadline(self._config.timeout_ms):
            if callable(prepare):
                prepare = await run_in_thread(prepare, limiter=self._threads())
            tokens, config, plan = prepare
            check_open(self._closed, "AsyncModel")
            parser = plan.reply_parser() if plan is not None else None
            try:
                async with open_engine_stream(self._engine, tokens, config, self._config.timeout_ms) as stream:
                    yield stream, parser
            finally:
                if parser is not None:
                    parser.close()

    async def embed(self, texts: "Union[str, Sequence[str], Sequence[Sequence[int]]]", normalize: bool = True,
                    pooling: Optional[str] = None, *, context_size: int = 2048) -> Any:
        """:meth:`mullama.Model.embed` on a worker thread (the model's embedding
        context of its own; the batching engine is not involved). Cancelling
        the caller stops the evaluation inside llama.cpp within one batch step.
        Concurrent calls take turns, waiting on the event loop: they never hold
        the threads that tokenize generation requests."""
        check_open(self._closed, "AsyncModel")
        call = EmbedCall()
        self._embed_calls.add(call)
        try:
            async with deadline(self._config.timeout_ms):
                return await run_cancellable(
                    call, self._embedding, self._embed_limiters.current(),  # type: ignore[arg-type]
                    functools.partial(self._model.embed, texts, normalize, pooling, context_size=context_size,
                                      threads=self._config.threads, _call=call))
        finally:
            self._embed_calls.discard(call)

    async def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> List[int]:
        """Token ids of *text* (on a worker thread)."""
        check_open(self._closed, "AsyncModel")
        return await anyio.to_thread.run_sync(self._model.tokenize, text, add_bos, special, limiter=self._threads())

    tokenize_async = tokenize  # Mullama's name

    async def tokenize_chat(self, messages: Sequence[Message], *, template: Optional[str] = None,
                            chat_template_kwargs: Optional[Mapping[str, Any]] = None) -> List[int]:
        """Token ids of *messages* formatted for the assistant's turn (what
        :meth:`chat` generates from); ChatTemplateError without a template."""
        check_open(self._closed, "AsyncModel")
        messages = check_messages(messages)
        return await anyio.to_thread.run_sync(chat_tokens, self._model, messages, template, chat_template_kwargs,
                                             limiter=self._threads())

    async def apply_chat_template(self, messages: Sequence[Message], *, template: Optional[str] = None,
                                  add_generation_prompt: bool = True,
                                  chat_template_kwargs: Optional[Mapping[str, Any]] = None) -> str:
        """The prompt text of *messages* in the model's chat format (on a worker
        thread; see :meth:`mullama.Model.apply_chat_template`)."""
        check_open(self._closed, "AsyncModel")
        messages = check_messages(messages)
        render = functools.partial(self._model.apply_chat_template, messages, template=template,
                                   add_generation_prompt=add_generation_prompt,
                                   chat_template_kwargs=chat_template_kwargs)
        return await run_in_thread(render, limiter=self._threads())

    async def make_config(self, **fields: Any) -> StreamConfig:
        """``StreamConfig(**fields)``, built on one of this model's worker threads:
        llama.cpp's converter can take a second on a large JSON schema (many
        optional properties), which must not stall the event loop."""
        return await run_in_thread(functools.partial(StreamConfig, **fields), limiter=self._threads())

    async def plan_chat(self, messages: Sequence[Message], *, template: Optional[str] = None,
                        tools: Optional[Sequence[Any]] = None, tool_choice: "ToolChoice" = None,
                        parallel_tool_calls: Optional[bool] = None,
                        chat_template_kwargs: Optional[Mapping[str, Any]] = None) -> Optional[ChatPlan]:
        """How :meth:`chat` renders *messages* (on a worker thread): a plan from
        llama.cpp's chat library (the prompt's tokens, the tool-call grammar, the
        reply parser) for a chat with tools or a thinking template, ``None`` for
        plain chat (:meth:`tokenize_chat`). The server's building block."""
        check_open(self._closed, "AsyncModel")
        messages = check_messages(messages)
        plan = functools.partial(plan_chat, self._model, messages, template, tools=tools, tool_choice=tool_choice,
                                 parallel_tool_calls=parallel_tool_calls, chat_template_kwargs=chat_template_kwargs)
        return await run_in_thread(plan, limiter=self._threads())

    async def detokenize(self, tokens: Sequence[int]) -> str:
        check_open(self._closed, "AsyncModel")
        return await anyio.to_thread.run_sync(self._model.detokenize, tokens, limiter=self._threads())

    async def model_info(self) -> ModelInfo:
        check_open(self._closed, "AsyncModel")
        if self._info is None:
            self._info = await anyio.to_thread.run_sync(lambda: self._model.info, limiter=self._threads())
        return self._info

    async def create_context(self, context_size: Optional[int] = None) -> "AsyncContext":
        """A context of its own (its own KV cache): a conversation that keeps its state."""
        check_open(self._closed, "AsyncModel")
        cfg = self._config
        size = cfg.context_size if context_size is None else context_size
        ctx = await anyio.to_thread.run_sync(
            lambda: self._model.create_context(context_size=size, threads=cfg.threads,
                                               flash_attention=cfg.flash_attention,
                                               adaptive_threads=cfg.adaptive_threads),
            limiter=self._threads())
        conv = AsyncContext(self, ctx)
        self._conversations.add(conv)
        return conv


class ConversationOwner(Protocol):
    """What an :class:`AsyncContext` relies on in the object that made it (an
    :class:`AsyncModel`, or a :class:`~mullama.aio.ModelPool` for its members)."""

    @property
    def closed(self) -> bool: ...

    @property
    def config(self) -> AsyncConfig: ...

    #: its open conversations (an AsyncContext leaves it when closed)
    _conversations: "set[AsyncContext]"

    def _record_generation(self, ms: float) -> None:
        """Count a finished conversation call that took *ms* (its runtime metrics)."""


class AsyncContext(_Results, Uncopyable):
    """One conversation with its own KV cache, for async code.

    Each call continues the conversation. One task uses it at a time: a second
    task waits its turn (first come, first served; bound the wait with a
    cancel scope such as ``anyio.fail_after``). A task of another event loop
    (another thread, or asyncio and trio) cannot wait for it: while it is in
    use, such a call raises :class:`~mullama.LoopConflictError` at once.
    """

    _copy_hint = ("create a context in the other process (save_state() and load_state() move a "
                  "conversation); a copy would share the KV cache")

    def __init__(self, owner: ConversationOwner, ctx: Context) -> None:
        self._owner = owner
        self._ctx = ctx
        self._lock = anyio.Lock()
        self._limiter: Optional[anyio.CapacityLimiter] = None
        self._loop = LoopBinding("AsyncContext")
        self._workers = Workers()
        self._closed = False

    def _threads(self) -> anyio.CapacityLimiter:
        """Its own worker-thread slot (one: it runs one thing at a time), so that
        open conversations never hold anyio's default slots, which every other
        ``to_thread`` call of the process shares."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(1)
        return self._limiter

    @property
    def n_past(self) -> int:
        """Tokens in the conversation."""
        return self._ctx.n_past

    @property
    def tokens(self) -> List[int]:
        return self._ctx.tokens

    @property
    def closed(self) -> bool:
        return self._closed

    def kv_used(self) -> int:
        """KV cells the conversation holds (its tokens evaluated into the cache; 0 once closed)."""
        return 0 if self._closed else self._ctx.kv_used()

    @asynccontextmanager
    async def _use(self) -> AsyncIterator[Context]:
        check_open(self._closed or self._owner.closed, "AsyncContext")
        if self._loop.enter():  # LoopConflictError if another loop is using it
            self._lock = anyio.Lock()  # the old ones belong to the last loop (and nobody holds them)
            self._limiter = None
        try:
            async with self._lock:
                check_open(self._closed or self._owner.closed, "AsyncContext")
                yield self._ctx
        finally:
            self._loop.leave()

    def generate_stream(self, prompt: Prompt,
                        config: Optional[StreamConfig] = None) -> AsyncContextManager[TokenStream]:
        """Continue the conversation with *prompt* (text or token ids), streaming tokens.

        A stream left early keeps in the conversation only the tokens the
        consumer received.
        """
        return _stream_only(self._open(lambda ctx: (prompt, config, None)))

    def _open_chat(self, messages: Sequence[Message], config: StreamConfig, template: Optional[str],
                   args: ToolArgs) -> "AsyncContextManager[tuple[TokenStream, Optional[ReplyParser]]]":
        """The answer to *messages* (the whole conversation, earlier answers
        included as ``"assistant"`` messages). The tokens the conversation shares
        with what this context holds are not evaluated again, so a turn costs
        only its new tokens."""
        messages = check_messages(messages)

        def prepare(ctx: Context) -> "tuple[List[int], Optional[StreamConfig], Optional[ChatPlan]]":
            tokens, cfg, plan = ctx._prepare(messages, config, template, *args)
            return ctx._keep_prefix(tokens), cfg, plan

        return self._open(prepare)

    @asynccontextmanager
    async def _open(self, prepare: Callable[[Context], Any]
                    ) -> "AsyncIterator[tuple[TokenStream, Optional[ReplyParser]]]":
        """Run *prepare* on the context (prompt, config and plan; on a worker
        thread) and stream the generation, with the plan's reply parser."""
        async with deadline(self._owner.config.timeout_ms), self._use() as ctx:
            prompt, config, plan = await run_in_thread(prepare, ctx, limiter=self._threads())
            stream: Optional[TokenStream] = None
            parser = plan.reply_parser() if plan is not None else None
            t0 = time.perf_counter()
            try:
                async with open_token_stream(ctx, prompt, config, self._workers, self._threads()) as stream:
                    yield stream, parser
            finally:
                if parser is not None:
                    parser.close()
                if stream is not None:
                    self._owner._record_generation((time.perf_counter() - t0) * 1e3)
                # the worker is done; the conversation keeps what the consumer received
                keep = stream.seen_tokens() if stream is not None else None
                if keep is not None and not ctx.closed and keep < ctx.n_past:
                    with anyio.CancelScope(shield=True):
                        await run_in_thread(ctx.truncate, keep, limiter=self._threads())

    async def process_batch(self, prompt: Prompt) -> int:
        """Evaluate *prompt* (text or token ids) into the conversation without generating.

        Returns the number of tokens the context holds. Cancellation stops the
        evaluation inside llama.cpp and leaves the context as it was.
        """
        async with deadline(self._owner.config.timeout_ms), self._use() as ctx:
            if isinstance(prompt, str):
                tokens = await run_in_thread(ctx.model.tokenize, prompt, ctx.n_past == 0, limiter=self._threads())
            else:
                tokens = token_list(prompt)
            ctx.clear_cancel()  # before the worker exists: a cancellation from now on stops it
            await run_cancellable(ctx, self._workers, self._threads(),
                                  functools.partial(ctx.eval, clear_cancel=False), tokens)
            return ctx.n_past

    async def save_state(self, path: PathLike) -> None:
        async with self._use() as ctx:
            await run_in_thread(ctx.save_state, path, limiter=self._threads())

    async def load_state(self, path: PathLike) -> None:
        async with self._use() as ctx:
            await run_in_thread(ctx.load_state, path, limiter=self._threads())

    async def reset(self) -> None:
        async with self._use() as ctx:
            await run_in_thread(ctx.reset, limiter=self._threads())

    async def aclose(self) -> None:
        """Stop what runs on the context and free it (shielded, idempotent).

        Does not wait for a consumer that holds a stream open: its worker is
        stopped and the stream ends. LoopConflictError (and nothing closed)
        if another event loop is using the context.
        """
        if self._closed:
            return
        self._loop.check()
        self._closed = True
        with anyio.CancelScope(shield=True):
            self._ctx.cancel()
            self._workers.close_handoffs()
            await self._workers.wait_idle()
            await run_in_thread(self._ctx.close, limiter=self._threads())
            self._owner._conversations.discard(self)

    async def __aenter__(self) -> "AsyncContext":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _model_limiters(config: AsyncConfig) -> LoopLimiters:
    """The worker-thread slots of an AsyncModel's own blocking calls (loading,
    tokenizing each request's prompt, chat templates, detokenize, model_info,
    create_context, closing), one set per event loop it serves.

    They are its own so that those calls never wait for anyio's default slots
    (40 per loop), which every ``to_thread`` call of the process shares (a
    pool's calls, the application's own threads): were those all held, no
    request could even be tokenized. As many as the engine has slots: it starts
    at most ``max_concurrent`` requests at once, so tokenizing more prompts at
    once would only move their wait into its queue, while each extra thread
    competes for the cores the decode threads run on (tokenizing runs in C,
    without the GIL). At least 2, so that one slow call (a create_context
    allocating its KV cache, a long chat template, a close joining the engine)
    does not hold up the short ones behind it.
    """
    return LoopLimiters(max(2, config.max_concurrent))


def load_model(config: AsyncConfig, progress: Optional[Callable[[float], None]]) -> Model:
    """Load *config*'s model; call from a worker thread (``anyio.to_thread``).

    *progress* is called on the event loop with the load fraction. Cancelling
    the awaiting task stops llama.cpp's loader at its next progress report and
    frees what it had loaded.
    """

    def on_progress(fraction: float) -> None:
        anyio.from_thread.check_cancelled()  # raises in the loader: the load is aborted
        if progress is not None:
            anyio.from_thread.run_sync(progress, fraction)

    return Model.load(config.model_path, gpu_layers=config.gpu_layers, progress=on_progress)


async def drain(stream_cm: AsyncContextManager[TokenStream]) -> Completion:
    """Run a stream to its end and return its :class:`~mullama.Completion`."""
    async with stream_cm as stream:
        async for _ in stream:
            pass
    return stream.completion()


def _with_max_tokens(config: Optional[StreamConfig], max_tokens: Optional[int]) -> StreamConfig:
    config = config if config is not None else StreamConfig()
    if not isinstance(config, StreamConfig):
        raise InvalidConfigError(f"config must be a StreamConfig, got {type(config).__name__}")
    return config if max_tokens is None else config.replace(max_tokens=max_tokens)
