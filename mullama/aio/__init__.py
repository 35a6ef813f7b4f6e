"""mullama.aio: the async API, on anyio, identical under asyncio and trio.

>>> import anyio, mullama
>>> from mullama.aio import AsyncModel
>>> async def main():
...     async with await AsyncModel.load(mullama.default_model_path()) as model:
...         async with model.generate_stream("Once upon a time") as stream:
...             async for tok in stream:
...                 print(tok.text, end="")
>>> anyio.run(main)                     # or anyio.run(main, backend="trio")

Nothing here calls C directly: every blocking call runs on a worker thread
through the sync API, and cancellation reaches llama.cpp through the
context's abort flag.
"""

from .._config import SpeculativeConfig, StreamConfig
from .._generation import Completion, RequestMetrics, SpeculativeStats, TokenData
from .._model import ModelInfo
from .._prompt_cache import PromptCacheStats
from ._model import AsyncConfig, AsyncContext, AsyncModel
from ._pool import ModelPool, PooledModel, PoolStats
from ._runtime import Runtime, RuntimeMetrics, TaskHandle
from ._tasks import GenerationResult, TaskManager, WorkerStatus
from ._stream import TokenStream, unwrap_single

__all__ = [
    "AsyncConfig",
    "AsyncModel",
    "AsyncContext",
    "TokenStream",
    "ModelPool",
    "PooledModel",
    "PoolStats",
    "PromptCacheStats",
    "Runtime",
    "RuntimeMetrics",
    "TaskHandle",
    "TaskManager",
    "WorkerStatus",
    "GenerationResult",
    "RequestMetrics",
    "SpeculativeConfig",
    "SpeculativeStats",
    "StreamConfig",
    "TokenData",
    "Completion",
    "ModelInfo",
    "unwrap_single",
]
