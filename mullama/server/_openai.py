"""The OpenAI API's shapes: request bodies in, response bodies out.

Parsing is strict about what it cannot honour (a parameter that would change
the answer and is not supported is refused with a 400 naming it, never
ignored) and lenient about what does not matter (``user``, unknown fields).
"""

from __future__ import annotations

import base64
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from .. import __version__
from .._chat import check_messages
from .._config import MAX_TOP_LOGPROBS, SpeculativeConfig, StreamConfig, check_constraint
from .._generation import Completion, TokenData
from .._tools import ChatCompletion, ChatDelta, check_tools
from .._errors import GrammarError, InvalidConfigError, MullamaError

__all__ = ["ApiError", "GenerationRequest", "parse_request", "finish_reason"]

#: what OpenAI's completions endpoint generates when max_tokens is not given
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class ApiError(Exception):
    """An error answered with an OpenAI-style body: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Sequence["tuple[str, str]"] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = list(headers)

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class GenerationRequest:
    """A parsed ``/v1/completions`` or ``/v1/chat/completions`` body."""

    chat: bool
    model: Optional[str]
    #: chat: the messages; completions: the prompts (each text or token ids)
    messages: Optional[List[Dict[str, Any]]] = None
    prompts: List[Union[str, List[int]]] = field(default_factory=list)
    #: choices per prompt
    n: int = 1
    #: None: as many as fit in the context (chat's default)
    max_tokens: Optional[int] = None
    sampling: Dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    #: how many most likely alternatives per token (chat: top_logprobs; completions: logprobs)
    top_logprobs: int = 0
    echo: bool = False
    #: chat: function tools, tool_choice, parallel_tool_calls and template kwargs (ChatPlan's arguments)
    tools: Optional[List[Dict[str, Any]]] = None
    tool_choice: Any = None
    parallel_tool_calls: Optional[bool] = None
    chat_template_kwargs: Optional[Dict[str, Any]] = None

    #: the structured-output field the request uses (response_format, json_schema or grammar), if any
    constraint: Optional[str] = None

    def config_fields(self, max_tokens: int) -> Dict[str, Any]:
        """The request's :class:`StreamConfig` fields."""
        return dict(max_tokens=max_tokens, include_probabilities=self.logprobs, top_logprobs=self.top_logprobs,
                    **self.sampling)

    def config(self, max_tokens: int) -> StreamConfig:
        return StreamConfig(**self.config_fields(max_tokens))


