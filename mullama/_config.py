"""Sampling settings and shared validation helpers."""

from __future__ import annotations

import math
import random
import os
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ._errors import GrammarError, InvalidConfigError, InvalidTokenError

__all__ = ["StreamConfig", "SpeculativeConfig", "Grammar", "default_threads", "resolve_threads"]

_U32_MAX = 0xFFFFFFFF
_I32_MAX = 0x7FFFFFFF

#: the server: seconds a request body may take to arrive, and a response may make no progress reaching its client
SERVER_IO_TIMEOUT_S = 60.0
#: the server: seconds a connection may stay without a complete request head (after opening, between requests)
SERVER_KEEP_ALIVE_TIMEOUT_S = 5.0

#: most stop strings a generation may have (every generated token is checked against each:
#: thousands of them would slow every token of the request, and of the engine's other requests)
MAX_STOP_STRINGS = 64
#: most bytes (UTF-8) of all stop strings together
MAX_STOP_BYTES = 8192
#: most alternatives' log-probabilities per token (OpenAI's bound; _core.TOP_LOGPROBS_MAX)
MAX_TOP_LOGPROBS = 20
#: most bytes of a JSON schema (as JSON): llama.cpp's converter takes more than a
#: second on a schema of 1,000 properties (68 KB), and the time grows faster than the size
MAX_SCHEMA_BYTES = 64 * 1024


def default_threads() -> int:
    """The number of cores this process may run on (its CPU affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_threads(name: str, value: Optional[int], stacklevel: int = 3) -> int:
    """*value* checked, ``None`` as :func:`default_threads`, and at most the
    usable cores: more compute threads than cores spin against each other at
    ggml's barrier, so a larger number is capped, with a ``RuntimeWarning``."""
    if value is None:
        return default_threads()
    value = check_int(name, value, minimum=1, maximum=1024)
    cores = default_threads()
    if value > cores:
        warnings.warn(f"{name}={value} is more than the {cores} cores this process may use; using {cores} "
                      "(more compute threads than cores wait for each other and run slower)",
                      RuntimeWarning, stacklevel=stacklevel)
        return cores
    return value


