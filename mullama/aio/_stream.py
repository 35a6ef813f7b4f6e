"""The bridge between a worker thread generating in C and an async consumer.

One request = one worker thread (``anyio.to_thread.run_sync``, never
abandoned) that runs the sync generation loop and hands each batch of tokens
(one trip into C) to the event loop through a bounded :class:`Handoff`. The
worker never waits for the event loop to be scheduled: on 2 cores llama.cpp's
threads keep both busy, and a worker that blocked on a round trip through the
loop for every batch lost 40% of its speed. It only waits when the buffer is
full: a slow consumer slows its own generation, and memory stays bounded.

Cancellation: a watcher task beside the worker sets the context's abort flag
when the request's scope is cancelled; the C loop sees it between tokens and
llama.cpp's abort callback sees it inside a decode, so the worker returns
within about one token (also in the middle of a prompt evaluation). The
worker is awaited with ``abandon_on_cancel=False``: when the cancellation has
propagated out of the request, no thread is still using the context.
"""

from __future__ import annotations

import socket
import sys
import threading
from collections import deque
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable, Deque, List, Optional, TypeVar

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

from .._context import Context, Prompt, _Run, STREAM_INTERVAL_S
from .._config import StreamConfig
from .._engine import Engine, EngineRequest
from .._generation import Completion, Generation, RequestMetrics, TokenData, timeout_error
from .._errors import AbortedError, ClosedError

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["TokenStream"]

T = TypeVar("T")

#: batches buffered between the worker and the consumer (each at most ~20 ms of tokens)
STREAM_BUFFER = 4


class Workers:
    """Counts the worker threads of one owner that are using a context, and
    knows their hand-offs (closing the owner closes them: a worker waiting for
    a consumer that stopped reading returns)."""

    __slots__ = ("active", "started", "handoffs", "_idle")

    def __init__(self) -> None:
        self.active = 0
        self.started = 0
        self.handoffs: "set[Handoff]" = set()
        self._idle: Optional[anyio.Event] = None

    def close_handoffs(self) -> None:
        for h in list(self.handoffs):
            h.close()

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


class Handoff:
    """A bounded queue of token batches from a producer thread to the event loop.

    The producer side (:meth:`put`, :meth:`offer`, :meth:`finish`) never calls
    into the event loop: it wakes the consumer by writing a byte to a socket
    pair, which the loop side awaits with :func:`anyio.wait_readable`.
    """

    def __init__(self, capacity: int, on_space: Optional[Callable[[], None]] = None) -> None:
        self._items: Deque[List[TokenData]] = deque()
        self._capacity = capacity
        self._cv = threading.Condition()
        self._on_space = on_space
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._done = False      # set by the producer after its last batch
        self._closed = False    # set by the consumer when it stops reading

    # -- producer thread -----------------------------------------------------------

    def has_space(self) -> bool:
        return self._closed or len(self._items) < self._capacity

    def offer(self, batch: List[TokenData]) -> None:
        """Queue *batch* without waiting (the caller checked :meth:`has_space`)."""
        self._items.append(batch)
        self._wake()

    def put(self, batch: List[TokenData]) -> bool:
        """Queue *batch*, waiting while the buffer is full; False once the consumer left."""
        with self._cv:
            while len(self._items) >= self._capacity and not self._closed:
                self._cv.wait()
            if self._closed:
                return False
            self._items.append(batch)
        self._wake()
        return True

    def finish(self) -> None:
        self._done = True
        self._wake()

    def _wake(self) -> None:
        try:
            self._writer.send(b"\0")
        except OSError:  # full (a wake-up is pending anyway) or closed
            pass

    # -- event loop -----------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self._done

    async def get(self) -> Optional[List[TokenData]]:
        """The next batch, or None at the end (or once the consumer closed it)."""
        while True:
            if self._closed:
                return None
            # read before looking at the buffer: the producer queues its last batch, then sets
            # _done; read after, a finish between the two looks would lose that batch
            done = self._done
            if self._items:
                was_full = len(self._items) >= self._capacity
                batch = self._items.popleft()
                if was_full:  # only a full buffer stops the producer: waking it otherwise costs it a step
                    self._made_room()
                return batch
            if done:
                return None
            await anyio.wait_readable(self._reader)
            try:
                self._reader.recv(4096)
            except OSError:
                pass

    async def wait_finished(self) -> None:
        """Wait until the producer is done (discarding what it still sends)."""
        while not self._done:
            self._items.clear()
            self._made_room()
            await anyio.wait_readable(self._reader)
            try:
                self._reader.recv(4096)
            except OSError:
                pass

    def _made_room(self) -> None:
        with self._cv:
            self._cv.notify()
        if self._on_space is not None:
            self._on_space()

    def close(self) -> None:
        """Stop reading: a producer waiting for space returns at once."""
        if not self._closed:
            self._closed = True
            self._made_room()

    def dispose(self) -> None:
        """Free the sockets (after the producer is done)."""
        self.close()
        self._reader.close()
        self._writer.close()