def _get(body: Dict[str, Any], name: str, types: "tuple[type, ...]", what: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in types:
        raise ApiError(400, f"'{name}' must be {what}, got {value!r}", param=name)
    if not isinstance(value, types):
        raise ApiError(400, f"'{name}' must be {what}, got {type(value).__name__} {value!r}", param=name)
    if isinstance(value, float) and not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a finite number, got {value!r}", param=name)
    return value


def body_object(body: Any) -> Dict[str, Any]:
    """A request body that must be a JSON object."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def body_field(body: Dict[str, Any], name: str, types: "tuple[type, ...]", what: str, required: bool = False) -> Any:
    """A field of a request body, checked (``None`` when absent, unless *required*)."""
    if required and body.get(name) is None:
        raise ApiError(400, f"'{name}' is required", param=name)
    return _get(body, name, types, what)


def _refuse_unless(body: Dict[str, Any], name: str, ok: Any, why: str) -> None:
    value = body.get(name)
    if value is not None and not ok(value):
        raise ApiError(400, f"'{name}'={value!r} is not supported: {why}", param=name)


_NUM = (int, float)
_FINGERPRINT = f"mullama-{__version__}"

#: parameters of both endpoints that this server reads (anything else is refused by name)
_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
           "frequency_penalty", "presence_penalty", "logprobs", "logit_bias",
           "response_format",
           "top_k", "min_p", "repeat_penalty", "repeat_last_n", "grammar", "json_schema",  # llama.cpp's extensions
           "speculative.n_max",
           "speculative",  # mullama's: true, false or {"max_draft", "ngram_min", "ngram_max"}
           # no effect on the answer
           "user", "metadata", "store", "service_tier"}
_KNOWN = {
    True: _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "functions",
                     "function_call", "parallel_tool_calls", "audio", "modalities", "chat_template_kwargs"},
    False: _COMMON | {"prompt", "echo", "suffix", "best_of"},
}


def parse_request(body: Any, *, chat: bool) -> GenerationRequest:
    """Check an OpenAI request body; :class:`ApiError` (400) names the first problem."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - _KNOWN[chat])
    if unknown:
        raise ApiError(400, f"unsupported parameter '{unknown[0]}': this server does not implement it",
                       param=unknown[0])
    model = _get(body, "model", (str,), "a string")
    req = GenerationRequest(chat=chat, model=model)

    if chat:
        if "messages" not in body:
            raise ApiError(400, "'messages' is required", param="messages")
        try:
            req.messages = check_messages(body["messages"])
        except InvalidConfigError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        max_tokens = _get(body, "max_completion_tokens", (int,), "an integer")
        if max_tokens is None:
            max_tokens = _get(body, "max_tokens", (int,), "an integer")
        try:
            req.tools = check_tools(body.get("tools")) or None
        except InvalidConfigError as exc:
            raise ApiError(400, str(exc), param="tools") from None
        req.tool_choice = body.get("tool_choice")
        if req.tool_choice is not None and not req.tools:
            if req.tool_choice != "none":
                raise ApiError(400, "'tool_choice' needs 'tools'", param="tool_choice")
            req.tool_choice = None
        req.parallel_tool_calls = _get(body, "parallel_tool_calls", (bool,), "a boolean")
        if not req.tools:
            req.parallel_tool_calls = None
        req.chat_template_kwargs = _get(body, "chat_template_kwargs", (dict,), "an object")
        _refuse_unless(body, "functions", lambda v: v == [],
                       "the legacy 'functions' are not supported: send them as 'tools'")
        _refuse_unless(body, "function_call", lambda v: v == "none",
                       "the legacy 'function_call' is not supported: use 'tool_choice'")
        _refuse_unless(body, "audio", lambda v: False, "only text output is supported")
        _refuse_unless(body, "modalities", lambda v: v == ["text"], "only text output is supported")
        logprobs = _get(body, "logprobs", (bool,), "a boolean")
        req.logprobs = bool(logprobs)
        top = _get(body, "top_logprobs", (int,), "an integer")
        if top is not None:
            if not 0 <= top <= MAX_TOP_LOGPROBS:
                raise ApiError(400, f"'top_logprobs' must be between 0 and {MAX_TOP_LOGPROBS}, got {top}",
                               param="top_logprobs")
            if top and not req.logprobs:
                raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
            req.top_logprobs = top
    else:
        if "prompt" not in body:
            raise ApiError(400, "'prompt' is required", param="prompt")
        req.prompts = _parse_prompts(body["prompt"])
        max_tokens = _get(body, "max_tokens", (int,), "an integer")
        if max_tokens is None:
            max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
        logprobs = _get(body, "logprobs", (int,), "an integer")
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"'logprobs' must be between 0 and {MAX_TOP_LOGPROBS}, got {logprobs}",
                           param="logprobs")
        req.logprobs = logprobs is not None
        req.top_logprobs = logprobs or 0
        req.echo = bool(_get(body, "echo", (bool,), "a boolean"))
        if req.echo and req.logprobs:
            raise ApiError(400, "'echo' with 'logprobs' is not supported: the prompt's log-probabilities are not "
                                "computed", param="echo")
        _refuse_unless(body, "suffix", lambda v: v == "", "insertion (suffix) is not supported")
        _refuse_unless(body, "best_of", lambda v: v == 1, "best_of must be 1")
    if max_tokens is not None and max_tokens < 1:
        param = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        raise ApiError(400, f"'{param}' must be at least 1, got {max_tokens}", param=param)
    req.max_tokens = max_tokens

    n = _get(body, "n", (int,), "an integer")
    if n is not None and not 1 <= n <= MAX_CHOICES:
        raise ApiError(400, f"'n' must be between 1 and {MAX_CHOICES}, got {n}", param="n")
    req.n = n or 1
    if len(req.prompts) * req.n > MAX_CHOICES:
        raise ApiError(400, f"{len(req.prompts)} prompts x n={req.n} make more than {MAX_CHOICES} choices",
                       param="prompt")
    req.stream = bool(_get(body, "stream", (bool,), "a boolean"))
    options = _get(body, "stream_options", (dict,), "an object")
    if options is not None:
        if not req.stream:
            raise ApiError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
        req.include_usage = bool(options.get("include_usage"))

    sampling: Dict[str, Any] = {"temperature": 1.0, "top_p": 1.0}  # OpenAI's defaults
    for name, types, what in (("temperature", _NUM, "a number"), ("top_p", _NUM, "a number"),
                              ("frequency_penalty", _NUM, "a number"), ("presence_penalty", _NUM, "a number"),
                              ("seed", (int,), "an integer"),
                              # llama.cpp's extensions, as llama.cpp's own server takes them
                              ("top_k", (int,), "an integer"), ("min_p", _NUM, "a number"),
                              ("repeat_penalty", _NUM, "a number"), ("repeat_last_n", (int,), "an integer")):
        value = _get(body, name, types, what)
        if value is not None:
            sampling[name] = value
    bias = _get(body, "logit_bias", (dict,), "an object of token ids to biases")
    if bias:
        try:  # OpenAI's keys are token ids as strings
            sampling["logit_bias"] = {int(k): v for k, v in bias.items()}
        except ValueError:
            raise ApiError(400, "'logit_bias' keys must be token ids", param="logit_bias") from None
    if not 0 <= sampling["temperature"] <= 2:
        raise ApiError(400, f"'temperature' must be between 0 and 2, got {sampling['temperature']}",
                       param="temperature")
    if sampling.get("seed") is not None:
        sampling["seed"] = sampling["seed"] % 0xFFFFFFFF  # OpenAI takes any integer; llama.cpp a 32-bit one
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
        sampling["stop"] = tuple(stop)
    spec = _speculative(body)
    if spec is not None:
        sampling["speculative"] = spec
    # structured output: OpenAI's response_format, llama.cpp's json_schema and grammar (GBNF)
    constraints = [name for name in ("response_format", "json_schema", "grammar") if body.get(name) is not None]
    for name in constraints:
        sampling[name] = _get(body, name, (str,) if name == "grammar" else (dict,),
                              "a string" if name == "grammar" else "an object")
    if len(constraints) > 1:
        raise ApiError(400, f"give at most one of {', '.join(constraints)}", param=constraints[1])
    req.constraint = constraints[0] if constraints else None
    if req.constraint is not None:
        try:
            check_constraint(req.constraint, sampling[req.constraint])
        except (GrammarError, InvalidConfigError) as exc:
            raise ApiError(400, str(exc), param=req.constraint) from None
    req.sampling = sampling
    # every value checked once more by the same rules as the Python API; a JSON schema's
    # conversion to a grammar can take a second, so the app makes the config off the event loop
    try:
        StreamConfig(**{k: v for k, v in req.config_fields(max_tokens or 1).items() if k not in constraints})
    except InvalidConfigError as exc:
        raise ApiError(400, str(exc), param=_param_of(exc, [*sampling, "max_tokens"])) from None
    return req


