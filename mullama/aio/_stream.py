"""The bridge between a worker thread generating in C and an async consumer.

One request = one worker thread (``anyio.to_thread.run_sync``, never
abandoned) that runs the sync generation loop and sends each batch of tokens
(one trip into C) through a bounded memory object stream. A slow consumer
fills the stream and the worker waits: generation slows to the consumer's
pace and memory stays bounded.

Cancellation: a watcher task beside the worker sets the context's abort flag
when the request's scope is cancelled; the C loop sees it between tokens and
llama.cpp's abort callback sees it inside a decode, so the worker returns
within about one token (also in the middle of a prompt evaluation). The
worker is awaited with ``abandon_on_cancel=False``: when the cancellation has
propagated out of the request, no thread is still using the context.
"""

from __future__ import annotations

import sys
from contextlib import asynccontextmanager
from typing import AsyncIterator, List, Optional

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

from .._context import Completion, Context, Prompt, TokenData, _Run, STREAM_INTERVAL_S
from .._config import StreamConfig
from .._errors import ClosedError, RequestTimeoutError

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["TokenStream"]

#: batches buffered between the worker and the consumer
STREAM_BUFFER = 4


class Workers:
    """Counts the worker threads of one owner that are using a context."""

    __slots__ = ("active", "started", "_idle")

    def __init__(self) -> None:
        self.active = 0
        self.started = 0
        self._idle: Optional[anyio.Event] = None

    def enter(self) -> None:
        self.active += 1
        self.started += 1

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0 and self._idle is not None:
            self._idle.set()
            self._idle = None

    async def wait_idle(self) -> None:
        while self.active:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()


class TokenStream(anyio.abc.AsyncResource):
    """An async iterator of :class:`~mullama.TokenData` for one generation.

    Use it through ``async with model.generate_stream(...) as stream:``.
    Leaving the ``async with`` (normally, by ``break``, by an exception or by
    cancellation) stops the generation inside llama.cpp and waits for its
    worker thread.
    """

    def __init__(self, receive: "anyio.abc.ObjectReceiveStream[List[TokenData]]", run: _Run) -> None:
        self._receive = receive
        self._run = run
        self._batch: List[TokenData] = []
        self._index = 0
        self._closed = False
        #: position of the last token handed to the consumer, or None
        self.last_position: Optional[int] = None

    def __aiter__(self) -> "TokenStream":
        return self

    async def __anext__(self) -> TokenData:
        if self._index < len(self._batch):
            await anyio.lowlevel.checkpoint_if_cancelled()
        else:
            try:
                self._batch = await self._receive.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                raise StopAsyncIteration from None
            self._index = 0
        tok = self._batch[self._index]
        self._index += 1
        self.last_position = tok.position
        return tok

    def seen_tokens(self) -> Optional[int]:
        """Context length up to the last token the consumer received (None: prompt not evaluated)."""
        if self.last_position is not None:
            return self.last_position + 1
        return self._run.prompt_end

    @property
    def finish_reason(self) -> Optional[str]:
        """Why the generation ended, once it has (else None)."""
        return self._run.finish_reason if self._run.finished else None

    def completion(self) -> Completion:
        """The whole result, once the stream is exhausted."""
        return self._run.completion()

    async def aclose(self) -> None:
        """Stop reading; the generation stops when its ``async with`` exits."""
        self._closed = True
        self._receive.close()
        await anyio.lowlevel.checkpoint()


def _work(run: _Run, send: "anyio.abc.ObjectSendStream[List[TokenData]]") -> None:
    """Worker thread: generate batches and hand them to the event loop."""
    batches = run.batches()
    try:
        for batch in batches:
            try:
                anyio.from_thread.run(send.send, batch)  # waits while the stream is full
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return  # the consumer left
            anyio.from_thread.check_cancelled()
    finally:
        batches.close()


async def _produce(ctx: Context, run: _Run, send: "anyio.abc.ObjectSendStream[List[TokenData]]",
                   workers: Workers, limiter: Optional[anyio.CapacityLimiter]) -> None:
    finished = False

    async def watch() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            if not finished:
                ctx.cancel()  # abort inside C; thread-safe, returns at once

    async with send, anyio.create_task_group() as tg:
        tg.start_soon(watch)
        # cleared here, on the loop, before the thread starts: a cancellation that
        # arrives from now on is seen by the worker
        ctx._core.clear_cancel()
        workers.enter()
        try:
            await anyio.to_thread.run_sync(_work, run, send, abandon_on_cancel=False, limiter=limiter)
        finally:
            finished = True
            workers.leave()
            tg.cancel_scope.cancel()


@asynccontextmanager
async def open_token_stream(
    ctx: Context,
    prompt: Prompt,
    config: Optional[StreamConfig],
    workers: Workers,
    limiter: Optional[anyio.CapacityLimiter] = None,
) -> AsyncIterator[TokenStream]:
    """Run one generation on *ctx* in a worker thread and stream its tokens.

    The caller must hold *ctx* exclusively for the duration.
    """
    run = _Run(ctx, prompt, config, interval=STREAM_INTERVAL_S, clear_cancel=False)  # validates arguments
    send, receive = anyio.create_memory_object_stream[List[TokenData]](STREAM_BUFFER)
    stream = TokenStream(receive, run)
    with unwrap_single():
        async with anyio.create_task_group() as tg:
            tg.start_soon(_produce, ctx, run, send, workers, limiter)
            try:
                yield stream
            finally:
                if not run.finished:
                    ctx.cancel()
                receive.close()


class unwrap_single:
    """Re-raise a lone exception out of a task group's ExceptionGroup as itself.

    A request runs a helper task beside the caller's code; an error in either
    (the caller's own exception, ContextOverflowError from the worker) should
    reach the caller as it is, not wrapped in a group.
    """

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ, exc, tb) -> bool:
        if isinstance(exc, BaseExceptionGroup):
            while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]
            if not isinstance(exc, BaseExceptionGroup):
                raise exc
        return False


@asynccontextmanager
async def deadline(timeout_ms: Optional[int]) -> AsyncIterator[None]:
    """``fail_after`` for a request, raising :class:`RequestTimeoutError`."""
    if not timeout_ms:
        yield
        return
    try:
        with anyio.fail_after(timeout_ms / 1000):
            yield
    except TimeoutError:
        raise RequestTimeoutError(f"the request did not finish within timeout_ms={timeout_ms}") from None


def check_open(closed: bool, what: str) -> None:
    if closed:
        raise ClosedError(f"the {what} is closed")

