"""Runtime: the async counterpart of Mullama's MullamaRuntime.

It owns what a process-wide runtime holds: a task group for spawned tasks and
their :class:`TaskHandle` outcomes, the cap and names of blocking-call threads,
the models and pools it loads (their generations feed :class:`RuntimeMetrics`),
and the graceful shutdown that closes them. Supervised, restartable workers
are :mod:`._tasks`' TaskManager.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Dict, Generic, List, Optional, Tuple, TypeVar, Union

import anyio
import anyio.abc
import anyio.to_thread

from .._config import check_float, check_int, default_threads
from .._errors import ClosedError, InvalidConfigError, MullamaError
from ._model import AsyncConfig, AsyncModel, PathLike
from ._pool import ModelPool
from ._stream import unwrap_single

__all__ = ["Runtime", "RuntimeMetrics", "TaskHandle"]

log = logging.getLogger("mullama.aio")

T = TypeVar("T")

#: the TaskHandle of the runtime task running now (shutdown() must not wait for itself)
_current_task: "contextvars.ContextVar[Optional[TaskHandle[Any]]]" = contextvars.ContextVar(
    "mullama_runtime_task", default=None)


@dataclass(frozen=True)
class RuntimeMetrics:
    """A snapshot of a :class:`Runtime`.

    Attributes:
        active_tasks: spawned tasks and blocking calls running now.
        completed_tasks: spawned tasks and blocking calls that have ended (any outcome).
        worker_threads: llama.cpp compute threads of each model the runtime loads.
        blocking_threads: threads running :meth:`Runtime.run_blocking` calls now.
        total_generations: generations finished by the runtime's models and pools.
        avg_generation_ms: their mean wall time (0.0 before the first).
        uptime_seconds: time since the runtime started.
    """

    active_tasks: int
    completed_tasks: int
    worker_threads: int
    blocking_threads: int
    total_generations: int
    avg_generation_ms: float
    uptime_seconds: float


class TaskHandle(Generic[T]):
    """A task spawned on a :class:`Runtime`: its outcome is kept here, never lost.

    A task that raises does not disturb the runtime or its other tasks; the
    error is re-raised by :meth:`wait` / :meth:`result`, and logged when the
    task ends if nobody is waiting for it then.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._scope = anyio.CancelScope()
        self._done = anyio.Event()
        self._value: Any = None
        self._error: Optional[BaseException] = None
        self._cancelled = False
        self._waiters = 0

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Cancel the task (it ends at its next checkpoint)."""
        self._scope.cancel()

    def result(self) -> T:
        """The task's return value; re-raises its error. The task must be done."""
        if not self.done:
            raise MullamaError(f"task {self.name!r} is still running")
        if self._cancelled:
            raise MullamaError(f"task {self.name!r} was cancelled")
        if self._error is not None:
            raise self._error
        return self._value

    async def wait(self) -> T:
        """Wait for the task to end and return :meth:`result`."""
        self._waiters += 1
        try:
            await self._done.wait()
        finally:
            self._waiters -= 1
        return self.result()

    async def _run(self, fn: Callable[..., Awaitable[T]], args: Tuple[Any, ...]) -> None:
        returned = False
        token = _current_task.set(self)
        try:
            with self._scope:
                self._value = await fn(*args)
                returned = True
        except Exception as exc:  # kept on the handle, not thrown into the task group
            self._error = exc
        finally:
            _current_task.reset(token)
            self._cancelled = not returned and self._error is None  # by its own scope or an outer one
            self._done.set()
            if self._error is not None and not self._waiters:
                log.error("runtime task %r failed", self.name, exc_info=self._error)


