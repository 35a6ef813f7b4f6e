"""The ``mullama`` command: pull the default model, run a prompt, describe a model."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import asdict
from typing import Any, Dict, List, Optional

from ._errors import InvalidConfigError, MullamaError
from ._config import SERVER_IO_TIMEOUT_S as IO_TIMEOUT_S, SERVER_KEEP_ALIVE_TIMEOUT_S as KEEP_ALIVE_TIMEOUT_S


def _cmd_pull(args: argparse.Namespace) -> int:
    from ._cache import pull

    print(pull(progress=not args.quiet))
    return 0


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """``\\n``, ``\\t``, ``\\r`` and ``\\\\`` as typed in a shell, as the characters they name."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


def _model_path(args: argparse.Namespace) -> str:
    from ._cache import default_model_path

    return os.path.expanduser(args.model) if args.model else str(default_model_path(progress=True))


def _cmd_run(args: argparse.Namespace) -> int:
    from ._config import StreamConfig
    from ._errors import ContextOverflowError
    from ._model import Model

    path = _model_path(args)
    config = StreamConfig(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        stop=tuple(unescape(s) for s in args.stop or ()),
    )
    with Model.load(path) as model:
        ctx = model.create_context(context_size=args.context_size, threads=args.threads,
                                   adaptive_threads=not args.fixed_threads)
        out = sys.stdout
        n = 0
        wrote = False
        t0 = time.perf_counter()
        t_first = None
        try:
            for tok in ctx.stream(args.prompt, config):
                if t_first is None:
                    t_first = time.perf_counter()
                n += 1
                if tok.text:
                    out.write(tok.text)
                    out.flush()
                    wrote = True
        except ContextOverflowError as exc:
            raise ContextOverflowError(f"{exc.args[0].split(';')[0]}: raise -c/--context-size (now "
                                       f"{args.context_size}) or lower -n/--max-tokens (now {args.max_tokens})"
                                       ) from None
        finally:
            if wrote:  # (no empty line before an error, or for an empty answer)
                out.write("\n")
                out.flush()
        if not args.quiet and t_first is not None:
            # the speed goes to stderr: stdout carries only the text
            t1 = time.perf_counter()
            st = ctx.thread_stats()
            rate = f", {(n - 1) / (t1 - t_first):.1f} tok/s" if n > 1 and t1 > t_first else ""
            threads = f"{st.threads} threads" if st.threads == st.max_threads else \
                f"{st.threads} of {st.max_threads} threads: the machine is busy"
            print(f"mullama: {n} tokens in {t1 - t0:.2f} s (first after {(t_first - t0) * 1e3:.0f} ms{rate}; "
                  f"{threads})", file=sys.stderr)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from ._model import Model

    args.model = args.path
    with Model.load(_model_path(args), vocab_only=args.vocab_only) as model:
        info = asdict(model.info)
        template = info.pop("chat_template")
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
        print(f"{'chat_template':<{width}}  {'yes' if template else 'no'}")
    return 0


def _mib(value: Optional[float], flag: str) -> Optional[int]:
    if value is None:
        return None
    if not value >= 0 or value == float("inf"):
        raise InvalidConfigError(f"{flag} must be a number of MiB, 0 or more; got {value}")
    return int(value * (1 << 20))


_NOT_ON_RAY = ("backend", "graceful_timeout", "keep_alive_timeout", "max_connections", "no_access_log", "log_level")
_RAY_ONLY = ("replicas", "max_replicas", "ray_address", "config")
#: what --config gives for each of its models
_MODEL_FLAGS = ("model", "name", "context_size", "max_concurrent", "max_queue", "prompt_cache_mb",
                "inexact_prompt_cache", "threads", "fixed_threads", "speculative", "draft_max", "draft_model",
                "gpu_layers", "flash_attention", "timeout", "chat_template", "chat_template_file", "any_model_name",
                "replicas", "max_replicas")