def _speculative(body: Dict[str, Any]) -> Optional[Union[bool, SpeculativeConfig]]:
    """The request's speculative decoding: mullama's ``speculative`` (true,
    false or an object of :class:`SpeculativeConfig`'s fields) and llama.cpp's
    ``speculative.n_max`` (the most tokens drafted); None: the server's default."""
    spec = body.get("speculative")
    n_max = _get(body, "speculative.n_max", (int,), "an integer")
    if spec is not None and not isinstance(spec, (bool, dict)):
        raise ApiError(400, f"'speculative' must be a boolean or an object, got {type(spec).__name__} {spec!r}",
                       param="speculative")
    if spec is False:
        if n_max is not None:
            raise ApiError(400, "'speculative.n_max' with 'speculative': false", param="speculative.n_max")
        return False
    if spec is None and n_max is None:
        return None
    fields = dict(spec) if isinstance(spec, dict) else {}
    if n_max is not None:
        fields["max_draft"] = n_max
    unknown = sorted(set(fields) - {"max_draft", "ngram_min", "ngram_max", "adaptive"})
    if unknown:
        raise ApiError(400, f"'speculative' has no field {unknown[0]!r} (it takes max_draft, ngram_min, "
                            "ngram_max and adaptive)", param="speculative")
    try:
        return SpeculativeConfig(**fields)
    except InvalidConfigError as exc:
        raise ApiError(400, str(exc), param="speculative.n_max" if n_max is not None else "speculative") from None