def check_int(name: str, value: object, *, minimum: int, maximum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidConfigError(f"{name} must be an integer, got {type(value).__name__} {_shown(value)}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise InvalidConfigError(f"{name} must be {bound}, got {_shown(value)}")
    return value


def check_float(name: str, value: object, *, minimum: float, maximum: float = math.inf,
                min_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidConfigError(f"{name} must be a number, got {type(value).__name__} {_shown(value)}")
    try:
        v = float(value)
    except OverflowError:  # an int beyond any float (JSON allows one)
        v = math.inf if value > 0 else -math.inf  # type: ignore[operator]
    if not math.isfinite(v) or v < minimum or v > maximum or (min_open and v == minimum):
        lo = f"> {minimum}" if min_open else f">= {minimum}"
        hi = "" if maximum == math.inf else f" and <= {maximum}"
        raise InvalidConfigError(f"{name} must be {lo}{hi}, got {_shown(value)}")
    return v


def _shown(value: object) -> str:
    """repr() of a value in an error message; an integer too long for Python to print
    (sys.get_int_max_str_digits) is shown by its size."""
    try:
        return repr(value)
    except ValueError:
        if not isinstance(value, int):
            raise
        return f"an integer of {value.bit_length()} bits"


@dataclass(frozen=True)
class Grammar:
    """A GBNF grammar (llama.cpp's grammar format) the output must follow.

    Its syntax is checked by llama.cpp's own parser when a generation starts,
    before anything is decoded: a grammar that does not parse raises
    :class:`GrammarError` naming the problem, its line and column.

    Args:
        text: the grammar's rules, e.g. ``'root ::= "yes" | "no"'``.
        root: the rule the whole output must match.
        triggers: regular expressions that make the grammar *lazy*: the output is
            free until one of them matches (searched from the start of the
            output), and follows the grammar from the match on (from its first
            group, if it has one). This is how tool-call grammars apply only once
            a model starts a call.
        trigger_tokens: token ids that trigger a lazy grammar the same way.
        prefill_tokens: tokens the grammar is fed before the output (the header of
            a reply that a chat template wrote and the grammar starts with).
        preserved_tokens: special tokens whose text the output keeps (a tool-call
            tag such as ``<tool_call>``; other special tokens are written as nothing).
        reasoning: the tags around a model's thinking (``("<think>", "</think>")``):
            a lazy grammar waits while the model thinks, so that a trigger in a
            thought does not start a call.
        reasoning_open: the output starts inside a thought (the template opened it).

    Chat with ``tools`` makes its grammar from the chat template, with all of these.
    """

    text: str
    root: str = "root"
    triggers: Tuple[str, ...] = ()
    trigger_tokens: Tuple[int, ...] = ()
    prefill_tokens: Tuple[int, ...] = ()
    preserved_tokens: Tuple[int, ...] = ()
    reasoning: Tuple[str, ...] = ()
    reasoning_open: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise InvalidConfigError(f"a grammar must be a str of GBNF rules, got {type(self.text).__name__}")
        if not self.text.strip():
            raise InvalidConfigError("the grammar is empty")
        try:
            self.text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidConfigError(f"the grammar is not valid text: {exc.reason} at character {exc.start}") from None
        if not isinstance(self.root, str) or not self.root:
            raise InvalidConfigError(f"the grammar's root must be a rule name, got {self.root!r}")
        object.__setattr__(self, "triggers", _str_tuple("grammar trigger", self.triggers))
        for name in ("trigger_tokens", "prefill_tokens", "preserved_tokens"):
            object.__setattr__(self, name, tuple(token_list(getattr(self, name))))
        object.__setattr__(self, "reasoning", _str_tuple("reasoning tag", self.reasoning))
        if self.reasoning and (len(self.reasoning) != 2 or not all(self.reasoning)):
            raise InvalidConfigError(f"reasoning must be two tags (start, end), got {self.reasoning!r}")

    @property
    def lazy(self) -> bool:
        """Whether the grammar waits for a trigger."""
        return bool(self.triggers or self.trigger_tokens)


#: how speculative decoding drafts (SpeculativeConfig.method)
SPECULATIVE_METHODS = ("auto", "prompt_lookup", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding of a request: draft several tokens, verify them in
    one batched decode, keep those the model would have produced.

    The drafts come from *prompt lookup*: the tokens that followed the latest
    earlier occurrence (in the prompt or the output so far) of the last
    ``ngram_max`` tokens, or of fewer down to ``ngram_min``. That pays off on
    input-grounded work (editing a file, extracting from a document, answers
    quoting their sources), where the output copies long runs of the input.

    The output is what decoding without speculation gives: greedy decoding
    gives the same tokens, and sampled decoding the same distribution (with a
    seed, the same tokens), since every token is sampled by the request's own
    sampler after the tokens before it were accepted. (Bit for bit where
    llama.cpp computes a token's logits the same in a batch of any size: F32,
    Q4_0, Q4_1 and Q8_0 weights; not the repacked K-quants, see the README.)
    Each generation measures what a draft costs and how much of it is
    accepted, drafts the length that pays best, and drafts nothing (but for a
    probe now and then) when no draft beats a plain step.

    With a draft model (``Model.create_context(draft_model=...)``,
    ``AsyncConfig(draft_model=...)``, ``mullama serve --draft-model``), a
    smaller model of the same family drafts instead, greedily: that helps on
    any text the small model predicts well, at the cost of running it.

    Attributes:
        max_draft: most tokens drafted per step (1-256).
        ngram_min: the shortest n-gram looked up (1-64).
        ngram_max: the longest n-gram looked up, tried first (``ngram_min``-64).
        method: ``"auto"`` (the draft model when there is one, else prompt
            lookup), ``"prompt_lookup"`` or ``"draft_model"`` (an error where
            there is no draft model).
        adaptive: choose each draft's length by its measured cost (default);
            False always drafts up to ``max_draft`` tokens (for measurements
            and tests whose drafts must not depend on the machine's speed).
    """

    max_draft: int = 16
    ngram_min: int = 3
    ngram_max: int = 5
    method: str = "auto"
    adaptive: bool = True

    def __post_init__(self) -> None:
        check_int("speculative.max_draft", self.max_draft, minimum=1, maximum=256)
        check_int("speculative.ngram_min", self.ngram_min, minimum=1, maximum=64)
        check_int("speculative.ngram_max", self.ngram_max, minimum=self.ngram_min, maximum=64)
        if not isinstance(self.adaptive, bool):
            raise InvalidConfigError(f"speculative.adaptive must be a bool, got {_shown(self.adaptive)}")
        if self.method not in SPECULATIVE_METHODS:
            raise InvalidConfigError(f"speculative.method must be one of {', '.join(SPECULATIVE_METHODS)}, "
                                     f"got {_shown(self.method)}")


def _str_tuple(what: str, items: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    if isinstance(items, str):
        items = (items,)
    try:
        out = tuple(items)
    except TypeError:
        raise InvalidConfigError(f"{what}s must be a sequence of str, got {type(items).__name__}") from None
    for x in out:
        if not isinstance(x, str):
            raise InvalidConfigError(f"a {what} must be a str, got {type(x).__name__} {x!r}")
    return out


@dataclass(frozen=True)
class StreamConfig:
    """How to sample a generation. The defaults are llama.cpp's.

    Args:
        max_tokens: most tokens to generate.
        temperature: 0 means greedy (always the most likely token).
        top_k: keep the k most likely tokens (0 = off).
        top_p: nucleus sampling threshold (1.0 = off).
        min_p: drop tokens below ``min_p`` times the top probability (0 = off).
        repeat_penalty: penalty for tokens among the last ``repeat_last_n`` (1.0 = off).
        repeat_last_n: how many recent tokens the penalties look at.
        frequency_penalty: subtract this times a token's count among the last
            ``repeat_last_n`` tokens from its logit (0 = off; -2..2, as in OpenAI's API).
        presence_penalty: subtract this from the logit of every token seen among
            the last ``repeat_last_n`` tokens (0 = off; -2..2).
        seed: random seed of the sampler; ``None`` picks a random one.
        stop: strings that end the generation; the stop string is not returned.
            At most 64 strings (``MAX_STOP_STRINGS``) of at most 8192 UTF-8
            bytes together (``MAX_STOP_BYTES``).
        include_probabilities: fill ``TokenData.logprob`` with the log-probability
            of each chosen token under the model's raw distribution.
        logit_bias: ``{token id: bias}`` added to the logits before sampling
            (-100..100, as in OpenAI's API: -100 bans a token, 100 all but
            forces it); kept as sorted ``(token, bias)`` pairs.
        top_logprobs: also give, per token, the log-probabilities of this
            many most likely tokens (0..20, found in the C loop without copying
            the logits): ``TokenData.top_logprobs``. More than 0 turns
            ``include_probabilities`` on.
        grammar: a GBNF grammar (a str, or a :class:`Grammar`) the output must
            follow. A generation whose grammar allows no next token ends with
            ``finish_reason == "grammar_dead_end"``.
        json_schema: a JSON schema the output must validate against: a dict, its
            JSON text, or a pydantic model class (its ``model_json_schema()``;
            pydantic is not a dependency of mullama). It becomes a grammar by
            llama.cpp's own converter, the one llama-server uses; a schema it
            cannot convert raises :class:`GrammarError` naming the schema path.
        response_format: OpenAI's ``response_format``: ``{"type": "text"}``,
            ``{"type": "json_object"}`` (any JSON value; llama.cpp's
            ``"schema"`` key is honoured too) or ``{"type": "json_schema",
            "json_schema": {"name": ..., "schema": {...}, "strict": true}}``.
        speculative: speculative decoding (a :class:`SpeculativeConfig`, or
            ``True`` for its defaults); ``None`` (or ``False``) decodes one
            token per step. The output is the same either way (see there).

    At most one of ``grammar``, ``json_schema`` and ``response_format`` may be
    given; :attr:`constraint` is the grammar the output follows.
    """

    max_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: Optional[int] = None
    stop: Tuple[str, ...] = field(default=())
    include_probabilities: bool = False
    logit_bias: Tuple[Tuple[int, float], ...] = ()
    top_logprobs: int = 0
    grammar: Optional[Grammar] = None
    # (dicts: left out of the hash; equal configs still compare equal)
    json_schema: Optional[Any] = field(default=None, hash=False)
    response_format: Optional[Mapping[str, Any]] = field(default=None, hash=False)
    speculative: Optional[SpeculativeConfig] = None

    def __post_init__(self) -> None:
        check_int("max_tokens", self.max_tokens, minimum=1, maximum=_I32_MAX)
        check_float("temperature", self.temperature, minimum=0.0)
        check_int("top_k", self.top_k, minimum=0, maximum=_I32_MAX)
        check_float("top_p", self.top_p, minimum=0.0, maximum=1.0, min_open=True)
        check_float("min_p", self.min_p, minimum=0.0, maximum=1.0)
        check_float("repeat_penalty", self.repeat_penalty, minimum=0.0, min_open=True)
        check_int("repeat_last_n", self.repeat_last_n, minimum=0, maximum=1 << 16)
        check_float("frequency_penalty", self.frequency_penalty, minimum=-2.0, maximum=2.0)
        check_float("presence_penalty", self.presence_penalty, minimum=-2.0, maximum=2.0)
        if self.seed is not None:
            check_int("seed", self.seed, minimum=0, maximum=_U32_MAX - 1)
        object.__setattr__(self, "stop", _check_stop(self.stop))
        if not isinstance(self.include_probabilities, bool):
            raise InvalidConfigError(
                f"include_probabilities must be a bool, got {type(self.include_probabilities).__name__}")
        object.__setattr__(self, "logit_bias", _check_logit_bias(self.logit_bias))
        if self.speculative is True:
            object.__setattr__(self, "speculative", SpeculativeConfig())
        elif self.speculative is False:
            object.__setattr__(self, "speculative", None)
        elif self.speculative is not None and not isinstance(self.speculative, SpeculativeConfig):
            raise InvalidConfigError("speculative must be a SpeculativeConfig, True or None, got "
                                     f"{type(self.speculative).__name__} {_shown(self.speculative)}")
        check_int("top_logprobs", self.top_logprobs, minimum=0, maximum=MAX_TOP_LOGPROBS)
        if self.top_logprobs:
            object.__setattr__(self, "include_probabilities", True)
        if isinstance(self.grammar, str):
            object.__setattr__(self, "grammar", Grammar(self.grammar))
        elif self.grammar is not None and not isinstance(self.grammar, Grammar):
            raise InvalidConfigError(f"grammar must be a str or a Grammar, got {type(self.grammar).__name__}")
        schema: Optional[Dict[str, Any]] = None
        if self.response_format is not None:
            schema = response_format_schema(self.response_format)
            if schema is None:  # {"type": "text"}: no constraint
                object.__setattr__(self, "response_format", None)
        given = [n for n in ("grammar", "json_schema", "response_format") if getattr(self, n) is not None]
        if len(given) > 1:
            raise InvalidConfigError(f"give at most one of grammar, json_schema and response_format, got {given}")
        if self.json_schema is not None:
            schema = json_schema_dict(self.json_schema)
            object.__setattr__(self, "json_schema", schema)
        constraint = self.grammar if schema is None else Grammar(schema_grammar(_json_text(schema)))
        object.__setattr__(self, "_constraint", constraint)

    @property
    def constraint(self) -> Optional[Grammar]:
        """The grammar the output follows: ``grammar``, or the one made from
        ``json_schema`` or ``response_format``; ``None`` if unconstrained."""
        return self._constraint  # type: ignore[attr-defined,no-any-return]

    @classmethod
    def greedy(cls, max_tokens: int = 256, **kwargs: object) -> "StreamConfig":
        """Deterministic decoding: always take the most likely token."""
        return cls(max_tokens=max_tokens, temperature=0.0, **kwargs)  # type: ignore[arg-type]

    def replace(self, **changes: object) -> "StreamConfig":
        """A copy with some fields changed (validated again)."""
        import dataclasses

        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def json_schema_dict(schema: Any) -> Dict[str, Any]:
    """A JSON schema given as a dict, JSON text or a pydantic model class, as a dict."""
    import json

    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):  # pydantic v2, without importing it
        schema = schema.model_json_schema()
    elif isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
    if schema is True:
        schema = {}
    elif schema is False:
        raise GrammarError("the JSON schema is false: it allows no output at all")
    if not isinstance(schema, Mapping):
        raise InvalidConfigError(
            "a JSON schema must be a dict, its JSON text or a pydantic model class, got "
            f"{type(schema).__name__}")
    return dict(schema)


def response_format_schema(fmt: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The JSON schema an OpenAI ``response_format`` asks for (``None`` for text)."""
    if not isinstance(fmt, Mapping):
        raise InvalidConfigError(f"response_format must be a dict, got {type(fmt).__name__}")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_dict({} if fmt.get("schema") is None else fmt["schema"])
    if kind == "json_schema":
        inner = fmt.get("json_schema")
        if inner is None and "schema" in fmt:  # llama.cpp's shorthand
            return json_schema_dict(fmt["schema"])
        if not isinstance(inner, Mapping) or "schema" not in inner:
            raise InvalidConfigError(
                'response_format {"type": "json_schema"} needs "json_schema": {"name": ..., "schema": {...}}')
        return json_schema_dict(inner["schema"])
    raise InvalidConfigError(
        f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def _json_text(schema: Mapping[str, Any]) -> str:
    import json

    try:
        text = json.dumps(schema, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise GrammarError(f"the JSON schema cannot be written as JSON: {e}") from None
    if len(text) > MAX_SCHEMA_BYTES:
        raise GrammarError(f"the JSON schema is {len(text)} bytes as JSON; at most {MAX_SCHEMA_BYTES} are allowed "
                           "(llama.cpp's converter takes seconds on schemas this large)")
    try:
        _check_bounds(schema, "#")
    except RecursionError:
        raise GrammarError("the JSON schema is nested too deeply") from None
    return text


_BOUNDS = (("minLength", "maxLength"), ("minItems", "maxItems"), ("minProperties", "maxProperties"),
           ("minimum", "maximum"))


def _check_bounds(schema: Any, path: str) -> None:
    """A schema whose minimum is above its maximum allows nothing: named here, with its path."""
    if isinstance(schema, Mapping):
        for lo, hi in _BOUNDS:
            a, b = schema.get(lo), schema.get(hi)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
                    and not isinstance(b, bool) and a > b:
                raise GrammarError(f"JSON schema error at {path}: {lo} {a} is above {hi} {b}")
        for key, value in schema.items():
            _check_bounds(value, f"{path}/{key}")
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            _check_bounds(value, f"{path}/{i}")


def choice_configs(config: StreamConfig, n: int) -> List[StreamConfig]:
    """The configurations of *n* choices of one request: choice i samples with
    seed ``config.seed + i`` (wrapping), from a random base seed when
    ``config.seed`` is None, so that choices differ and each can be reproduced
    alone with its seed."""
    base = config.seed if config.seed is not None else random.randrange(_U32_MAX)
    return [config.replace(seed=(base + i) % _U32_MAX) for i in range(n)]


def check_constraint(name: str, value: Any) -> None:
    """Check a ``response_format``, ``json_schema`` or ``grammar`` value the quick way:
    its shape, not yet its conversion to a grammar (which StreamConfig does)."""
    if name == "grammar":
        if not isinstance(value, Grammar):
            Grammar(value)
        return
    schema = response_format_schema(value) if name == "response_format" else json_schema_dict(value)
    if schema is not None:
        _json_text(schema)


@lru_cache(maxsize=128)
def schema_grammar(schema_json: str) -> str:
    """The GBNF grammar of a JSON schema's text (cached: clients send the same schemas again and again)."""
    from . import _core

    return _core.json_schema_to_grammar(schema_json)


def _check_logit_bias(bias: Any) -> Tuple[Tuple[int, float], ...]:
    """``{token id: bias}`` (or pairs) as sorted pairs, each bias in -100..100."""
    if not bias:
        return ()
    try:
        items = list(bias.items()) if isinstance(bias, Mapping) else [tuple(p) for p in bias]
    except TypeError:
        raise InvalidConfigError(f"logit_bias must be a dict of token id to bias, got {type(bias).__name__}") from None
    out = {}
    for pair in items:
        if len(pair) != 2:
            raise InvalidConfigError(f"logit_bias must be a dict of token id to bias, got the item {pair!r}")
        tok, value = pair
        tok = check_int("logit_bias token", tok, minimum=0, maximum=_I32_MAX)
        out[tok] = check_float(f"logit_bias[{tok}]", value, minimum=-100.0, maximum=100.0)
    return tuple(sorted(out.items()))


def _check_stop(stop: Union[str, Sequence[str], None]) -> Tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    try:
        items = tuple(stop)
    except TypeError:
        raise InvalidConfigError(f"stop must be a string or a sequence of strings, got {type(stop).__name__}") from None
    if len(items) > MAX_STOP_STRINGS:
        raise InvalidConfigError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(items)}")
    total = 0
    for s in items:
        if not isinstance(s, str):
            raise InvalidConfigError(f"stop strings must be str, got {type(s).__name__} {s!r}")
        if not s:
            raise InvalidConfigError("stop strings must not be empty")
        total += len(s.encode("utf-8", "surrogatepass"))
    if total > MAX_STOP_BYTES:
        raise InvalidConfigError(
            f"the stop strings are {total} bytes (UTF-8) together; at most {MAX_STOP_BYTES} are allowed")
    return items

_NOT_TOKENS = (bytes, bytearray, memoryview)


def token_list(tokens: Sequence[int]) -> List[int]:
    """*tokens* as a list of ints: the one place prompts of token ids are checked.

    Bytes are refused (iterating them gives their byte values, not token ids),
    and so are bools (``True`` is not token 1).
    """
    if isinstance(tokens, _NOT_TOKENS):
        raise InvalidConfigError(
            f"a prompt must be text (str) or a sequence of int token ids, not {type(tokens).__name__}: "
            "decode bytes to str first (for example prompt.decode('utf-8'))")
    if isinstance(tokens, str):
        raise InvalidConfigError("tokens must be a sequence of int token ids, not a str")
    try:
        items = list(tokens)
    except TypeError:
        raise InvalidConfigError(
            f"tokens must be a sequence of int token ids, got {type(tokens).__name__}") from None
    if not all(type(t) is int for t in items):  # plain ints (the common case) need no conversion
        items = [_token_id(i, t) for i, t in enumerate(items)]
    if items and (min(items) < -(1 << 31) or max(items) >= (1 << 31)):
        bad = next(t for t in items if not -(1 << 31) <= t < (1 << 31))
        raise InvalidTokenError(f"token id {bad} is outside the vocabulary")
    return items


def _token_id(i: int, t: object) -> int:
    if isinstance(t, bool) or type(t).__name__ in ("bool_", "bool"):  # also numpy's bool
        raise InvalidConfigError(f"token {i} is a bool ({t!r}), not a token id")
    try:
        return t.__index__()  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        raise InvalidConfigError(
            f"tokens must be a sequence of int token ids; token {i} is a {type(t).__name__}") from None
