"""The ``mullama`` command: pull the default model, run a prompt, describe a model."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from typing import List, Optional

from ._errors import MullamaError


def _cmd_pull(args: argparse.Namespace) -> int:
    from ._cache import pull

    print(pull(progress=not args.quiet))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from ._cache import default_model_path
    from ._config import StreamConfig
    from ._model import Model

    path = args.model or default_model_path(progress=True)
    config = StreamConfig(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        stop=tuple(args.stop or ()),
    )
    with Model.load(path) as model:
        ctx = model.create_context(context_size=args.context_size, threads=args.threads)
        out = sys.stdout
        try:
            for tok in ctx.stream(args.prompt, config):
                out.write(tok.text)
                out.flush()
        finally:
            out.write("\n")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from ._model import Model

    with Model.load(args.path, vocab_only=args.vocab_only) as model:
        info = asdict(model.info)
        template = info.pop("chat_template")
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
        print(f"{'chat_template':<{width}}  {'yes' if template else 'no'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mullama", description="Run local GGUF language models through llama.cpp.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="fetch the default model into the cache")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(fn=_cmd_pull)

    p = sub.add_parser("run", help="stream a generation")
    p.add_argument("prompt")
    p.add_argument("-m", "--model", help="a .gguf file (default: the default model, pulled if needed)")
    p.add_argument("-n", "--max-tokens", type=int, default=128)
    p.add_argument("-t", "--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("-c", "--context-size", type=int, default=2048)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(fn=_cmd_run)

    p = sub.add_parser("info", help="describe a model file")
    p.add_argument("path")
    p.add_argument("--vocab-only", action="store_true", help="load only the tokenizer")
    p.set_defaults(fn=_cmd_info)
    return ap


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
