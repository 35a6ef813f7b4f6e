"""Model: a loaded GGUF file, its metadata and its tokenizer."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, List, Mapping, Optional, Sequence, Union

from . import _core
from ._config import StreamConfig, check_int, resolve_threads, token_list
from ._context import Context
from ._embed import POOLINGS, EmbedCall, Embedder
from ._errors import (ChatTemplateError, ClosedError, InvalidConfigError, InvalidModelError, ModelNotFoundError,
                      MullamaError)
from ._generation import Completion, TokenData
from ._gguf import GGUFInfo, read_gguf
from ._memory import KVLayout, check_memory, kv_layout
from ._owner import Owner

if TYPE_CHECKING:
    from ._chat import Message
    from ._tools import ChatCompletion, ChatDelta, ToolChoice

__all__ = ["Model", "ModelInfo"]

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class ModelInfo:
    """What a model is, read from its GGUF metadata."""

    name: str
    architecture: str
    n_params: int
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_ctx_train: int
    size_bytes: int
    chat_template: Optional[str] = None
    path: str = ""

    def __repr__(self) -> str:
        # the chat template (often kilobytes of Jinja) is shown by its size only
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                           if f.name != "chat_template")
        template = f"<{len(self.chat_template)} characters>" if self.chat_template else "None"
        return f"ModelInfo({fields}, chat_template={template})"


def check_model_file(path: PathLike) -> "tuple[str, GGUFInfo]":
    """Checks before llama.cpp sees the file: it exists, is readable and is a
    well-formed GGUF file (see :mod:`mullama._gguf`). Returns the path as str
    and what the file's header says."""
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidConfigError(f"model path must be a str or os.PathLike, got {type(path).__name__}")
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"model file not found: {p}")
    if p.is_dir():
        raise InvalidModelError(f"{p} is a directory, not a GGUF model file")
    if not p.is_file():
        raise InvalidModelError(f"{p} is not a regular file")
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise InvalidModelError(f"cannot read {p}: {exc.strerror or exc}") from exc
    if not head:
        raise InvalidModelError(f"{p} is empty")
    try:
        return str(p), read_gguf(str(p))
    except OSError as exc:
        raise InvalidModelError(f"cannot read {p}: {exc.strerror or exc}") from exc


_NOT_LOADED = object()


