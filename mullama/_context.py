"""Context: a KV cache, its conversation, and generation from it."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generator, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np

from . import _core
from ._config import StreamConfig, token_list
from ._errors import AbortedError, InvalidConfigError, MullamaError, StateError
from ._generation import FINISH_REASONS, Completion, Generation, TokenData, new_sampler, new_speculator
from ._owner import Owner

if TYPE_CHECKING:
    from ._chat import Message
    from ._model import Model
    from ._tools import ChatCompletion, ChatDelta, ChatPlan, ToolChoice

__all__ = ["Context", "ThreadStats"]

_log = logging.getLogger("mullama")

Prompt = Union[str, Sequence[int]]

#: a stream hands tokens back to Python at least this often (seconds)
STREAM_INTERVAL_S = 0.02
#: generate() returns to Python this often, so Ctrl-C is seen promptly
GENERATE_INTERVAL_S = 0.25


@dataclass(frozen=True)
class ThreadStats:
    """The compute threads of a context or engine (see ``adaptive_threads``).

    ``threads`` are in use now, at most ``max_threads``. Under CPU contention
    the thread governor moves to fewer threads: ``changes`` counts its moves,
    ``watchdog_aborts`` the steps it stopped because they ran far longer than
    usual (each was run again, with fewer threads), ``trials`` the short runs
    at another thread count it measured. ``last_step_ms`` is the time of the
    last ``llama_decode``.
    """

    threads: int
    max_threads: int
    adaptive: bool
    steps: int
    changes: int
    watchdog_aborts: int
    trials: int
    last_step_ms: float

    @classmethod
    def _from_core(cls, d: dict) -> "ThreadStats":
        return cls(d["threads"], d["max_threads"], bool(d["adaptive"]), d["steps"], d["changes"],
                   d["watchdog_aborts"], d["trials"], d["last_step_s"] * 1e3)


def log_thread_changes(core, seen: int, what: str) -> int:
    """Log (INFO, logger ``mullama``) that *core*'s governor changed its thread
    count since it had made *seen* changes; returns the count now."""
    changes = core.thread_changes
    if changes != seen and _log.isEnabledFor(logging.INFO):
        st = ThreadStats._from_core(core.thread_stats())
        _log.info("%s now decodes with %d of %d threads (CPU contention %s; last step %.1f ms, "
                  "%d steps stopped by the watchdog so far)", what, st.threads, st.max_threads,
                  "seen" if st.threads < st.max_threads else "gone", st.last_step_ms, st.watchdog_aborts)
    return changes


class Context(Owner):
    """An inference context: a KV cache holding one conversation.

    Each :meth:`generate` or :meth:`stream` call appends its prompt to what the
    context already holds and generates from there; the generated tokens stay
    in the context, so the next call continues the conversation. :meth:`reset`
    starts over. A context serves one caller at a time: using it from a second
    thread (or a second stream) while one runs raises :class:`BusyError`.

    Create contexts with :meth:`Model.create_context`. A context cannot be
    pickled or copied (:class:`NotCopyableError`); :meth:`save_state` and
    :meth:`load_state` move a conversation.
    """

    _copy_hint = ("create a context in the other process (save_state() and load_state() move a "
                  "conversation); a copy would share the KV cache")

    def __init__(self, model: "Model", core: "_core.LlamaContext", threads: int,
                 draft: "Optional[tuple[_core.DraftModel, Optional[Model]]]" = None) -> None:
        self._model = model
        self._core = core
        #: the most compute threads this context uses (see :meth:`thread_stats`)
        self.threads = threads
        self._thread_changes = 0
        #: the draft model's context, and the draft model if this context loaded it (closed with it)
        self._draft = draft

    # -- lifetime -------------------------------------------------------------

    def close(self) -> None:
        """Free the KV cache (idempotent). A running generation is cancelled first."""
        self._core.close()
        if self._draft is not None:
            drafter, owned = self._draft
            drafter.close()
            if owned is not None:
                owned.close()

    @property
    def closed(self) -> bool:
        return self._core.closed

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<mullama.Context {'closed' if self.closed else f'{self.n_past}/{self.n_ctx} tokens'}>"

    # -- state ----------------------------------------------------------------

    @property
    def model(self) -> "Model":
        return self._model

    @property
    def n_ctx(self) -> int:
        """How many tokens the context holds at most."""
        return self._core.n_ctx

    @property
    def n_past(self) -> int:
        """How many tokens the context holds now."""
        return self._core.n_past

    @property
    def tokens(self) -> List[int]:
        """The conversation so far, as token ids."""
        return self._core.tokens

    def kv_used(self) -> int:
        """KV cells in use: the conversation's tokens already evaluated into
        the cache (``n_past`` may count one more, sampled and not yet decoded)."""
        return self._core.n_kv

    def reset(self) -> None:
        """Forget the conversation (empties the KV cache)."""
        self._core.claim()
        try:
            self._core.reset()
        finally:
            self._core.release()

    def truncate(self, n_tokens: int) -> None:
        """Forget every token from position *n_tokens* on (their KV cells too):
        the conversation goes back to its first *n_tokens* tokens."""
        self._core.claim()
        try:
            self._core.truncate(n_tokens)
        finally:
            self._core.release()

    def clear_cancel(self) -> None:
        """Forget a :meth:`cancel` that came when nothing was running: the next
        generation is not stopped by it. (Async code calls this before handing
        the context to a worker thread, so a cancellation from then on counts.)"""
        self._core.clear_cancel()

    def thread_stats(self) -> ThreadStats:
        """Its compute threads now: how many, and what the thread governor did."""
        return ThreadStats._from_core(self._core.thread_stats())

    def cancel(self) -> None:
        """Stop the generation running on this context, from any thread.

        The loop stops within about one token, also in the middle of a prompt
        evaluation; the generation ends with ``finish_reason == "cancelled"``.
        """
        self._core.cancel()

    def save_state(self, path: Union[str, "os.PathLike[str]"]) -> None:
        """Write the KV cache and the conversation's tokens to *path*."""
        self._core.claim()
        try:
            self._core.save_state(os.fspath(path))
        finally:
            self._core.release()

    def load_state(self, path: Union[str, "os.PathLike[str]"]) -> None:
        """Restore a state written by :meth:`save_state` (same model and context size)."""
        p = os.fspath(path)
        if not os.path.isfile(p):
            raise StateError(f"state file not found: {p}")
        self._core.claim()
        try:
            self._core.load_state(p)
        finally:
            self._core.release()

    # -- low level: decode and read logits ------------------------------------

    def eval(self, tokens: Sequence[int], *, clear_cancel: bool = True) -> None:
        """Append *tokens* to the context and evaluate them (prompt processing).

        *clear_cancel*: forget an earlier :meth:`cancel` first (async code
        passes False: it clears the flag itself, before its worker starts, so
        that a cancellation from then on counts).

        Raises:
            InvalidTokenError, ContextOverflowError, AbortedError (cancel()).
        """
        toks = token_list(tokens)
        self._core.claim()
        try:
            if clear_cancel:
                self._core.clear_cancel()
            if self._core.decode(toks) == _core.STATUS_ABORTED:
                raise AbortedError("the evaluation was cancelled")
        finally:
            self._core.release()

    def logits(self) -> np.ndarray:
        """The last token's logits, a float32 array of ``n_vocab`` values.

        Zero-copy: the array views llama.cpp's buffer and is valid until the next
        evaluation on this context; copy it to keep it.
        """
        self._core.claim()
        try:
            return np.frombuffer(self._core.logits(), dtype=np.float32)
        finally:
            self._core.release()

    # -- generation -------------------------------------------------------------

    def generate(self, prompt: Prompt, config: Optional[StreamConfig] = None) -> Completion:
        """Generate a completion of *prompt* (text or token ids).

        Returns a :class:`Completion`; cancellation returns what was generated so
        far with ``finish_reason == "cancelled"``.
        """
        run = _Run(self, prompt, config, interval=GENERATE_INTERVAL_S)
        for _ in run.batches():
            pass
        return run.completion()

    def chat(self, messages: Sequence["Message"], config: Optional[StreamConfig] = None, *,
             template: Optional[str] = None, tools: Optional[Sequence[Any]] = None,
             tool_choice: "ToolChoice" = None, parallel_tool_calls: Optional[bool] = None,
             chat_template_kwargs: Optional[Mapping[str, Any]] = None) -> "ChatCompletion":
        """Answer a conversation: the assistant's next message.

        The context then holds *messages* and the answer. Pass the whole
        conversation each turn (with the previous answers as ``"assistant"``
        messages, :meth:`ChatCompletion.message`): the tokens it shares with what
        the context already holds are not evaluated again, so a turn costs only
        its new tokens.

        Args:
            messages: ``[{"role": "system"|"user"|"assistant"|"tool", "content": str, ...}, ...]``;
                assistant messages may carry OpenAI ``tool_calls``, tool results
                their ``tool_call_id``.
            template: a Jinja chat template or a llama.cpp built-in format name
                (default: the model's own; ChatTemplateError if it has none).
            tools: OpenAI function tools (``[{"type": "function", "function":
                {"name", "description", "parameters"}}]``) the model may call:
                the reply's ``tool_calls``. Rendered by llama.cpp's chat library,
                which gives the tool-call grammar and parser of the template.
            tool_choice: ``"auto"`` (default), ``"none"``, ``"required"`` or
                ``{"type": "function", "function": {"name": ...}}``.
            parallel_tool_calls: let the model make several calls in one reply.
            chat_template_kwargs: extra variables for the template
                (``{"enable_thinking": False}``, ``{"documents": [...]}``).

        Returns:
            A :class:`ChatCompletion`: ``content``, ``reasoning_content``,
            ``tool_calls`` and everything a :class:`Completion` has.
        """
        prepared = self._prepare(messages, config, template, tools, tool_choice, parallel_tool_calls,
                                 chat_template_kwargs)
        return self._complete(*prepared)

    def chat_stream(self, messages: Sequence["Message"], config: Optional[StreamConfig] = None, *,
                    template: Optional[str] = None, tools: Optional[Sequence[Any]] = None,
                    tool_choice: "ToolChoice" = None, parallel_tool_calls: Optional[bool] = None,
                    chat_template_kwargs: Optional[Mapping[str, Any]] = None) -> Iterator[TokenData]:
        """Like :meth:`chat`, yielding the tokens of the answer as they come
        (:meth:`chat_deltas` yields them parsed into content and tool calls)."""
        tokens, cfg, _ = self._prepare(messages, config, template, tools, tool_choice, parallel_tool_calls,
                                       chat_template_kwargs)
        return self.stream(self._keep_prefix(tokens), cfg)

    def chat_deltas(self, messages: Sequence["Message"], config: Optional[StreamConfig] = None, *,
                    template: Optional[str] = None, tools: Optional[Sequence[Any]] = None,
                    tool_choice: "ToolChoice" = None, parallel_tool_calls: Optional[bool] = None,
                    chat_template_kwargs: Optional[Mapping[str, Any]] = None) -> Iterator["ChatDelta"]:
        """Like :meth:`chat`, yielding :class:`ChatDelta` pieces of the answer as
        they come: text of ``content`` and ``reasoning_content``, and tool calls
        (each call's id and name once, then pieces of its arguments), in the
        order a client assembles them. The last delta has ``finish_reason``."""
        tokens, cfg, plan = self._prepare(messages, config, template, tools, tool_choice, parallel_tool_calls,
                                          chat_template_kwargs)
        return self._deltas(self._keep_prefix(tokens), cfg, plan)

    def _prepare(self, messages: Sequence["Message"], config: Optional[StreamConfig], template: Optional[str],
                 tools: Optional[Sequence[Any]], tool_choice: "ToolChoice", parallel_tool_calls: Optional[bool],
                 kwargs: Optional[Mapping[str, Any]]) -> "tuple[List[int], Optional[StreamConfig], Optional[ChatPlan]]":
        """A chat's whole prompt, its config and its llama.cpp chat-library plan (None for plain chat)."""
        from ._chat import chat_tokens
        from ._tools import plan_chat

        plan = plan_chat(self._model, messages, template, tools=tools, tool_choice=tool_choice,
                         parallel_tool_calls=parallel_tool_calls, chat_template_kwargs=kwargs)
        if plan is None:
            return chat_tokens(self._model, messages, template, kwargs), config, None
        return plan.tokens, plan.config(config if config is not None else StreamConfig()), plan

    def _complete(self, tokens: List[int], config: Optional[StreamConfig],
                  plan: "Optional[ChatPlan]") -> "ChatCompletion":
        """Generate a prepared chat's reply (keeping the prefix the context shares) and parse it."""
        from ._tools import plain_completion

        done = self.generate(self._keep_prefix(tokens), config)
        if plan is None:
            return plain_completion(done)
        parser = plan.reply_parser()
        try:
            parser.feed(done.text, final=True, cut=done.finish_reason != "stop")
            return parser.completion(done)
        finally:
            parser.close()

    def _deltas(self, tokens: List[int], config: Optional[StreamConfig],
                plan: "Optional[ChatPlan]") -> Iterator["ChatDelta"]:
        """The ChatDelta pieces of generating from *tokens* (the part the context does not hold yet)."""
        from ._tools import ChatDelta

        run = _Run(self, tokens, config, interval=STREAM_INTERVAL_S)
        if plan is None:
            for batch in run.batches():
                text = "".join(t.text for t in batch)
                if text:
                    yield ChatDelta(content=text)
            yield ChatDelta(finish_reason=run.completion().finish_reason)
            return
        parser = plan.reply_parser()
        try:
            for batch in run.batches():
                yield from parser.feed("".join(t.text for t in batch))
            done = run.completion()
            yield from parser.feed("", final=True, cut=done.finish_reason != "stop")
            yield ChatDelta(finish_reason=parser.completion(done).finish_reason)
        finally:
            parser.close()

    def chat_prompt(self, messages: Sequence["Message"], template: Optional[str] = None,
                    chat_template_kwargs: Optional[Mapping[str, Any]] = None) -> List[int]:
        """Format *messages*, keep the part of the context they share, and
        return the tokens still to evaluate (at least one)."""
        from ._chat import chat_tokens

        return self._keep_prefix(chat_tokens(self._model, messages, template, chat_template_kwargs))

    def _keep_prefix(self, tokens: List[int]) -> List[int]:
        """Keep the part of the context *tokens* start with; the tokens still to evaluate (at least one)."""
        from ._chat import common_prefix

        self._core.claim()
        try:
            keep = min(common_prefix(self._core.tokens, tokens), len(tokens) - 1)
            self._core.truncate(keep)
        finally:
            self._core.release()
        return tokens[keep:]

    def stream(self, prompt: Prompt, config: Optional[StreamConfig] = None) -> Iterator[TokenData]:
        """Yield the tokens of a generation as they are produced.

        The context is held by the stream until it is exhausted or closed
        (``close()`` on the generator, or leaving a ``for`` loop and dropping it).
        """
        return iter(_Run(self, prompt, config, interval=STREAM_INTERVAL_S))


