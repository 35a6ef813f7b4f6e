"""Run the server: uvicorn on asyncio, or hypercorn's trio worker on trio.

The same ASGI application runs under both; only the HTTP server around it
differs. The listening socket is bound here first, so port 0 picks a free
port and the address is known before the model has loaded.

Both servers get the same limits against clients that misbehave:

- **keep-alive timeout**: a connection must complete a request's head within
  ``keep_alive_timeout`` seconds of opening, or of its previous response
  (else it is closed; uvicorn on its own never closes a half-sent head);
- **io timeout** (the app's ``io_timeout``): a response that makes no progress
  for that long closes the connection (hypercorn shields its socket writes
  from cancellation, so a client that stops reading held its request, its slot
  and the shutdown forever; uvicorn's close waits for unsent bytes for ever);
  a request body must arrive within it;
- **connection limit**: beyond ``max_connections`` open connections new ones
  are closed at once, so slow clients cannot take every file descriptor (the
  soft descriptor limit is raised to the hard one first);
- accept() failing for lack of descriptors is logged once a minute, not per
  retry; the ``mullama`` loggers print at ``log_level``;
- responses go out without Nagle's delay (TCP_NODELAY).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import socket
import threading
import time
from typing import Any, Callable, Iterator, Optional, Set

from .._config import SERVER_KEEP_ALIVE_TIMEOUT_S as KEEP_ALIVE_TIMEOUT_S, check_int
from .._errors import InvalidConfigError, MullamaError
from ._app import OpenAIApp

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["serve", "BACKENDS"]

#: event loop -> the ASGI server that runs on it
BACKENDS = {"asyncio": "uvicorn", "trio": "hypercorn"}
#: file descriptors kept free of connections: the model, logs, and two per request (its hand-off)
FD_RESERVE = 64

log = logging.getLogger("mullama.server")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on *host*:*port* (0 = any free port)."""
    check_int("port", port, minimum=0, maximum=65535)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
    # sockets that say they are TCP, and accepted sockets inherit it; without it a
    # response's head and body went out ~40 ms apart. (Set on the listener too.)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise MullamaError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    return sock


class Limits:
    """What `serve` bounds for every connection (see the module's docstring)."""

    def __init__(self, keep_alive_timeout: float, io_timeout: float, max_connections: int,
                 graceful_timeout: float) -> None:
        self.keep_alive_timeout = keep_alive_timeout
        self.io_timeout = io_timeout
        self.max_connections = max_connections
        self.graceful_timeout = graceful_timeout
        self.connections = 0
        self.refused = 0
        #: set when the graceful shutdown's time is up: every write is cut short
        self.closing = False
        self.writes: Set[Any] = set()  # cancel scopes of writes in progress (trio)

    def admit(self) -> bool:
        if self.connections >= self.max_connections:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning("%d connections are open (max_connections); closing new ones (%d so far)",
                            self.connections, self.refused)
            return False
        self.connections += 1
        return True


def default_max_connections(app: OpenAIApp) -> int:
    """Connections the descriptor limit leaves room for (after raising it to
    the hard limit): all but FD_RESERVE and two per request slot and queue place."""
    limit = _raise_fd_limit()
    cfg = app._config
    reserve = FD_RESERVE + 2 * (cfg.max_concurrent + cfg.max_queue)
    return max(8, limit - reserve)


def _raise_fd_limit() -> int:
    try:
        import resource
    except ImportError:  # not on Unix
        return 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max(soft, 65536) if hard == resource.RLIM_INFINITY else hard
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft


class _AcceptErrorsOnce(logging.Filter):
    """accept() failing for lack of file descriptors is logged once a minute,
    with a count and without a traceback, instead of on every retry (asyncio
    retries each second, trio ten times a second, each with a traceback)."""

    PREFIXES = ("socket.accept() out of system resource", "accept returned")
    #: asyncio schedules a retry of the accept for each failure; the ones still pending when the
    #: listener closes (at shutdown) fail on its closed socket (ValueError: fd -1): nothing was lost
    STALE_RETRY = "Exception in callback BaseSelectorEventLoop._start_serving("

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        self.interval = interval
        self._next = 0.0
        self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith(self.STALE_RETRY) and record.exc_info and isinstance(record.exc_info[1], ValueError):
            return False
        if not msg.startswith(self.PREFIXES):
            return True
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return False
        more = f" ({self._held} more since the last report)" if self._held else ""
        self._next, self._held = now + self.interval, 0
        record.msg = ("cannot accept connections: out of file descriptors or memory; retrying (reported once a "
                      f"minute{more}; lower max_connections or raise `ulimit -n`)")
        record.args = ()
        record.exc_info = record.exc_text = None
        return True


@contextlib.contextmanager
def _logging(log_level: str) -> Iterator[None]:
    """The mullama loggers print at *log_level* (library code has only a NullHandler);
    accept errors are reported once a minute."""
    logger = logging.getLogger("mullama")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s: %(message)s"))
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(log_level.upper())
    once = _AcceptErrorsOnce()
    noisy = [logging.getLogger("asyncio"), logging.getLogger("trio.serve_listeners")]
    for other in noisy:
        other.addFilter(once)
    try:
        yield
    finally:
        for other in noisy:
            other.removeFilter(once)
        logger.removeHandler(handler)
        logger.setLevel(previous)


def serve(app: OpenAIApp, *, host: str = "127.0.0.1", port: int = 8000, backend: str = "asyncio",
          log_level: str = "info", access_log: bool = True, graceful_timeout: float = 10.0,
          keep_alive_timeout: float = KEEP_ALIVE_TIMEOUT_S, max_connections: Optional[int] = None,
          on_ready: Optional[Callable[[str], None]] = None) -> None:
    """Serve *app* until SIGINT or SIGTERM.

    Args:
        backend: ``"asyncio"`` (uvicorn) or ``"trio"`` (hypercorn's trio worker).
        graceful_timeout: seconds open requests get to finish at shutdown; then
            they are cancelled (also those writing to a client that stopped reading).
        keep_alive_timeout: seconds a connection may stay without a complete
            request head (after opening, or between requests).
        max_connections: open connections beyond which new ones are closed at
            once (default: what the file descriptor limit leaves room for).
        on_ready: called with the server's URL once the model is loaded.

    Raises:
        MullamaError: the port is taken, the server package is missing, or the
            model failed to load.
    """
    if backend not in BACKENDS:
        raise InvalidConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if not (isinstance(graceful_timeout, (int, float)) and graceful_timeout >= 0):
        raise InvalidConfigError(f"graceful_timeout must be a number of seconds >= 0, got {graceful_timeout!r}")
    if not (isinstance(keep_alive_timeout, (int, float)) and keep_alive_timeout > 0):
        raise InvalidConfigError(f"keep_alive_timeout must be a number of seconds > 0, got {keep_alive_timeout!r}")
    if max_connections is not None:
        check_int("max_connections", max_connections, minimum=1)
    # (the app bounds body reads and its own writes by its io_timeout; the servers' writes get the same)
    limits = Limits(keep_alive_timeout, app.io_timeout, max_connections or default_max_connections(app),
                    graceful_timeout)
    package = BACKENDS[backend]
    try:
        __import__(package)
        if backend == "trio":
            __import__("trio")
    except ImportError:
        raise MullamaError(f"serving on {backend} needs {package}: pip install 'mullama[server]'") from None
    sock = bind(host, port)
    shown_host = f"[{host}]" if ":" in host else host
    url = f"http://{shown_host}:{sock.getsockname()[1]}"
    if on_ready is not None:
        app.on_startup = lambda: on_ready(url)
    with _logging(log_level):
        log.info("limits: a request head within %g s (keep-alive), no write or body read stalled over %g s, "
                 "at most %d connections", limits.keep_alive_timeout, limits.io_timeout, limits.max_connections)
        if backend == "asyncio":
            _serve_uvicorn(app, sock, log_level, access_log, limits)
        else:
            _serve_hypercorn(app, sock, log_level, access_log, limits)