class Runtime:
    """The async counterpart of Mullama's MullamaRuntime, on anyio.

    It runs tasks on a task group of its own, caps blocking calls, loads
    models and pools whose generations it counts, and shuts down gracefully::

        async with Runtime(worker_threads=2, max_blocking_threads=8) as rt:
            model = await rt.load_model(path, max_concurrent=4)
            handle = rt.spawn(model.generate, "Hello", 16)
            print(await handle.wait(), rt.metrics())

    Args:
        worker_threads: llama.cpp compute threads of each model loaded through
            the runtime (default: the cores this process may use).
        max_blocking_threads: how many :meth:`run_blocking` calls run at once.
        thread_name: prefix of the names of the threads the runtime starts
            (engine drivers and blocking calls).
    """

    def __init__(self, *, worker_threads: Optional[int] = None, max_blocking_threads: int = 16,
                 thread_name: str = "mullama") -> None:
        self.worker_threads = default_threads() if worker_threads is None else check_int(
            "worker_threads", worker_threads, minimum=1, maximum=1024)
        check_int("max_blocking_threads", max_blocking_threads, minimum=1, maximum=4096)
        if not isinstance(thread_name, str) or not thread_name:
            raise InvalidConfigError(f"thread_name must be a non-empty str, got {thread_name!r}")
        self.thread_name = thread_name
        self._limiter = anyio.CapacityLimiter(max_blocking_threads)
        self._tg: Optional[anyio.abc.TaskGroup] = None
        self._tasks: "set[TaskHandle[Any]]" = set()
        self._resources: List[Union[AsyncModel, ModelPool]] = []
        self._active = 0
        self._completed = 0
        self._blocking_seq = 0
        self._started: Optional[float] = None
        self._stopping = False
        self._stopped = False

    # -- lifetime -------------------------------------------------------------------

    async def __aenter__(self) -> "Runtime":
        if self._started is not None:
            raise MullamaError("a Runtime can be entered once")
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._started = time.monotonic()
        return self

    async def __aexit__(self, typ: Any, exc: Any, tb: Any) -> Optional[bool]:
        try:
            await self.shutdown(timeout=None if exc is None else 0)
        finally:
            assert self._tg is not None
            with unwrap_single():  # the body's own exception comes out as itself
                suppress = await self._tg.__aexit__(typ, exc, tb)
        return suppress

    def is_running(self) -> bool:
        """True between entering the runtime and the start of its shutdown."""
        return self._started is not None and not self._stopping

    def _check_running(self) -> anyio.abc.TaskGroup:
        if self._started is None:
            raise ClosedError("the Runtime is not started: use `async with Runtime(...) as rt:`")
        if self._stopping:
            raise ClosedError("the Runtime is shutting down")
        assert self._tg is not None
        return self._tg

    async def shutdown(self, timeout: Optional[float] = None) -> None:
        """Stop taking work, let running tasks finish, then close the models.

        Args:
            timeout: seconds to wait for running tasks (None: as long as they
                take); those still running then are cancelled.

        Shielded from cancellation; idempotent.
        """
        if timeout is not None:
            check_float("timeout", timeout, minimum=0.0)
        if self._stopped or self._started is None:
            return
        self._stopping = True
        others = [t for t in self._tasks if t is not _current_task.get()]  # called from a task: not itself
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(timeout):
                for task in others:
                    await task._done.wait()
            for task in others:
                task.cancel()
            for task in others:
                await task._done.wait()
            for res in reversed(self._resources):
                await res.aclose()
            self._stopped = True

    # -- work -----------------------------------------------------------------------

    def spawn(self, fn: Callable[..., Awaitable[T]], *args: Any, name: Optional[str] = None) -> TaskHandle[T]:
        """Run ``await fn(*args)`` as a task of the runtime; returns its :class:`TaskHandle`."""
        tg = self._check_running()
        handle: TaskHandle[T] = TaskHandle(name or str(getattr(fn, "__qualname__", repr(fn))))
        self._tasks.add(handle)
        self._active += 1

        async def run() -> None:
            try:
                await handle._run(fn, args)
            finally:
                self._active -= 1
                self._completed += 1
                self._tasks.discard(handle)

        tg.start_soon(run, name=handle.name)
        return handle

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run the blocking ``fn(*args)`` on a named worker thread, at most
        ``max_blocking_threads`` at once.

        **Cancellation**: waiting for a thread can be cancelled; a call that
        has started runs to its end (a thread cannot be interrupted).
        """
        self._check_running()
        self._blocking_seq += 1
        name = f"{self.thread_name}-blocking-{self._blocking_seq}"

        def call() -> T:
            thread = threading.current_thread()
            old, thread.name = thread.name, name
            try:
                return fn(*args)
            finally:
                thread.name = old

        self._active += 1
        try:
            return await anyio.to_thread.run_sync(call, limiter=self._limiter)
        finally:
            self._active -= 1
            self._completed += 1

    async def load_model(self, path_or_config: Union[PathLike, AsyncConfig], **options: Any) -> AsyncModel:
        """Load an :class:`AsyncModel` with ``worker_threads`` threads; the
        runtime counts its generations and closes it at shutdown."""
        self._check_running()
        config = self._config(path_or_config, options)
        model = await AsyncModel.load_with_config(config, progress=options.get("progress"),
                                                  thread_name=f"{self.thread_name}-engine-{len(self._resources) + 1}")
        return await self._own(model)

    async def open_pool(self, path_or_config: Union[PathLike, AsyncConfig], size: int,
                        **options: Any) -> ModelPool:
        """Open a :class:`ModelPool` of *size* members; closed at shutdown."""
        self._check_running()
        config = self._config(path_or_config, options)
        return await self._own(await ModelPool.load(config, size, progress=options.get("progress")))

    def _config(self, path_or_config: Union[PathLike, AsyncConfig], options: Dict[str, Any]) -> AsyncConfig:
        options = {k: v for k, v in options.items() if k != "progress"}
        if isinstance(path_or_config, AsyncConfig):
            if options:
                raise InvalidConfigError("pass either an AsyncConfig or options, not both")
            return path_or_config
        options.setdefault("threads", self.worker_threads)
        return AsyncConfig(model_path=path_or_config, **options)

    async def _own(self, res: Any) -> Any:
        if self._stopping:  # shut down while loading: do not leak it
            await res.aclose()
            raise ClosedError("the Runtime shut down while loading")
        self._resources.append(res)
        return res

    # -- metrics --------------------------------------------------------------------

    def metrics(self) -> RuntimeMetrics:
        """Counters of tasks, threads and generations, now."""
        count, total_ms = 0, 0.0
        for res in self._resources:
            c, ms = res.generation_stats()
            count += c
            total_ms += ms
        return RuntimeMetrics(
            active_tasks=self._active,
            completed_tasks=self._completed,
            worker_threads=self.worker_threads,
            blocking_threads=int(self._limiter.borrowed_tokens),
            total_generations=count,
            avg_generation_ms=total_ms / count if count else 0.0,
            uptime_seconds=time.monotonic() - self._started if self._started is not None else 0.0,
        )
