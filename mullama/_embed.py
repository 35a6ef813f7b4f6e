"""Embeddings: :meth:`mullama.Model.embed`'s batching, pooling and normalisation.

Each model keeps an embedding context of its own per pooling and size (never
a generation's context), created at the first call. Texts are packed into
batches of whole sequences, each batch evaluated from an empty cache as
llama.cpp's ``llama-embedding`` does; pooling is llama.cpp's (from the model's
metadata, or the one asked for), normalisation its Euclidean one
(``common_embd_normalize`` with ``embd_norm=2``).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, Union

import numpy as np

from . import _core
from ._errors import AbortedError, ContextOverflowError, InvalidConfigError, UnsupportedModelError

if TYPE_CHECKING:
    from ._model import Model

__all__ = ["POOLINGS", "EmbedCall", "Embedder", "normalized"]

#: pooling names and llama.cpp's llama_pooling_type values
POOLINGS = {"none": 0, "mean": 1, "cls": 2, "last": 3}
_NAMES = {v: k for k, v in POOLINGS.items()}
_RANK = 4
#: sequences one batch evaluates together
BATCH_SEQUENCES = 64

Progress = Callable[[int, int], None]


def normalized(rows: np.ndarray) -> np.ndarray:
    """Each row divided by its Euclidean norm, in place (a zero row stays zero),
    as llama.cpp's ``common_embd_normalize(..., 2)``."""
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64))
    rows *= np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0).astype(np.float32)[:, None]
    return rows


class EmbedCall:
    """One :meth:`Embedder.embed` call, cancellable from any thread."""

    def __init__(self) -> None:
        self.cancelled = False
        self._embedder: Optional["Embedder"] = None

    def cancel(self) -> None:
        self.cancelled = True
        embedder = self._embedder
        if embedder is not None:
            embedder._cancel(self)


class Embedder:
    """An embedding context of a model and what runs on it, one call at a time."""

    def __init__(self, model: "Model", pooling: Optional[str], context_size: int, threads: int) -> None:
        want = -1 if pooling is None else POOLINGS[pooling]
        n_seq = min(BATCH_SEQUENCES, context_size)  # (llama.cpp keeps at most a batch's tokens of outputs)
        core = _core.EmbeddingContext(model._core, context_size, n_seq, threads, want)
        if pooling is None and core.pooling == POOLINGS["none"]:  # a generative model names none: mean
            core.close()
            core = _core.EmbeddingContext(model._core, context_size, n_seq, threads, POOLINGS["mean"])
        if core.pooling not in _NAMES:
            core.close()
            what = "rank pooling (a reranker)" if core.pooling == _RANK else f"pooling type {core.pooling}"
            raise UnsupportedModelError(f"this model's {what} gives no embeddings; pass pooling= "
                                        f"({', '.join(POOLINGS)})")
        self._core = core
        self.pooling = _NAMES[core.pooling]
        self.n_embd = core.n_embd
        self.context_size = core.n_batch  # the most tokens one batch (so one text) holds
        self._lock = threading.Lock()   # one call at a time
        self._state = threading.Lock()  # which call runs, and cancelling it
        self._running: Optional[EmbedCall] = None

    def close(self) -> None:
        self._core.close()

    def _cancel(self, call: EmbedCall) -> None:
        with self._state:  # (never the next call's: it starts under this lock)
            if self._running is call:
                self._core.cancel()

    def embed(self, seqs: Sequence[List[int]], normalize: bool, call: Optional[EmbedCall] = None,
              progress: Optional[Progress] = None) -> Union[np.ndarray, List[np.ndarray]]:
        """Embeddings of the token lists *seqs*: an ``(len(seqs), n_embd)``
        array, or with pooling ``none`` one ``(n_tokens, n_embd)`` array each."""
        limit = self.context_size
        for i, s in enumerate(seqs):
            if not s:
                raise InvalidConfigError(f"input {i} is empty: it has no embedding")
            if len(s) > limit:
                raise ContextOverflowError(
                    f"input {i} has {len(s)} tokens, more than the embedding context's {limit}; shorten it or "
                    "pass a larger context_size")
        batches: List[List[List[int]]] = []
        for s in seqs:
            if not batches or len(batches[-1]) == self._core.n_seq or sum(map(len, batches[-1])) + len(s) > limit:
                batches.append([])
            batches[-1].append(list(s))
        pooled = self.pooling != "none"
        out: List[np.ndarray] = []
        call = call or EmbedCall()
        with self._lock:
            with self._state:
                self._core.clear_cancel()
                self._running = call
                call._embedder = self
            try:
                done = 0
                for batch in batches:
                    if call.cancelled:
                        raise AbortedError("the embedding was cancelled")
                    rows = np.empty((len(batch) if pooled else sum(map(len, batch)), self.n_embd), np.float32)
                    if self._core.embed(batch, rows) == _core.STATUS_ABORTED:
                        raise AbortedError("the embedding was cancelled")
                    out.append(normalized(rows) if normalize else rows)
                    done += len(batch)
                    if progress is not None:
                        progress(done, len(seqs))
            finally:
                with self._state:
                    self._running = None
                    call._embedder = None
        if pooled:
            return np.concatenate(out) if out else np.empty((0, self.n_embd), np.float32)
        per_token: List[np.ndarray] = []
        for batch, rows in zip(batches, out):
            start = 0
            for s in batch:
                per_token.append(rows[start:start + len(s)])
                start += len(s)
        return per_token
