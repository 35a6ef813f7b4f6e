"""Run the server: uvicorn on asyncio, or hypercorn's trio worker on trio.

The same ASGI application runs under both; only the HTTP server around it
differs. The listening socket is bound here first, so port 0 picks a free
port and the address is known before the model has loaded.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import socket
import threading
from typing import Callable, Iterator, Optional

from .._config import check_int
from .._errors import InvalidConfigError, MullamaError
from ._app import OpenAIApp

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["serve", "BACKENDS"]

#: event loop -> the ASGI server that runs on it
BACKENDS = {"asyncio": "uvicorn", "trio": "hypercorn"}


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on *host*:*port* (0 = any free port)."""
    check_int("port", port, minimum=0, maximum=65535)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise MullamaError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    return sock


def serve(app: OpenAIApp, *, host: str = "127.0.0.1", port: int = 8000, backend: str = "asyncio",
          log_level: str = "info", access_log: bool = True, graceful_timeout: float = 10.0,
          on_ready: Optional[Callable[[str], None]] = None) -> None:
    """Serve *app* until SIGINT or SIGTERM.

    Args:
        backend: ``"asyncio"`` (uvicorn) or ``"trio"`` (hypercorn's trio worker).
        graceful_timeout: seconds open requests get to finish at shutdown.
        on_ready: called with the server's URL once the model is loaded.

    Raises:
        MullamaError: the port is taken, the server package is missing, or the
            model failed to load.
    """
    if backend not in BACKENDS:
        raise InvalidConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
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
    if backend == "asyncio":
        _serve_uvicorn(app, sock, log_level, access_log, graceful_timeout)
    else:
        _serve_hypercorn(app, sock, log_level, access_log, graceful_timeout)


def _serve_uvicorn(app: OpenAIApp, sock: socket.socket, log_level: str, access_log: bool,
                   graceful_timeout: float) -> None:
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
                            timeout_graceful_shutdown=graceful_timeout, ws="none")  # type: ignore[arg-type]
    server = Server(config)
    try:
        server.run(sockets=[sock])
    except SystemExit:  # uvicorn exits the process when the lifespan startup fails
        pass
    finally:
        sock.close()
    if not server.started:
        raise _startup_failed(app)


def _serve_hypercorn(app: OpenAIApp, sock: socket.socket, log_level: str, access_log: bool,
                     graceful_timeout: float) -> None:
    import trio
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve
    from hypercorn.utils import LifespanFailureError

    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns the socket from here on
    config.loglevel = log_level.upper()
    config.accesslog = "-" if access_log else None
    config.graceful_timeout = graceful_timeout
    config.startup_timeout = 24 * 3600  # a big model may take long to load: the lifespan waits for it

    async def until_signal() -> None:
        if threading.current_thread() is not threading.main_thread():
            await trio.sleep_forever()  # signals reach the main thread only: run until cancelled
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                return

    async def main() -> None:
        await hypercorn_serve(app, config, shutdown_trigger=until_signal)  # type: ignore[arg-type]

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
