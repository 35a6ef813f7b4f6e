"""What a Ray Serve application of mullama is made of: its models and the
server-wide options, from Python or from a YAML/JSON config file. No Ray here:
these are plain values, checked when they are made."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .._config import SERVER_IO_TIMEOUT_S, SpeculativeConfig, default_threads
from .._errors import InvalidConfigError
from ..aio import AsyncConfig

__all__ = ["ModelDeployment", "AppConfig", "load_config", "replica_threads", "ROUTER_NAME"]

#: the name of the router deployment of an application of several models (no model may take it)
ROUTER_NAME = "mullama-router"

_AUTOSCALING_KEYS = frozenset({
    "min_replicas", "initial_replicas", "max_replicas", "target_ongoing_requests", "metrics_interval_s",
    "look_back_period_s", "smoothing_factor", "upscale_smoothing_factor", "downscale_smoothing_factor",
    "upscaling_factor", "downscaling_factor", "downscale_delay_s", "downscale_to_zero_delay_s", "upscale_delay_s",
    "aggregation_function", "policy"})


def replica_threads(replicas: int) -> int:
    """The default threads of a replica: this machine's usable cores, shared by ``replicas``."""
    return max(1, default_threads() // max(1, replicas))


@dataclass(frozen=True)
class ModelDeployment:
    """One model of the application: one Ray Serve deployment whose replicas
    each load it once (an :class:`~mullama.aio.AsyncModel` on the batching engine).

    Args:
        config: what each replica loads. Its ``threads`` are each replica's
            compute threads, and the CPUs Ray reserves for it (``AsyncConfig``
            defaults them to the cores of the machine that makes the config;
            :func:`load_config` and ``mullama serve --ray`` to those cores
            divided by the model's replicas).
        name: the model id clients send as ``"model"`` (default: the file's stem).
        replicas: a fixed number of replicas, when ``autoscaling`` is None.
        autoscaling: Ray Serve's ``autoscaling_config`` (``min_replicas``,
            ``max_replicas``, ``target_ongoing_requests``, ...). Its
            ``target_ongoing_requests`` defaults to ``max_ongoing_requests``:
            a replica whose engine slots are all busy asks for another.
        num_cpus: the CPUs Ray reserves for each replica (default: ``threads``).
        max_ongoing_requests: the requests Serve sends one replica at once
            (default: its engine's slots, ``max_concurrent``). Beyond, requests
            wait at Serve's proxy, which gives each to the first replica with
            a free slot (rather than to a busy replica's own queue while
            another replica is idle). Each proxy lets ``max_queue`` times the
            replicas (``max_replicas`` when autoscaled) wait
            (``max_queued_requests``), and answers 503 beyond. Requests that
            generate nothing (``/health``, ``/v1/models``) count too: probe
            Serve's own ``/-/healthz`` rather than ``/health``.
        chat_template: as :class:`~mullama.server.OpenAIApp`'s.
        speculative: as :class:`~mullama.server.OpenAIApp`'s.
        health_check_period_s: seconds between Serve's health checks of a replica.
        deployment_options: any other option of ``serve.deployment``
            (``max_queued_requests``, ``graceful_shutdown_timeout_s``, ...),
            overriding what is derived above.
    """

    config: AsyncConfig
    name: Optional[str] = None
    replicas: int = 1
    autoscaling: Optional[Mapping[str, Any]] = None
    num_cpus: Optional[float] = None
    max_ongoing_requests: Optional[int] = None
    chat_template: Optional[str] = None
    speculative: Optional[SpeculativeConfig] = None
    health_check_period_s: float = 5.0
    deployment_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.config, AsyncConfig):
            raise InvalidConfigError(f"config must be an AsyncConfig, got {type(self.config).__name__}")
        if self.name is None:
            object.__setattr__(self, "name", Path(self.config.model_path).stem)
        if not isinstance(self.name, str) or not self.name:
            raise InvalidConfigError(f"name must be a non-empty string, got {self.name!r}")
        if self.name == ROUTER_NAME:
            raise InvalidConfigError(f"{ROUTER_NAME!r} is the router's name; give the model another")
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 1:
            raise InvalidConfigError(f"replicas must be an integer of 1 or more, got {self.replicas!r}")
        if self.autoscaling is not None:
            if not isinstance(self.autoscaling, Mapping):
                raise InvalidConfigError(f"autoscaling must be a mapping of Ray Serve's autoscaling_config "
                                         f"fields, got {self.autoscaling!r}")
            unknown = sorted(set(self.autoscaling) - _AUTOSCALING_KEYS)
            if unknown:
                raise InvalidConfigError(f"unknown autoscaling field(s) {unknown}; known: {sorted(_AUTOSCALING_KEYS)}")
        if self.num_cpus is not None and not (isinstance(self.num_cpus, (int, float)) and self.num_cpus >= 0):
            raise InvalidConfigError(f"num_cpus must be a number of CPUs, 0 or more; got {self.num_cpus!r}")
        if self.max_ongoing_requests is not None and (
                isinstance(self.max_ongoing_requests, bool) or not isinstance(self.max_ongoing_requests, int)
                or self.max_ongoing_requests < 1):
            raise InvalidConfigError(f"max_ongoing_requests must be an integer of 1 or more, "
                                     f"got {self.max_ongoing_requests!r}")
        if not (isinstance(self.health_check_period_s, (int, float)) and self.health_check_period_s > 0):
            raise InvalidConfigError(f"health_check_period_s must be a positive number of seconds, "
                                     f"got {self.health_check_period_s!r}")
        if not isinstance(self.deployment_options, Mapping):
            raise InvalidConfigError(f"deployment_options must be a mapping, got {self.deployment_options!r}")
        if self.speculative is not None and not isinstance(self.speculative, SpeculativeConfig):
            raise InvalidConfigError(f"speculative must be a SpeculativeConfig or None, got {self.speculative!r}")

    def most_replicas(self) -> int:
        """The replicas it runs, or may run when autoscaled."""
        return self.replicas if self.autoscaling is None else int(self.autoscaling.get("max_replicas", 1))

    def serve_options(self) -> Dict[str, Any]:
        """The options of ``serve.deployment`` this model's deployment gets."""
        cfg = self.config
        opts: Dict[str, Any] = {
            "name": self.name,
            "ray_actor_options": {"num_cpus": float((cfg.threads or 1) if self.num_cpus is None else self.num_cpus)},
            "max_ongoing_requests": self.max_ongoing_requests or cfg.max_concurrent,
            "max_queued_requests": max(1, cfg.max_queue * self.most_replicas()),  # (Serve has no 0)
            "health_check_period_s": float(self.health_check_period_s),
        }
        if self.autoscaling is None:
            opts["num_replicas"] = self.replicas
        opts.update(self.deployment_options)
        if self.autoscaling is not None:  # (its target: the max_ongoing_requests in effect)
            opts["autoscaling_config"] = {"target_ongoing_requests": opts["max_ongoing_requests"], **self.autoscaling}
        return opts