def _check_ray_flags(args: argparse.Namespace) -> None:
    defaults = build_parser().parse_args(["serve"])

    def _given(args: argparse.Namespace, names: "tuple[str, ...]") -> List[str]:
        """The flags of ``names`` given other values than their defaults, as typed."""
        return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) != getattr(defaults, n)]

    if not args.ray:
        given = _given(args, _RAY_ONLY)
        if given:
            raise InvalidConfigError(f"{', '.join(given)} need(s) --ray")
        return
    given = _given(args, _NOT_ON_RAY)
    if given:
        raise InvalidConfigError(f"{', '.join(given)}: not options of --ray (Serve's HTTP proxy serves the "
                                 "requests, and Ray its logs)")
    if args.replicas < 1 or (args.max_replicas is not None and args.max_replicas < args.replicas):
        raise InvalidConfigError(f"--replicas must be 1 or more and --max-replicas at least --replicas; got "
                                 f"{args.replicas} and {args.max_replicas}")
    if args.config:
        given = _given(args, _MODEL_FLAGS)
        if given:
            raise InvalidConfigError(f"{', '.join(given)}: the config file sets these for each model; with "
                                     "--config, only the server's flags (--host, --port, --api-key, --cors-origins, "
                                     "--io-timeout, --ray-address) apply")
    try:
        import mullama.ray  # noqa: F401
    except ImportError as exc:
        raise InvalidConfigError(f"--ray needs Ray Serve: pip install 'mullama[ray]' ({exc.__cause__ or exc})") \
            from None


def _serve_on_ray(args: argparse.Namespace, cors: List[str], model: Optional[Dict[str, Any]]) -> int:
    """``mullama serve --ray``: the same server as replicas on Ray Serve (:mod:`mullama.ray`);
    ``model``: the ModelDeployment fields of the one model, or None with ``--config``."""
    import mullama.ray as mray

    # the flags given (not None) override the config file's values
    server = dict(api_key=args.api_key, cors_origins=tuple(cors) or None, any_model_name=args.any_model_name or None,
                  io_timeout=args.io_timeout, host=args.host, port=args.port, address=args.ray_address)
    if model is None:
        app = mray.load_config(args.config, **server)
    else:
        autoscaling = None if args.max_replicas is None else {"min_replicas": args.replicas,
                                                              "max_replicas": args.max_replicas}
        deployment = mray.ModelDeployment(name=args.name, replicas=args.replicas, autoscaling=autoscaling, **model)
        app = mray.AppConfig(models=(deployment,), **{k: v for k, v in server.items() if v is not None})

    def ready(url: str) -> None:
        names = ", ".join(repr(m.name) for m in app.models)
        print(f"mullama: serving {names} at {url}/v1 (Ray Serve)", flush=True)

    mray.run(app, on_ready=ready)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from ._config import SpeculativeConfig
    from ._model import check_model_file
    from .aio import AsyncConfig
    from .server import BACKENDS, create_app, serve

    cors = [o.strip() for o in (args.cors_origins or "").split(",") if o.strip()]
    _check_ray_flags(args)
    if args.config:
        return _serve_on_ray(args, cors, None)
    # (absolute: Ray's replicas do not run in this directory)
    path = os.path.abspath(_model_path(args))
    check_model_file(path)  # a missing or broken file is named now, not in the server's log
    threads = args.threads
    if args.ray and threads is None:  # this machine's cores, shared by the replicas it may run
        from .ray import replica_threads

        threads = replica_threads(args.max_replicas or args.replicas)
    template = args.chat_template
    if args.chat_template_file:
        try:
            with open(args.chat_template_file, encoding="utf-8") as f:
                template = f.read()
        except OSError as exc:
            raise InvalidConfigError(f"cannot read --chat-template-file: {exc}") from None
    config = AsyncConfig(
        model_path=path, context_size=args.context_size, threads=threads, max_concurrent=args.max_concurrent,
        max_queue=args.max_queue, timeout_ms=int(args.timeout * 1000) if args.timeout else None,
        gpu_layers=args.gpu_layers, flash_attention=args.flash_attention, adaptive_threads=not args.fixed_threads,
        prompt_cache_bytes=_mib(args.prompt_cache_mb, "--prompt-cache-mb"),
        prompt_cache_exact=not args.inexact_prompt_cache,
        draft_model=os.path.abspath(args.draft_model) if args.draft_model else None)
    if args.draft_model:
        check_model_file(args.draft_model)
    # (a draft model is loaded to be used: it turns speculation on by default, as in llama-server)
    speculative = None
    if args.speculative or args.draft_model:
        if args.draft_max is not None and not 1 <= args.draft_max <= 256:
            raise InvalidConfigError(f"--draft-max must be between 1 and 256, got {args.draft_max}")
        speculative = SpeculativeConfig(max_draft=args.draft_max or 16)
    elif args.draft_max is not None:
        raise InvalidConfigError("--draft-max needs --speculative or --draft-model")
    if args.ray:
        return _serve_on_ray(args, cors, dict(config=config, chat_template=template, speculative=speculative))
    app = create_app(config, model_id=args.name, chat_template=template, api_key=args.api_key,
                     io_timeout=IO_TIMEOUT_S if args.io_timeout is None else args.io_timeout,
                     any_model_name=args.any_model_name,
                     cors_origins=cors, speculative=speculative)

    def ready(url: str) -> None:
        print(f"mullama: serving {app.model_id!r} at {url}/v1 ({args.backend}, {BACKENDS[args.backend]})",
              flush=True)

    serve(app, host=args.host or "127.0.0.1", port=8000 if args.port is None else args.port,
          backend=args.backend, log_level=args.log_level, access_log=not args.no_access_log,
          graceful_timeout=args.graceful_timeout, keep_alive_timeout=args.keep_alive_timeout,
          max_connections=args.max_connections, on_ready=ready)
    return 0