def _param_of(exc: MullamaError, fields: Sequence[str]) -> Optional[str]:
    text = str(exc)
    if "stop strings" in text:  # (the count and size limits name them first)
        return "stop"
    return next((name for name in fields if text.startswith(name)), None)


def _parse_prompts(prompt: Any) -> List[Union[str, List[int]]]:
    """OpenAI's ``prompt``: a string, token ids, or a list of either (a batch)."""
    batch = prompt if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt) \
        else [prompt]
    out: List[Union[str, List[int]]] = []
    for i, p in enumerate(batch):
        where = f"'prompt'[{i}]" if len(batch) > 1 else "'prompt'"
        if isinstance(p, str):
            if not p:
                raise ApiError(400, f"{where} must not be empty", param="prompt")
            out.append(p)
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            out.append(p)
        else:
            raise ApiError(400, f"{where} must be a non-empty string or a non-empty list of token ids",
                           param="prompt")
    return out


def embedding_inputs(body: Dict[str, Any]) -> List[Union[str, List[int]]]:
    """``input`` of an embeddings request: texts or token id lists (at most MAX_EMBEDDING_INPUTS)."""
    if body.get("input") is None:
        raise ApiError(400, "'input' is required", param="input")
    unknown = sorted(set(body) - {"input", "model", "encoding_format", "dimensions", "user"})
    if unknown:
        raise ApiError(400, f"unsupported parameter '{unknown[0]}'", param=unknown[0])
    value = body["input"]
    items = value if isinstance(value, list) and value and all(isinstance(v, (str, list)) for v in value) \
        else [value]
    if len(items) > MAX_EMBEDDING_INPUTS:
        raise ApiError(400, f"at most {MAX_EMBEDDING_INPUTS} inputs per request, got {len(items)}", param="input")
    for i, item in enumerate(items):
        where = f"'input'[{i}]" if len(items) > 1 else "'input'"
        if isinstance(item, str):
            if not item:
                raise ApiError(400, f"{where} must not be empty", param="input")
        elif not (isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool)
                                                             for t in item)):
            raise ApiError(400, f"{where} must be a non-empty string or a non-empty list of token ids",
                           param="input")
    return items


def encode_embedding(row: Any, fmt: str) -> Union[List[float], str]:
    """One embedding as OpenAI sends it: a list of floats, or base64 of its little-endian float32 bytes."""
    if fmt == "base64":
        return base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
    return row.tolist()


def finish_reason(reason: str) -> str:
    """OpenAI's name for a mullama finish reason (a grammar's dead end, a full
    context and a cancellation cut the reply short: ``"length"``)."""
    return reason if reason in ("stop", "tool_calls") else "length"


# -- responses -------------------------------------------------------------------------


class ResponseIds:
    """The id, creation time and model name one response's bodies share."""

    __slots__ = ("id", "created", "model")

    def __init__(self, chat: bool, model: str) -> None:
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.model = model


#: most choices of one request (prompts x n)
MAX_CHOICES = 256
#: most inputs of one embeddings request (OpenAI's limit)
MAX_EMBEDDING_INPUTS = 2048


def model_card(model_id: str, created: int) -> Dict[str, Any]:
    """A model of ``/v1/models``."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "mullama"}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Dict[str, Any]:
    """OpenAI's ``usage``; ``prompt_tokens_details.cached_tokens``: prompt tokens
    reused from the prompt cache rather than evaluated."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


Piece = Callable[[int], bytes]


