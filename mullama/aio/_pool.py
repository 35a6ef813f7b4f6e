"""ModelPool: members with their own KV caches, sharing one copy of the weights."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncContextManager, AsyncIterator, Callable, Deque, Generator, List, Optional, Sequence

import anyio
import anyio.lowlevel
import anyio.to_thread

from .._chat import Message
from .._config import StreamConfig, check_int
from .._context import Prompt
from .._generation import Completion
from .._tools import ChatCompletion, ChatDelta
from .._errors import BusyError, ClosedError, ContextCreationError, InvalidConfigError
from .._model import Model, ModelInfo
from .._owner import Owner, Uncopyable
from ._loop import LoopBinding, LoopLimiters
from ._model import AsyncConfig, AsyncContext, PathLike, load_model
from ._stream import TokenStream, check_open, run_in_thread

__all__ = ["ModelPool", "PooledModel", "PoolStats"]

log = logging.getLogger("mullama.aio")


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of a :class:`ModelPool`.

    Attributes:
        size: members that exist now (available + in use; above the target
            while a shrink drains).
        available: members ready to be acquired.
        in_use: members lent out.
        waiting: tasks waiting in :meth:`ModelPool.acquire`.
    """

    size: int
    available: int
    in_use: int
    waiting: int


class _Waiter:
    __slots__ = ("event", "member", "error")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.member: Optional[AsyncContext] = None
        self.error: Optional[Exception] = None