class TokenStream(anyio.abc.AsyncResource):
    """An async iterator of :class:`~mullama.TokenData` for one generation.

    Use it through ``async with model.generate_stream(...) as stream:``.
    Leaving the ``async with`` (normally, by ``break``, by an exception or by
    cancellation) stops the generation inside llama.cpp and waits for its
    worker thread.
    """

    def __init__(self, handoff: Handoff, run: Generation) -> None:
        self._handoff = handoff
        self._run = run
        self._batch: List[TokenData] = []
        self._index = 0
        self._closed = False
        #: position of the last token handed to the consumer, or None
        self.last_position: Optional[int] = None

    def __aiter__(self) -> "TokenStream":
        return self

    async def __anext__(self) -> TokenData:
        if self._closed or self._index >= len(self._batch):
            await self._refill()
        else:  # the per-token path: a token already here costs one cancellation check
            await anyio.lowlevel.checkpoint_if_cancelled()
        tok = self._batch[self._index]
        self._index += 1
        self.last_position = tok.position
        return tok

    async def next_batch(self) -> List[TokenData]:
        """Every token that has arrived and not been read yet (at least one,
        waiting for it if needed); StopAsyncIteration at the end.

        Reading in batches costs one step per batch instead of one per token.
        """
        if self._closed or self._index >= len(self._batch):
            await self._refill()
        else:
            await anyio.lowlevel.checkpoint_if_cancelled()
        batch = self._batch[self._index:]
        self._index = len(self._batch)
        self.last_position = batch[-1].position
        return batch

    def batches(self) -> AsyncIterator[List[TokenData]]:
        """``async for batch in stream.batches():`` (see :meth:`next_batch`)."""
        return _Batches(self)

    async def _refill(self) -> None:
        """Wait for the next batch (the current one is read); StopAsyncIteration at the end."""
        if self._closed:
            raise StopAsyncIteration
        batch = await self._handoff.get()
        if batch is None:
            if self._run.error is not None:
                raise self._run.error
            if self._run.timed_out:  # ended by the engine at its deadline
                raise timeout_error(self._run.timeout_ms)
            raise StopAsyncIteration
        self._batch = batch
        self._index = 0

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

    def metrics(self) -> RequestMetrics:
        """This generation's metrics so far (queue wait, time to first token,
        speeds, tokens; finish reason once done)."""
        return self._run.metrics()

    async def aclose(self) -> None:
        """Stop reading and stop the generation (its ``async with`` still waits for it)."""
        self._closed = True
        self._handoff.close()  # a worker thread waiting for room returns
        self._run.cancel()
        await anyio.lowlevel.checkpoint()


class _Batches:
    __slots__ = ("_stream",)

    def __init__(self, stream: TokenStream) -> None:
        self._stream = stream

    def __aiter__(self) -> "_Batches":
        return self

    def __anext__(self) -> Awaitable[List[TokenData]]:
        return self._stream.next_batch()


def _work(run: _Run, handoff: Handoff) -> None:
    """Worker thread: generate batches and hand them to the event loop."""
    batches = run.batches()
    try:
        for batch in batches:
            if not handoff.put(batch):
                return  # the consumer left
            # cancellation reaches this loop through the context's abort flag (set by
            # the watcher); raising here too would race with it
    finally:
        batches.close()
        handoff.finish()


async def run_in_thread(fn: Callable[..., T], *args: object,
                        limiter: Optional[anyio.CapacityLimiter] = None) -> T:
    """``anyio.to_thread.run_sync(fn, *args)``, never abandoned, except that an
    exception of *fn* comes out without the reference cycles of the backends'
    result objects (asyncio's future, trio's outcome, each held by a frame in
    the exception's traceback): the frames it holds (a request's prompt, its
    tokens) are freed as soon as the caller drops it, not at the next run of
    the cyclic collector."""
    failed: List[BaseException] = []

    def call() -> Optional[T]:
        try:
            return fn(*args)
        except Exception as exc:
            failed.append(exc)
            return None

    result = await anyio.to_thread.run_sync(call, abandon_on_cancel=False, limiter=limiter)
    if not failed:
        return result  # type: ignore[return-value]
    error = failed.pop()
    try:
        raise error
    finally:
        del error


async def run_cancellable(ctx: Context, workers: Workers, limiter: Optional[anyio.CapacityLimiter],
                          fn: Callable[..., T], *args: object) -> T:
    """Run *fn* on a worker thread; cancelling the caller aborts it inside C
    (``ctx.cancel()``: thread-safe, within about one token) and waits for it to
    return. The caller clears *ctx*'s cancel flag first, on the loop, before
    anything can cancel it. An AbortedError that this cancellation caused gives
    way to the cancellation itself."""
    finished = False
    aborted = False

    async def watch() -> None:
        nonlocal aborted
        try:
            await anyio.sleep_forever()
        finally:
            if not finished:
                aborted = True
                ctx.cancel()

    with unwrap_single():
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            workers.enter()
            try:
                result = await run_in_thread(fn, *args, limiter=limiter)
            except AbortedError:
                if aborted:  # our own abort: let the cancellation itself propagate
                    await anyio.lowlevel.checkpoint()
                raise
            finally:
                finished = True
                workers.leave()
                tg.cancel_scope.cancel()
    return result


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
    handoff = Handoff(STREAM_BUFFER)
    stream = TokenStream(handoff, run)
    # cleared here, on the loop, before the worker exists: a cancellation or an
    # early exit from now on is seen by the worker, even before it starts
    ctx.clear_cancel()
    workers.handoffs.add(handoff)
    try:
        with unwrap_single():
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_cancellable, ctx, workers, limiter, _work, run, handoff)
                try:
                    yield stream
                finally:
                    if not run.finished:
                        ctx.cancel()
                    handoff.close()
    finally:
        workers.handoffs.discard(handoff)
        handoff.dispose()


