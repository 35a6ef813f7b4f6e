"""The continuous batching engine: many requests decoded together on one context.

One driver thread per engine owns the :class:`~mullama._core.BatchEngine` (one
llama.cpp context with a sequence per slot). Between steps it admits queued
requests into free slots, pauses slots whose consumer is behind, and hands
each request's new tokens to its sink; the steps themselves run in C without
the GIL. A request that finishes or is cancelled leaves at the next step
boundary and its slot is free at once.

The prompt cache: a free slot keeps its sequence's KV cells, and a request is
given the free slot whose cells hold the longest prefix of its prompt (or
copies them from a running request's sequence, or restores them from the
host-memory cache, :mod:`mullama._prompt_cache`), so only the rest of its
prompt is evaluated. Reused cells are those an uncached run would compute:
outputs are the same.

Sync code: the async side (``mullama.aio``) gives each request a sink and
waits on it; nothing here knows about event loops.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable, Deque, Dict, List, Optional, Protocol, Tuple

from . import _core
from ._config import StreamConfig, check_int, token_list
from ._context import ThreadStats, log_thread_changes
from ._errors import ClosedError, ContextOverflowError, InvalidTokenError, MullamaError, OverloadedError
from ._generation import FINISH_REASONS, Generation, SpeculativeStats, TokenData, new_sampler, new_speculator
from ._prompt_cache import HostPromptCache, PromptCacheStats

__all__ = ["Engine", "EngineRequest", "MAX_SEQUENCES"]

log = logging.getLogger("mullama")

#: the driver hands tokens to consumers at least this often (seconds)
STEP_BUDGET_S = 0.02
#: most sequences one llama.cpp context decodes together (LLAMA_MAX_SEQ, llama-cparams.h)
MAX_SEQUENCES = 256
#: most tokens of one llama.cpp context (its n_ctx is a uint32)
MAX_CONTEXT_TOKENS = 0xFFFFFFFF
#: a request waits for a running request still evaluating a prompt that shares
#: at least this many more of its tokens, then copies them rather than evaluate them again;
#: cells are copied from another sequence or restored from host memory only for such a gain
#: (a copy moves a whole sequence's buffer)
SHARE_MIN_TOKENS = 32
#: a free slot's cached sequence is saved to the host-memory cache before its cells
#: are given to another prompt if that would lose at least this many tokens
SAVE_MIN_TOKENS = 32


#: tokens of the decode-cells probe: enough to take llama.cpp's large-batch kernels
#: (x86: repacked gemm from 4 tokens, the tiled K-quant kernel from 8); it costs a prompt of
#: this many tokens, one of 3 fewer, and 6 one-token decodes, once per model (about 0.3 s on the
#: default model with 2 threads)
PROBE_TOKENS = 16


def probe_decode_cells(core: "_core.BatchEngine", n_vocab: int) -> Optional[bool]:
    """Whether *core*'s decode steps compute a token's KV cells bit for bit as a prompt
    evaluation does (``BatchEngine.probe_decode_cells``; with one sequence, two decoding
    together are not checked); None when its context or batch is under ``PROBE_TOKENS``
    tokens."""
    n = min(PROBE_TOKENS, core.n_ctx_seq, core.n_batch)
    if n < PROBE_TOKENS:
        return None
    return core.probe_decode_cells([(1 + i * 7919) % n_vocab for i in range(n)])


class Sink(Protocol):
    """Where a request's tokens go (the async side's hand-off)."""

    def has_space(self) -> bool: ...

    def offer(self, batch: List[TokenData]) -> None: ...

    def finish(self) -> None: ...


class EngineRequest(Generation):
    """One generation in the engine.

    *timeout_ms*: the engine ends the request that long after it was made
    (finish reason ``"timeout"``), waiting or running, whatever its consumer
    does: a consumer that stopped reading (a client that stopped receiving)
    cannot keep a slot and its KV cells past its deadline.
    """

    def __init__(self, tokens: List[int], config: StreamConfig, sink: Sink,
                 timeout_ms: Optional[int] = None) -> None:
        super().__init__(config)
        self.tokens_in = tokens
        self.prompt_tokens = len(tokens)
        self.sink = sink
        self.timeout_ms = timeout_ms or None
        self.deadline = time.monotonic() + timeout_ms / 1e3 if timeout_ms else None
        self._expired = False  # the driver cancelled it at its deadline
        self.prompt_end = len(tokens)
        self.slot: Optional[int] = None
        self.sampler: Optional["_core.SamplerChain"] = None
        self.speculator: Optional["_core.Speculator"] = None
        self.cancelled = False
        self._engine: Optional["Engine"] = None

    def cancel(self) -> None:
        """Stop this request (thread-safe); it leaves the engine at the next step."""
        self.cancelled = True
        engine = self._engine
        if engine is not None:
            engine._cancel(self)


class Engine:
    """Continuous batching over ``n_seq`` slots of one context.

    Args:
        model: a loaded :class:`~mullama.Model` (weights are shared, not copied).
        n_seq: requests decoded together (1 to ``MAX_SEQUENCES``).
        ctx_per_seq: tokens each request may hold (prompt + generation).
        max_queue: requests that may wait for a slot; beyond, ``submit`` raises
            :class:`OverloadedError` at once.
        prompt_cache_bytes: the host-memory prompt cache's budget (0: none;
            the slots' own cells are reused either way).
        exact_prompt_cache: reuse only KV cells that an uncached run computes
            bit for bit (see ``BatchEngine.match``): all of them when the
            model's decode steps compute cells as a prompt does (probed once
            per model, ``decode_cells_exact``), else those of prompt chunks;
            False reuses every cell, as llama-server does.
        draft_model: a smaller model with the model's tokens (a path, loaded
            and closed with the engine, or a loaded model) that drafts for
            speculative decoding, one sequence per slot.

    Raises:
        InvalidConfigError: *n_seq* out of range.
        InsufficientMemoryError: the KV cache of ``n_seq x ctx_per_seq`` tokens
            cannot fit in the memory available (checked before allocating).
    """

    def __init__(self, model, n_seq: int, ctx_per_seq: int, threads: int, flash_attention: bool = False,
                 max_queue: int = 64, batch_size: int = 512, adaptive_threads: bool = True,
                 prompt_cache_bytes: int = 0, exact_prompt_cache: bool = True, draft_model=None) -> None:
        check_int("max_concurrent (the engine's sequences)", n_seq, minimum=1, maximum=MAX_SEQUENCES)
        check_int("context_size", ctx_per_seq, minimum=1, maximum=MAX_CONTEXT_TOKENS // max(n_seq, 1))
        model._check_memory(ctx_per_seq, n_seq, batch_size, bool(flash_attention),
                            what=f"max_concurrent={n_seq} requests of context_size={ctx_per_seq} tokens")
        self._model = model
        self._core = _core.BatchEngine(model._core, n_seq, ctx_per_seq, batch_size, threads, flash_attention,
                                       adaptive_threads=adaptive_threads, exact=exact_prompt_cache)
        # Not with flash attention, whose kernel computes several tokens of several sequences in one
        # batch otherwise than alone (BatchEngine._prompt_chunks), as a speculative step would.
        if exact_prompt_cache and not flash_attention and not _core.supports_gpu_offload():
            # (a GPU build: llama.cpp offloads large batches to the GPU, whose kernels are not probed;
            # the same model and build give the same answer, so a full probe's, two sequences
            # decoding together included, is kept on the model)
            known: Optional[bool] = getattr(model, "_decode_cells_exact", None)
            if known is None:
                try:
                    known = probe_decode_cells(self._core, model.n_vocab)
                except MullamaError as exc:  # an optimisation only: the engine refreshes tails instead
                    log.warning("could not check whether decoded KV cells can be reused as they are: %s", exc)
                else:
                    if known is not None and n_seq >= 2:
                        model._decode_cells_exact = known
            self._core.decode_exact = bool(known)
        #: the draft model, the draft context, and whether the engine loaded the model (closes it)
        self._draft: Optional[Tuple[object, "_core.DraftModel", bool]] = None
        if draft_model is not None:
            try:
                draft, drafter = model._drafter(draft_model, n_seq, ctx_per_seq, threads)
            except BaseException:
                self._core.close()
                raise
            self._draft = (draft, drafter, draft is not draft_model)
            self._core.set_drafter(drafter)
        self._thread_changes = 0
        self.n_seq = n_seq
        self.max_queue = max_queue
        self._cv = threading.Condition()
        self._queue: Deque[EngineRequest] = deque()
        self._free: List[int] = list(range(n_seq - 1, -1, -1))
        self._active: Dict[int, EngineRequest] = {}
        self._used_at = [0] * n_seq  # when each slot last started or ended a request (LRU)
        self._clock = 0
        check_int("prompt_cache_bytes", prompt_cache_bytes, minimum=0)
        self.host_cache: Optional[HostPromptCache] = HostPromptCache(prompt_cache_bytes) if prompt_cache_bytes else None
        self._thread: Optional[threading.Thread] = None
        self._closing = False
        self.completed = 0
        self.generated_tokens = 0
        #: requests that reached a slot and finished, and their wall time in slots (ms)
        self.generations = 0
        self.generation_ms = 0.0
        #: name of the driver thread (set before the first request)
        self.thread_name = "mullama-engine"
        #: KV cells held by running requests, and by free slots' caches, as of the driver's last step
        self.kv_cells = 0
        self.cached_cells = 0
        #: prompt tokens of started requests that were reused from a cache, and that were evaluated
        self.cached_prompt_tokens = 0
        self.evaluated_prompt_tokens = 0
        #: speculative decoding of ended requests: verifications, tokens drafted, drafted tokens accepted
        self.draft_steps = 0
        self.drafted_tokens = 0
        self.accepted_tokens = 0
        #: the exception that stopped the driver thread, if one did
        self.broken: Optional[BaseException] = None
        self.on_done: Optional[Callable[[EngineRequest], None]] = None

    # -- any thread ---------------------------------------------------------------

    @property
    def ctx_per_seq(self) -> int:
        return self._core.n_ctx_seq

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def tokens_in_flight(self) -> int:
        """Tokens generated so far by the requests holding a slot (their progress)."""
        return sum(len(req.tokens) for req in list(self._active.values()))

    @property
    def decode_cells_exact(self) -> bool:
        """Decode steps compute the cells a prompt evaluation computes (probed, see
        BatchEngine.probe_decode_cells): the exact prompt cache then reuses generated tokens as
        they are, with nothing evaluated again after a request."""
        return bool(self._core.decode_exact)

    def prompt_cache_stats(self) -> PromptCacheStats:
        """The prompt cache's counters and the memory it holds (see :class:`PromptCacheStats`)."""
        host = self.host_cache if self.host_cache is not None else HostPromptCache(0)  # none: zeros
        return PromptCacheStats(
            cached_prompt_tokens=self.cached_prompt_tokens, evaluated_prompt_tokens=self.evaluated_prompt_tokens,
            slot_cells=self.cached_cells, host_bytes=host.bytes, host_budget=host.budget, host_entries=len(host),
            host_saves=host.saves, host_restores=host.restores, host_evictions=host.evictions,
            refreshed_tokens=self._core.refreshed,
            decoded_cells_reused=self.decode_cells_exact or not self._core.exact)

    def speculative_stats(self) -> SpeculativeStats:
        """Speculative decoding of the requests that ended (see :class:`SpeculativeStats`)."""
        return SpeculativeStats(self.draft_steps, self.drafted_tokens, self.accepted_tokens)

    def clear_prompt_cache(self) -> int:
        """Drop the host-memory cache's entries; the bytes given back."""
        if self.host_cache is None:
            return 0
        with self._cv:  # (the driver uses the cache under this lock)
            freed = self.host_cache.bytes
            self.host_cache.clear()
        return freed

    def thread_stats(self) -> ThreadStats:
        """The compute threads of the engine's context (see :class:`ThreadStats`)."""
        return ThreadStats._from_core(self._core.thread_stats())


    def submit(self, request: EngineRequest) -> None:
        """Queue *request*; raises OverloadedError if the queue is full."""
        request.tokens_in = token_list(request.tokens_in)  # no bytes or bools as token ids
        cfg = request.config
        if len(request.tokens_in) + cfg.max_tokens > self._core.n_ctx_seq:
            raise ContextOverflowError(
                f"the prompt ({len(request.tokens_in)} tokens) plus max_tokens ({cfg.max_tokens}) do not fit in "
                f"a request's share of the context ({self._core.n_ctx_seq} tokens); lower max_tokens, shorten "
                "the prompt or raise context_size")
        if not request.tokens_in:
            raise MullamaError("the prompt is empty")
        n_vocab = self._model.n_vocab
        bad = [t for t in request.tokens_in if not 0 <= t < n_vocab]
        if bad:
            raise InvalidTokenError(f"token id {bad[0]} is outside the vocabulary (0..{n_vocab - 1})")
        cfg = request.config
        # built here, on the caller's side: the driver runs no code that bad input can break
        request.speculator = new_speculator(cfg, self._model._core, self._draft is not None)
        request.sampler = new_sampler(self._model._core, cfg)
        with self._cv:
            if self._closing:
                request.sampler.close()
                raise ClosedError("the engine is closed")
            # queued requests first take the free slots (at the driver's next step); only the rest wait
            if len(self._queue) >= self.max_queue + len(self._free):
                request.sampler.close()
                raise OverloadedError(
                    f"all {self.n_seq} slots are busy and {len(self._queue) - len(self._free)} requests are "
                    f"waiting (max_queue={self.max_queue}); try again later")
            request._engine = self
            self._queue.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._drive, name=self.thread_name, daemon=True)
                self._thread.start()
            self._cv.notify()
        self._core.wake()

    def notify(self) -> None:
        """A consumer made room: let the driver resume its paused slot."""
        with self._cv:
            self._cv.notify()
        self._core.wake()

    def _cancel(self, request: EngineRequest) -> None:
        with self._cv:
            slot = request.slot
            if slot is not None:
                self._core.cancel_slot(slot)  # the driver releases it at the next step
            elif not request.finished and request in self._queue:
                self._queue.remove(request)  # never started: done now
                self._finish(request, "cancelled")
            self._cv.notify()
        self._core.wake()

    def close(self) -> None:
        """Stop the driver after cancelling every request; free the context."""
        with self._cv:
            self._closing = True
            for req in list(self._queue) + list(self._active.values()):
                req.cancelled = True
                if req.slot is not None:
                    self._core.cancel_slot(req.slot)
            self._cv.notify()
        self._core.wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()  # (the driver itself can get here: a garbage collection run in it)
        self._core.close()
        if self._draft is not None:
            draft, drafter, owned = self._draft
            drafter.close()
            if owned:
                draft.close()  # type: ignore[attr-defined]
        if self.host_cache is not None:
            self.host_cache.clear()

    # -- the driver thread ----------------------------------------------------------

    def _drive(self) -> None:
        try:
            self._drive_loop()
        except BaseException as exc:  # never leave requests waiting on a dead driver
            with self._cv:
                self._closing = True
                self.broken = exc
                for req in list(self._queue) + list(self._active.values()):
                    req.error = MullamaError(f"the batching engine stopped: {exc!r}")
                    self._finish(req, "error")
                self._queue.clear()
                self._active.clear()
            raise

    def _drive_loop(self) -> None:
        core = self._core
        while True:
            with self._cv:
                while True:
                    wait = self._expire()
                    if self._closing or (self._queue and self._free) or self._runnable() or core.idle_work():
                        break
                    self._cv.wait(wait)
                if self._closing and not self._active:
                    for req in self._queue:
                        self._finish(req, "cancelled")
                    self._queue.clear()
                    return
                core.clear_wake()
                self._admit()
            for slot, req in self._active.items():
                core.set_paused(slot, not req.sink.has_space())
            try:
                core.run(STEP_BUDGET_S)
            except MullamaError as exc:  # a failed step fails the requests in it
                for req in list(self._active.values()):
                    req.error = exc
                    self._leave(req, "error")
                continue
            self._deliver()
            self.kv_cells, self.cached_cells = core.kv_used()
            if core.thread_changes != self._thread_changes:
                self._thread_changes = log_thread_changes(core, self._thread_changes, "the batching engine")

    def _expire(self) -> Optional[float]:
        """End the requests past their deadline (under the lock); seconds until
        the next deadline, or None."""
        now = time.monotonic()
        nearest: Optional[float] = None
        for req in list(self._queue):
            if req.deadline is None:
                continue
            if req.deadline <= now:
                self._queue.remove(req)
                self._finish(req, "timeout")
            elif nearest is None or req.deadline < nearest:
                nearest = req.deadline
        for slot, req in self._active.items():
            if req.deadline is None or req._expired:
                continue
            if req.deadline <= now:
                req._expired = req.cancelled = True  # it leaves at the step boundary
                self._core.cancel_slot(slot)
            elif nearest is None or req.deadline < nearest:
                nearest = req.deadline
        return None if nearest is None else max(nearest - now, 0.0)

    def _runnable(self) -> bool:
        """Some active request needs the driver (unpaused, finished or cancelled)."""
        for req in self._active.values():
            if req.cancelled or req.sink.has_space():
                return True
        return False

    def _admit(self) -> None:
        waiting: List[EngineRequest] = []
        try:
            while self._free and self._queue:
                req = self._queue.popleft()
                if req.cancelled:
                    self._finish(req, "cancelled")
                elif not self._place(req):
                    waiting.append(req)
        finally:  # (an unexpected error stops the driver, which then fails every queued request)
            self._queue.extendleft(reversed(waiting))

    def _place(self, req: EngineRequest) -> bool:
        """Start *req* in a free slot, reusing the longest cached prefix of its
        prompt; False if it should wait for a running request to finish
        evaluating a prompt it shares."""
        core = self._core
        tokens = req.tokens_in
        limit = max(len(tokens) - 2, 0)  # the last two are evaluated, in one batch (BatchEngine.match)
        held, coming = core.match(tokens)
        # in place: the free slot whose cells hold the most, the least recently used of equals
        slot = max(self._free, key=lambda i: (min(held[i], limit), -self._used_at[i]))
        reuse, source, entry = min(held[slot], limit), -1, None
        for i in self._active:  # a copy of another stream's cells: worth it for a real gain only
            if min(held[i], limit) >= reuse + SHARE_MIN_TOKENS:
                reuse, source = min(held[i], limit), i
        if self.host_cache is not None and not core.copying():
            key, n = self.host_cache.best(tokens)
            if min(n, limit) >= reuse + SHARE_MIN_TOKENS:
                reuse, source, entry = min(n, limit), -1, key
        if any(min(coming[i], limit) >= reuse + SHARE_MIN_TOKENS for i in self._active):
            return False
        if source >= 0 or entry is not None:  # the cells come from elsewhere: take the least useful slot
            slot = min(self._free, key=lambda i: (held[i] > 0, self._used_at[i]))
        restore = self.host_cache.get(entry) if self.host_cache is not None and entry is not None else None
        self._save(slot, reuse if source < 0 and restore is None else 0)  # (may evict the entry: it is taken)
        if restore is not None:
            try:
                core.restore_sequence(slot, restore[1], restore[0])
            except Exception as exc:
                log.warning("could not restore a cached prompt of %d tokens: %s", len(restore[0]), exc)
                reuse = 0
        cfg = req.config
        sampler = req.sampler
        assert sampler is not None  # made by submit()
        try:
            reuse = core.start(slot, tokens, sampler, cfg.max_tokens, cfg.include_probabilities, cfg.top_logprobs,
                               reuse=reuse, source=source, speculator=req.speculator)
        except Exception as exc:
            sampler.close()
            req.error = exc
            self._finish(req, "error")
            return True
        self._free.remove(slot)
        self._touch(slot)
        req.slot = slot
        req.cached_tokens = reuse
        self.cached_prompt_tokens += reuse
        self.evaluated_prompt_tokens += len(tokens) - reuse
        req.t_start = time.perf_counter()
        self._active[slot] = req
        return True

    def _save(self, slot: int, keep: int) -> None:
        """Before the free *slot* keeps only its first *keep* cached tokens:
        save its sequence to the host-memory cache if that would lose enough."""
        cache = self.host_cache
        if cache is None:
            return
        tokens = self._core.cached(slot)
        if len(tokens) - keep < SAVE_MIN_TOKENS or cache.holds(tokens):
            return
        try:
            if cache.make_room(self._core.sequence_size(slot)):  # (evicted before the state is read)
                cache.put(tokens, self._core.save_sequence(slot, cache.budget))
        except Exception as exc:  # (MemoryError too) not cached: the request goes on, slower next time
            log.warning("could not save a cached prompt of %d tokens: %s", len(tokens), exc)

    def _touch(self, slot: int) -> None:
        self._clock += 1
        self._used_at[slot] = self._clock

    def _deliver(self) -> None:
        core = self._core
        for slot, req in list(self._active.items()):
            toks, pieces, lps, top = core.drain(slot)
            _, finish, cancelled, _, _, _ = core.slot_state(slot)
            if req.speculator is not None:
                req.drafted_tokens, req.accepted_tokens = req.speculator.drafted, req.speculator.accepted
            if toks:
                batch, stopped = req.add(toks, pieces, lps, len(req.tokens_in) + len(req.tokens),
                                         ends=finish != _core.STATUS_OK, top=top)
                if batch:
                    req.sink.offer(batch)
                if stopped:
                    self._leave(req, "stop")
                    continue
            if cancelled or req.cancelled:
                self._leave(req, "timeout" if req._expired else "cancelled")
            elif finish != _core.STATUS_OK:
                self._leave(req, FINISH_REASONS[finish])

    def _leave(self, req: EngineRequest, reason: str) -> None:
        slot = req.slot
        if slot is not None:
            self._core.release(slot, keep=reason != "error")  # its cells stay as a cache of its tokens
            del self._active[slot]
            self._free.append(slot)
            self._touch(slot)
            req.slot = None
            self.kv_cells, self.cached_cells = self._core.kv_used()  # before the consumer hears of it
        self._finish(req, reason)

    def _finish(self, req: EngineRequest, reason: str) -> None:
        if req.finished:
            return
        if req.slot is None and req.sampler is not None:
            req.sampler.close()  # never started (a started one is freed with its slot)
        req.end(reason)
        self.completed += 1
        self.generated_tokens += len(req.tokens)
        if req.speculator is not None:  # (its last counts: it may end without a last delivery)
            req.drafted_tokens, req.accepted_tokens = req.speculator.drafted, req.speculator.accepted
            self.draft_steps += req.speculator.drafts
            self.drafted_tokens += req.drafted_tokens
            self.accepted_tokens += req.accepted_tokens
        if req.t_start is not None and req.t_end is not None:
            self.generations += 1
            self.generation_ms += (req.t_end - req.t_start) * 1e3
        if self.on_done is not None:
            self.on_done(req)
        req.sink.finish()
