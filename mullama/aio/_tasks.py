"""TaskManager: named, supervised workers on a task group of their own.

It owns the workers' lifecycle (spawn, restart after a failure, stop, the
:class:`WorkerStatus` of each) and the two ready-made worker bodies: a
generation worker fed from a stream of prompts (a :class:`GenerationResult`
per request) and a metrics collector (which samples, say, a Runtime's
``metrics()``; the Runtime itself is :mod:`._runtime`'s).
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterable, Awaitable, Callable, Dict, Optional, Tuple, Union

import anyio
import anyio.abc

from .._config import StreamConfig, check_float, check_int
from .._context import Prompt
from .._generation import Completion
from .._errors import ClosedError, InvalidConfigError, MullamaError
from ._model import AsyncModel
from ._pool import ModelPool
from ._stream import unwrap_single

__all__ = ["TaskManager", "WorkerStatus", "GenerationResult"]

log = logging.getLogger("mullama.aio")


@dataclass(frozen=True)
class WorkerStatus:
    """A snapshot of one worker of a :class:`TaskManager`.

    Attributes:
        name: the worker's name.
        kind: ``"worker"``, ``"generation"`` or ``"metrics"``.
        state: ``"running"``, ``"completed"``, ``"failed"`` or ``"cancelled"``.
        restarts: times it was restarted after failing.
        processed: items handled (requests of a generation worker, samples of
            a metrics collector).
        error: the last exception it raised, or None.
        started_at / finished_at: ``time.monotonic()`` values (finished_at None while running).
    """

    name: str
    kind: str
    state: str
    restarts: int
    processed: int
    error: Optional[BaseException]
    started_at: float
    finished_at: Optional[float]


@dataclass(frozen=True)
class GenerationResult:
    """What a generation worker sends for each request: a completion or the error it raised."""

    prompt: Prompt
    completion: Optional[Completion]
    error: Optional[Exception]


GenerationRequest = Union[Prompt, Tuple[Prompt, Optional[StreamConfig]]]


class _Worker:
    def __init__(self, name: str, kind: str) -> None:
        self.name = name
        self.kind = kind
        self.state = "running"
        self.restarts = 0
        self.processed = 0
        self.error: Optional[BaseException] = None
        self.started_at = time.monotonic()
        self.finished_at: Optional[float] = None
        self.scope = anyio.CancelScope()
        self.done = anyio.Event()

    def status(self) -> WorkerStatus:
        return WorkerStatus(self.name, self.kind, self.state, self.restarts, self.processed, self.error,
                            self.started_at, self.finished_at)


class TaskManager:
    """Named, supervised workers on a task group of their own.

    A worker that raises is recorded in its :class:`WorkerStatus` (and logged),
    restarted up to ``max_restarts`` times, and never takes down the manager or
    the other workers. Leaving ``async with`` stops the workers still running::

        async with TaskManager() as tm:
            tm.spawn_worker("poller", poll, url, max_restarts=3)
            tm.spawn_generation_worker("gen-1", model, requests_rx, results_tx)
            tm.spawn_metrics_collector("metrics", runtime, interval=1.0, sink=print)
            ...
            print(tm.worker_status())
    """

    def __init__(self) -> None:
        self._tg: Optional[anyio.abc.TaskGroup] = None
        self._workers: Dict[str, _Worker] = {}
        self._samples: Dict[str, Any] = {}
        self._closed = False

    async def __aenter__(self) -> "TaskManager":
        if self._tg is not None or self._closed:
            raise MullamaError("a TaskManager can be entered once")
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(self, typ: Any, exc: Any, tb: Any) -> Optional[bool]:
        self._closed = True  # no new workers from here on
        try:
            await self.stop_all()
        finally:
            assert self._tg is not None
            with unwrap_single():  # the body's own exception comes out as itself
                suppress = await self._tg.__aexit__(typ, exc, tb)
        return suppress

    # -- spawning -------------------------------------------------------------------

    def spawn_worker(self, name: str, fn: Callable[..., Awaitable[Any]], *args: Any, max_restarts: int = 0,
                     restart_delay: float = 0.1) -> None:
        """Run ``await fn(*args)`` as the worker *name*.

        Args:
            max_restarts: restarts allowed after the worker raises (0: none).
            restart_delay: seconds between a failure and the restart.
        """
        if not callable(fn):
            raise InvalidConfigError(f"fn must be an async callable, got {type(fn).__name__}")
        self._spawn(name, "worker", lambda w: fn(*args), max_restarts, restart_delay)

    def _spawn(self, name: str, kind: str, body: Callable[[_Worker], Awaitable[Any]], max_restarts: int,
               restart_delay: float = 0.1, cleanup: Optional[Callable[[], Awaitable[Any]]] = None) -> None:
        if self._tg is None or self._closed:
            raise ClosedError("the TaskManager is not running: use `async with TaskManager() as tm:`")
        if not isinstance(name, str) or not name:
            raise InvalidConfigError(f"a worker name must be a non-empty str, got {name!r}")
        old = self._workers.get(name)
        if old is not None and old.state == "running":
            raise InvalidConfigError(f"a worker named {name!r} is already running")
        check_int("max_restarts", max_restarts, minimum=0)
        check_float("restart_delay", restart_delay, minimum=0.0)
        worker = _Worker(name, kind)
        self._workers[name] = worker
        self._tg.start_soon(_supervise, worker, body, max_restarts, restart_delay, cleanup, name=name)

    def spawn_generation_worker(self, name: str, model: Union[AsyncModel, ModelPool],
                                requests: AsyncIterable[GenerationRequest],
                                results: Optional[anyio.abc.ObjectSendStream[GenerationResult]] = None, *,
                                max_restarts: int = 0) -> None:
        """A worker that completes each request it receives, one at a time.

        Args:
            model: an :class:`AsyncModel`, or a :class:`ModelPool` (a member is
                acquired for each request).
            requests: prompts, or ``(prompt, StreamConfig)`` pairs, e.g. a memory
                object receive stream; the worker ends when it ends.
            results: where each :class:`GenerationResult` goes, in request order.

        The worker owns both streams and closes them when it ends (give each
        worker its own clones).

        A request that fails (a prompt too long, a timeout) yields a result
        with its error, and the worker goes on.
        """
        if not isinstance(model, (AsyncModel, ModelPool)):
            raise InvalidConfigError(f"model must be an AsyncModel or a ModelPool, got {type(model).__name__}")
        async def close_streams() -> None:
            for stream in (requests, results):
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()

        self._spawn(name, "generation", lambda w: _generation_loop(w, model, requests, results), max_restarts,
                    cleanup=close_streams)

    def spawn_metrics_collector(self, name: str, source: Any, interval: float = 1.0,
                                sink: Optional[Callable[[Any], Any]] = None) -> None:
        """A worker that samples ``source.metrics()`` (a :class:`~mullama.aio.Runtime`),
        ``source.stats()`` (a :class:`ModelPool`) or ``source()`` every
        *interval* seconds and passes each sample to *sink* (sync or async).

        The latest sample is also kept: :meth:`last_sample`.
        """
        check_float("interval", interval, minimum=1e-3)
        if hasattr(source, "metrics"):
            read = source.metrics
        elif hasattr(source, "stats"):
            read = source.stats
        elif callable(source):
            read = source
        else:
            raise InvalidConfigError("source must have metrics() or stats(), or be callable")
        self._samples.pop(name, None)
        self._spawn(name, "metrics", lambda w: _metrics_loop(w, self._samples, read, interval, sink), 0)

    def last_sample(self, name: str) -> Any:
        """The latest sample of the metrics collector *name* (None before the first)."""
        return self._samples.get(name)

    # -- supervision ----------------------------------------------------------------

    def worker_status(self) -> Dict[str, WorkerStatus]:
        """Every worker spawned so far (running or ended), by name."""
        return {name: w.status() for name, w in self._workers.items()}

    async def wait(self, name: str) -> WorkerStatus:
        """Wait until the worker *name* ends; its final status."""
        w = self._get(name)
        await w.done.wait()
        return w.status()

    async def stop(self, name: str) -> WorkerStatus:
        """Cancel the worker *name* and wait until it has ended."""
        w = self._get(name)
        w.scope.cancel()
        with anyio.CancelScope(shield=True):
            await w.done.wait()
        return w.status()

    async def stop_all(self) -> None:
        """Cancel every running worker and wait until all have ended (shielded)."""
        with anyio.CancelScope(shield=True):
            for w in list(self._workers.values()):
                w.scope.cancel()
            for w in list(self._workers.values()):
                await w.done.wait()

    def _get(self, name: str) -> _Worker:
        try:
            return self._workers[name]
        except KeyError:
            raise InvalidConfigError(f"no worker named {name!r}") from None


async def _supervise(w: _Worker, body: Callable[[_Worker], Awaitable[Any]], max_restarts: int,
                     delay: float, cleanup: Optional[Callable[[], Awaitable[Any]]]) -> None:
    try:
        with w.scope:
            while True:
                try:
                    await body(w)
                    w.state = "completed"
                    return
                except Exception as exc:  # recorded and logged: a failing worker is never lost
                    w.error = exc
                    log.error("worker %r failed", w.name, exc_info=exc)
                    if w.restarts >= max_restarts:
                        w.state = "failed"
                        return
                    w.restarts += 1
                await anyio.sleep(delay)
    finally:
        if w.state == "running":
            w.state = "cancelled"
        try:
            if cleanup is not None:
                with anyio.CancelScope(shield=True):
                    await cleanup()
        finally:
            w.finished_at = time.monotonic()
            w.done.set()


async def _generation_loop(w: _Worker, model: Union[AsyncModel, ModelPool],
                           requests: AsyncIterable[GenerationRequest],
                           results: Optional[anyio.abc.ObjectSendStream[GenerationResult]]) -> None:
    async for item in requests:
        if isinstance(item, tuple) and len(item) == 2 and (item[1] is None or isinstance(item[1], StreamConfig)):
            prompt, config = item
        else:  # a prompt: text, or token ids (a tuple of ints among them)
            prompt, config = item, None
        try:
            if isinstance(model, ModelPool):
                async with model.acquire() as member:
                    completion = await member.generate(prompt, config=config)
            else:
                completion = await model.generate(prompt, config=config)
            result = GenerationResult(prompt, completion, None)
        except Exception as exc:  # this request's error, sent in its place; the worker goes on
            result = GenerationResult(prompt, None, exc)
        w.processed += 1
        if results is not None:
            await results.send(result)


async def _metrics_loop(w: _Worker, samples: Dict[str, Any], read: Callable[[], Any], interval: float,
                        sink: Optional[Callable[[Any], Any]]) -> None:
    while True:
        sample = read()
        samples[w.name] = sample
        w.processed += 1
        if sink is not None:
            out = sink(sample)
            if inspect.isawaitable(out):
                await out
        await anyio.sleep(interval)
