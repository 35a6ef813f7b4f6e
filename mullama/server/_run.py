"""Run the server: uvicorn on asyncio, or hypercorn's trio worker on trio.

The same ASGI application runs under both; only the HTTP server around it
differs. The listening socket is bound here first, so port 0 picks a free
port and the address is known before the model has loaded.

Both servers get the same limits against clients that misbehave:

- **keep-alive timeout**: a connection must complete a request's head within
  ``keep_alive_timeout`` seconds of opening, or of its previous response
  (else it is closed; uvicorn on its own never closes a half-sent head);
- **io timeout**: a response write that makes no progress for ``io_timeout``
  seconds closes the connection (hypercorn shields its socket writes from
  cancellation, so a client that stops reading held its request, its slot and
  the shutdown forever); the app applies the same bound to request bodies;
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

from .._config import check_int
from .._errors import InvalidConfigError, MullamaError
from ._app import IO_TIMEOUT_S, OpenAIApp

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["serve", "BACKENDS"]

#: event loop -> the ASGI server that runs on it
BACKENDS = {"asyncio": "uvicorn", "trio": "hypercorn"}
#: default seconds an idle connection may stay open without a complete request head
KEEP_ALIVE_TIMEOUT_S = 5.0
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
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 65536)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


class _AcceptErrorsOnce(logging.Filter):
    """accept() failing for lack of file descriptors is logged once a minute,
    with a count and without a traceback, instead of on every retry (asyncio
    retries each second, trio ten times a second, each with a traceback)."""

    PREFIXES = ("socket.accept() out of system resource", "accept returned")

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        self.interval = interval
        self._next = 0.0
        self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.PREFIXES):
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
          keep_alive_timeout: float = KEEP_ALIVE_TIMEOUT_S, io_timeout: Optional[float] = None,
          max_connections: Optional[int] = None, on_ready: Optional[Callable[[str], None]] = None) -> None:
    """Serve *app* until SIGINT or SIGTERM.

    Args:
        backend: ``"asyncio"`` (uvicorn) or ``"trio"`` (hypercorn's trio worker).
        graceful_timeout: seconds open requests get to finish at shutdown; then
            they are cancelled (also those writing to a client that stopped reading).
        keep_alive_timeout: seconds a connection may stay without a complete
            request head (after opening, or between requests).
        io_timeout: seconds a response write may make no progress before the
            connection is closed (default: the app's ``io_timeout``).
        max_connections: open connections beyond which new ones are closed at
            once (default: what the file descriptor limit leaves room for).
        on_ready: called with the server's URL once the model is loaded.

    Raises:
        MullamaError: the port is taken, the server package is missing, or the
            model failed to load.
    """
    if backend not in BACKENDS:
        raise InvalidConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    for name, value in (("graceful_timeout", graceful_timeout), ("keep_alive_timeout", keep_alive_timeout),
                        ("io_timeout", io_timeout)):
        if value is not None and not (isinstance(value, (int, float)) and value >= 0):
            raise InvalidConfigError(f"{name} must be a number of seconds >= 0, got {value!r}")
    if max_connections is not None:
        check_int("max_connections", max_connections, minimum=1)
    limits = Limits(keep_alive_timeout, io_timeout if io_timeout is not None else app.io_timeout,
                    max_connections or default_max_connections(app), graceful_timeout)
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
    """uvicorn's h11 protocol with the connection limit and a deadline for each
    request head (uvicorn's keep-alive timer is disarmed by any byte received)."""
    import asyncio

    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _head_timer: Optional[asyncio.TimerHandle] = None
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
                    if message["type"] == "http.response.body" and not message.get("more_body", False):
                        complete = True
                    await send(message)

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
            self._arm_head_timer()

        def connection_lost(self, exc: Optional[Exception]) -> None:
            self._disarm_head_timer()
            if self._counted:
                self._counted = False
                limits.connections -= 1
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the request's head is complete
                self._disarm_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_timer()

        def _arm_head_timer(self) -> None:
            self._disarm_head_timer()
            self._head_timer = self.loop.call_later(limits.keep_alive_timeout, self._head_timeout)

        def _head_timeout(self) -> None:
            if self.transport.get_write_buffer_size():
                # it has not even taken the last response (the kernel's buffers are full):
                # a close would wait for it for ever
                self.transport.abort()
            else:
                self.timeout_keep_alive_handler()

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

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
                            http=_uvicorn_protocol(limits), timeout_keep_alive=limits.keep_alive_timeout)
    server = Server(config)
    try:
        server.run(sockets=[sock])
    except SystemExit:  # uvicorn exits the process when the lifespan startup fails
        pass
    finally:
        sock.close()
    if not server.started:
        raise _startup_failed(app)


def _hypercorn_tcp_server(limits: Limits) -> type:
    """hypercorn's trio TCPServer with the connection limit, and with its
    shielded socket writes bounded: by io_timeout, and at the end of the
    graceful shutdown (a client that stops reading can hold neither)."""
    import trio
    from hypercorn.events import Closed, RawData
    from hypercorn.trio.tcp_server import TCPServer

    class Server(TCPServer):
        async def run(self) -> None:
            if not limits.admit():
                await self.stream.aclose()
                return
            try:
                await super().run()
            finally:
                limits.connections -= 1

        async def protocol_send(self, event: Any) -> None:
            if not isinstance(event, RawData):
                await super().protocol_send(event)
                return
            gone = False
            async with self.send_lock:
                # shielded as in hypercorn (a write cut in the middle breaks the HTTP
                # stream), but with a deadline, and cancelled when shutdown's time is up
                with trio.CancelScope(shield=True, deadline=trio.current_time() + limits.io_timeout) as scope:
                    if limits.closing:
                        scope.cancel()
                    limits.writes.add(scope)
                    try:
                        await self.stream.send_all(event.data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        gone = True
                    finally:
                        limits.writes.discard(scope)
            if gone or scope.cancelled_caught:
                with trio.CancelScope(shield=True):
                    await self.stream.aclose()
                await self.protocol.handle(Closed())

    return Server


def _serve_hypercorn(app: OpenAIApp, sock: socket.socket, log_level: str, access_log: bool, limits: Limits) -> None:
    import hypercorn.trio.run as hypercorn_run
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
                # hypercorn cancels open requests after graceful_timeout; their
                # shielded writes are cancelled here at the same moment
                await trio.sleep(limits.graceful_timeout)
                limits.closing = True
                for scope in list(limits.writes):
                    scope.cancel()

            await hypercorn_serve(app, config, shutdown_trigger=shutdown_trigger)  # type: ignore[arg-type]
            nursery.cancel_scope.cancel()

    # hypercorn builds one TCPServer per connection from this module's global
    original = hypercorn_run.TCPServer  # type: ignore[attr-defined]
    hypercorn_run.TCPServer = _hypercorn_tcp_server(limits)  # type: ignore[attr-defined]
    try:
        trio.run(main)
    except BaseException as exc:
        group = exc if isinstance(exc, BaseExceptionGroup) else BaseExceptionGroup("", [exc])
        failed, _ = group.split(LifespanFailureError)
        if failed is None:
            raise
        raise _startup_failed(app) from None
    finally:
        hypercorn_run.TCPServer = original  # type: ignore[attr-defined]


def _startup_failed(app: OpenAIApp) -> MullamaError:
    cause = app.startup_error
    if isinstance(cause, MullamaError):
        return type(cause)(f"the server did not start: {cause}")
    return MullamaError(f"the server did not start: {cause!r}" if cause else "the server did not start")
