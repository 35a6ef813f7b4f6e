"""What a generation produces, the same for a conversation's generation
(:class:`~mullama.Context`, ``_Run``) and a request of the batching engine
(``EngineRequest``): its tokens as :class:`TokenData`, text that is valid UTF-8
and free of stop strings, its finish reason, its :class:`Timings` and
:class:`RequestMetrics`, and the :class:`Completion` that sums it up.

The C loops (``_core``) hand over tokens, their bytes and log-probabilities in
chunks, with a status (``_core.STATUS_*``) saying whether and how the
generation ended; :meth:`Generation.add` turns each chunk into ``TokenData``.
"""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from . import _core
from ._config import StreamConfig
from ._errors import InvalidConfigError, MullamaError, RequestTimeoutError

__all__ = ["TokenData", "Timings", "RequestMetrics", "SpeculativeStats", "Completion", "Generation", "new_sampler",
           "new_speculator", "timeout_error"]

#: the finish reason of each way a C loop ends a generation
FINISH_REASONS = {
    _core.STATUS_EOG: "stop",
    _core.STATUS_LENGTH: "length",
    _core.STATUS_CONTEXT_FULL: "context_full",
    _core.STATUS_ABORTED: "cancelled",
    _core.STATUS_DEAD_END: "grammar_dead_end",
}


@dataclass(frozen=True)
class TokenData:
    """One generated token.

    ``text`` is what this token adds to the output. It is always valid UTF-8:
    bytes of a character split across tokens, and text that may be the start of
    a stop string, are held back and arrive with a later token (the final one
    at the latest). A cancelled generation ends at the text released so far:
    what was held back then is not part of its output, in the stream and in
    its :class:`Completion` alike.
    """

    id: int
    text: str
    position: int
    logprob: Optional[float] = None
    is_final: bool = False
    #: the ``StreamConfig.top_logprobs`` most likely tokens at this position, as
    #: ``(token id, log-probability)``, most likely first (None unless asked for)
    top_logprobs: Optional[Tuple[Tuple[int, float], ...]] = None

    @property
    def token_id(self) -> int:  # the name Mullama's TokenData uses
        return self.id