class ModelPool(Owner):
    """A pool of ``size`` members that share one loaded model.

    Each member has its own context (its own KV cache), so up to ``size``
    conversations run at once while the weights are in memory once. A member
    is lent with :meth:`acquire` (asyncpg style: ``async with pool.acquire() as
    m:`` or ``m = await pool.acquire()`` then ``await pool.release(m)``); its
    KV cache is reset when it comes back, and a member whose reset fails is
    closed and replaced by a new one. Tasks beyond ``size`` wait their turn,
    first come first served.

    >>> async with ModelPool(AsyncConfig(path), size=4) as pool:   # or: await ModelPool.load(...)
    ...     async with pool.acquire() as m:
    ...         text = await m.generate("Hello", max_tokens=16)

    Members use ``config.context_size``, ``threads`` and ``flash_attention``;
    each request has ``config.timeout_ms`` as its deadline.

    A pool serves one event loop at a time: while members are lent or tasks
    wait in one loop, a call from another loop (another thread, or asyncio
    and trio) raises :class:`~mullama.LoopConflictError`. It cannot be pickled
    or copied (:class:`~mullama.NotCopyableError`).
    """

    _copy_hint = "pass the AsyncConfig and open a pool in the other process"

    def __init__(self, config: AsyncConfig, size: int) -> None:
        if not isinstance(config, AsyncConfig):
            raise InvalidConfigError(f"config must be an AsyncConfig, got {type(config).__name__}")
        check_int("size", size, minimum=1, maximum=1024)
        self._model: Optional[Model] = None
        self._config = config
        self._target = size
        self._available: Deque[AsyncContext] = deque()
        self._in_use: "set[AsyncContext]" = set()
        self._creating = 0
        self._waiters: Deque[_Waiter] = deque()
        self._conversations: "set[AsyncContext]" = set()  # every member: AsyncContext's owner protocol
        self._closed = False
        self._retiring = 0
        self._change: Optional[anyio.Event] = None
        self._create_error: Optional[Exception] = None
        self._generations = 0
        self._generation_ms = 0.0
        #: the loop of the leases, waiters and resizes under way
        self._loop = LoopBinding("ModelPool")
        # its own blocking calls (load, member contexts, tokenize, close): on thread slots of
        # its own, never anyio's default ones, which every to_thread call of the process shares
        self._limiters = LoopLimiters(max(2, size))
        #: members replaced because their reset failed
        self.replaced = 0

    # -- loading ----------------------------------------------------------------------

    @classmethod
    async def load(cls, config: AsyncConfig, size: int, *,
                   progress: Optional[Callable[[float], None]] = None) -> "ModelPool":
        """``await ModelPool.load(config, size)``: a pool, opened."""
        pool = cls(config, size)
        await pool.open(progress=progress)
        return pool

    async def open(self, *, progress: Optional[Callable[[float], None]] = None) -> None:
        """Load the model once and create the members (``async with`` does it for you).

        Args:
            progress: called on the event loop with the load fraction in [0, 1].

        Raises:
            InsufficientMemoryError: the members' KV caches (``size x
                context_size`` tokens) cannot fit in the memory available;
                checked before any is allocated.

        **Cancellation**: cancelling the load leaves nothing loaded.
        """
        check_open(self._closed, "ModelPool")
        if self._model is not None:
            return
        self._enter()
        try:
            self._model = await anyio.to_thread.run_sync(load_model, self._config, progress,
                                                         limiter=self._limiters.current())
            try:
                cfg = self._config
                self._model._check_memory(
                    cfg.context_size, 1, min(512, cfg.context_size), cfg.flash_attention, count=self._target,
                    what=f"a ModelPool of {self._target} members of context_size={cfg.context_size}")
                await self._grow(self._target)
            except BaseException:
                await self.aclose()
                raise
        finally:
            self._loop.leave()

    def _enter(self) -> None:
        """Count a user of this loop (LoopConflictError if another loop uses the pool)."""
        if self._loop.enter():
            self._change = None  # an Event of the last loop (nobody waits on it)

    # -- lending ----------------------------------------------------------------------

    def acquire(self) -> "_Acquire":
        """Lend a member: ``async with pool.acquire() as m:`` or ``m = await pool.acquire()``.
        When every member is lent, wait for one (first come, first served);
        :meth:`acquire_nowait` does not wait.

        **Cancellation**: a task cancelled while waiting leaves the queue and
        holds nothing; a member handed to it in the same instant goes to the
        next waiter.
        """
        return _Acquire(self, True)

    def acquire_nowait(self) -> "_Acquire":
        """Lend a free member, or raise :class:`~mullama.BusyError` at once if
        none is (``async with pool.acquire_nowait() as m:``, or awaited)."""
        return _Acquire(self, False)

    async def _acquire(self, wait: bool) -> "PooledModel":
        self._check_open()
        self._enter()  # the lease is a user of this loop until it is released
        try:
            return await self._lend(wait)
        except BaseException:
            self._loop.leave()
            raise

    async def _lend(self, wait: bool) -> "PooledModel":
        await anyio.lowlevel.checkpoint()
        self._check_open()
        if self._available and not self._waiters:
            member = self._available.popleft()
        elif self._size() == 0:
            raise self._empty_error()
        elif not wait:
            raise BusyError(f"all {len(self._in_use)} members of the pool are in use (acquire_nowait)")
        else:
            waiter = _Waiter()
            self._waiters.append(waiter)
            try:
                await waiter.event.wait()
            except BaseException:
                if waiter.member is not None:  # handed over as we were cancelled: pass it on
                    self._in_use.discard(waiter.member)
                    if not self._put_back(waiter.member):
                        await self._retire(waiter.member)  # (shielded: AsyncContext.aclose is)
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)
                raise
            if waiter.member is None:
                raise waiter.error or ClosedError("the ModelPool was closed while waiting for a member")
            member = waiter.member
        self._in_use.add(member)
        return PooledModel(self, member)

    async def release(self, lease: "PooledModel") -> None:
        """Give a member back: its KV cache is reset (a member that fails the reset is replaced).

        Shielded and idempotent per lease. Call it from the event loop that
        acquired the member (LoopConflictError from another one).
        """
        if not isinstance(lease, PooledModel) or lease._pool is not self:
            raise InvalidConfigError("release() takes a member acquired from this pool")
        member = lease._member
        if member is None:
            return
        self._loop.check()
        lease._member = None
        try:
            await self._take_back(member)
        finally:
            self._loop.leave()

    async def _take_back(self, member: AsyncContext) -> None:
        with anyio.CancelScope(shield=True):
            try:
                if not self._closed and not member._closed:
                    await member.reset()  # counted as in use until it is clean
                    self._in_use.discard(member)
                    if not self._put_back(member):
                        await self._retire(member)
                    return
            except Exception as exc:  # a member we cannot reset is not lent again
                log.warning("pool member reset failed (%r): replacing it", exc)
                self.replaced += 1
            self._in_use.discard(member)
            await member.aclose()
            if not self._closed and self._size() < self._target:
                try:
                    await self._grow(1)
                except Exception as exc:
                    log.error("could not replace a pool member: %r", exc)
            self._changed()

    def _put_back(self, member: AsyncContext) -> bool:
        """An idle member (not counted in the size): to the first waiter or to
        the shelf, at once; False if the pool is above its target size (the
        caller then awaits ``_retire(member)``)."""
        if self._size() + 1 > self._target and not self._closed:
            return False
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.member = member
            self._in_use.add(member)
            waiter.event.set()
        else:
            self._available.append(member)
        return True

    async def _retire(self, member: AsyncContext) -> None:
        """Close an idle member (no longer counted in the size); its context is
        freed on a worker thread, never on the event loop."""
        self._retiring += 1
        try:
            await member.aclose()  # (shielded; it leaves _conversations)
        finally:
            self._retiring -= 1
            self._changed()

    def _changed(self) -> None:
        """The size or the target changed: wake resize() and aclose(); an empty
        pool with nothing being created fails its waiters."""
        if self._change is not None:
            self._change.set()
            self._change = None
        if self._size() == 0 and not self._closed:
            while self._waiters:
                waiter = self._waiters.popleft()
                waiter.error = self._empty_error()
                waiter.event.set()

    async def _wait_change(self) -> None:
        if self._change is None:
            self._change = anyio.Event()
        await self._change.wait()

    def _empty_error(self) -> Exception:
        why = f": creating a member failed ({self._create_error!r})" if self._create_error else ""
        return ContextCreationError(f"the pool has no members{why}; resize() it to try again")

    # -- size -------------------------------------------------------------------------

    def _size(self) -> int:
        return len(self._available) + len(self._in_use) + self._creating

    def stats(self) -> PoolStats:
        """Members available, in use and waiting tasks, now."""
        return PoolStats(self._size(), len(self._available), len(self._in_use), len(self._waiters))

    @property
    def target_size(self) -> int:
        """The size the pool grows or drains to (``stats().size`` is the size now)."""
        return self._target

    async def resize(self, size: int) -> None:
        """Grow to *size* members at once, or shrink by draining.

        Shrinking closes idle members now and members in use when they come
        back; it returns when the pool has *size* members, or when a later
        resize() set another size. Cancelling it stops the wait, not the
        shrink; a grow that fails or is cancelled keeps the members it made.
        """
        check_int("size", size, minimum=1, maximum=1024)
        self._check_open()
        self._enter()
        try:
            await self._resize(size)
        finally:
            self._loop.leave()

    async def _resize(self, size: int) -> None:
        self._target = size
        self._changed()
        if self._size() < size:
            try:
                await self._grow(size - self._size())
            except BaseException:
                if self._target == size:
                    self._target = self._size()
                raise
            return
        while self._size() > size and self._available:
            await self._retire(self._available.pop())
        while self._target == size and self._size() > size:
            await self._wait_change()
            self._check_open()

    async def _grow(self, n: int) -> None:
        cfg, model = self._config, self._model
        assert model is not None
        for _ in range(n):
            self._creating += 1
            try:
                ctx = await run_in_thread(
                    lambda: model.create_context(context_size=cfg.context_size, threads=cfg.threads,
                                                 adaptive_threads=cfg.adaptive_threads,
                                                 flash_attention=cfg.flash_attention),
                    limiter=self._limiters.current())
            except BaseException as exc:
                self._creating -= 1
                if isinstance(exc, Exception):
                    self._create_error = exc
                self._changed()
                raise
            self._creating -= 1
            if self._closed:  # closed meanwhile: aclose() waits for this
                ctx.close()
                self._changed()
                return
            self._create_error = None
            member = AsyncContext(self, ctx)
            self._conversations.add(member)
            if not self._put_back(member):
                await self._retire(member)
            self._changed()

    # -- the owner protocol of AsyncContext -------------------------------------------

    def _record_generation(self, ms: float) -> None:
        self._generations += 1
        self._generation_ms += ms

    def generation_stats(self) -> "tuple[int, float]":
        """Generations finished by members and their total wall time in milliseconds."""
        return self._generations, self._generation_ms

    # -- model-wide -------------------------------------------------------------------

    @property
    def config(self) -> AsyncConfig:
        return self._config

    @property
    def model(self) -> Model:
        """The shared sync :class:`~mullama.Model`."""
        self._check_open()
        assert self._model is not None
        return self._model

    def _check_open(self) -> None:
        check_open(self._closed, "ModelPool")
        if self._model is None:
            raise ClosedError("the ModelPool is not open yet: use `async with ModelPool(...)` or ModelPool.load()")

    def is_ready(self) -> bool:
        """True while the pool is open (False once it, or its sync :attr:`model`, is closed)."""
        return self._model is not None and not self._closed and not self._model.closed

    def kv_used(self) -> int:
        """KV cells its members' conversations hold (all members, lent or not)."""
        return sum(m.kv_used() for m in list(self._conversations) if not m.closed)

    async def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> List[int]:
        return await run_in_thread(self.model.tokenize, text, add_bos, special, limiter=self._limiters.current())

    async def detokenize(self, tokens: Sequence[int]) -> str:
        return await run_in_thread(self.model.detokenize, tokens, limiter=self._limiters.current())

    async def model_info(self) -> ModelInfo:
        model = self.model
        return await run_in_thread(lambda: model.info, limiter=self._limiters.current())

    async def aclose(self) -> None:
        """Close every member (stopping what runs on it) and free the model.

        Shielded and idempotent; waiting tasks get ClosedError; later calls raise ClosedError.
        LoopConflictError (and nothing closed) if another event loop is using the pool.
        """
        if self._closed:
            return
        self._loop.check()
        for member in self._conversations:
            member._loop.check()
        self._closed = True
        with anyio.CancelScope(shield=True):
            while self._waiters:
                self._waiters.popleft().event.set()  # member None: ClosedError
            self._changed()  # a waiting resize() raises ClosedError
            while self._creating:  # a context being created is closed by _grow
                await self._wait_change()
            for member in list(self._conversations):
                await member.aclose()
            while self._retiring:  # a member being retired is closed by _retire
                await self._wait_change()
            self._available.clear()
            if self._model is not None:
                await anyio.to_thread.run_sync(self._model.close, limiter=self._limiters.current())

    async def __aenter__(self) -> "ModelPool":
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        s = self.stats()
        state = "closed" if self._closed else f"size={s.size} available={s.available} in_use={s.in_use}"
        return f"<mullama.aio.ModelPool {state}>"

    @property
    def closed(self) -> bool:
        return self._closed

    def _holds(self) -> bool:
        return not self._closed and self._model is not None  # opened

    def _close_unclosed(self) -> None:
        self._closed = True
        if self._model is not None:
            self._model.close()  # and every member's context