def chat_logprobs(tokens: Sequence[TokenData], piece: Piece) -> Dict[str, Any]:
    """OpenAI's chat ``logprobs``: per token its text, bytes and log-probability,
    and its ``top_logprobs`` alternatives in the same shape. *piece*: a token's bytes."""
    def entry(token: int, logprob: Optional[float]) -> Dict[str, Any]:
        b = piece(token)
        return {"token": b.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(b)}

    return {"content": [{**entry(t.id, t.logprob),
                         "top_logprobs": [entry(i, lp) for i, lp in t.top_logprobs or ()]} for t in tokens]}


def completion_logprobs(tokens: Sequence[TokenData], piece: Piece, offset: int) -> Dict[str, Any]:
    """OpenAI's completions ``logprobs``: tokens, their log-probabilities and text
    offsets, and per token ``{text: logprob}`` of its alternatives (``logprobs=k``)."""
    texts = [piece(t.id).decode("utf-8", "replace") for t in tokens]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    top = None
    if any(t.top_logprobs for t in tokens):
        top = [{piece(i).decode("utf-8", "replace"): lp for i, lp in t.top_logprobs or ()} for t in tokens]
    return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens], "top_logprobs": top,
            "text_offset": offsets}


def chat_choice(index: int, done: Completion, logprobs: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    message: Dict[str, Any] = {"role": "assistant", "content": done.text, "refusal": None}
    if isinstance(done, ChatCompletion):
        message["content"] = done.content
        if done.reasoning_content:
            message["reasoning_content"] = done.reasoning_content
        if done.tool_calls:
            message["tool_calls"] = [c.to_openai() for c in done.tool_calls]
    return {"index": index, "message": message, "logprobs": logprobs,
            "finish_reason": finish_reason(done.finish_reason)}


def completion_choice(index: int, text: str, done: Completion, logprobs: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(done.finish_reason)}


def response(ids: ResponseIds, chat: bool, choices: List[Dict[str, Any]], use: Dict[str, Any]) -> Dict[str, Any]:
    """A whole chat or completions response of *choices* (chat_choice / completion_choice)."""
    return {"id": ids.id, "object": "chat.completion" if chat else "text_completion", "created": ids.created,
            "model": ids.model, "system_fingerprint": _FINGERPRINT, "choices": choices, "usage": use}


def chat_delta(d: ChatDelta) -> Dict[str, Any]:
    """OpenAI's ``delta`` of a :class:`ChatDelta` (a call's first piece has its id, type and name)."""
    delta: Dict[str, Any] = {}
    if d.content:
        delta["content"] = d.content
    if d.reasoning_content:
        delta["reasoning_content"] = d.reasoning_content
    if d.tool_calls:
        calls = []
        for c in d.tool_calls:
            call: Dict[str, Any] = {"index": c.index}
            if c.id is not None:
                call.update(id=c.id, type="function", function={"name": c.name, "arguments": c.arguments})
            else:
                call["function"] = {"arguments": c.arguments}
            calls.append(call)
        delta["tool_calls"] = calls
    return delta


def chat_chunk(ids: ResponseIds, delta: Dict[str, Any], finish: Optional[str] = None,
               logprobs: Optional[Dict[str, Any]] = None, with_usage: bool = False, index: int = 0) -> Dict[str, Any]:
    return _chunk(ids, "chat.completion.chunk", with_usage,
                  {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})


def completion_chunk(ids: ResponseIds, text: str, finish: Optional[str] = None,
                     logprobs: Optional[Dict[str, Any]] = None, with_usage: bool = False,
                     index: int = 0) -> Dict[str, Any]:
    return _chunk(ids, "text_completion", with_usage,
                  {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})


def _chunk(ids: ResponseIds, obj: str, with_usage: bool, choice: Dict[str, Any]) -> Dict[str, Any]:
    chunk = {"id": ids.id, "object": obj, "created": ids.created, "model": ids.model,
             "system_fingerprint": _FINGERPRINT, "choices": [choice]}
    if with_usage:
        chunk["usage"] = None  # the last chunk carries it
    return chunk


def usage_chunk(ids: ResponseIds, chat: bool, use: Dict[str, Any]) -> Dict[str, Any]:
    return {"id": ids.id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": ids.created, "model": ids.model, "system_fingerprint": _FINGERPRINT, "choices": [],
            "usage": use}