@dataclass(frozen=True)
class Timings:
    """Where a generation's time went, in milliseconds.

    ``queue_ms``: waiting for a free slot (requests on the batching engine; 0
    on a context); ``prompt_ms``: from the start of the prompt's evaluation to
    the first generated token (the prompt's evaluation and the first token's
    sampling); ``generation_ms``: from the first token to the end;
    ``time_to_first_token_ms``: from the request to its first token, queue
    included. ``cached_tokens``: how many of the ``prompt_tokens`` were
    reused from the engine's prompt cache rather than evaluated
    (:attr:`evaluated_prompt_tokens` were). ``drafted_tokens`` and
    ``accepted_tokens``: with speculative decoding, the tokens drafted and
    those of them the model accepted (:attr:`acceptance_rate`).
    """

    prompt_tokens: int
    prompt_ms: float
    generated_tokens: int
    generation_ms: float
    time_to_first_token_ms: float
    queue_ms: float = 0.0
    cached_tokens: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def evaluated_prompt_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def acceptance_rate(self) -> float:
        """The share of drafted tokens the model accepted (0.0 without drafts)."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / (self.prompt_ms / 1e3) if self.prompt_ms > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / (self.generation_ms / 1e3) if self.generation_ms > 0 else 0.0


@dataclass(frozen=True)
class RequestMetrics:
    """What one generation cost (times in milliseconds; see :class:`Timings`).

    ``generation_tokens_per_s`` counts the tokens after the first (the first
    one's time is in the time to first token); ``prompt_tokens_per_s``
    counts the evaluated prompt tokens (``prompt_tokens - cached_tokens``);
    ``drafted_tokens`` and ``accepted_tokens`` count speculative decoding's drafts.
    """

    queue_ms: float
    time_to_first_token_ms: float
    prompt_tokens: int
    prompt_tokens_per_s: float
    generated_tokens: int
    generation_tokens_per_s: float
    finish_reason: str
    cached_tokens: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0


@dataclass(frozen=True)
class SpeculativeStats:
    """Speculative decoding of the requests that ended so far (see
    :class:`~mullama.SpeculativeConfig`).

    Attributes:
        drafts: drafts verified (one batched decode each).
        drafted_tokens: tokens drafted.
        accepted_tokens: drafted tokens the model accepted: each saved a decode step.
    """

    drafts: int
    drafted_tokens: int
    accepted_tokens: int

    @property
    def acceptance_rate(self) -> float:
        """The share of drafted tokens accepted (0.0 without drafts)."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0


@dataclass(frozen=True)
class Completion:
    """The result of a generation.

    ``finish_reason`` is ``"stop"`` (end-of-generation token or stop string),
    ``"length"`` (``max_tokens`` reached), ``"context_full"`` (the context
    window is full), ``"cancelled"`` or ``"grammar_dead_end"`` (the grammar
    allows no next token).
    """

    text: str
    tokens: List[int]
    finish_reason: str
    timings: Timings
    logprobs: Optional[List[float]] = None
    metrics: Optional[RequestMetrics] = None
    #: per token, its ``StreamConfig.top_logprobs`` most likely ``(token id, log-probability)``
    top_logprobs: Optional[List[Tuple[Tuple[int, float], ...]]] = None


def timeout_error(timeout_ms: Optional[int]) -> RequestTimeoutError:
    return RequestTimeoutError(f"the request did not finish within timeout_ms={timeout_ms}")


def new_sampler(model: "_core.LlamaModel", cfg: StreamConfig) -> "_core.SamplerChain":
    """The C sampling (chain and grammar) for *cfg*; GrammarError if its grammar is invalid."""
    g = cfg.constraint
    seed = 0xFFFFFFFF if cfg.seed is None else cfg.seed
    if g is None:
        return _core.SamplerChain(model, cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p, cfg.repeat_penalty,
                                  cfg.repeat_last_n, seed, cfg.frequency_penalty, cfg.presence_penalty,
                                  logit_bias=cfg.logit_bias)
    sampler = _core.SamplerChain(model, cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p, cfg.repeat_penalty,
                                 cfg.repeat_last_n, seed, cfg.frequency_penalty, cfg.presence_penalty,
                                 g.text, g.root, g.triggers, g.trigger_tokens, g.preserved_tokens, g.reasoning,
                                 g.reasoning_open, cfg.logit_bias)
    if g.prefill_tokens:
        try:
            sampler.prefill(g.prefill_tokens)
        except BaseException:
            sampler.close()
            raise
    return sampler


def new_speculator(cfg: StreamConfig, model: "_core.LlamaModel",
                   has_draft_model: bool) -> "Optional[_core.Speculator]":
    """The C state of *cfg*'s speculative decoding (None: off) on a decoder
    of *model* that has (or not) a draft model; InvalidConfigError if it asks
    for a draft model that is not there, or *model* cannot drop a rejected
    draft (a recurrent or hybrid model's state)."""
    spec = cfg.speculative
    if spec is None:
        return None
    if not model.can_drop_tail:
        raise InvalidConfigError("speculative decoding needs a model whose memory can drop rejected drafted "
                                 "tokens; this one is recurrent (or hybrid): decode without speculative")
    if spec.method == "draft_model" and not has_draft_model:
        raise InvalidConfigError("speculative.method='draft_model' needs a draft model: load one with "
                                 "create_context(draft_model=...), AsyncConfig(draft_model=...) or "
                                 "mullama serve --draft-model")
    use_model = spec.method == "draft_model" or (spec.method == "auto" and has_draft_model)
    return _core.Speculator(spec.max_draft, spec.ngram_min, spec.ngram_max, use_model, spec.adaptive)


class _TextAssembler:
    """Turns token bytes into text that is valid UTF-8 and free of stop strings."""

    __slots__ = ("_decode", "_stops", "_held", "_max_hold")

    def __init__(self, stops: Tuple[str, ...]) -> None:
        self._decode = codecs.getincrementaldecoder("utf-8")("replace").decode
        self._stops = stops
        self._held = ""
        self._max_hold = max((len(s) for s in stops), default=1) - 1

    def feed(self, piece: bytes) -> Tuple[str, bool]:
        """Text released by *piece*, and whether a stop string was reached."""
        text = self._held + self._decode(piece)
        if not self._stops:
            return text, False
        cut = -1
        for s in self._stops:
            i = text.find(s)
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
        if cut >= 0:
            self._held = ""
            return text[:cut], True
        # hold back the longest tail that could begin a stop string: for each
        # stop, the first place in its reach where its first character occurs
        # and the rest of the text is a prefix of it
        n = len(text)
        keep = 0
        for s in self._stops:
            first = s[0]
            i = text.find(first, max(0, n - len(s) + 1, n - self._max_hold))
            while 0 <= i and n - i > keep:
                if s.startswith(text[i:]):
                    keep = n - i
                    break
                i = text.find(first, i + 1)
        if keep:
            self._held = text[n - keep:]
            return text[:n - keep], False
        self._held = ""
        return text, False

    def flush(self) -> str:
        text = self._held + self._decode(b"", True)
        self._held = ""
        return text


class Generation:
    """One generation's output and clock, filled chunk by chunk: what a
    :class:`~mullama.aio.TokenStream` reads, whichever path produces it.

    The clock: ``t_submit`` when it was asked for, ``t_start`` when its
    prompt's evaluation began, ``t_first`` at its first token, ``t_end`` when
    it ended (``finish_reason`` set). ``error``: why it failed, if it did;
    ``timeout_ms``: the deadline that ends it with finish reason ``"timeout"``
    (:attr:`timed_out`).
    """

    #: tokens in the context once the prompt is evaluated (None before)
    prompt_end: Optional[int] = None
    timeout_ms: Optional[int] = None

    def __init__(self, config: StreamConfig) -> None:
        self.config = config
        self.error: Optional[BaseException] = None
        self.text = _TextAssembler(config.stop)
        self.tokens: List[int] = []
        self.pieces: List[str] = []
        self.logprobs: List[float] = []
        self.top_logprobs: List[Tuple[Tuple[int, float], ...]] = []
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.drafted_tokens = 0
        self.accepted_tokens = 0
        self.finish_reason: Optional[str] = None
        self.t_submit = time.perf_counter()
        self.t_start: Optional[float] = None
        self.t_first: Optional[float] = None
        self.t_end: Optional[float] = None

    @property
    def finished(self) -> bool:
        return self.t_end is not None

    @property
    def timed_out(self) -> bool:
        """It was ended at its deadline (finish reason ``"timeout"``)."""
        return self.finish_reason == "timeout"

    def cancel(self) -> None:
        """Stop it from any thread (it ends at the producer's next step)."""
        raise NotImplementedError

    def add(self, toks: Sequence[int], pieces: Sequence[bytes], lps: Optional[Sequence[float]], first_pos: int,
            ends: bool, top: Optional[Sequence[Tuple[Tuple[int, float], ...]]] = None
            ) -> Tuple[List[TokenData], bool]:
        """Record a chunk of tokens from C (the first at position *first_pos*;
        *ends*: its last token ends the generation) and return its
        ``TokenData`` and whether a stop string ended it. Tokens after a stop
        string are dropped: the caller forgets them."""
        if toks and self.t_first is None:
            self.t_first = time.perf_counter()
        batch = []
        last = len(toks) - 1
        for i, tok in enumerate(toks):
            text, stopped = self.text.feed(pieces[i])
            final = stopped or (ends and i == last)
            if final and not stopped:
                text += self.text.flush()
            lp = lps[i] if lps is not None else None
            alternatives = top[i] if top is not None else None
            self.tokens.append(tok)
            self.pieces.append(text)
            if lp is not None:
                self.logprobs.append(lp)
            if alternatives is not None:
                self.top_logprobs.append(alternatives)
            batch.append(TokenData(tok, text, first_pos + i, lp, final, alternatives))
            if stopped:
                return batch, True
        return batch, False

    def end(self, reason: str) -> None:
        """The generation is over, for *reason* (its finish reason)."""
        if self.t_end is None:
            self.finish_reason = reason
            self.t_end = time.perf_counter()

    def timings(self) -> Timings:
        end = self.t_end or time.perf_counter()
        start = self.t_start or end
        first = self.t_first or end
        return Timings(
            prompt_tokens=self.prompt_tokens,
            prompt_ms=(first - start) * 1e3,
            generated_tokens=len(self.tokens),
            generation_ms=(end - first) * 1e3,
            time_to_first_token_ms=(first - self.t_submit) * 1e3,
            queue_ms=(start - self.t_submit) * 1e3,
            cached_tokens=self.cached_tokens,
            drafted_tokens=self.drafted_tokens,
            accepted_tokens=self.accepted_tokens,
        )

    def metrics(self) -> RequestMetrics:
        t = self.timings()
        n = len(self.tokens)
        gen_s = max(t.generation_ms / 1e3, 1e-9)
        evaluated = t.evaluated_prompt_tokens
        return RequestMetrics(
            queue_ms=t.queue_ms,
            time_to_first_token_ms=t.time_to_first_token_ms,
            prompt_tokens=self.prompt_tokens,
            prompt_tokens_per_s=evaluated / max(t.prompt_ms / 1e3, 1e-9) if self.t_first else 0.0,
            generated_tokens=n,
            generation_tokens_per_s=(n - 1) / gen_s if n > 1 else 0.0,
            finish_reason=self.finish_reason or "",
            cached_tokens=self.cached_tokens,
            drafted_tokens=self.drafted_tokens,
            accepted_tokens=self.accepted_tokens,
        )

    def completion(self) -> Completion:
        """The result; raises what ended it if it failed or timed out."""
        if self.error is not None:
            raise self.error
        if self.timed_out:
            raise timeout_error(self.timeout_ms)
        if not self.finished:
            raise MullamaError("the generation has not finished")
        return Completion(
            text="".join(self.pieces),
            tokens=list(self.tokens),
            finish_reason=self.finish_reason or "",
            timings=self.timings(),
            logprobs=list(self.logprobs) if self.config.include_probabilities else None,
            metrics=self.metrics(),
            top_logprobs=list(self.top_logprobs) if self.config.top_logprobs else None,
        )