def _uvicorn_protocol(limits: Limits) -> type:
    """uvicorn's h11 protocol with the connection limit, a deadline for each
    request head (uvicorn's keep-alive timer is disarmed by any byte received),
    and a bound on a response the client does not take."""
    import asyncio

    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _timer: Optional[asyncio.TimerHandle] = None
        _counted = False

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.app = self._wrap(self.app)

        def _wrap(self, app: Any) -> Any:
            async def wrapped(scope: Any, receive: Any, send: Any) -> None:
                # A response the app gave up on (its client stopped reading: io_timeout)
                # is aborted: uvicorn's close() would wait for the client to take the
                # unsent bytes first, holding the connection for ever.
                # (One that never started is uvicorn's to answer, with a 500.)
                started = complete = False

                async def tracked(message: Any) -> None:
                    nonlocal started, complete
                    started = True
                    await send(message)
                    if message["type"] == "http.response.body" and not message.get("more_body", False):
                        complete = True

                try:
                    await app(scope, receive, tracked if scope["type"] == "http" else send)
                finally:
                    if started and not complete and self.transport is not None:
                        self.transport.abort()

            return wrapped

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if not limits.admit():
                transport.abort()
                return
            self._counted = True
            self._arm(limits.keep_alive_timeout, self._head_timeout)

        def connection_lost(self, exc: Optional[Exception]) -> None:
            self._disarm()
            if self._counted:
                self._counted = False
                limits.connections -= 1
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:  # a new request's head is complete
                self._disarm()

        def on_response_complete(self) -> None:
            cycle = self.cycle
            super().on_response_complete()
            if self.cycle is cycle:  # (else the next, pipelined, request has begun)
                self._after_response()

        def _after_response(self) -> None:
            unsent = self.transport.get_write_buffer_size()
            if unsent:  # the client has not taken it all yet (also when the connection is closing)
                self._arm(limits.io_timeout, self._check_unsent, unsent)
            elif not self.transport.is_closing():
                self._arm(limits.keep_alive_timeout, self._head_timeout)

        def _check_unsent(self, before: int) -> None:
            # a client taking its response slowly gets io_timeout for each bit of progress
            if self.transport.get_write_buffer_size() >= before:
                self.transport.abort()  # none: a close would wait for it for ever
            else:
                self._after_response()

        def _head_timeout(self) -> None:
            self._timer = None
            try:
                self.timeout_keep_alive_handler()
            except h11.LocalProtocolError:  # (the client is in the middle of something)
                self.transport.abort()

        def _arm(self, delay: float, callback: Callable[..., None], *args: Any) -> None:
            self._disarm()
            self._timer = self.loop.call_later(delay, callback, *args)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    return Protocol


def _serve_uvicorn(app: OpenAIApp, sock: socket.socket, log_level: str, access_log: bool, limits: Limits) -> None:
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown, so the
            # process dies of the signal; a shutdown asked for is a clean exit here
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, loop="asyncio", lifespan="on", log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=limits.graceful_timeout, ws="none",  # type: ignore[arg-type]
                            http=_uvicorn_protocol(limits),
                            # seconds, fractions too: uvicorn hands them to loop.call_later (typed int)
                            timeout_keep_alive=limits.keep_alive_timeout)  # type: ignore[arg-type]
    server = Server(config)
    try:
        server.run(sockets=[sock])
    except SystemExit:  # uvicorn exits the process when the lifespan startup fails
        pass
    finally:
        sock.close()
    if not server.started:
        raise _startup_failed(app)


#: hypercorn's trio TCPServer, replaced once (see _install_hypercorn_server)
_HYPERCORN_CHUNK = 1 << 16


