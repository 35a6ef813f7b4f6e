"""Tool calling with llama.cpp's chat library (common/chat.h), as llama-server does it.

A chat with ``tools`` (or with tool calls and tool results in its history) is
rendered by llama.cpp's own chat-template engine, which also returns what the
reply needs: a grammar for the tool calls (lazy: it applies from the template's
tool-call marker on, e.g. ``<tool_call>``), the special tokens the reply keeps
as text, extra stop strings, and the parser that splits the reply into
``content``, ``reasoning_content`` and ``tool_calls``. Plain chat stays on the
sandboxed Jinja renderer of :mod:`mullama._chat` (see the README for why).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from . import _core
from ._chat import Message, check_messages
from ._config import Grammar, StreamConfig, json_schema_dict
from ._errors import ChatTemplateError, InvalidConfigError
from ._generation import Completion

if TYPE_CHECKING:
    from ._model import Model

__all__ = ["ToolCall", "ToolCallDelta", "ChatDelta", "ChatCompletion", "ChatPlan", "ReplyParser", "plan_chat"]

ToolChoice = Union[str, Mapping[str, Any], None]

_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: the optional free text before the first call in llama.cpp's tool-call grammars (``until-12?``)
_FREE_TEXT = re.compile(r"^(root ::= .*?)until-\d+\? ", re.M)
#: what llama.cpp's regex_escape escapes (its trigger patterns are ECMAScript regular expressions)
_REGEX_SPECIAL = re.compile(r"[.^$|()*+?\[\]{}\\]")
#: the calls of a reply, in llama.cpp's tool-call grammars (``(tool-call space)+``, or
#: ``(tool-call? space)+`` for auto)
_MANY_CALLS = re.compile(r"^(tool-calls ::= )\(tool-call\?? space\)\+$", re.M)


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: ``arguments`` is JSON text, as in OpenAI's API."""

    id: str
    name: str
    arguments: str
    type: str = "function"

    def to_openai(self) -> Dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a tool call in a stream: the first piece of call ``index`` has
    its ``id`` and ``name``, the following ones pieces of ``arguments``."""

    index: int
    id: Optional[str] = None
    name: Optional[str] = None
    arguments: str = ""


@dataclass(frozen=True)
class ChatDelta:
    """What a chat stream adds: text of the reply (``content``), of its
    reasoning (``reasoning_content``) and pieces of tool calls, in the order a
    client assembles them. The last delta has ``finish_reason`` set."""

    content: str = ""
    reasoning_content: str = ""
    tool_calls: Tuple[ToolCallDelta, ...] = ()
    finish_reason: Optional[str] = None


@dataclass(frozen=True)
class ChatCompletion(Completion):
    """A chat reply: a :class:`Completion` whose ``text`` is split into
    ``content``, ``reasoning_content`` (a model's thinking, when the template
    marks it) and ``tool_calls``. ``finish_reason`` is ``"tool_calls"`` when
    the reply ended with calls."""

    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: Tuple[ToolCall, ...] = field(default=())

    def message(self) -> Dict[str, Any]:
        """The reply as an OpenAI assistant message, ready to append to the conversation."""
        msg: Dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning_content:
            msg["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            msg["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return msg


def uses_tools(messages: Sequence[Mapping[str, Any]], tools: Optional[Sequence[Any]]) -> bool:
    """Whether a chat offers tools, or its history holds tool calls or tool results."""
    return bool(tools) or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def plan_chat(model: "Model", messages: Sequence[Message], template: Optional[str] = None, *,
              tools: Optional[Sequence[Any]] = None, tool_choice: ToolChoice = None,
              parallel_tool_calls: Optional[bool] = None,
              chat_template_kwargs: Optional[Mapping[str, Any]] = None) -> "Optional[ChatPlan]":
    """The one place that decides a chat's renderer: llama.cpp's chat library (a
    :class:`ChatPlan`) for a chat with tools, tool calls or tool results, or whose
    template thinks (its reply's reasoning is split off); ``None`` for plain chat,
    which the sandboxed Jinja renderer formats. Renders: call it off the event loop."""
    msgs = check_messages(messages)
    if not uses_tools(msgs, tools):
        if tool_choice is not None or parallel_tool_calls is not None:
            raise InvalidConfigError("tool_choice and parallel_tool_calls need tools")
        if not model._template_thinks(template):
            return None
    return ChatPlan(model, msgs, tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls,
                    template=template, chat_template_kwargs=chat_template_kwargs)


def check_tools(tools: Optional[Sequence[Any]]) -> List[Dict[str, Any]]:
    """OpenAI function tools, checked: ``[{"type": "function", "function": {"name", "description"?, "parameters"?}}]``."""
    if tools is None:
        return []
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise InvalidConfigError(f"tools must be a list of function tools, got {type(tools).__name__}")
    out: List[Dict[str, Any]] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            raise InvalidConfigError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}, got {tool!r:.80}")
        fn = tool.get("function")
        if not isinstance(fn, Mapping):
            raise InvalidConfigError(f"tools[{i}]['function'] must be a dict with a 'name'")
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise InvalidConfigError(
                f"tools[{i}]['function']['name'] must be 1-64 letters, digits, '_' or '-', got {name!r}")
        params = fn.get("parameters")
        fn = dict(fn)
        if isinstance(params, type) and hasattr(params, "model_json_schema"):  # a pydantic model class
            fn["parameters"] = json_schema_dict(params)
        elif params is not None and not isinstance(params, Mapping):
            raise InvalidConfigError(
                f"tools[{i}]['function']['parameters'] must be a JSON schema (a dict or a pydantic model class)")
        if "description" in fn and not isinstance(fn["description"], str):
            raise InvalidConfigError(f"tools[{i}]['function']['description'] must be a string")
        out.append({"type": "function", "function": fn})
    names = [t["function"]["name"] for t in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise InvalidConfigError(f"two tools are named {dup!r}")
    return out


def _check_tool_choice(choice: ToolChoice, tools: List[Dict[str, Any]]) -> "tuple[str, List[Dict[str, Any]]]":
    """llama.cpp's tool_choice (auto, none, required) and the tools it offers; a named
    function is "required" with only that tool."""
    if choice is None:
        return "auto", tools
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise InvalidConfigError(
                f"tool_choice must be 'auto', 'none', 'required' or {{'type': 'function', 'function': "
                f"{{'name': ...}}}}, got {choice!r}")
        if choice == "required" and not tools:
            raise InvalidConfigError("tool_choice='required' needs tools")
        return choice, tools
    if isinstance(choice, Mapping) and choice.get("type") == "function" and isinstance(choice.get("function"), Mapping):
        name = choice["function"].get("name")
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise InvalidConfigError(f"tool_choice names the function {name!r}, which is not among the tools")
        return "required", chosen
    raise InvalidConfigError(f"tool_choice must be a string or {{'type': 'function', 'function': {{'name': ...}}}}, "
                             f"got {choice!r:.80}")


def _check_history(msgs: List[Dict[str, Any]]) -> None:
    for i, m in enumerate(msgs):
        calls = m.get("tool_calls")
        if calls is None:
            continue
        if m["role"] != "assistant" or not isinstance(calls, Sequence) or isinstance(calls, (str, bytes)):
            raise InvalidConfigError(f"messages[{i}]['tool_calls'] must be a list, on an assistant message")
        for j, c in enumerate(calls):
            fn = c.get("function") if isinstance(c, Mapping) else None
            if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                raise InvalidConfigError(
                    f"messages[{i}]['tool_calls'][{j}] must be {{'id': ..., 'type': 'function', 'function': "
                    "{'name': ..., 'arguments': '<JSON text>'}}")
            args = fn.get("arguments", "{}")
            if isinstance(args, str):
                try:
                    json.loads(args or "{}")
                except ValueError:
                    raise InvalidConfigError(
                        f"messages[{i}]['tool_calls'][{j}]['function']['arguments'] is not valid JSON") from None
            elif not isinstance(args, Mapping):
                raise InvalidConfigError(
                    f"messages[{i}]['tool_calls'][{j}]['function']['arguments'] must be JSON text (or a dict)")


class ChatPlan:
    """What generating one chat reply through llama.cpp's chat library needs:
    the prompt's tokens, the sampling constraint and the reply parser's settings.

    Built on the caller's side (it renders the template, a few milliseconds).
    """

    def __init__(self, model: "Model", messages: Sequence[Message], *, tools: Optional[Sequence[Any]] = None,
                 tool_choice: ToolChoice = None, parallel_tool_calls: Optional[bool] = None,
                 template: Optional[str] = None, chat_template_kwargs: Optional[Mapping[str, Any]] = None) -> None:
        msgs = check_messages(messages)
        _check_history(msgs)
        checked = check_tools(tools)
        choice, offered = _check_tool_choice(tool_choice, checked)
        if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
            raise InvalidConfigError(f"parallel_tool_calls must be a bool, got {parallel_tool_calls!r}")
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, Mapping):
            raise InvalidConfigError(f"chat_template_kwargs must be a dict, got {type(chat_template_kwargs).__name__}")
        kwargs = dict(chat_template_kwargs or {})
        request: Dict[str, Any] = {
            "messages": msgs, "tools": offered or None, "tool_choice": choice,
            "parallel_tool_calls": bool(parallel_tool_calls), "chat_template_kwargs": kwargs,
            # a model's thinking goes to reasoning_content (llama-server's default, "auto")
            "reasoning_format": "auto",
        }
        if isinstance(kwargs.get("enable_thinking"), bool):
            request["enable_thinking"] = kwargs["enable_thinking"]
        try:
            text = json.dumps(request, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidConfigError(f"the chat request cannot be written as JSON: {exc}") from None
        rendered = json.loads(model._render_with_tools(template, text))
        grammar_text: str = rendered["grammar"]
        caps = rendered["caps"]
        if offered and choice != "none" and not (caps.get("supports_tools") or caps.get("supports_tool_calls")):
            raise ChatTemplateError(
                "the chat template describes no tool calls (llama.cpp's chat library found no tool-call format in "
                f"it), so the model {model.info.name!r} cannot be offered tools with it: pass template= the Jinja "
                "template of a model family with tool calls (Qwen, Hermes, Llama 3.x, Mistral, ...)")
        self.prompt: str = rendered["prompt"]
        self.format_id: int = rendered["format_id"]
        self.generation_prompt: str = rendered["generation_prompt"]
        self.parser: str = rendered["parser"]
        self.stops: Tuple[str, ...] = tuple(rendered["additional_stops"])
        self.tools = offered if choice != "none" else []
        self.grammar: Optional[Grammar] = None
        if grammar_text and choice != "none":
            if choice == "required":
                # OpenAI's "required" (and a named function): the reply is the call(s). llama.cpp's grammar
                # lets free text come first, which a small model may fill until max_tokens.
                grammar_text = _FREE_TEXT.sub(r"\1", grammar_text, count=1)
            if not parallel_tool_calls:
                # parallel_tool_calls=False: one call (llama.cpp's grammar takes any number)
                grammar_text = _MANY_CALLS.sub(r"\1tool-call space", grammar_text, count=1)
            preserved = []
            for piece in rendered["preserved_tokens"]:
                toks = model.tokenize(piece, add_bos=False, special=True)
                if len(toks) == 1:
                    preserved.append(toks[0])
            patterns, tokens = [], []
            for trig in rendered["triggers"]:
                if trig["type"] == "token":
                    tokens.append(trig["token"])
                elif trig["type"] == "word":
                    patterns.append(_REGEX_SPECIAL.sub(r"\\\g<0>", trig["value"]))
                elif trig["type"] == "pattern_full":
                    p = trig["value"]
                    patterns.append(("" if p.startswith("^") else "^") + p + ("" if p.endswith("$") else "$"))
                else:
                    patterns.append(trig["value"])
            lazy = bool(rendered["grammar_lazy"])
            # a grammar that starts with the reply's header is fed the header the template wrote
            prefill: Tuple[int, ...] = ()
            if not lazy and self.generation_prompt:
                prefill = tuple(model.tokenize(self.generation_prompt, add_bos=False, special=True))
                # as llama.cpp's common_sampler: a tokenizer's leading space is not part of the header
                first = model.token_to_piece(prefill[0], special=True) if prefill else b""
                if first[:1].isspace() and not self.generation_prompt[:1].isspace():
                    prefill = prefill[1:]
            start, ends = rendered["thinking_start_tag"], rendered["thinking_end_tags"]
            reasoning = (start, ends[0]) if lazy and start and ends else ()
            self.grammar = Grammar(grammar_text, triggers=tuple(patterns) if lazy else (),
                                   trigger_tokens=tuple(tokens) if lazy else (), prefill_tokens=prefill,
                                   preserved_tokens=tuple(preserved), reasoning=reasoning,
                                   reasoning_open=bool(reasoning) and self.generation_prompt.rstrip().endswith(start))
        bos = model._core.special_tokens()[0]
        bos_text = model.token_to_piece(bos, special=True).decode("utf-8", "replace") if bos >= 0 else ""
        self.tokens: List[int] = model.tokenize(self.prompt, add_bos=not (bos_text and self.prompt.startswith(bos_text)),
                                                special=True)

    def config(self, config: StreamConfig) -> StreamConfig:
        """*config* with the tool-call grammar and the template's extra stop strings."""
        if not isinstance(config, StreamConfig):
            raise InvalidConfigError(f"config must be a StreamConfig, got {type(config).__name__}")
        if self.grammar is None and not self.stops:
            return config
        if self.grammar is not None and config.constraint is not None:
            raise InvalidConfigError("give tools or a grammar / JSON schema / response_format, not both")
        changes: Dict[str, Any] = {"stop": tuple(dict.fromkeys(config.stop + self.stops))}
        if self.grammar is not None:
            changes["grammar"] = self.grammar
        return config.replace(**changes)

    def reply_parser(self) -> "ReplyParser":
        return ReplyParser(self)


class ReplyParser:
    """Splits a reply into content, reasoning_content and tool calls as it grows
    (llama.cpp's parser for the template), and into the deltas of a stream: a
    call's id and name come once, first, then pieces of its arguments."""

    def __init__(self, plan: ChatPlan) -> None:
        self._p = _core.ChatOutputParser(plan.format_id, plan.generation_prompt, plan.parser, "auto",
                                         bool(plan.tools))
        self._text = ""
        self._message: Dict[str, Any] = {"role": "assistant", "content": ""}
        self._named: set = set()

    def feed(self, text: str, final: bool = False, cut: bool = False) -> List[ChatDelta]:
        """Add *text* to the reply; the deltas it makes. *final*: the reply is
        over; *cut*: it was cut short (max_tokens, cancelled...), so a call it
        was writing is reported as far as it got."""
        self._text += text
        try:
            out = json.loads(self._p.parse(self._text, not final or cut))
        except ValueError:
            if not final:
                return []
            # a final reply that does not match the template's format: all of it is content
            sent = self._message.get("content") or ""
            self._message = {"role": "assistant", "content": self._text}
            rest = self._text[len(sent):] if self._text.startswith(sent) else ""
            return [ChatDelta(content=rest)] if rest else []
        self._message = out["message"]
        deltas = []
        for d in out["diffs"]:
            i = d["index"]
            if i < 0:
                if d["content"] or d["reasoning_content"]:
                    deltas.append(ChatDelta(content=d["content"], reasoning_content=d["reasoning_content"]))
                continue
            call = self._message.get("tool_calls", [])[i] if i < len(self._message.get("tool_calls", [])) else None
            if i not in self._named:
                if call is None or not call["function"]["name"]:
                    continue
                if not d["arguments"] and not final:
                    continue  # the name alone may still grow: wait for the first piece of arguments
                self._named.add(i)
                deltas.append(ChatDelta(tool_calls=(ToolCallDelta(i, call["id"], call["function"]["name"],
                                                                  d["arguments"]),)))
            elif d["arguments"]:
                deltas.append(ChatDelta(tool_calls=(ToolCallDelta(i, None, None, d["arguments"]),)))
        if final:
            for i, call in enumerate(self._message.get("tool_calls", [])):
                if i not in self._named and call["function"]["name"]:
                    self._named.add(i)
                    deltas.append(ChatDelta(tool_calls=(ToolCallDelta(i, call["id"], call["function"]["name"],
                                                                      call["function"]["arguments"]),)))
        return deltas

    def calls(self) -> Tuple[ToolCall, ...]:
        return tuple(ToolCall(c.get("id") or "", c["function"]["name"], c["function"]["arguments"])
                     for c in self._message.get("tool_calls", []))

    def completion(self, done: Completion) -> ChatCompletion:
        """*done* (the whole reply, parsed with :meth:`feed` to the end) as a ChatCompletion."""
        calls = self.calls()
        reason = "tool_calls" if calls and done.finish_reason == "stop" else done.finish_reason
        return ChatCompletion(text=done.text, tokens=done.tokens, finish_reason=reason, timings=done.timings,
                              logprobs=done.logprobs, metrics=done.metrics,
                              content=self._message.get("content") or (None if calls else ""),
                              reasoning_content=self._message.get("reasoning_content") or None, tool_calls=calls)

    def close(self) -> None:
        self._p.close()


def plain_completion(done: Completion) -> ChatCompletion:
    """A reply of plain chat (no tools) as a ChatCompletion: all of it is content."""
    return ChatCompletion(text=done.text, tokens=done.tokens, finish_reason=done.finish_reason, timings=done.timings,
                          logprobs=done.logprobs, metrics=done.metrics, content=done.text)