@dataclass(frozen=True)
class AppConfig:
    """A whole application: its models, and what the HTTP API does for all of them.

    Args:
        models: one or more :class:`ModelDeployment` with distinct names. With
            one, its replicas answer HTTP themselves; with more, a router
            deployment reads each request's ``"model"`` and streams it through
            that model's replicas.
        api_key, cors_origins, io_timeout, any_model_name: as
            :class:`~mullama.server.OpenAIApp`'s (``any_model_name`` needs one model).
        host, port: where Serve's HTTP proxy listens.
        address: the Ray cluster to join (``"auto"``, ``"ray://host:10001"``);
            None starts a local one.
        name, route_prefix: the Serve application's name and route prefix.
    """

    models: Tuple[ModelDeployment, ...]
    api_key: Optional[str] = None
    cors_origins: Tuple[str, ...] = ()
    io_timeout: float = SERVER_IO_TIMEOUT_S
    any_model_name: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    address: Optional[str] = None
    name: str = "mullama"
    route_prefix: str = "/"

    def __post_init__(self) -> None:
        models = (self.models,) if isinstance(self.models, ModelDeployment) else tuple(self.models)
        object.__setattr__(self, "models", models)
        if not models or not all(isinstance(m, ModelDeployment) for m in models):
            raise InvalidConfigError("models must be one or more ModelDeployment")
        names = [str(m.name) for m in models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise InvalidConfigError(f"two models are named {dup[0]!r}; give each a distinct name")
        if self.any_model_name and len(models) > 1:
            raise InvalidConfigError("any_model_name needs a single model: with several, \"model\" picks one")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise InvalidConfigError(f"port must be 1-65535 (Serve's proxy listens on a port given), "
                                     f"got {self.port!r}")
        if not (isinstance(self.io_timeout, (int, float)) and self.io_timeout > 0):
            raise InvalidConfigError(f"io_timeout must be a positive number of seconds, got {self.io_timeout!r}")
        if not isinstance(self.route_prefix, str) or not self.route_prefix.startswith("/"):
            raise InvalidConfigError(f"route_prefix must start with '/', got {self.route_prefix!r}")
        origins = (self.cors_origins,) if isinstance(self.cors_origins, str) else tuple(self.cors_origins)
        object.__setattr__(self, "cors_origins", origins)

    def app_options(self) -> Dict[str, Any]:
        """The :class:`~mullama.server.OpenAIApp` options every model's replicas share."""
        return {"api_key": self.api_key, "cors_origins": self.cors_origins, "io_timeout": self.io_timeout,
                "any_model_name": self.any_model_name}


_MODEL_KEYS = {f.name for f in fields(ModelDeployment)} - {"config", "speculative"}
_CONFIG_KEYS = {f.name for f in fields(AsyncConfig)} - {"model_path"}
_APP_KEYS = {f.name for f in fields(AppConfig)} - {"models"}


def _model_from(entry: Any, where: str, base: Path) -> ModelDeployment:
    if not isinstance(entry, Mapping):
        raise InvalidConfigError(f"{where} must be a mapping, got {entry!r}")
    entry = dict(entry)
    path = entry.pop("path", None) or entry.pop("model_path", None)
    if not isinstance(path, str) or not path:
        raise InvalidConfigError(f"{where} needs 'path', the model's .gguf file")
    model_opts = {k: entry.pop(k) for k in list(entry) if k in _MODEL_KEYS}
    speculative = entry.pop("speculative", None)
    unknown = sorted(set(entry) - _CONFIG_KEYS)
    if unknown:
        raise InvalidConfigError(f"{where}: unknown field(s) {unknown}; known: path, "
                                 f"{', '.join(sorted(_MODEL_KEYS | _CONFIG_KEYS | {'speculative'}))}")
    for key in ("draft_model",):
        if isinstance(entry.get(key), str):
            entry[key] = str(base / os.path.expanduser(entry[key]))
    if speculative is True:
        speculative = SpeculativeConfig()
    elif isinstance(speculative, Mapping):
        try:
            speculative = SpeculativeConfig(**speculative)
        except TypeError as exc:
            raise InvalidConfigError(f"{where}.speculative: {exc}") from None
    elif speculative not in (None, False):
        raise InvalidConfigError(f"{where}.speculative must be true, false or a mapping, got {speculative!r}")
    try:
        config = AsyncConfig(model_path=str(base / os.path.expanduser(path)), **entry)
        model = ModelDeployment(config=config, speculative=speculative or None, **model_opts)
    except TypeError as exc:
        raise InvalidConfigError(f"{where}: {exc}") from None
    if "threads" not in entry:  # this machine's cores, shared by the model's replicas
        model = replace(model, config=replace(config, threads=replica_threads(model.most_replicas())))
    return model


def load_config(source: Union[str, "os.PathLike[str]", Mapping[str, Any]],
                **overrides: Any) -> AppConfig:
    """An :class:`AppConfig` from a YAML or JSON file (or a mapping of the same shape)::

        port: 8000
        models:
          - path: models/a.gguf      # relative to the file
            name: small
            threads: 1               # compute threads of each replica (its num_cpus too)
            replicas: 2
          - path: models/b.gguf
            threads: 2
            autoscaling: {min_replicas: 1, max_replicas: 4}

    Model entries take :class:`ModelDeployment`'s fields and
    :class:`~mullama.aio.AsyncConfig`'s (``path`` for ``model_path``);
    the top level :class:`AppConfig`'s. ``overrides`` (not None) replace top-level fields.
    """
    base = Path.cwd()
    if isinstance(source, Mapping):
        data: Any = dict(source)
    else:
        path = Path(source)
        base = path.resolve().parent
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidConfigError(f"cannot read the config file {str(path)!r}: {exc}") from None
        try:
            if path.suffix == ".json":
                data = json.loads(text)
            else:
                import yaml  # type: ignore[import-untyped]  # (Ray's own dependency)

                data = yaml.safe_load(text)
        except ValueError as exc:
            raise InvalidConfigError(f"{str(path)!r} is not valid JSON: {exc}") from None
        except Exception as exc:  # yaml.YAMLError
            raise InvalidConfigError(f"{str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise InvalidConfigError(f"the config must be a mapping with 'models', got {type(data).__name__}")
    data = dict(data)
    entries = data.pop("models", None)
    unknown = sorted(set(data) - _APP_KEYS)
    if unknown:
        raise InvalidConfigError(f"unknown top-level field(s) {unknown}; known: models, {', '.join(sorted(_APP_KEYS))}")
    if not isinstance(entries, Sequence) or isinstance(entries, str) or not entries:
        raise InvalidConfigError("the config needs 'models': a list of one or more models")
    unknown = sorted(set(overrides) - _APP_KEYS)
    if unknown:
        raise InvalidConfigError(f"unknown override(s) {unknown}; known: {', '.join(sorted(_APP_KEYS))}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    models: List[ModelDeployment] = [_model_from(e, f"models[{i}]", base) for i, e in enumerate(entries)]
    return AppConfig(models=tuple(models), **data)