class Model(Owner):
    """A GGUF model loaded into memory. Weights are shared by all its contexts.

    Build it with :meth:`Model.load`. Use it as a context manager, or call
    :meth:`close` (idempotent); closing a model closes its contexts. A model
    cannot be pickled or copied (:class:`NotCopyableError`): pass its path to
    another process and load it there.
    """

    _copy_hint = "pass the path and load it in the other process (contexts of one Model share its weights)"

    def __init__(self, core: "_core.LlamaModel", vocab_only: bool, gguf: Optional[GGUFInfo] = None,
                 gpu_layers: int = 0) -> None:
        self._core = core
        self._vocab_only = vocab_only
        self._info: Optional[ModelInfo] = None
        self._gpu_layers = gpu_layers
        self._layout: object = _NOT_LOADED
        self._gguf_meta = None if gguf is None else gguf.metadata
        #: (n_params, size_bytes) from the file's tensor table: llama.cpp has no
        #: hyperparameters for a vocabulary-only model (asking for them aborts)
        self._file_sizes = None if gguf is None or not vocab_only else (
            sum(math.prod(shape) for _, shape, _, _ in gguf.tensors), sum(n for _, _, _, n in gguf.tensors))
        #: llama.cpp's chat library's templates, by override ("" for the model's own); one rendering at a time
        self._templates: "dict[str, _core.ChatTemplates]" = {}
        self._templates_lock = threading.Lock()
        self._thinking: "dict[str, bool]" = {}  # _template_thinks, by template
        self._embedders: "dict[tuple[Optional[str], int, int], Embedder]" = {}  # by (pooling, size, threads)
        #: contexts that loaded a draft model of their own (closed with this model, the draft model too)
        self._drafting: "weakref.WeakSet[Context]" = weakref.WeakSet()

    @classmethod
    def load(
        cls,
        path: PathLike,
        *,
        gpu_layers: int = 0,
        use_mmap: bool = True,
        vocab_only: bool = False,
        progress: Optional[Callable[[float], Optional[bool]]] = None,
    ) -> "Model":
        """Load a GGUF model.

        Args:
            path: the ``.gguf`` file.
            gpu_layers: layers to offload to the GPU (needs a GPU build; -1 = all).
            use_mmap: map the file instead of reading it.
            vocab_only: load only the tokenizer (no generation possible).
            progress: called with the load fraction in [0, 1]; return ``False``
                to cancel the load. An exception it raises is re-raised here.

        Raises:
            ModelNotFoundError, InvalidModelError, UnsupportedModelError.
        """
        spath, gguf = check_model_file(path)
        check_int("gpu_layers", gpu_layers, minimum=-1)
        if progress is not None and not callable(progress):
            raise InvalidConfigError(f"progress must be callable, got {type(progress).__name__}")
        try:
            core = _core.LlamaModel.load(spath, gpu_layers, bool(use_mmap), bool(vocab_only), progress)
        except InvalidModelError as exc:
            if gguf.n_tensors == 0 and not vocab_only:
                raise InvalidModelError(
                    f"{spath} holds no weights (a vocabulary-only GGUF file): it cannot generate; load it with "
                    "vocab_only=True to tokenize") from exc
            raise
        return cls(core, bool(vocab_only), gguf, gpu_layers)

    # -- lifetime -------------------------------------------------------------

    def close(self) -> None:
        """Free the model and every context created from it (idempotent)."""
        with self._templates_lock:
            for t in self._templates.values():
                t.close()
            self._templates.clear()
            for e in self._embedders.values():
                e.close()
            self._embedders.clear()
        for ctx in list(self._drafting):
            ctx.close()
        self._core.close()

    def _template_thinks(self, template: Optional[str]) -> bool:
        """Whether *template* (default: the model's own) lets the model think
        (``<think>``...), as llama.cpp's chat library finds; known once per template."""
        from ._chat import _builtin_names

        key = template or ""
        thinks = self._thinking.get(key)
        if thinks is None:
            if (template is None and not self.info.chat_template) or (
                    template in _builtin_names() and template != "chatml"):
                thinks = False  # no Jinja source: plain chat says why, or a built-in format
            else:
                try:
                    probe = json.dumps({"messages": [{"role": "user", "content": "Hi"}]})
                    thinks = bool(json.loads(self._render_with_tools(template, probe))["supports_thinking"])
                except MullamaError:
                    thinks = False  # a template llama.cpp's library cannot render stays on the Jinja renderer
            if len(self._thinking) >= 64:
                self._thinking.clear()
            self._thinking[key] = thinks
        return thinks

    def _render_with_tools(self, template: Optional[str], request_json: str) -> str:
        """Render a chat request with llama.cpp's chat library (see _tools.ChatPlan)."""
        from ._chat import _builtin_names, check_template

        key = template or ""
        if template is not None:
            check_template(template)
            if template in _builtin_names() and template != "chatml":
                raise ChatTemplateError(
                    f"llama.cpp's built-in format {template!r} has no tool calls: pass template= Jinja source")
        with self._templates_lock:
            if self._core.closed:
                raise ClosedError("the model is closed")
            t = self._templates.pop(key, None)
            if t is None:
                t = _core.ChatTemplates(self._core, key)
                while len(self._templates) >= 8:  # a few templates kept, the least recently used dropped
                    self._templates.pop(next(iter(self._templates))).close()
            self._templates[key] = t
            return t.apply(request_json)

    @property
    def closed(self) -> bool:
        return self._core.closed

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.info.name!r}, {self.info.architecture}"
        return f"<mullama.Model {state} {self._core.path}>"

    # -- metadata ---------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        """Name, architecture, sizes and chat template of the model."""
        if self._info is None:
            meta = self._core.meta()
            if self._vocab_only:
                n_params, size, n_embd, n_layer, n_head, n_ctx_train = self._hparams_from_file(meta)
            else:
                n_params, size, n_embd, n_layer, n_head, n_ctx_train, _ = self._core.stats()
            self._info = ModelInfo(
                name=meta.get("general.name", Path(self._core.path).stem),
                architecture=meta.get("general.architecture", "unknown"),
                n_params=int(n_params),
                n_vocab=self._core.n_vocab,
                n_embd=n_embd,
                n_layer=n_layer,
                n_head=n_head,
                n_ctx_train=n_ctx_train,
                size_bytes=int(size),
                chat_template=self._core.chat_template(),
                path=self._core.path,
            )
        return self._info

    def _hparams_from_file(self, meta: dict) -> "tuple[int, int, int, int, int, int]":
        """What llama.cpp's stats() would say, from the GGUF file itself."""
        typed = self._gguf_meta or {}
        arch = meta.get("general.architecture", "")

        def number(key: str) -> int:
            value = typed.get(f"{arch}.{key}", meta.get(f"{arch}.{key}", 0))
            values = getattr(value, "values", None)  # a per-layer array: its largest
            if isinstance(values, tuple):
                value = max((v for v in values if isinstance(v, int)), default=0)
            try:
                return int(value)
            except (TypeError, ValueError):
                return 0

        n_params, size = self._file_sizes or (0, 0)
        return (n_params, size, number("embedding_length"), number("block_count"), number("attention.head_count"),
                number("context_length"))

    def metadata(self) -> dict:
        """Every GGUF metadata key and its value, as strings."""
        return self._core.meta()

    @property
    def n_vocab(self) -> int:
        return self._core.n_vocab

    @property
    def vocab_only(self) -> bool:
        return self._vocab_only

    # -- embeddings -------------------------------------------------------------------

    def embed(self, texts: Union[str, Sequence[str], Sequence[Sequence[int]]], normalize: bool = True,
              pooling: Optional[str] = None, *, context_size: int = 2048, threads: Optional[int] = None,
              progress: Optional[Callable[[int, int], None]] = None,
              _call: Optional[EmbedCall] = None) -> Any:
        """Embeddings of *texts* (a string, a list of strings, or lists of token ids).

        Returns a float32 array of shape ``(len(texts), n_embd)`` (one row for a
        single string), L2-normalised unless *normalize* is false, as
        llama.cpp's ``llama-embedding`` computes them. *pooling*: ``"mean"``,
        ``"cls"``, ``"last"`` or ``"none"`` (then a list with one
        ``(n_tokens, n_embd)`` array per text); default: the model's own
        (``<arch>.pooling_type``), mean for a model that names none (a
        generative model). Texts are evaluated in batches on an embedding
        context of this model's own (*context_size* tokens, the longest text
        allowed), created at the first call: generation is never disturbed.
        *progress(done, total)* is called after each batch.

        Raises:
            ContextOverflowError: a text longer than *context_size* tokens.
            InvalidConfigError: an empty text or an unknown pooling.
            UnsupportedModelError: a reranker (rank pooling) without *pooling*.
        """
        if self._core.closed:
            raise ClosedError("the model is closed")
        if self._vocab_only:
            raise InvalidModelError("this model was loaded with vocab_only=True: it cannot compute embeddings")
        if not isinstance(normalize, bool):
            raise InvalidConfigError(f"normalize must be a bool, got {type(normalize).__name__}")
        if pooling is not None and pooling not in POOLINGS:
            raise InvalidConfigError(f"pooling must be one of {', '.join(POOLINGS)} (or None: the model's), "
                                     f"got {pooling!r}")
        check_int("context_size", context_size, minimum=1, maximum=1 << 20)
        threads = resolve_threads("threads", threads)
        items = [texts] if isinstance(texts, str) else list(texts)
        seqs = [self.tokenize(t) if isinstance(t, str) else token_list(t) for t in items]  # type: ignore[arg-type]
        key = (pooling, context_size, threads)
        with self._templates_lock:
            embedder = self._embedders.get(key)
            if embedder is None:
                embedder = self._embedders[key] = Embedder(self, pooling, context_size, threads)
        return embedder.embed(seqs, normalize, _call, progress)

    # -- tokens -------------------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> List[int]:
        """Token ids of *text*.

        Args:
            add_bos: add the beginning-of-sequence token if the model uses one.
            special: parse special tokens written in the text (``<|im_start|>``).
        """
        if not isinstance(text, str):
            raise InvalidConfigError(f"text must be str, got {type(text).__name__}")
        return self._core.tokenize(text.encode("utf-8", "surrogatepass"), bool(add_bos), bool(special))

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        """The text of *tokens* (special tokens rendered only if *special*)."""
        return self._core.detokenize(token_list(tokens), False, bool(special)).decode("utf-8", "replace")

    def token_to_piece(self, token: int, special: bool = False) -> bytes:
        """The raw bytes of one token (may be part of a UTF-8 character)."""
        return self._core.token_to_piece(token_list([token])[0], bool(special))

    def is_end_of_generation(self, token: int) -> bool:
        return self._core.is_eog(token_list([token])[0])

    # -- chat -----------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence["Message"], *, template: Optional[str] = None,
                            add_generation_prompt: bool = True,
                            chat_template_kwargs: Optional[Mapping[str, Any]] = None) -> str:
        """The prompt text of *messages* (``[{"role": "user", "content": "Hi"}]``)
        in the model's chat format.

        Args:
            template: a Jinja chat template or the name of a llama.cpp built-in
                format (:func:`mullama.builtin_templates`); default: the model's own.
            add_generation_prompt: end with the header of an assistant turn.
            chat_template_kwargs: extra variables for the template.

        Raises:
            ChatTemplateError: no template (the model has none and none was
                given), or the template failed on these messages.
        """
        from ._chat import format_chat

        if self._core.closed:
            raise ClosedError("the model is closed")
        return format_chat(self, messages, template=template, add_generation_prompt=add_generation_prompt,
                           kwargs=chat_template_kwargs)

    def chat(self, messages: Sequence["Message"], config: Optional[StreamConfig] = None, *,
             template: Optional[str] = None, context_size: Optional[int] = None,
             tools: Optional[Sequence[Any]] = None, tool_choice: "ToolChoice" = None,
             parallel_tool_calls: Optional[bool] = None,
             chat_template_kwargs: Optional[Mapping[str, Any]] = None) -> "ChatCompletion":
        """Answer a conversation: the assistant's next message, as a :class:`ChatCompletion`
        (see :meth:`Context.chat` for the arguments).

        A one-off: a context sized for the prompt plus ``config.max_tokens`` (or
        *context_size*) is created and freed. To keep a conversation's KV cache
        between turns, use :meth:`Context.chat`.
        """
        prepared = self._prepare_chat(messages, config, template, tools, tool_choice, parallel_tool_calls,
                                      chat_template_kwargs)
        with self.create_context(context_size=self._chat_size(prepared, context_size)) as ctx:
            return ctx._complete(*prepared)

    def chat_stream(self, messages: Sequence["Message"], config: Optional[StreamConfig] = None, *,
                    template: Optional[str] = None, context_size: Optional[int] = None,
                    tools: Optional[Sequence[Any]] = None, tool_choice: "ToolChoice" = None,
                    parallel_tool_calls: Optional[bool] = None,
                    chat_template_kwargs: Optional[Mapping[str, Any]] = None) -> Iterator["TokenData"]:
        """Like :meth:`chat`, yielding the tokens of the answer as they come.

        The messages are checked and formatted at the call; the context lives
        until the iterator is exhausted or closed.
        """
        prepared = self._prepare_chat(messages, config, template, tools, tool_choice, parallel_tool_calls,
                                      chat_template_kwargs)
        size = self._chat_size(prepared, context_size)

        def run() -> Iterator["TokenData"]:
            with self.create_context(context_size=size) as ctx:
                yield from ctx.stream(prepared[0], prepared[1])

        return run()

    def chat_deltas(self, messages: Sequence["Message"], config: Optional[StreamConfig] = None, *,
                    template: Optional[str] = None, context_size: Optional[int] = None,
                    tools: Optional[Sequence[Any]] = None, tool_choice: "ToolChoice" = None,
                    parallel_tool_calls: Optional[bool] = None,
                    chat_template_kwargs: Optional[Mapping[str, Any]] = None) -> Iterator["ChatDelta"]:
        """Like :meth:`chat`, yielding :class:`ChatDelta` pieces (see :meth:`Context.chat_deltas`)."""
        prepared = self._prepare_chat(messages, config, template, tools, tool_choice, parallel_tool_calls,
                                      chat_template_kwargs)
        size = self._chat_size(prepared, context_size)

        def run() -> Iterator["ChatDelta"]:
            with self.create_context(context_size=size) as ctx:
                yield from ctx._deltas(*prepared)

        return run()

    def _prepare_chat(self, messages: Sequence["Message"], config: Optional[StreamConfig], template: Optional[str],
                      tools: Optional[Sequence[Any]], tool_choice: "ToolChoice", parallel_tool_calls: Optional[bool],
                      kwargs: Optional[Mapping[str, Any]]) -> "tuple[List[int], Optional[StreamConfig], Any]":
        """A one-off chat's prompt, config and plan, made at the call (see Context._prepare)."""
        from ._chat import chat_tokens
        from ._tools import plan_chat

        if self._core.closed:
            raise ClosedError("the model is closed")
        if config is not None and not isinstance(config, StreamConfig):
            raise InvalidConfigError(f"config must be a StreamConfig, got {type(config).__name__}")
        plan = plan_chat(self, messages, template, tools=tools, tool_choice=tool_choice,
                         parallel_tool_calls=parallel_tool_calls, chat_template_kwargs=kwargs)
        if plan is None:
            return chat_tokens(self, messages, template, kwargs), config, None
        return plan.tokens, plan.config(config if config is not None else StreamConfig()), plan

    def _chat_size(self, prepared: "tuple[List[int], Optional[StreamConfig], Any]",
                   context_size: Optional[int]) -> int:
        """The context size of a one-off chat: its prompt plus max_tokens (at most the training size)."""
        if context_size is not None:
            return context_size
        tokens, config = prepared[0], prepared[1]
        max_tokens = config.max_tokens if config is not None else StreamConfig.max_tokens
        return min(len(tokens) + max_tokens, self.info.n_ctx_train or (1 << 24))

    # -- contexts -----------------------------------------------------------------

    def create_context(
        self,
        context_size: int = 2048,
        threads: Optional[int] = None,
        batch_size: int = 512,
        flash_attention: bool = False,
        threads_batch: Optional[int] = None,
        adaptive_threads: bool = True,
        draft_model: Union[PathLike, "Model", None] = None,
    ) -> "Context":
        """A new inference context with its own KV cache (a conversation).

        Args:
            context_size: tokens the context holds (0 = the model's training size).
            threads: threads for generation (default: the cores this process may use;
                more than that is capped, with a ``RuntimeWarning``).
            batch_size: most prompt tokens evaluated in one step.
            flash_attention: use flash attention.
            threads_batch: threads for prompt processing (default: ``threads``).
            adaptive_threads: let the context use fewer threads while the machine
                is busy (``threads`` is then the most it uses): steps that slow
                down under CPU contention make it try fewer threads, and it
                climbs back when the machine is quiet. Outputs are the same
                either way. ``False`` always uses ``threads``.
            draft_model: a smaller model with this model's tokens (a path, loaded
                and closed with the context, or a loaded :class:`Model`) that
                drafts for speculative decoding (``StreamConfig(speculative=True)``).

        Raises:
            IncompatibleDraftModelError: *draft_model* does not have this model's tokens.
            InsufficientMemoryError: the context's KV cache and attention
                buffers, estimated from the model's metadata, need more memory
                than is available (checked before anything is allocated).
            ContextCreationError: llama.cpp could not create it.
        """

        if self._core.closed:
            raise ClosedError("the model is closed")
        if self._vocab_only:
            raise InvalidModelError("this model was loaded with vocab_only=True: it can tokenize but not generate")
        check_int("context_size", context_size, minimum=0, maximum=1 << 24)
        check_int("batch_size", batch_size, minimum=1, maximum=1 << 20)
        threads = resolve_threads("threads", threads)
        threads_batch = threads if threads_batch is None else resolve_threads("threads_batch", threads_batch)
        what = f"context_size={context_size}"
        if context_size == 0:
            context_size = self.info.n_ctx_train
            what = f"context_size=0 (the model's training size, {context_size})"
        batch_size = min(batch_size, context_size)
        self._check_memory(context_size, 1, batch_size, bool(flash_attention), what=what)
        core = _core.LlamaContext(self._core, context_size, batch_size, threads, threads_batch, bool(flash_attention),
                                  bool(adaptive_threads))
        if draft_model is None:
            return Context(self, core, threads=threads)
        try:
            draft, drafter = self._drafter(draft_model, 1, context_size, threads)
        except BaseException:
            core.close()
            raise
        core.set_drafter(drafter)
        ctx = Context(self, core, threads=threads, draft=(drafter, draft if draft is not draft_model else None))
        if draft is not draft_model:
            self._drafting.add(ctx)
        return ctx

    def _drafter(self, draft_model: Union[PathLike, "Model"], n_seq: int, n_ctx_seq: int,
                 threads: int) -> "tuple[Model, _core.DraftModel]":
        """The draft model (loaded if a path) and a context of it with *n_seq*
        sequences, checked against this model's tokens."""
        if isinstance(draft_model, Model):
            if draft_model.closed:
                raise ClosedError("the draft model is closed")
            draft = draft_model
        else:
            draft = Model.load(draft_model)
        try:
            if draft._vocab_only:
                raise InvalidModelError("the draft model was loaded with vocab_only=True: it cannot generate")
            draft._check_memory(n_ctx_seq, n_seq, 512, False, what=f"a draft context of {n_seq} x {n_ctx_seq} tokens")
            return draft, _core.DraftModel(draft._core, self._core, n_seq, n_ctx_seq, threads)
        except BaseException:
            if draft is not draft_model:
                draft.close()
            raise

    # -- memory -----------------------------------------------------------------------

    def _kv_layout(self) -> Optional[KVLayout]:
        """What a KV cell costs in this model (None: unknown), from its GGUF metadata."""
        if self._layout is _NOT_LOADED:
            try:
                meta = self._gguf_meta if self._gguf_meta is not None else read_gguf(self._core.path).metadata
                self._layout = kv_layout(meta)
            except Exception:  # no estimate: llama.cpp's own checks still apply
                self._layout = None
            self._gguf_meta = None
        return self._layout  # type: ignore[return-value]

    def _check_memory(self, n_ctx_seq: int, n_seq: int, n_ubatch: int, flash_attention: bool, *,
                      what: str, count: int = 1) -> None:
        """Raise InsufficientMemoryError if *count* contexts of *n_seq* x *n_ctx_seq*
        tokens cannot fit in the memory available (see :mod:`mullama._memory`)."""
        if self._gpu_layers != 0 and _core.supports_gpu_offload():
            return  # the cache goes (partly) to the GPU: not this machine's RAM
        check_memory(self._kv_layout(), n_ctx_seq=n_ctx_seq, n_seq=n_seq, n_ubatch=n_ubatch,
                     flash_attention=flash_attention, count=count, what=what)
