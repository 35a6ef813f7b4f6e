"""Embed the OpenAI-compatible app in your own ASGI server: here uvicorn, on a model you load.

`create_app` takes a path (loaded at the server's startup) or an AsyncModel
you already have; the app then serves /v1/models, /v1/completions,
/v1/chat/completions, /health and /metrics.

    python examples/embed_server.py [--model path/to/model.gguf] [--port 8000]
"""

import argparse

import uvicorn

import mullama
from mullama.aio import AsyncConfig
from mullama.server import create_app


def main(model_path: str, port: int) -> None:
    config = AsyncConfig(model_path, context_size=2048, max_concurrent=4, max_queue=16)
    app = create_app(config, model_id="local", api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=port)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a .gguf file (default: the default model, pulled if needed)")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()
    main(args.model or str(mullama.default_model_path()), args.port)