class _Run(Generation):
    """One generation on a context: prompt evaluation, then chunks of tokens from the C loop."""

    def __init__(self, ctx: Context, prompt: Prompt, config: Optional[StreamConfig], interval: float,
                 clear_cancel: bool = True) -> None:
        if config is None:
            config = StreamConfig()
        elif not isinstance(config, StreamConfig):
            raise InvalidConfigError(f"config must be a StreamConfig, got {type(config).__name__}")
        super().__init__(config)
        self._ctx = ctx
        self._prompt = prompt if isinstance(prompt, str) else token_list(prompt)
        self._interval = interval
        self._clear_cancel = clear_cancel

    def cancel(self) -> None:
        if not self.finished:
            self._ctx.cancel()

    def batches(self) -> Generator[List[TokenData], None, None]:
        """The generation as one list of tokens per trip into C (what a stream hands over)."""
        core = self._ctx._core
        core.claim()
        try:
            yield from self._generate(core)
        finally:
            core.release()

    def __iter__(self) -> Iterator[TokenData]:
        batches = self.batches()
        try:
            for batch in batches:
                for tok in batch:
                    try:
                        yield tok
                    except GeneratorExit:
                        # the consumer left: keep only what it has seen in the conversation
                        if not tok.is_final:
                            self._ctx._core.truncate(tok.position + 1)
                        raise
        finally:
            batches.close()

    def _generate(self, core: "_core.LlamaContext") -> Iterator[List[TokenData]]:
        model = self._ctx._model
        if self._clear_cancel:
            core.clear_cancel()
        self.t_start = time.perf_counter()
        prompt = self._prompt
        if isinstance(prompt, str):
            prompt = model.tokenize(prompt, add_bos=core.n_past == 0)
        if not prompt and core.n_past == 0:
            raise MullamaError("the prompt is empty and the context holds nothing to continue from")
        self.prompt_tokens = len(prompt)
        # a bad grammar or speculative setting fails before anything is decoded
        speculator = new_speculator(self.config, model._core, self._ctx._draft is not None)
        sampler = new_sampler(model._core, self.config)
        try:
            if core.decode(prompt) == _core.STATUS_ABORTED:
                self.end("cancelled")
                return
            self.prompt_end = core.n_past
            # every generated token must fit in the context
            limit = min(self.config.max_tokens, self._ctx.n_ctx - core.n_past)
            if limit <= 0:
                self.end("context_full")
                return
            yield from self._loop(core, sampler, speculator, limit)
        finally:
            sampler.close()
            self.end("cancelled")  # the consumer stopped early: the generation counts as cancelled

    def _loop(self, core: "_core.LlamaContext", sampler: "_core.SamplerChain",
              speculator: "Optional[_core.Speculator]", limit: int) -> Iterator[List[TokenData]]:
        want_lp, n_top = self.config.include_probabilities, self.config.top_logprobs
        chunk = 1  # the first chunk is one token, so that the first token arrives at once
        while True:
            n = len(self.tokens)
            status, toks, pieces, lps, top = core.generate(sampler, min(chunk, limit - n), self._interval, want_lp,
                                                           n_top, speculator)
            chunk = limit
            if speculator is not None:
                self.drafted_tokens, self.accepted_tokens = speculator.drafted, speculator.accepted
            if core.thread_changes != self._ctx._thread_changes:
                self._ctx._thread_changes = log_thread_changes(core, self._ctx._thread_changes, "a context")
            at_limit = n + len(toks) == limit
            # a cancelled generation ends at the text released so far (see TokenData)
            ends = at_limit or status not in (_core.STATUS_OK, _core.STATUS_ABORTED)
            batch, stopped = self.add(toks, pieces, lps, core.n_past - len(toks), ends, top)
            if stopped:
                core.truncate(batch[-1].position + 1)  # drop tokens sampled past the stop string
                self.end("stop")
            elif status != _core.STATUS_OK:
                self.end(FINISH_REASONS[status])
            elif at_limit:
                self.end("length" if limit == self.config.max_tokens else "context_full")
            if batch:
                yield batch
            if self.finished:
                return