class _Acquire:
    """What :meth:`ModelPool.acquire` returns: awaitable, and an async context manager."""

    __slots__ = ("_pool", "_wait", "_lease", "_used")

    def __init__(self, pool: ModelPool, wait: bool) -> None:
        self._pool = pool
        self._wait = wait
        self._lease: Optional[PooledModel] = None
        self._used = False

    def _use_once(self) -> None:
        # (asyncpg's rule: one acquire() is awaited or entered once; a second use would
        # lend a second member that the first `async with` exit never gives back)
        if self._used:
            raise InvalidConfigError("this pool.acquire() was already used: call pool.acquire() again")
        self._used = True

    def __await__(self) -> Generator[Any, None, "PooledModel"]:
        self._use_once()
        return self._pool._acquire(self._wait).__await__()

    async def __aenter__(self) -> "PooledModel":
        self._use_once()
        self._lease = await self._pool._acquire(self._wait)
        return self._lease

    async def __aexit__(self, *exc: object) -> None:
        assert self._lease is not None
        await self._pool.release(self._lease)


class PooledModel(Uncopyable):
    """A member lent by a :class:`ModelPool`: a conversation of its own until released.

    Calls continue the member's conversation (its KV cache) until it goes
    back to the pool, where it is reset. After release the lease is dead:
    every call raises :class:`~mullama.ClosedError`, so a stale reference
    cannot reach a member now lent to someone else.
    """

    __slots__ = ("_pool", "_member")
    _copy_hint = "acquire another member (a copy would release this one twice)"

    def __init__(self, pool: ModelPool, member: AsyncContext) -> None:
        self._pool = pool
        self._member: Optional[AsyncContext] = member

    def _m(self) -> AsyncContext:
        member = self._member
        if member is None:
            raise ClosedError("this pool member was released; acquire another")
        return member

    def generate_stream(self, prompt: Prompt,
                        config: Optional[StreamConfig] = None) -> AsyncContextManager[TokenStream]:
        """``async with m.generate_stream(prompt, config) as stream: async for tok in stream:``."""
        return self._m().generate_stream(prompt, config)

    async def generate(self, prompt: Prompt, max_tokens: Optional[int] = None,
                       config: Optional[StreamConfig] = None) -> Completion:
        """Continue the conversation and return the :class:`~mullama.Completion`."""
        return await self._m().generate(prompt, max_tokens, config)

    async def generate_text(self, prompt: Prompt, max_tokens: Optional[int] = None,
                            config: Optional[StreamConfig] = None) -> str:
        """The convenience: :meth:`generate`'s text alone."""
        return (await self.generate(prompt, max_tokens, config)).text

    def chat_stream(self, messages: Sequence[Message], config: Optional[StreamConfig] = None, *,
                    template: Optional[str] = None, **tools: Any) -> AsyncContextManager[TokenStream]:
        """Stream the answer to *messages* (see :meth:`AsyncContext.chat_stream`;
        *tools* are :meth:`AsyncContext.chat`'s tool-calling keywords)."""
        return self._m().chat_stream(messages, config, template=template, **tools)

    async def chat(self, messages: Sequence[Message], config: Optional[StreamConfig] = None, *,
                   max_tokens: Optional[int] = None, template: Optional[str] = None, **tools: Any) -> ChatCompletion:
        """The answer to *messages* as a :class:`~mullama.ChatCompletion`; the
        conversation keeps it (see :meth:`AsyncContext.chat`)."""
        return await self._m().chat(messages, config, max_tokens=max_tokens, template=template, **tools)

    def chat_deltas(self, messages: Sequence[Message], config: Optional[StreamConfig] = None, *,
                    max_tokens: Optional[int] = None, template: Optional[str] = None,
                    **tools: Any) -> AsyncContextManager[AsyncIterator[ChatDelta]]:
        """Stream the answer as :class:`~mullama.ChatDelta` pieces (see :meth:`AsyncContext.chat_deltas`)."""
        return self._m().chat_deltas(messages, config, max_tokens=max_tokens, template=template, **tools)

    async def process_batch(self, prompt: Prompt) -> int:
        """Evaluate *prompt* into the conversation without generating."""
        return await self._m().process_batch(prompt)

    async def save_state(self, path: PathLike) -> None:
        await self._m().save_state(path)

    async def load_state(self, path: PathLike) -> None:
        await self._m().load_state(path)

    async def reset(self) -> None:
        await self._m().reset()

    async def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> List[int]:
        self._m()
        return await self._pool.tokenize(text, add_bos, special)

    async def detokenize(self, tokens: Sequence[int]) -> str:
        self._m()
        return await self._pool.detokenize(tokens)

    async def model_info(self) -> ModelInfo:
        self._m()
        return await self._pool.model_info()

    @property
    def n_past(self) -> int:
        """Tokens in this member's conversation."""
        return self._m().n_past

    def kv_used(self) -> int:
        """KV cells this member's conversation holds."""
        return self._m().kv_used()

    async def release(self) -> None:
        """Give the member back to its pool (same as ``await pool.release(m)``)."""
        await self._pool.release(self)

    def __repr__(self) -> str:
        return f"<mullama.aio.PooledModel {'released' if self._member is None else f'{self.n_past} tokens'}>"