def _thread_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="most compute threads (default: the cores this process may use)")
    p.add_argument("--fixed-threads", action="store_true",
                   help="always use --threads, also when the machine is busy (default: fewer threads while "
                        "other work competes for the cores, which is faster then)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mullama", description="Run local GGUF language models through llama.cpp.")
    ap.add_argument("--version", action="version", version=f"mullama {_version()}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="fetch the default model into the cache")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(fn=_cmd_pull)

    p = sub.add_parser("run", help="stream a generation")
    p.add_argument("prompt", help="the text to continue")
    p.add_argument("-m", "--model", help="a .gguf file (default: the default model, pulled if needed)")
    p.add_argument("-n", "--max-tokens", type=int, default=128, metavar="N", help="most tokens to generate (default: 128)")
    p.add_argument("-t", "--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop string, repeatable; \\n, \\t, \\r and \\\\ are unescaped")
    p.add_argument("-c", "--context-size", type=int, default=2048, metavar="N",
                   help="tokens the context holds, prompt and generation (default: 2048)")
    _thread_args(p)
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the speed (stderr) after the text")
    p.set_defaults(fn=_cmd_run)

    p = sub.add_parser("serve", help="serve a model with OpenAI's HTTP API",
                       description="An OpenAI-compatible HTTP server: /v1/models, /v1/completions, "
                                   "/v1/chat/completions (streaming too), /health and /metrics (Prometheus).")
    p.add_argument("-m", "--model", help="a .gguf file (default: the default model, pulled if needed)")
    p.add_argument("--host", default=None, help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=None,
                   help="port (default: 8000; 0 = any free port, not with --ray)")
    p.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio",
                   help="event loop: asyncio (uvicorn) or trio (hypercorn); default asyncio")
    p.add_argument("--name", help="the model id clients ask for (default: the file name without .gguf)")
    p.add_argument("--cors-origins", metavar="ORIGINS",
                   help="comma-separated origins browsers may call the API from ('*' for any; default: none)")
    p.add_argument("--any-model-name", action="store_true",
                   help="answer whatever \"model\" a request names (as llama-server does with one model), for "
                        "clients that send a fixed placeholder; by default another name is a 404")
    p.add_argument("-c", "--context-size", type=int, default=2048, help="tokens per request (prompt + completion)")
    p.add_argument("--max-concurrent", type=int, default=4, help="requests decoded together (default: 4)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; beyond, 503 at once (default: 64)")
    p.add_argument("--prompt-cache-mb", type=float, default=None, metavar="MB",
                   help="host memory for the prompt cache, in MiB (0 = none; default: a tenth of the machine's "
                        "memory, at most 2048); the slots' own KV cells are reused either way")
    p.add_argument("--inexact-prompt-cache", action="store_true",
                   help="also reuse the KV cells of tokens decoded one at a time, as llama-server does: follow-ups "
                        "sent the moment a reply ends start sooner, but outputs may differ from an uncached run")
    _thread_args(p)
    p.add_argument("--speculative", action="store_true",
                   help="speculative decoding (prompt lookup) for every request that does not turn it off; "
                        "faster when the output repeats the input, the same output (see the README)")
    p.add_argument("--draft-max", type=int, default=None, metavar="N",
                   help="with --speculative or --draft-model: most tokens drafted per step, 1-256 (default: 16)")
    p.add_argument("--draft-model", "--model-draft", metavar="PATH",
                   help="a smaller .gguf with the model's tokens that drafts for speculative decoding "
                        "(instead of prompt lookup); implies --speculative")
    p.add_argument("--gpu-layers", type=int, default=0)
    p.add_argument("--flash-attention", action="store_true")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a request may take, queue included (0 = none; default: 600)")
    p.add_argument("--chat-template", help="a Jinja chat template, or a llama.cpp built-in name such as chatml "
                                           "(default: the model's own)")
    p.add_argument("--chat-template-file", help="read the Jinja chat template from this file")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ requests")
    p.add_argument("--graceful-timeout", type=float, default=10.0,
                   help="seconds open requests get to finish at shutdown (SIGINT/SIGTERM; default: 10)")
    p.add_argument("--keep-alive-timeout", type=float, default=KEEP_ALIVE_TIMEOUT_S,
                   help="seconds a connection may stay without a complete request head, after opening or "
                        f"between requests (default: {KEEP_ALIVE_TIMEOUT_S:g})")
    p.add_argument("--io-timeout", type=float, default=None,
                   help="seconds a request body may take to arrive (then 408), and a response may make no "
                        "progress reaching the client (then it is disconnected and its generation cancelled); "
                        f"default: {IO_TIMEOUT_S:g}")
    p.add_argument("--max-connections", type=int, default=None,
                   help="open connections beyond which new ones are closed at once (default: what the file "
                        "descriptor limit leaves room for)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--no-access-log", action="store_true", help="do not log each request")
    g = p.add_argument_group("Ray Serve (the ray extra: pip install 'mullama[ray]')")
    g.add_argument("--ray", action="store_true",
                   help="serve as replicas on Ray Serve, behind its HTTP proxy at --host:--port: start a local "
                        "Ray cluster, or join --ray-address")
    g.add_argument("--replicas", type=int, default=1,
                   help="replicas, each loading the model (default 1); with --max-replicas, the fewest")
    g.add_argument("--max-replicas", type=int, default=None,
                   help="autoscale between --replicas and this many, on requests in flight (a replica is full "
                        "when its --max-concurrent slots are)")
    g.add_argument("--ray-address", metavar="ADDR", help="a running Ray cluster to deploy on ('auto', "
                                                         "'ray://host:10001'; default: start a local one)")
    g.add_argument("--config", metavar="FILE",
                   help="a YAML or JSON file of the models, replicas and options (see the README); "
                        "--host, --port, --api-key and the other server flags given override it")
    p.set_defaults(fn=_cmd_serve)

    p = sub.add_parser("info", help="describe a model file")
    p.add_argument("path", nargs="?", help="a .gguf file (default: the default model, pulled if needed)")
    p.add_argument("--vocab-only", action="store_true", help="load only the tokenizer")
    p.set_defaults(fn=_cmd_info)
    return ap


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mullama")
    except PackageNotFoundError:
        return "(not installed)"


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except MullamaError as exc:
        print(f"mullama: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
