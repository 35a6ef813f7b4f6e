"""mullama on Ray Serve: the OpenAI-compatible server of ``mullama serve``,
as replicas on a Ray cluster behind Serve's HTTP proxy.

Each replica loads its model once (an :class:`~mullama.aio.AsyncModel` on the
batching engine) and serves :class:`~mullama.server.OpenAIApp`, the same ASGI
application as ``mullama serve``. A client that disconnects cancels its
request on the replica, which stops the generation inside llama.cpp within
about one token and frees its slot. Serve autoscales replicas on their ongoing
requests (by default a replica is full when its engine's slots are), replaces
a replica whose model stops accepting requests (health checks), and Ray's
metrics get each replica's engine metrics. Several models: one deployment
each, behind a router that reads the request's ``"model"``.

From Python::

    from mullama.aio import AsyncConfig
    from mullama.ray import AppConfig, ModelDeployment, deployed

    config = AppConfig(models=(ModelDeployment(AsyncConfig("model.gguf", threads=1), replicas=2),), port=8000)
    with deployed(config) as url:      # starts (or joins) a Ray cluster and deploys
        ...                            # OpenAI clients use f"{url}/v1"

or from the shell: ``mullama serve --ray --replicas 2`` (one model) or
``mullama serve --ray --config mullama.yaml`` (see :func:`load_config`).

Needs the ``ray`` extra: ``pip install "mullama[ray]"``. Nothing else in
mullama imports Ray.
"""

from __future__ import annotations

try:
    import ray
    from ray import serve
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError("mullama.ray needs Ray Serve: pip install 'mullama[ray]'") from _exc

import logging
import os
import re
import signal
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from .._errors import MullamaError
from ._serve import REPLICA_HEADER, ModelReplica, ReplicaUnhealthyError, Router, build_app
from ._spec import AppConfig, ModelDeployment, load_config, replica_threads

__all__ = ["AppConfig", "ModelDeployment", "load_config", "build_app", "deployed", "run", "ModelReplica", "Router",
           "DeploymentError", "ReplicaUnhealthyError", "REPLICA_HEADER", "replica_threads"]

log = logging.getLogger("mullama.ray")


class DeploymentError(MullamaError):
    """Ray Serve could not deploy the application (a replica failed to start:
    a model file missing on a node, not enough memory, ...)."""


@contextmanager
def deployed(config: AppConfig, *, ray_init: Optional[dict] = None) -> Iterator[str]:
    """Deploy ``config`` on Ray Serve for the ``with`` block; yields the base URL.

    It joins ``config.address`` (or the cluster this process is connected to
    already), or starts a local Ray cluster, starts Serve's HTTP proxy on
    ``config.host:config.port`` if Serve is not running there yet, and deploys
    the application, waiting until every replica has loaded its model (a
    local cluster runs its workers at the usual priority, ``RAY_worker_niceness``
    0, rather than Ray's 15, unless that is set already). At the
    end it deletes the application; it also shuts down Serve and Ray if it
    started them. ``ray_init``: more arguments of ``ray.init``.
    """
    started_ray = not ray.is_initialized()
    if started_ray:
        if config.address is None:
            # Ray runs its workers at niceness 15 by default: replicas serving requests would give
            # their cores to any other work on the machine (a local cluster is started here)
            os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(address=config.address, **(ray_init or {}))
    started_serve = False
    try:
        # (private, but the only way to ask whether Serve runs without starting it)
        client = serve.context._connect(raise_if_no_controller_running=False)
        if client is None:
            serve.start(http_options={"host": config.host, "port": config.port})
            started_serve = True
            client = serve.context._connect()
        http = client.http_config
        if (http.host, http.port) != (config.host, config.port):
            log.warning("Serve runs on this cluster already, its HTTP proxy at %s:%s (not %s:%s as configured): "
                        "the application is served there", http.host, http.port, config.host, config.port)
        try:
            try:
                serve.run(build_app(config), name=config.name, route_prefix=config.route_prefix, blocking=False)
            except RuntimeError as exc:  # (Serve's "Deploying application ... failed": a replica did not start)
                raise DeploymentError(f"Ray Serve could not deploy {config.name!r}: {_why_failed(config.name)}"
                                      ) from exc
            host = "127.0.0.1" if http.host in ("0.0.0.0", "::") else http.host
            yield f"http://{host}:{http.port}{config.route_prefix.rstrip('/')}"
        finally:
            serve.delete(config.name)  # (also a failed application: nothing of it is left)
    finally:
        if started_serve:
            serve.shutdown()
        if started_ray:
            ray.shutdown()


def _why_failed(app: str) -> str:
    """The errors of a failed application's deployments, from Serve's status: the last
    line of each replica constructor's traceback (``ModelNotFoundError: ...``)."""
    try:
        status = serve.status().applications[app]
    except Exception:
        return "see the replicas' errors in the log"
    why = []
    for name, d in status.deployments.items():
        lines = [x.strip() for x in (d.message or "").splitlines() if re.match(r"\s*[\w.]+(Error|Exception): ", x)]
        if lines:
            why.append(f"{name}: {lines[-1]}")
    return "; ".join(why) or status.message or "see the replicas' errors in the log"


def run(config: AppConfig, *, on_ready: Optional[Callable[[str], Any]] = None,
        ray_init: Optional[dict] = None) -> None:
    """Deploy ``config`` (:func:`deployed`) and serve until SIGINT or SIGTERM,
    then delete the application (and stop the Ray processes :func:`deployed`
    started). A signal during the deployment stops it the same way, with
    :class:`KeyboardInterrupt`."""
    def interrupt(*_: Any) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with deployed(config, ray_init=ray_init) as url:
            for sig in previous:  # (again: ray.init sets a SIGTERM handler of its own)
                signal.signal(sig, interrupt)
            if on_ready is not None:
                on_ready(url)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                log.info("stopping: deleting the application")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
