"""mullama: run local GGUF language models through llama.cpp, fast, from
synchronous code and from asyncio or trio (``mullama.aio``).

>>> import mullama
>>> with mullama.Model.load(mullama.default_model_path()) as model:
...     ctx = model.create_context()
...     for tok in ctx.stream("The capital of France is", mullama.StreamConfig.greedy(16)):
...         print(tok.text, end="", flush=True)
"""

import logging as _logging

from ._errors import *  # noqa: F401,F403
from ._errors import __all__ as _errors_all
from ._config import Grammar, SpeculativeConfig, StreamConfig, default_threads
from ._model import Model, ModelInfo
from ._context import Context, ThreadStats
from ._generation import Completion, RequestMetrics, Timings, TokenData
from ._cache import DEFAULT_MODEL, default_model_path, model_home, pull
from ._chat import Message, builtin_templates
from ._tools import ChatCompletion, ChatDelta, ToolCall, ToolCallDelta

# llama.cpp's log goes to the "mullama.llama_cpp" logger; quiet unless the
# application configures logging
_logging.getLogger("mullama").addHandler(_logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "Model",
    "ModelInfo",
    "Context",
    "SpeculativeConfig",
    "StreamConfig",
    "Grammar",
    "TokenData",
    "Completion",
    "ChatCompletion",
    "ChatDelta",
    "ToolCall",
    "ToolCallDelta",
    "Timings",
    "RequestMetrics",
    "ThreadStats",
    "Message",
    "builtin_templates",
    "default_threads",
    "DEFAULT_MODEL",
    "default_model_path",
    "model_home",
    "pull",
    *_errors_all,
]


def _at_exit() -> None:
    # a decode still running in another thread would crash in static destructors:
    # stop every generation and wait (bounded) until no thread is inside C; then
    # llama.cpp's log goes nowhere instead of into a finalizing interpreter
    from . import _core

    _core.shutdown(timeout=5.0)
    _core.silence_logging()


import atexit as _atexit  # noqa: E402

_atexit.register(_at_exit)
