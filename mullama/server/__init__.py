"""An OpenAI-compatible HTTP server on :mod:`mullama.aio`, for asyncio and trio.

Run it with ``mullama serve`` (uvicorn on asyncio, or ``--backend trio`` for
hypercorn's trio worker), or mount :func:`create_app` in any ASGI server::

    import uvicorn
    from mullama.server import create_app

    uvicorn.run(create_app("model.gguf", model_id="local"), port=8000)

It needs the ``server`` extra: ``pip install "mullama[server]"``.
"""

from ._app import OpenAIApp, create_app
from ._run import BACKENDS, serve

__all__ = ["OpenAIApp", "create_app", "serve", "BACKENDS"]