@asynccontextmanager
async def open_engine_stream(engine: Engine, tokens: List[int], config: StreamConfig,
                             timeout_ms: Optional[int] = None) -> AsyncIterator[TokenStream]:
    """Submit one request to the batching engine and stream its tokens.

    *timeout_ms*: the engine ends the request then, even if this side is
    stuck (not reading, or blocked writing what it read to a client).

    On exit (normal, early, error or cancellation) an unfinished request is
    cancelled and the exit waits, shielded, until the engine has released its
    slot (at the next step boundary: about one token).
    """
    handoff = Handoff(STREAM_BUFFER, on_space=engine.notify)
    request = EngineRequest(tokens, config, handoff, timeout_ms)
    try:
        engine.submit(request)  # OverloadedError / ContextOverflowError at once
    except BaseException:
        handoff.dispose()
        raise
    stream = TokenStream(handoff, request)
    try:
        yield stream
    finally:
        if not handoff.finished:
            request.cancel()
            with anyio.CancelScope(shield=True):
                await handoff.wait_finished()
        handoff.dispose()


class unwrap_single:
    """Re-raise a lone exception out of a task group's ExceptionGroup as itself.

    ``with unwrap_single(): async with anyio.create_task_group() as tg: ...``

    A request runs a helper task beside the caller's code; an error in either
    (the caller's own exception, ContextOverflowError from the worker) should
    reach the caller as it is, not wrapped in a group. An error plus the
    cancellations it caused counts as lone. The dropped group is taken apart,
    so that it keeps nothing alive in reference cycles.
    """

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ, exc, tb) -> None:
        if not isinstance(exc, BaseExceptionGroup):
            return
        leaf = _single(exc)
        if leaf is None:
            return
        # The group is dropped for its leaf. Its exceptions' tracebacks hold the
        # frames of the task group, which hold the group: reference cycles that
        # keep the leaf, its traceback and so the request's frames (its prompt,
        # its token list) alive until the cyclic collector runs, which can take
        # gigabytes of refused requests. They are taken apart here. Raised as
        # it is, the leaf's __context__ would be the group and this frame would
        # hold the group too: neither link is made.
        _dismantle(exc, leaf, anyio.get_cancelled_exc_class())
        context = leaf.__context__
        del typ, exc, tb
        try:
            raise leaf
        finally:
            leaf.__context__ = context
            del leaf, context


def _single(group: BaseException) -> Optional[BaseException]:
    """The one exception a task group's *group* stands for, if there is one."""
    cancelled = anyio.get_cancelled_exc_class()
    leaves = _leaves(group)
    if len(leaves) == 1 or all(isinstance(e, cancelled) for e in leaves):
        return leaves[0]
    others = [e for e in leaves if not isinstance(e, cancelled)]
    return others[0] if len(others) == 1 else None  # (an error plus the cancellations it caused)


def _dismantle(exc: BaseException, keep: BaseException, cancelled: type) -> None:
    """Drop the tracebacks and links of *exc* when it is a group or a
    cancellation (ours, dropped), and so on through the groups and
    cancellations it holds or was raised during; never *keep* (re-raised) nor
    any other exception (it may be the caller's)."""
    if exc is keep or not isinstance(exc, (BaseExceptionGroup, cancelled)):
        return
    linked = [exc.__context__, exc.__cause__]
    exc.__traceback__ = exc.__context__ = exc.__cause__ = None
    if isinstance(exc, BaseExceptionGroup):
        linked.extend(exc.exceptions)
    for e in linked:
        if e is not None:
            _dismantle(e, keep, cancelled)


def _leaves(group: BaseException) -> List[BaseException]:
    if isinstance(group, BaseExceptionGroup):
        return [leaf for e in group.exceptions for leaf in _leaves(e)]
    return [group]


@asynccontextmanager
async def deadline(timeout_ms: Optional[int]) -> AsyncIterator[None]:
    """``fail_after`` for a request, raising :class:`RequestTimeoutError` when
    (and only when) this deadline expired: a ``TimeoutError`` of the caller's
    own (its own ``fail_after``, ``asyncio.wait_for``) inside passes unchanged."""
    if not timeout_ms:
        yield
        return
    with anyio.move_on_after(timeout_ms / 1000) as scope:
        yield
    if scope.cancelled_caught:
        raise timeout_error(timeout_ms)


def check_open(closed: bool, what: str) -> None:
    if closed:
        raise ClosedError(f"the {what} is closed")

