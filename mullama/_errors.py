"""The exceptions mullama raises. Every one is a :class:`MullamaError`."""

from __future__ import annotations

import anyio

__all__ = [
    "MullamaError",
    "ModelLoadError",
    "ModelNotFoundError",
    "InvalidModelError",
    "UnsupportedModelError",
    "ContextCreationError",
    "InsufficientMemoryError",
    "ContextOverflowError",
    "InvalidConfigError",
    "IncompatibleDraftModelError",
    "InvalidTokenError",
    "ClosedError",
    "BusyError",
    "LoopConflictError",
    "DecodeError",
    "AbortedError",
    "StateError",
    "DownloadError",
    "RequestTimeoutError",
    "OverloadedError",
    "ChatTemplateError",
    "GrammarError",
    "NotCopyableError",
]


class MullamaError(Exception):
    """Base class of every error mullama raises."""


class ModelLoadError(MullamaError):
    """A model file could not be loaded."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """The model path does not exist or is not a regular file."""


class InvalidModelError(ModelLoadError):
    """The file is not a GGUF model, or it is truncated or corrupt."""


class UnsupportedModelError(ModelLoadError):
    """The GGUF file is valid but describes a model llama.cpp cannot run here."""


class ContextCreationError(MullamaError):
    """llama.cpp could not create an inference context (memory, sizes)."""


class InsufficientMemoryError(ContextCreationError):
    """A context would need more memory than the machine has available: its
    estimated KV cache and attention buffers exceed ``MemAvailable`` (or the
    cgroup's memory limit). Raised before anything is allocated."""


class ContextOverflowError(MullamaError):
    """The tokens do not fit in the context window."""


class InvalidConfigError(MullamaError, ValueError):
    """A configuration or sampling value is out of range or of the wrong type."""


class IncompatibleDraftModelError(InvalidConfigError):
    """A draft model for speculative decoding does not have the model's tokens."""


class InvalidTokenError(MullamaError, ValueError):
    """A token id is outside the model's vocabulary."""


class ClosedError(MullamaError, anyio.ClosedResourceError):
    """The model or context was used after ``close()``. (Also an
    ``anyio.ClosedResourceError``: async code that handles anyio's closed
    resources handles mullama's too.)"""


class BusyError(MullamaError):
    """A context was used from two places at once."""


class LoopConflictError(BusyError):
    """An async object (an ``AsyncContext`` or a ``ModelPool``) was used from
    a second event loop (another thread's, or asyncio and trio) while its
    first one was still using it. A loop cannot wait for another loop's
    locks: use each object from one loop at a time."""


class DecodeError(MullamaError):
    """llama.cpp failed to evaluate a batch of tokens."""


class AbortedError(MullamaError):
    """An evaluation was cancelled with ``Context.cancel()``."""


class StateError(MullamaError):
    """A saved context state could not be written or read back."""


class DownloadError(MullamaError):
    """The default model could not be fetched or failed verification."""


class RequestTimeoutError(MullamaError, TimeoutError):
    """An async request ran past its deadline (``AsyncConfig.timeout_ms``)."""


class OverloadedError(MullamaError):
    """Every slot is busy and the waiting queue is full: try again later."""


class GrammarError(MullamaError, ValueError):
    """A grammar (GBNF), JSON schema or response format that cannot be used: the
    message names the problem and where it is."""


class ChatTemplateError(MullamaError):
    """A conversation could not be formatted: the model has no chat template
    and none was given, or the template failed on the messages."""


class NotCopyableError(MullamaError, TypeError):
    """A model, context, pool or async model was pickled or copied: it owns
    llama.cpp memory, which cannot be duplicated or sent to another process."""