def _install_hypercorn_server() -> None:
    """Install, once, a subclass of hypercorn's trio TCPServer (hypercorn builds
    one per connection from hypercorn.trio.run's global) that applies the
    :class:`Limits` found on its config as ``mullama_limits``, and behaves as
    hypercorn's own for any other config: the connection limit, and its
    shielded socket writes bounded by io_timeout without progress and cut at
    the end of the graceful shutdown (a client that stops reading can hold
    neither its request nor the shutdown)."""
    import hypercorn.trio.run as hypercorn_run
    import trio
    from hypercorn.events import Closed, RawData
    from hypercorn.trio.tcp_server import TCPServer

    if getattr(hypercorn_run.TCPServer, "_mullama", False):  # type: ignore[attr-defined]
        return

    class Server(TCPServer):
        _mullama = True

        async def run(self) -> None:
            limits: Optional[Limits] = getattr(self.config, "mullama_limits", None)
            if limits is None:
                await super().run()
                return
            if not limits.admit():
                await self.stream.aclose()
                return
            try:
                await super().run()
            finally:
                limits.connections -= 1

        async def _read_data(self) -> None:
            await super()._read_data()
            if getattr(self.config, "mullama_limits", None) is not None:
                # Nothing more will be read (the client closed its side, or the connection
                # was closed): hypercorn's idle timer would keep the connection, and its
                # place under max_connections, until the keep-alive timeout.
                await self.idle_task.stop()

        async def protocol_send(self, event: Any) -> None:
            limits: Optional[Limits] = getattr(self.config, "mullama_limits", None)
            if limits is None or not isinstance(event, RawData):
                await super().protocol_send(event)
                return
            gone = False
            async with self.send_lock:
                # shielded as in hypercorn (a write cut in the middle breaks the HTTP
                # stream), but each piece must go out within io_timeout, and all is cut
                # when the graceful shutdown's time is up
                with trio.CancelScope(shield=True) as scope:
                    if limits.closing:
                        scope.cancel()
                    limits.writes.add(scope)
                    try:
                        data = memoryview(event.data)
                        for i in range(0, len(data), _HYPERCORN_CHUNK):
                            scope.deadline = trio.current_time() + limits.io_timeout
                            await self.stream.send_all(data[i:i + _HYPERCORN_CHUNK])
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        gone = True
                    finally:
                        limits.writes.discard(scope)
            if gone or scope.cancelled_caught:
                with trio.CancelScope(shield=True):
                    await self.stream.aclose()
                    await self.protocol.handle(Closed())

    hypercorn_run.TCPServer = Server  # type: ignore[attr-defined,misc]


def _serve_hypercorn(app: OpenAIApp, sock: socket.socket, log_level: str, access_log: bool, limits: Limits) -> None:
    import trio
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve
    from hypercorn.utils import LifespanFailureError

    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns the socket from here on
    config.loglevel = log_level.upper()
    config.accesslog = "-" if access_log else None
    config.graceful_timeout = limits.graceful_timeout
    config.keep_alive_timeout = limits.keep_alive_timeout
    config.startup_timeout = 24 * 3600  # a big model may take long to load: the lifespan waits for it

    async def until_signal() -> None:
        if threading.current_thread() is not threading.main_thread():
            await trio.sleep_forever()  # signals reach the main thread only: run until cancelled
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                return

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async def shutdown_trigger() -> None:
                await until_signal()
                nursery.start_soon(cut_writes)

            async def cut_writes() -> None:
                # hypercorn cancels open requests after graceful_timeout; they get one
                # second more for their last events, then their writes are cut
                await trio.sleep(limits.graceful_timeout + 1.0)
                limits.closing = True
                for scope in list(limits.writes):
                    scope.cancel()

            await hypercorn_serve(app, config, shutdown_trigger=shutdown_trigger)  # type: ignore[arg-type]
            nursery.cancel_scope.cancel()

    _install_hypercorn_server()
    config.mullama_limits = limits  # type: ignore[attr-defined]
    try:
        trio.run(main)
    except BaseException as exc:
        group = exc if isinstance(exc, BaseExceptionGroup) else BaseExceptionGroup("", [exc])
        failed, _ = group.split(LifespanFailureError)
        if failed is None:
            raise
        raise _startup_failed(app) from None


def _startup_failed(app: OpenAIApp) -> MullamaError:
    cause = app.startup_error
    if isinstance(cause, MullamaError):
        return type(cause)(f"the server did not start: {cause}")
    return MullamaError(f"the server did not start: {cause!r}" if cause else "the server did not start")
