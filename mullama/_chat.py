"""Chat: format a conversation with the model's chat template, then tokenize it.

A GGUF model usually carries its chat template (``tokenizer.chat_template``)
as the Jinja source Hugging Face tokenizers use. It is rendered here exactly as
``transformers`` renders it (a sandboxed Jinja environment, ``trim_blocks``,
``lstrip_blocks``, ``raise_exception``, ``strftime_now``, ``tojson``), so a
model gets the prompt format it was trained on. A template may also be given
by name: llama.cpp's built-in formats (``"chatml"``, ``"llama3"``, ...) need no
Jinja source, for models whose file has no template.

A template comes with the model file, so it may be hostile: the sandbox keeps
it from Python's internals, and each rendering is bounded (loop iterations and
calls, wall time, the size of its output and of any string or list it builds;
see ``MAX_TEMPLATE_STEPS``, ``TEMPLATE_TIMEOUT_S``, :func:`max_template_output`).
A template past a limit raises :class:`~mullama.ChatTemplateError` naming it.
"""

from __future__ import annotations

import contextvars
import datetime
import functools
import json
import math
import re
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, cast

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


class _Checked(List[Dict[str, Any]]):
    """Messages :func:`check_messages` made: checking them again returns them as they are
    (a request's messages pass the server, the model and the template renderer)."""

    __slots__ = ()


def check_messages(messages: Sequence[Message]) -> List[Dict[str, Any]]:
    """Validate *messages* and return them as plain dicts with text content."""
    if type(messages) is _Checked:
        return messages
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
    return _Checked(out)


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
                add_generation_prompt: bool = True, kwargs: Optional[Mapping[str, Any]] = None) -> str:
    """The prompt text of *messages* in the model's chat format.

    Args:
        template: a Jinja chat template, or the name of one of llama.cpp's
            built-in formats (:func:`builtin_templates`); default: the model's own.
        add_generation_prompt: end with the header of an assistant turn.
        kwargs: extra variables for a Jinja template (``enable_thinking``, ``documents``, ...).

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
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise InvalidConfigError(f"chat_template_kwargs must be a dict, got {type(kwargs).__name__}")
    if template in _builtin_names():
        return _apply_builtin(template, msgs, add_generation_prompt)
    bos, eos, _ = model._core.special_tokens()
    return _render(template, msgs, add_generation_prompt, _piece(model, bos), _piece(model, eos), kwargs or {})


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


# -- limits of one rendering -------------------------------------------------------------

#: most loop iterations, calls and operators on sizable values in one rendering
#: (real templates make a few per message)
MAX_TEMPLATE_STEPS = 1_000_000
#: longest one rendering may take (seconds)
TEMPLATE_TIMEOUT_S = 5.0
#: characters a rendering may produce (and any string or list it builds may
#: hold) whatever the messages: see :func:`max_template_output`
TEMPLATE_MIN_OUTPUT = 1 << 20


def max_template_output(msgs: Sequence[Mapping[str, Any]]) -> int:
    """The most characters the rendering of *msgs* may produce: 1 MiB plus four
    times the text of the messages (a template may repeat a message)."""
    return TEMPLATE_MIN_OUTPUT + 4 * sum(len(str(v)) for m in msgs for v in m.values())


class _Budget:
    """What is left of one rendering's limits."""

    __slots__ = ("steps", "deadline", "max_chars")

    def __init__(self, max_chars: int) -> None:
        self.steps = 0
        self.deadline = time.monotonic() + TEMPLATE_TIMEOUT_S
        self.max_chars = max_chars

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_TEMPLATE_STEPS:
            raise ChatTemplateError(
                f"the chat template ran more than MAX_TEMPLATE_STEPS={MAX_TEMPLATE_STEPS} loop iterations and "
                "calls in one rendering; it is refused")
        if time.monotonic() > self.deadline:
            raise ChatTemplateError(
                f"the chat template took more than TEMPLATE_TIMEOUT_S={TEMPLATE_TIMEOUT_S:g} s to render; "
                "it is refused")


