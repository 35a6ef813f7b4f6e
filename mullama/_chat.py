"""Chat: format a conversation with the model's chat template, then tokenize it.

A GGUF model usually carries its chat template (``tokenizer.chat_template``)
as the Jinja source Hugging Face tokenizers use. It is rendered here exactly as
``transformers`` renders it (a sandboxed Jinja environment, ``trim_blocks``,
``lstrip_blocks``, ``raise_exception``, ``strftime_now``, ``tojson``), so a
model gets the prompt format it was trained on. A template may also be given
by name: llama.cpp's built-in formats (``"chatml"``, ``"llama3"``, ...) need no
Jinja source, for models whose file has no template.
"""

from __future__ import annotations

import datetime
import functools
import json
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence

from . import _core
from ._errors import ChatTemplateError, InvalidConfigError

if TYPE_CHECKING:
    from ._model import Model

__all__ = ["Message", "builtin_templates", "format_chat"]

#: a chat message: ``{"role": "user", "content": "Hello"}``; content may also be
#: a list of OpenAI-style parts (``{"type": "text", "text": ...}``)
Message = Mapping[str, Any]


def builtin_templates() -> List[str]:
    """Names of llama.cpp's built-in chat formats, usable as ``template=``."""
    return list(_builtin_names())


@functools.lru_cache(maxsize=1)
def _builtin_names() -> "tuple[str, ...]":
    return tuple(_core.chat_builtin_templates())


def check_messages(messages: Sequence[Message]) -> List[Dict[str, Any]]:
    """Validate *messages* and return them as plain dicts with text content."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidConfigError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}")
    if not messages:
        raise InvalidConfigError("messages must not be empty")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise InvalidConfigError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(msg).__name__}")
        role = msg.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidConfigError(f"messages[{i}]['role'] must be a non-empty string, got {role!r}")
        content = msg.get("content")
        if content is None:
            content = ""
        elif not isinstance(content, str):
            content = _text_of_parts(content, i)
        if "\0" in content or "\0" in role:
            raise InvalidConfigError(f"messages[{i}] contains a NUL character")
        m = dict(msg)
        m["content"] = content
        out.append(m)
    return out


def _text_of_parts(parts: object, i: int) -> str:
    if not isinstance(parts, Sequence) or isinstance(parts, (str, bytes)):
        raise InvalidConfigError(
            f"messages[{i}]['content'] must be a string or a list of text parts, got {type(parts).__name__}")
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise InvalidConfigError(
                f"messages[{i}]['content'][{j}] is not a text part ({kind!r}); only text content is supported")
        texts.append(part["text"])
    return "".join(texts)


def format_chat(model: "Model", messages: Sequence[Message], *, template: Optional[str] = None,
                add_generation_prompt: bool = True) -> str:
    """The prompt text of *messages* in the model's chat format.

    Args:
        template: a Jinja chat template, or the name of one of llama.cpp's
            built-in formats (:func:`builtin_templates`); default: the model's own.
        add_generation_prompt: end with the header of an assistant turn.

    Raises:
        ChatTemplateError: the model has no template and none was given, or the
            template failed (for example it refused the order of the roles).
        InvalidConfigError: malformed messages.
    """
    msgs = check_messages(messages)
    if template is None:
        template = model.info.chat_template
        if not template:
            raise ChatTemplateError(
                f"the model {model.info.name!r} has no chat template in its GGUF metadata; pass template= a Jinja "
                f"chat template or one of llama.cpp's built-in formats: {', '.join(_builtin_names())}")
    else:
        check_template(template)
    if template in _builtin_names():
        return _apply_builtin(template, msgs, add_generation_prompt)
    bos, eos, _ = model._core.special_tokens()
    return _render(template, msgs, add_generation_prompt, _piece(model, bos), _piece(model, eos))


def check_template(template: object) -> None:
    """Check a ``template=`` value: a llama.cpp built-in name, or Jinja source
    that compiles. A bare word that is no built-in name is refused (it would
    otherwise be a "template" that renders as itself)."""
    if not isinstance(template, str) or not template.strip():
        raise InvalidConfigError(f"template must be a non-empty string, got {template!r}")
    if template in _builtin_names():
        return
    if "{{" not in template and "{%" not in template:
        raise ChatTemplateError(
            f"unknown chat template {template.strip()[:40]!r}: not one of llama.cpp's built-in formats "
            f"({', '.join(_builtin_names())}) and not Jinja source")
    _compile(template)


def _piece(model: "Model", token: int) -> str:
    if token < 0:
        return ""
    return model.token_to_piece(token, special=True).decode("utf-8", "replace")


def _apply_builtin(name: str, msgs: List[Dict[str, Any]], add_generation_prompt: bool) -> str:
    roles = [m["role"].encode("utf-8", "surrogatepass") for m in msgs]
    contents = [m["content"].encode("utf-8", "surrogatepass") for m in msgs]
    text = _core.apply_builtin_chat_template(name.encode("utf-8"), roles, contents, add_generation_prompt)
    if text is None:
        raise ChatTemplateError(f"llama.cpp could not apply its built-in chat template {name!r}")
    return text


def _render(source: str, msgs: List[Dict[str, Any]], add_generation_prompt: bool, bos: str, eos: str) -> str:
    import jinja2

    try:
        tmpl = _compile(source)
        return tmpl.render(messages=msgs, add_generation_prompt=add_generation_prompt, bos_token=bos,
                           eos_token=eos)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the chat template failed: {exc}") from exc
    except Exception as exc:  # a template is code: any error it raises is its own
        raise ChatTemplateError(f"the chat template failed: {type(exc).__name__}: {exc}") from exc


def _generation_tag() -> type:
    """``{% generation %}...{% endgeneration %}``, which transformers registers
    to mark assistant text for training masks: here it renders its body."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    return GenerationTag


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    _GenerationTag = _generation_tag()

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(f"the chat template refused the messages: {message}")

    def tojson(value: object, ensure_ascii: bool = False, indent: Optional[int] = None,
               separators: object = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,  # type: ignore[arg-type]
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, _GenerationTag])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the chat template is not valid Jinja (line {exc.lineno}): {exc.message}") from exc


def chat_tokens(model: "Model", messages: Sequence[Message], template: Optional[str] = None) -> List[int]:
    """Token ids of the formatted conversation, ready to generate the assistant's turn.

    Special tokens written by the template (``<|im_start|>``) are parsed as
    such; the model's BOS token is added unless the template wrote it.
    """
    text = format_chat(model, messages, template=template)
    bos = model._core.special_tokens()[0]
    add_bos = not (bos >= 0 and text.startswith(_piece(model, bos)))
    return model.tokenize(text, add_bos=add_bos, special=True)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