#: the limits of the rendering running in this thread (None outside one)
_budget: "contextvars.ContextVar[Optional[_Budget]]" = contextvars.ContextVar("mullama_template_budget",
                                                                                default=None)


def _max_chars() -> int:
    budget = _budget.get()
    return TEMPLATE_MIN_OUTPUT if budget is None else budget.max_chars


def _too_big(what: str, size: float) -> ChatTemplateError:
    return ChatTemplateError(
        f"the chat template would build {what} of {size:.0f} characters or items, more than the "
        f"{_max_chars()} one rendering may (the output limit: 1 MiB plus 4 times the messages' text)")


def _sized(value: Any) -> Any:
    """*value*, if it is not too big a string, list, tuple or dict."""
    if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > _max_chars():
        raise _too_big(f"a {type(value).__name__}", len(value))
    return value


_FORMAT_NUMBER = re.compile(r"\d{7,}")


def _check_format(fmt: Any) -> None:
    """A %- or {}-format string may not ask for a width or precision past the limit."""
    if isinstance(fmt, str):
        for m in _FORMAT_NUMBER.finditer(fmt):
            if int(m.group()) > _max_chars():
                raise _too_big("a formatted string", int(m.group()))


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Before ``*``, ``**`` and ``%`` compute anything: refuse a result past the limits."""
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _max_chars():
                raise _too_big(f"a {type(seq).__name__}", len(seq) * n)
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            bits = right * math.log2(abs(left))
            if bits > 64 * 1024:
                raise ChatTemplateError(f"the chat template would compute an integer of {bits:.0f} bits "
                                        "(more than 65536); it is refused")
    elif operator == "%":
        _check_format(left)


_WIDTH_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})


def _check_call(obj: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """Before a string method makes a long string: its width within the limits."""
    obj = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
    owner = getattr(obj, "__self__", None)
    if not isinstance(owner, str):
        return
    name = getattr(obj, "__name__", "")
    if name in _WIDTH_METHODS:
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, int) and a > _max_chars():
                raise _too_big("a padded string", a)
    elif name in ("format", "format_map"):
        _check_format(owner)
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        _check_replace(owner, args[0], args[1])


def _check_replace(text: Any, old: Any, new: Any) -> None:
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str) and len(new) > len(old):
        count = text.count(old) if old else len(text) + 1
        size = len(text) + count * (len(new) - len(old))
        if size > _max_chars():
            raise _too_big("a replaced string", size)


def _loop_guard(iterable: Any) -> Any:
    """The iterable of a ``{% for %}`` loop: each iteration counts as a step."""
    budget = _budget.get()
    if budget is None:
        yield from iterable
        return
    for item in iterable:
        budget.step()
        yield item


def _limit_ast(env: Any, tree: Any) -> Any:
    """*tree* (a parsed template) with its loops counted and the strings its
    ``~`` and filters build checked (see :func:`_loop_guard`, :func:`_sized`):
    through ``environment.<name>``, which no template variable can shadow."""
    from jinja2 import nodes
    from jinja2.visitor import NodeTransformer

    def wrap(name: str, node: Any) -> Any:
        call = nodes.Call(nodes.EnvironmentAttribute(name), [node], [], None, None)
        return call.set_lineno(node.lineno).set_environment(env)

    class Limit(NodeTransformer):
        def visit_For(self, node: Any) -> Any:
            node = self.generic_visit(node)
            node.iter = wrap("mullama_loop", node.iter)
            return node

        def visit_Concat(self, node: Any) -> Any:
            return wrap("mullama_sized", self.generic_visit(node))

        def visit_Filter(self, node: Any) -> Any:
            node = self.generic_visit(node)
            return node if node.node is None else wrap("mullama_sized", node)  # (a {% filter %} block's is None)

        def visit_FilterBlock(self, node: Any) -> Any:
            node.body = [self.visit(n) for n in node.body]
            return node

    return Limit().visit(tree)


def _limited_filters(env: Any) -> None:
    """The filters that could build a long string from a short one check their arguments first."""
    center, indent, fmt, replace = (env.filters[n] for n in ("center", "indent", "format", "replace"))

    def center_(value: Any, width: int = 80) -> Any:
        if isinstance(width, int) and width > _max_chars():
            raise _too_big("a centered string", width)
        return center(value, width)

    def indent_(s: Any, width: Any = 4, *args: Any, **kwargs: Any) -> Any:
        n = len(width) if isinstance(width, str) else width
        if isinstance(n, int) and n * max(1, str(s).count("\n") + 1) > _max_chars():
            raise _too_big("an indented string", n * (str(s).count("\n") + 1))
        return indent(s, width, *args, **kwargs)

    def format_(value: Any, *args: Any, **kwargs: Any) -> Any:
        _check_format(value)
        return fmt(value, *args, **kwargs)

    def replace_(eval_ctx: Any, s: Any, old: Any, new: Any, count: Optional[int] = None) -> Any:
        _check_replace(str(s), str(old), str(new))
        return replace(eval_ctx, s, old, new, count)

    import jinja2

    env.filters.update(center=center_, indent=indent_, format=format_,
                       replace=jinja2.pass_eval_context(replace_))


def _render(source: str, msgs: List[Dict[str, Any]], add_generation_prompt: bool, bos: str, eos: str,
            kwargs: Mapping[str, Any]) -> str:
    import jinja2

    try:
        tmpl = _compile(source)
        budget = _Budget(max_template_output(msgs))
        token = _budget.set(budget)
        try:
            out: List[str] = []
            size = 0
            # the template's variables: the caller's kwargs first, as transformers' apply_chat_template
            variables = {**kwargs, "messages": msgs, "add_generation_prompt": add_generation_prompt,
                         "bos_token": bos, "eos_token": eos}
            for chunk in tmpl.generate(**variables):
                size += len(chunk)
                if size > budget.max_chars:
                    raise ChatTemplateError(
                        f"the chat template's output passed {budget.max_chars} characters, the limit of one "
                        "rendering (1 MiB plus 4 times the messages' text); it is refused")
                out.append(chunk)
            return "".join(out)
        finally:
            _budget.reset(token)
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
        if isinstance(indent, int) and indent > 1024:
            raise ChatTemplateError(f"the chat template asked tojson for an indent of {indent} (at most 1024)")
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,  # type: ignore[arg-type]
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    class LimitedEnvironment(ImmutableSandboxedEnvironment):
        """Counts calls, checks sizes before ``*``, ``**``, ``%`` and string methods, and after ``+``."""

        intercepted_binops = frozenset({"*", "**", "%", "+"})
        mullama_loop = staticmethod(_loop_guard)
        mullama_sized = staticmethod(_sized)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            budget = _budget.get()
            if budget is not None:
                budget.step()
            _check_call(__obj, args, kwargs)
            return _sized(super().call(__context, __obj, *args, **kwargs))

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            budget = _budget.get()
            if budget is not None:
                budget.step()
            _check_binop(operator, left, right)
            return _sized(super().call_binop(context, operator, left, right))

    env = LimitedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag])
    env.filters["tojson"] = tojson
    _limited_filters(env)
    lipsum = cast(Callable[..., Any], env.globals["lipsum"])

    def lipsum_(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> Any:  # noqa: A002
        if not all(isinstance(v, int) and v <= 1000 for v in (n, min, max)):
            raise ChatTemplateError("the chat template asked lipsum() for more than 1000 paragraphs or words")
        return lipsum(n, html, min, max)

    env.globals["lipsum"] = lipsum_
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(_limit_ast(env, env.parse(source)))
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the chat template is not valid Jinja (line {exc.lineno}): {exc.message}") from exc


def chat_tokens(model: "Model", messages: Sequence[Message], template: Optional[str] = None,
                kwargs: Optional[Mapping[str, Any]] = None) -> List[int]:
    """Token ids of the formatted conversation, ready to generate the assistant's turn.

    Special tokens written by the template (``<|im_start|>``) are parsed as
    such; the model's BOS token is added unless the template wrote it.
    """
    text = format_chat(model, messages, template=template, kwargs=kwargs)
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
