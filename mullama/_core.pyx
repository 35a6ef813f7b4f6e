# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# distutils: language = c++
"""The C boundary of mullama: objects that own llama.cpp's model, context and
sampler chain, and the generation loop that runs without the GIL.

Nothing outside this module touches C. The Python layer (``mullama/*.py``)
validates arguments and shapes results; this module owns memory and threads.
The classes' attributes and cdef method signatures, and the C types and
Status codes they use, are declared in ``_core.pxd`` (for Cython code that
cimports them); the implementations are here.

Ownership:
  * ``LlamaModel`` owns a ``llama_model``.
  * ``LlamaContext`` owns a ``llama_context`` and its batch and holds a strong
    reference to its ``LlamaModel``, so the model is freed after the context
    whatever order the Python objects die in. ``LlamaModel.close()`` closes its
    live contexts first.
  * ``SamplerChain`` owns a ``llama_sampler`` chain and the samplers added to it.
  * ``close()`` is idempotent everywhere. A context that is inside C in another
    thread when it is closed is aborted, and ``close()`` waits for that thread
    to leave C before freeing anything.
"""

cimport cython
from cpython.buffer cimport PyBUF_FORMAT, PyBUF_ND, PyBUF_WRITABLE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.ref cimport PyObject
from libc.math cimport expf, logf
from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memchr, memcmp, memcpy, strcmp
from libc.stdlib cimport free, malloc, realloc
from libcpp cimport bool as cbool
from libcpp.string cimport string
from libcpp.vector cimport vector

from mullama._llama cimport *

import logging
import mmap
import re
import threading
import weakref

from mullama import _errors

cdef extern from *:
    """
    static inline int mullama_load_flag(const int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void mullama_store_flag(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    /* sequentially consistent: a store then a load on each side of a handshake (one sees the other's store) */
    static inline int mullama_load_flag_sc(const int *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    static inline void mullama_store_flag_sc(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
    """
    int mullama_load_flag(const int *p) nogil
    void mullama_store_flag(int *p, int v) nogil
    int mullama_load_flag_sc(const int *p) nogil
    void mullama_store_flag_sc(int *p, int v) nogil


cdef extern from "_threads.h" namespace "mullama" nogil:
    # see _threads.h: the monotonic clock and the abort callback (AbortState and
    # the compute-thread governor, CGovernor, are declared in _core.pxd)
    double mullama_now "mullama::now_s"()
    void abort_state_init(AbortState * a, const int * shutdown)
    bint abort_state_cancelled(const AbortState * a)
    cbool abort_callback(void * data) noexcept


# set once at interpreter exit: every loop and abort callback stops, and no new
# call enters C (see shutdown())
cdef int _g_shutdown = 0
_live = weakref.WeakSet()   # LlamaModel / LlamaContext / BatchEngine objects that may be inside C


def shutdown(double timeout=5.0):
    """Stop every generation and wait (bounded) until no thread is inside C.

    Registered with atexit by ``mullama``: a decode still running in a daemon
    thread while the process exits would otherwise crash in static destructors.
    """
    import time as _time
    mullama_store_flag(&_g_shutdown, 1)
    deadline = _time.monotonic() + timeout
    for obj in list(_live):
        (<_InC>obj)._wait_out(max(0.0, deadline - _time.monotonic()))


cdef class _InC:
    """Counts the threads inside a nogil section of an owner, so that close()
    (and interpreter exit) can wait for them before freeing anything."""

    def __cinit__(self):
        self._in_c = 0
        self._idle = threading.Condition(threading.Lock())
        _live.add(self)

    cdef inline int _enter_c(self) except -1:
        if mullama_load_flag(&_g_shutdown):
            raise _errors.ClosedError("the interpreter is shutting down")
        self._in_c += 1   # under the GIL
        return 0

    cdef inline void _leave_c(self):
        self._in_c -= 1
        if self._in_c == 0:
            with self._idle:
                self._idle.notify_all()

    def _wait_out(self, double timeout=-1.0):
        """Wait until no thread is inside C (the GIL is released meanwhile)."""
        with self._idle:
            if timeout < 0:
                while self._in_c:
                    self._idle.wait()
            elif self._in_c:
                self._idle.wait_for(lambda: self._in_c == 0, timeout)


# how a generation call, or a request in the batching engine, ended: Status
# (_core.pxd), under the names the Python layer uses (mullama/_generation.py)
STATUS_OK = ST_OK
STATUS_EOG = ST_EOG
STATUS_ABORTED = ST_ABORTED
STATUS_CONTEXT_FULL = ST_CTX_FULL
STATUS_LENGTH = ST_LENGTH
STATUS_DEAD_END = ST_DEAD_END
#: most log-probabilities of alternatives per generated token (``top_logprobs``)
TOP_LOGPROBS_MAX = MAX_TOP_LOGPROBS


# ---------------------------------------------------------------------------
# logging: llama.cpp's log lines go to the "mullama.llama_cpp" logger

_logger = logging.getLogger("mullama.llama_cpp")
_LEVELS = {
    GGML_LOG_LEVEL_DEBUG: logging.DEBUG,
    GGML_LOG_LEVEL_INFO: logging.INFO,
    GGML_LOG_LEVEL_WARN: logging.WARNING,
    GGML_LOG_LEVEL_ERROR: logging.ERROR,
}
_log_state = threading.local()
# what llama.cpp logs when a decode stops because our abort callback said so
# (GGML_STATUS_ABORTED == 1, llama_decode returns 2)
_ABORT_LINES = re.compile(r"failed with error 1$|compute status: 1$|failed to decode, ret = 2$|"
                          r"removing memory module entries")


@cython.wraparound(True)
cdef void _log_callback(ggml_log_level level, const char * text, void * user_data) noexcept with gil:
    # one llama.cpp message may come in several calls (GGML_LOG_LEVEL_CONT);
    # lines are assembled per thread and logged when complete
    try:
        st = _log_state
        if level != GGML_LOG_LEVEL_CONT:
            st.level = _LEVELS.get(level, logging.DEBUG)
        lvl = getattr(st, "level", logging.DEBUG)
        buf = getattr(st, "buf", "") + text.decode("utf-8", "replace")
        if not buf.endswith(u"\n"):
            st.buf = buf
            return
        st.buf = ""
        line = buf.rstrip()
        if lvl >= logging.WARNING and _ABORT_LINES.search(line):
            lvl = logging.DEBUG  # an abort we asked for (cancel()) is not an error
        if lvl >= logging.ERROR:
            # kept so that a failed load can say why (see take_errors())
            st.errors = (getattr(st, "errors", ()) + (line,))[-8:]
        if line and _logger.isEnabledFor(lvl):
            _logger.log(lvl, "%s", line)
    except BaseException:
        pass  # never let an exception unwind into C; logging is best effort


cdef void _silent_log_callback(ggml_log_level level, const char * text, void * user_data) noexcept nogil:
    pass


def take_errors():
    """Return and forget the error lines llama.cpp logged on this thread."""
    errors = getattr(_log_state, "errors", ())
    _log_state.errors = ()
    return errors


def silence_logging():
    """Stop routing llama.cpp's log through Python (used at interpreter exit)."""
    llama_log_set(_silent_log_callback, NULL)


llama_log_set(_log_callback, NULL)
quiet_common_log()
llama_backend_init()


def ggml_type_sizes():
    """(block size, bytes per block) of each ggml tensor type, indexed by type
    id; (0, 0) for ids whose support was removed."""
    cdef int t
    return [(int(ggml_blck_size(<ggml_type>t)), int(ggml_type_size(<ggml_type>t))) for t in range(<int>GGML_TYPE_COUNT)]


def gguf_walk_strings(const unsigned char[::1] buf, Py_ssize_t pos, Py_ssize_t count, bint keep):
    """Walk *count* GGUF strings (little-endian u64 length, then the bytes) from *pos* in *buf*.

    Returns (offset after the last one, or -1 when one lies outside *buf*; with
    *keep*, each string as llama.cpp reads a token: up to its first NUL byte,
    ``b"[EMPTY_i]"`` when that leaves nothing). mullama._gguf walks again in
    Python to name what is wrong when this returns -1."""
    cdef Py_ssize_t size = buf.shape[0], i, start, end, k
    cdef uint64_t n
    cdef const unsigned char *nul
    tokens = [] if keep else None
    for i in range(count):
        if pos > size - 8:
            return -1, None
        n = 0
        for k in range(7, -1, -1):
            n = (n << 8) | buf[pos + k]
        start = pos + 8
        if n > <uint64_t>(size - start):
            return -1, None
        pos = start + <Py_ssize_t>n
        if keep:
            end = pos
            if n:
                nul = <const unsigned char *>memchr(&buf[start], 0, n)
                if nul != NULL:
                    end = start + (nul - &buf[start])
            if end > start:
                tokens.append(PyBytes_FromStringAndSize(<const char *>&buf[start], end - start))
            else:
                tokens.append(b"[EMPTY_%d]" % i)
    return pos, tokens


def system_info():
    """llama.cpp's description of the CPU features it was built with."""
    return llama_print_system_info().decode("utf-8", "replace")


def version():
    return llama_version().decode("utf-8", "replace")


def quantize_model(str src, str dst, int ftype, int threads=1):
    """Tests and tools: write *src* (a GGUF file) to *dst* with every weight matrix of
    llama.cpp's ``llama_ftype`` *ftype* (``pure``: the same type everywhere, e.g. 15 =
    Q4_K). Raises MullamaError if llama.cpp fails."""
    cdef llama_model_quantize_params params = llama_model_quantize_default_params()
    cdef bytes s = src.encode(), d = dst.encode()
    cdef const char * cs = s
    cdef const char * cd = d
    cdef uint32_t rc
    params.nthread = threads
    params.ftype = <llama_ftype>ftype
    params.pure = True
    with nogil:
        rc = llama_model_quantize(cs, cd, &params)
    if rc != 0:
        raise _errors.MullamaError(f"llama_model_quantize({src!r} -> {dst!r}, ftype {ftype}) failed ({rc})")


def supports_gpu_offload():
    return llama_supports_gpu_offload()


def chat_builtin_templates():
    """Names of the chat formats llama.cpp knows without a Jinja template ("chatml", "llama3", ...)."""
    cdef int32_t n = llama_chat_builtin_templates(NULL, 0)
    cdef const char ** names = <const char **>malloc(max(n, 1) * sizeof(const char *))
    if names == NULL:
        raise MemoryError()
    try:
        n = llama_chat_builtin_templates(names, n)
        return [names[i].decode("utf-8") for i in range(n)]
    finally:
        free(names)


def apply_builtin_chat_template(bytes name, list roles, list contents, bint add_assistant):
    """Format a conversation with llama.cpp's built-in template *name*; None if
    llama.cpp does not know the template. *roles* and *contents* are bytes."""
    cdef Py_ssize_t n = len(roles), i
    if len(contents) != n:
        raise ValueError("roles and contents differ in length")
    cdef llama_chat_message * msgs = <llama_chat_message *>malloc(max(n, 1) * sizeof(llama_chat_message))
    cdef char * buf = NULL
    cdef char * grown
    cdef int32_t size = 256, got
    cdef bytes r, c
    if msgs == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            r = roles[i]
            c = contents[i]
            size += len(r) + 2 * len(c) + 64
            msgs[i].role = r        # the lists keep the bytes alive
            msgs[i].content = c
        while True:
            grown = <char *>realloc(buf, size)
            if grown == NULL:
                raise MemoryError()  # buf is still ours: freed below
            buf = grown
            got = llama_chat_apply_template(name, msgs, n, add_assistant, buf, size)
            if got < 0:
                return None
            if got <= size:
                return buf[:got].decode("utf-8", "replace")
            size = got + 1
    finally:
        free(msgs)
        free(buf)


# ---------------------------------------------------------------------------
# model

cdef class _LoadState:
    """Carries the Python progress callback into C and its exception back out."""

    def __cinit__(self, fn):
        self.fn = fn
        self.exc = None
        self.cancelled = False


cdef cbool _progress_callback(float progress, void * user_data) noexcept with gil:
    cdef _LoadState st = <_LoadState>user_data
    try:
        if st.fn(float(progress)) is False:  # returning False cancels the load
            st.cancelled = True
            return False
        return True
    except BaseException as exc:
        st.exc = exc  # re-raised by LlamaModel.load after C returns
        return False


@cython.no_gc_clear
cdef class LlamaModel(_InC):
    """Owns a ``llama_model``. Build with :meth:`load`."""

    def __cinit__(self):
        self.ptr = NULL
        self.vocab = NULL
        self._closing = False
        self._contexts = weakref.WeakSet()

    def __init__(self):
        raise TypeError("use LlamaModel.load(path, ...)")

    @staticmethod
    def load(str path, int n_gpu_layers=0, bint use_mmap=True, bint vocab_only=False, progress=None):
        """Load *path*; raises ModelLoadError (with llama.cpp's reason) on failure."""
        cdef LlamaModel self = LlamaModel.__new__(LlamaModel)
        cdef llama_model_params params = llama_model_default_params()
        cdef _LoadState st = None
        cdef bytes bpath = path.encode("utf-8")
        cdef const char * cpath = bpath
        params.n_gpu_layers = n_gpu_layers
        params.load_mode = LLAMA_LOAD_MODE_MMAP if use_mmap else LLAMA_LOAD_MODE_NONE
        params.vocab_only = vocab_only
        if progress is not None:
            st = _LoadState(progress)
            params.progress_callback = _progress_callback
            params.progress_callback_user_data = <void *>st
        take_errors()
        with nogil:
            self.ptr = llama_model_load_from_file(cpath, params)
        errors = take_errors()
        if st is not None and st.exc is not None:
            if self.ptr != NULL:
                llama_model_free(self.ptr)
                self.ptr = NULL
            raise st.exc
        if self.ptr == NULL:
            reason = "; ".join(errors) if errors else "llama.cpp gave no reason"
            if st is not None and st.cancelled:
                raise _errors.ModelLoadError(f"loading {path} was cancelled by the progress callback")
            if "unknown model architecture" in reason or "unsupported" in reason:
                raise _errors.UnsupportedModelError(f"{path}: {reason}")
            raise _errors.InvalidModelError(f"llama.cpp could not load {path}: {reason}")
        self.vocab = llama_model_get_vocab(self.ptr)
        self.n_vocab = llama_vocab_n_tokens(self.vocab)
        self.path = path
        return self

    cdef inline _check(self):
        if self.ptr == NULL or self._closing:
            raise _errors.ClosedError("the model is closed")

    cdef inline int _enter(self) except -1:
        self._check()
        return self._enter_c()

    @property
    def closed(self):
        return self.ptr == NULL or self._closing

    def close(self):
        """Free the model, closing every context still open on it first.

        Waits for threads inside C on this model (tokenizing, creating a
        context). A context whose logits are still viewed keeps the model's
        memory until that view is gone.
        """
        if self.ptr == NULL or self._closing:
            return
        self._closing = True
        for ctx in list(self._contexts):
            ctx.close()
        self._wait_out()
        self._release()

    cdef _release(self):
        """Free the model once it is closing and no context still holds C memory."""
        if self.ptr == NULL or not self._closing:
            return
        for ctx in self._contexts:
            if (<_Decoder>ctx).ptr != NULL:
                return  # freed by that context's _free()
        llama_model_free(self.ptr)
        self.ptr = NULL
        self.vocab = NULL

    def __dealloc__(self):
        # contexts hold a strong reference to us, so none is alive here
        if self.ptr != NULL:
            llama_model_free(self.ptr)
            self.ptr = NULL

    # -- metadata ---------------------------------------------------------

    def meta(self):
        """All GGUF metadata as a dict of strings (arrays are summarised by llama.cpp)."""
        self._check()
        cdef int n = llama_model_meta_count(self.ptr)
        cdef int i, k
        cdef char kbuf[256]
        cdef char * vbuf
        cdef int vcap = 4096
        out = {}
        vbuf = <char *>malloc(vcap)
        if vbuf == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                k = llama_model_meta_key_by_index(self.ptr, i, kbuf, sizeof(kbuf))
                if k < 0:
                    continue
                k = llama_model_meta_val_str_by_index(self.ptr, i, vbuf, vcap)
                if k >= vcap:
                    free(vbuf)
                    vcap = k + 1
                    vbuf = <char *>malloc(vcap)
                    if vbuf == NULL:
                        raise MemoryError()
                    k = llama_model_meta_val_str_by_index(self.ptr, i, vbuf, vcap)
                if k < 0:
                    continue
                out[kbuf.decode("utf-8", "replace")] = vbuf[:k].decode("utf-8", "replace")
        finally:
            free(vbuf)
        return out

    def description(self):
        self._check()
        cdef char buf[256]
        cdef int n = llama_model_desc(self.ptr, buf, sizeof(buf))
        return buf[:max(0, min(n, 255))].decode("utf-8", "replace")

    def chat_template(self):
        self._check()
        cdef const char * t = llama_model_chat_template(self.ptr, NULL)
        return None if t == NULL else t.decode("utf-8", "replace")

    def stats(self):
        """(n_params, size_bytes, n_embd, n_layer, n_head, n_ctx_train, has_decoder)."""
        self._check()
        return (llama_model_n_params(self.ptr), llama_model_size(self.ptr), llama_model_n_embd(self.ptr),
                llama_model_n_layer(self.ptr), llama_model_n_head(self.ptr), llama_model_n_ctx_train(self.ptr),
                llama_model_has_decoder(self.ptr))

    def special_tokens(self):
        self._check()
        return llama_vocab_bos(self.vocab), llama_vocab_eos(self.vocab), llama_vocab_get_add_bos(self.vocab)

    @property
    def can_drop_tail(self):
        """Its memory can forget a sequence's last tokens (not a recurrent or
        hybrid model's state), which speculative decoding needs."""
        self._check()
        return not (llama_model_is_recurrent(self.ptr) or llama_model_is_hybrid(self.ptr))

    def is_eog(self, int token):
        self._check()
        return llama_vocab_is_eog(self.vocab, token)

    # -- tokens -----------------------------------------------------------

    def tokenize(self, bytes text, bint add_special, bint parse_special):
        """Token ids of UTF-8 *text* (list of int)."""
        self._enter()
        cdef const char * ctext = text
        cdef Py_ssize_t tlen = len(text)
        if tlen > 0x7FFFFFF0:
            raise _errors.InvalidConfigError(f"text of {tlen} bytes is too long to tokenize")
        cdef int32_t cap = <int32_t>(tlen + 8)
        cdef vector[llama_token] out
        out.resize(cap)
        cdef int32_t n
        try:
            with nogil:
                n = llama_tokenize(self.vocab, ctext, <int32_t>tlen, out.data(), cap, add_special, parse_special)
                if n < 0 and n != -0x7FFFFFFF - 1:
                    cap = -n
                    out.resize(cap)
                    n = llama_tokenize(self.vocab, ctext, <int32_t>tlen, out.data(), cap, add_special, parse_special)
        finally:
            self._leave_c()
        if n < 0:
            raise _errors.MullamaError(f"llama.cpp could not tokenize the text ({tlen} bytes)")
        return [out[i] for i in range(n)]

    cdef int _check_tokens(self, vector[llama_token] & toks) except -1:
        cdef size_t i
        cdef int nv = self.n_vocab
        for i in range(toks.size()):
            if toks[i] < 0 or toks[i] >= nv:
                raise _errors.InvalidTokenError(
                    f"token id {toks[i]} at index {i} is outside the vocabulary (0..{nv - 1})")
        return 0

    def token_to_piece(self, int token, bint special=False):
        """The bytes of one token."""
        self._check()
        if token < 0 or token >= self.n_vocab:
            raise _errors.InvalidTokenError(f"token id {token} is outside the vocabulary (0..{self.n_vocab - 1})")
        cdef char buf[PIECE_BUF]
        cdef int n = llama_token_to_piece(self.vocab, token, buf, PIECE_BUF, 0, special)
        if n < 0:
            big = bytearray(-n)
            n = llama_token_to_piece(self.vocab, token, <char *>big, -n, 0, special)
            return bytes(big[:n])
        return PyBytes_FromStringAndSize(buf, n)

    def detokenize(self, tokens, bint remove_special=False, bint unparse_special=False):
        """UTF-8 bytes of a list of token ids."""
        self._check()
        cdef vector[llama_token] toks = tokens
        self._check_tokens(toks)
        self._enter()
        cdef int32_t cap = <int32_t>(toks.size() * 8 + 16)
        cdef string out
        out.resize(cap)
        cdef int32_t n
        try:
            with nogil:
                n = llama_detokenize(self.vocab, toks.data(), <int32_t>toks.size(), &out[0], cap,
                                     remove_special, unparse_special)
                if n < 0:
                    cap = -n
                    out.resize(cap)
                    n = llama_detokenize(self.vocab, toks.data(), <int32_t>toks.size(), &out[0], cap,
                                         remove_special, unparse_special)
        finally:
            self._leave_c()
        if n < 0:
            raise _errors.MullamaError("llama.cpp could not detokenize the tokens")
        return out.substr(0, n)


# ---------------------------------------------------------------------------
# sampler chain

@cython.no_gc_clear
cdef class SamplerChain:
    """A request's sampling: a llama.cpp sampler chain built from sampling
    settings (or greedy) and, optionally, a GBNF grammar the output must follow.

    The greedy chain is a plain argmax done in the generation loop itself: the
    same choice as llama.cpp's greedy sampler (first index of the largest
    logit) without copying the vocabulary into a candidate array per token.

    The grammar is kept beside the chain and checked as llama.cpp's
    common_sampler does (see _sampling.h): the token the chain picks is checked
    against it, and only a refused token makes the grammar filter the whole
    vocabulary. With *triggers* or *trigger_tokens* the grammar is lazy: it
    applies from the first match of a trigger pattern (regular expressions,
    matched from the start of the output) or trigger token on; with
    *reasoning* (start and end tags) a lazy grammar waits while the model
    thinks (*reasoning_open*: the reply starts inside a thought).
    """

    def __cinit__(self):
        self.s = new Sampling()
        self.greedy = True

    def __init__(self, LlamaModel model not None, float temperature=0.0, int top_k=0, float top_p=1.0,
                 float min_p=0.0, float repeat_penalty=1.0, int repeat_last_n=64, unsigned int seed=0xFFFFFFFF,
                 float frequency_penalty=0.0, float presence_penalty=0.0, str grammar=None, str root="root",
                 triggers=(), trigger_tokens=(), preserved=(), reasoning=(), bint reasoning_open=False,
                 logit_bias=()):
        model._check()
        cdef vector[llama_logit_bias] biases
        cdef llama_logit_bias b
        for tok, bias in logit_bias:
            if not 0 <= tok < model.n_vocab:
                raise _errors.InvalidTokenError(f"logit_bias token {tok} is outside the vocabulary (0..{model.n_vocab - 1})")
            b.token = tok
            b.bias = bias
            biases.push_back(b)
        for t in sorted(set(preserved)):
            if not 0 <= t < model.n_vocab:
                raise _errors.InvalidTokenError(f"preserved token {t} is outside the vocabulary")
            self.s.preserved.push_back(t)
        if grammar is not None:
            self._set_grammar(model, grammar, root, triggers, trigger_tokens, reasoning, reasoning_open)
        cdef llama_sampler_chain_params p = llama_sampler_chain_default_params()
        p.no_perf = True
        cdef bint penalties = repeat_penalty != 1.0 or frequency_penalty != 0.0 or presence_penalty != 0.0
        if temperature <= 0.0 and not penalties and biases.empty():
            return  # greedy: argmax in the loop
        self.greedy = False
        cdef llama_sampler * chain = llama_sampler_chain_init(p)
        self.s.chain = chain
        if not biases.empty():  # first, as in llama.cpp's common_sampler
            llama_sampler_chain_add(chain, llama_sampler_init_logit_bias(model.n_vocab, <int32_t>biases.size(),
                                                                         biases.data()))
        if penalties:
            llama_sampler_chain_add(chain, llama_sampler_init_penalties(
                model.n_vocab, repeat_last_n, repeat_penalty, frequency_penalty, presence_penalty))
        if temperature <= 0.0:
            llama_sampler_chain_add(chain, llama_sampler_init_greedy())
            return
        if top_k > 0:
            llama_sampler_chain_add(chain, llama_sampler_init_top_k(top_k))
        if top_p < 1.0:
            llama_sampler_chain_add(chain, llama_sampler_init_top_p(top_p, 1))
        if min_p > 0.0:
            llama_sampler_chain_add(chain, llama_sampler_init_min_p(min_p, 1))
        llama_sampler_chain_add(chain, llama_sampler_init_temp(temperature))
        llama_sampler_chain_add(chain, llama_sampler_init_dist(seed))

    cdef _set_grammar(self, LlamaModel model, str grammar, str root, triggers, trigger_tokens, reasoning,
                      bint reasoning_open):
        cdef string src = grammar.encode("utf-8")
        cdef string croot = root.encode("utf-8")
        cdef long offset = -1
        cdef string err = grammar_error(model.vocab, src, &offset)
        if not err.empty():
            raise _errors.GrammarError(_grammar_message(err.decode("utf-8", "replace"), src, offset))
        cdef list pats = [_utf8(t, "trigger pattern") for t in triggers]
        cdef vector[const char *] cpats
        cdef vector[llama_token] ctoks
        for t in pats:
            cpats.push_back(<const char *>t)
        for t in trigger_tokens:
            if not 0 <= t < model.n_vocab:
                raise _errors.InvalidTokenError(f"grammar trigger token {t} is outside the vocabulary")
            ctoks.push_back(t)
        take_errors()
        try:
            if cpats.empty() and ctoks.empty():
                self.s.grammar = llama_sampler_init_grammar(model.vocab, src.c_str(), croot.c_str())
            else:
                self.s.grammar = llama_sampler_init_grammar_lazy_patterns(
                    model.vocab, src.c_str(), croot.c_str(), cpats.data(), cpats.size(), ctoks.data(), ctoks.size())
        except Exception as e:  # a trigger pattern std::regex refused
            raise _errors.GrammarError(f"invalid grammar trigger pattern: {e}") from None
        if self.s.grammar == NULL:
            why = "; ".join(l.rstrip(".") for l in take_errors()) or "llama.cpp refused it"
            raise _errors.GrammarError(f"invalid grammar: {why}")
        self.s.vocab = model.vocab
        self.s.lazy = not (cpats.empty() and ctoks.empty())
        if reasoning:
            start, end = reasoning
            self.s.think_start = _utf8(start, "reasoning tag")
            self.s.think_end = _utf8(end, "reasoning tag")
            self.s.thinking = reasoning_open

    def prefill(self, tokens):
        """Advance the grammar over *tokens* as if they had been generated (the
        start of a reply a chat template already wrote). GrammarError if the
        grammar refuses them."""
        cdef vector[llama_token] toks = tokens
        if self.s == NULL:
            raise _errors.ClosedError("the sampler is closed")
        if self.s.grammar != NULL and not grammar_prefill(self.s, toks.data(), <int>toks.size()):
            raise _errors.GrammarError(
                "the grammar refuses its prefill tokens (the start of the reply it is fed before generating)")

    def close(self):
        if self.s != NULL:
            del self.s   # frees the chain, the samplers it owns, and the grammar
            self.s = NULL

    def __dealloc__(self):
        if self.s != NULL:
            del self.s
            self.s = NULL


@cython.no_gc_clear
cdef class Speculator:
    """A request's speculative decoding (see _speculative.h): prompt lookup of
    n-grams from *ngram_max* down to *ngram_min* tokens (or, with
    *draft_model*, the decoder's :class:`DraftModel`), drafts of at most
    *max_draft* tokens, the draft length adapting to what is accepted, and the
    counters of one generation."""

    def __cinit__(self):
        self.s = new Speculation()

    def __init__(self, int max_draft=16, int ngram_min=3, int ngram_max=5, bint draft_model=False,
                 bint adaptive=True):
        if not 1 <= max_draft <= 256:
            raise _errors.InvalidConfigError(f"max_draft must be between 1 and 256, got {max_draft}")
        if not 1 <= ngram_min <= ngram_max <= 64:
            raise _errors.InvalidConfigError(
                f"the n-gram sizes must satisfy 1 <= ngram_min <= ngram_max <= 64, got {ngram_min} and {ngram_max}")
        self.s.max_draft = max_draft
        self.s.ngram_min = ngram_min
        self.s.ngram_max = ngram_max
        self.s.use_model = draft_model
        self.s.adaptive = adaptive
        self.s.reset()

    @property
    def drafts(self):
        """Verifications (decodes of a draft)."""
        return self.s.drafts

    @property
    def drafted(self):
        """Tokens drafted."""
        return self.s.drafted

    @property
    def accepted(self):
        """Drafted tokens the model accepted."""
        return self.s.accepted

    def __dealloc__(self):
        del self.s


def json_schema_to_grammar(str schema_json):
    """The GBNF grammar of a JSON schema (JSON text), by llama.cpp's own
    converter (common/json-schema-to-grammar.cpp, as llama-server uses it).
    GrammarError naming the schema path if it cannot be converted."""
    try:
        return schema_to_grammar(schema_json.encode("utf-8")).decode("utf-8")
    except Exception as e:  # whatever C++ exception the converter threw, as Cython translated it
        msg = str(e).replace("JSON schema conversion failed:\n", "").strip()
        raise _errors.GrammarError(f"unsupported JSON schema: {msg}") from None


@cython.no_gc_clear
cdef class ChatTemplates:
    """A model's chat templates in llama.cpp's chat library (common/chat.h), as
    llama-server uses them: rendering with tools, tool_choice and template
    kwargs, which also gives the grammar, triggers and output parser a reply
    needs. *override* is Jinja source replacing the model's own ("" for none)."""

    def __cinit__(self):
        self.ptr = NULL

    def __init__(self, LlamaModel model not None, str override=""):
        model._check()
        cdef string src = override.encode("utf-8")
        try:
            with nogil:
                self.ptr = chat_templates_new(model.ptr, src)
        except Exception as e:
            raise _errors.ChatTemplateError(f"llama.cpp's chat library refused the chat template: {e}") from None
        self.model = model

    cdef _check(self):
        if self.ptr == NULL:
            raise _errors.ClosedError("the chat templates are closed")
        self.model._check()

    def apply(self, str request_json):
        """Render a request (JSON text, see _common.h's chat_apply) and return
        its prompt, grammar, triggers and parser settings as JSON text."""
        self._check()
        cdef string req = request_json.encode("utf-8", "surrogatepass")
        cdef string out
        try:
            with nogil:
                out = chat_apply(self.ptr, req)
        except Exception as e:
            raise _errors.ChatTemplateError(f"the chat template failed: {e}") from None
        return out.decode("utf-8", "replace")

    def close(self):
        if self.ptr != NULL:
            chat_templates_free(self.ptr)
            self.ptr = NULL

    def __dealloc__(self):
        if self.ptr != NULL:
            chat_templates_free(self.ptr)
            self.ptr = NULL


@cython.no_gc_clear
cdef class ChatOutputParser:
    """Parses a reply, as it grows, into content, reasoning_content and
    tool_calls with llama.cpp's chat library (the parser a template's
    rendering chose: see ChatTemplates.apply)."""

    def __cinit__(self):
        self.ptr = NULL

    def __init__(self, int format_id, str generation_prompt, str parser, str reasoning_format="none",
                 bint parse_tool_calls=True):
        cdef string gp = generation_prompt.encode("utf-8", "surrogatepass")
        cdef string ps = parser.encode("utf-8", "surrogatepass")
        cdef string rf = reasoning_format.encode("utf-8")
        try:
            self.ptr = chat_parser_new(format_id, gp, ps, rf, parse_tool_calls)
        except Exception as e:
            raise _errors.ChatTemplateError(f"llama.cpp's chat library could not make the reply parser: {e}") from None

    def parse(self, text, bint partial):
        """Parse the whole reply so far (*text*: str or UTF-8 bytes). Returns
        JSON text: ``{"message": ..., "diffs": [...]}``; raises ValueError if a
        final reply does not match the template's format."""
        if self.ptr == NULL:
            raise _errors.ClosedError("the parser is closed")
        cdef string t = text if isinstance(text, bytes) else (<str>text).encode("utf-8", "surrogatepass")
        cdef string out
        try:
            with nogil:
                out = chat_parse(self.ptr, t, partial)
        except Exception as e:
            raise ValueError(str(e)) from None
        return out.decode("utf-8", "replace")

    def close(self):
        if self.ptr != NULL:
            chat_parser_free(self.ptr)
            self.ptr = NULL

    def __dealloc__(self):
        if self.ptr != NULL:
            chat_parser_free(self.ptr)
            self.ptr = NULL


cdef bytes _utf8(object text, str what):
    if not isinstance(text, str):
        raise _errors.InvalidConfigError(f"a {what} must be a str, got {type(text).__name__}")
    return (<str>text).encode("utf-8")


cdef str _grammar_message(str err, string src, long offset):
    """*err* of llama.cpp's GBNF parser, with the line, column and text where it stopped."""
    if offset < 0:
        return f"invalid grammar: {err}"
    before = src.substr(0, offset).decode("utf-8", "replace")
    line = before.count("\n") + 1
    column = len(before) - (before.rfind("\n") + 1) + 1
    near = src.substr(offset, 24).decode("utf-8", "replace").split("\n")[0]
    where = f"line {line}, column {column}"
    return f"invalid grammar at {where}: {err}" + (f" (near {near!r})" if near else " (at the end)")


# ---------------------------------------------------------------------------
# context

cdef inline int _decode_status(int rc) noexcept nogil:
    """llama_decode's return code as a Status: 1 (no KV slot for the batch) is
    ST_CTX_FULL, 2 ST_ABORTED; a llama.cpp error (negative) stays as it is."""
    if rc == 1:
        return ST_CTX_FULL
    if rc == 2:
        return ST_ABORTED
    return rc if rc <= 0 else -rc   # no other positive code exists: an error too


cdef int _check_status(int status, overflow) except -1:
    """The one place a decode's status becomes an exception (pyzmq's
    ``_check_rc``): ST_CTX_FULL raises ContextOverflowError(*overflow*),
    ST_ABORTED AbortedError, a llama.cpp error DecodeError; the others pass."""
    if status == ST_CTX_FULL:
        raise _errors.ContextOverflowError(overflow)
    if status == ST_ABORTED:
        raise _errors.AbortedError("the evaluation was cancelled")
    if status < 0:
        raise _errors.DecodeError(f"llama_decode failed with code {status}")
    return 0


cdef int _governed_decode(llama_context * ctx, llama_batch & batch, CGovernor * gov,
                          AbortState * ab) noexcept nogil:
    """llama_decode under the thread governor: a step the watchdog aborted is
    rolled back (what it kept of each sequence, from the sequence's first
    position in the batch) and run again, with the thread count the governor
    chose then. Returns the Status (or llama.cpp error) of the step that counted."""
    cdef int rc, i
    cdef double t0
    cdef bint watchdog
    while True:
        gov.begin(batch.n_tokens, ab)
        t0 = mullama_now()
        rc = llama_decode(ctx, batch)
        watchdog = rc == 2 and ab.fired != 0 and not abort_state_cancelled(ab)
        gov.end(batch.n_tokens, mullama_now() - t0, watchdog)
        if not watchdog:
            return _decode_status(rc)
        for i in range(batch.n_tokens):
            if i == 0 or batch.seq_id[i][0] != batch.seq_id[i - 1][0]:
                llama_memory_seq_rm(llama_get_memory(ctx), batch.seq_id[i][0], batch.pos[i], -1)


def _start_threads(int n_max):
    """Threads a new context starts with: the cores not taken by threads of
    other processes running now (/proc/loadavg's running tasks minus this
    process's; Linux, else *n_max*). Only a first guess: the governor moves
    from there by what the steps show."""
    import os as _os
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
        cores = len(_os.sched_getaffinity(0))
        mine = 0
        for tid in _os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                    mine += f.read().rsplit(b")", 1)[1].split()[0] == b"R"
            except (OSError, IndexError):
                pass
    except (OSError, ValueError, IndexError, AttributeError):
        return n_max
    return max(1, min(n_max, cores - max(0, running - max(mine, 1))))


cdef double _first_cap(LlamaModel model):
    # the watchdog of a step nothing is known about yet: 2 s per GB of weights, at least 1 s
    return max(1.0, 2.0 * llama_model_size(model.ptr) / 1e9)


cdef _force_threads(CGovernor * gov, int threads, double watchdog):
    if gov == NULL:
        raise _errors.ClosedError("closed")
    if watchdog >= 0:
        gov.forced_limit = watchdog
    gov.force(threads)


cdef object _thread_stats(CGovernor * gov):
    return {"threads": gov.threads(), "max_threads": gov.n_max, "adaptive": gov.adaptive,
            "steps": gov.steps, "changes": gov.changes, "watchdog_aborts": gov.watchdog_aborts,
            "trials": gov.trials, "last_step_s": gov.last_step}


cdef int _sample_into(llama_context * ctx, int i, Sampling * smpl, const llama_vocab * vocab, int n_vocab,
                      bint want_lp, int n_top, Output * out, llama_token * tok_out) noexcept nogil:
    """Sample a token from the logits of batch row *i* and append it to *out*
    with its piece (b"" for an end-of-generation token) and, if *want_lp*, its
    log-probability and those of the *n_top* most likely tokens. Returns ST_OK,
    ST_EOG (an end-of-generation token) or ST_DEAD_END (the grammar allows no
    token: nothing is appended)."""
    cdef float * logits = llama_get_logits_ith(ctx, i)
    cdef float best, acc
    cdef int j, n
    cdef char buf[PIECE_BUF]
    cdef llama_token tok = sample(smpl, logits, n_vocab, &best)
    if tok == DEAD_END:
        return ST_DEAD_END
    if want_lp:
        if best != best:  # NaN: the argmax did not run over the raw logits
            best = logits[0]
            for j in range(1, n_vocab):
                if logits[j] > best:
                    best = logits[j]
        acc = 0.0
        for j in range(n_vocab):
            acc += expf(logits[j] - best)
        acc = best + logf(acc)  # the log of the softmax's sum
        out.lp.push_back(logits[tok] - acc)
        if n_top > 0:
            top_logprobs(logits, n_vocab, n_top, acc, out.top_tok, out.top_lp)
    out.tok.push_back(tok)
    tok_out[0] = tok
    if llama_vocab_is_eog(vocab, tok):
        out.len.push_back(0)
        return ST_EOG
    n = llama_token_to_piece(vocab, tok, buf, PIECE_BUF, 0, special_text(smpl, tok))
    if n < 0:
        n = 0
    out.text.append(buf, n)
    out.len.push_back(n)
    return ST_OK


cdef inline void _clear_output(Output * out) noexcept nogil:
    out.tok.clear()
    out.text.clear()
    out.len.clear()
    out.lp.clear()
    out.top_tok.clear()
    out.top_lp.clear()


cdef tuple _take_output(Output * out, bint want_lp, int n_top):
    """``(tokens, pieces, logprobs_or_None, top_or_None)`` of *out*, which is
    emptied; ``top[i]`` is token i's ``n_top`` most likely ``(token, logprob)``."""
    cdef size_t i, j
    cdef Py_ssize_t off = 0
    cdef const char * base = out.text.c_str()
    pieces = []
    for i in range(out.len.size()):
        pieces.append(PyBytes_FromStringAndSize(base + off, out.len[i]))
        off += out.len[i]
    top = None
    if want_lp and n_top > 0:
        top = [tuple([(out.top_tok[j], out.top_lp[j]) for j in range(i * n_top, (i + 1) * n_top)
                      if out.top_tok[j] >= 0]) for i in range(out.tok.size())]
    result = ([t for t in out.tok], pieces, [x for x in out.lp] if want_lp else None, top)
    _clear_output(out)
    return result



cdef DraftModel _entered(DraftModel drafter):
    """*drafter* entered (its model's close() then waits for it to leave), or
    None when there is none or its model was closed: then nothing is drafted."""
    if drafter is None:
        return None
    try:
        drafter._enter()
    except _errors.ClosedError:
        return None
    return drafter


cdef int _make_draft(Speculation * spec, DraftModel drafter, int seq, const vector[llama_token] & hist,
                     llama_token last, int most, AbortState * ab) noexcept nogil:
    """A draft for *hist* then *last* (the pending token) into ``spec.draft``,
    at most *most* tokens: by prompt lookup, or from the draft model
    (``use_model``, sequence *seq*; nothing without an entered *drafter*).
    Returns its length."""
    if spec.use_model:
        if drafter is None:  # (its model was closed: no drafts)
            spec.draft.clear()
            return 0
        return drafter.draft(seq, hist, last, most, spec.draft, ab)
    return lookup_draft(spec, hist, last, most)


cdef void _free_decoder(_Decoder d):
    """Free a decoder's C objects (not virtual: also what __dealloc__ runs)."""
    if d.has_batch:
        llama_batch_free(d.batch)
        d.has_batch = False
    if d.ptr != NULL:
        llama_free(d.ptr)
        d.ptr = NULL
    if d.gov != NULL:
        del d.gov   # its pools: after the llama.cpp context that used them
        d.gov = NULL


@cython.no_gc_clear
cdef class _Decoder(_InC):
    """What a context and the batching engine share: a ``llama_context``, its
    batch, the abort callback's state (cancellation flags and the watchdog),
    the thread governor, and their lifetime (close, the model reference)."""

    def __cinit__(self):
        self.ptr = NULL
        self.has_batch = False
        self._closed = False
        self._what = "decoder"
        self.gov = NULL
        abort_state_init(&self.ab, &_g_shutdown)

    cdef _open(self, LlamaModel model, uint32_t n_ctx, uint32_t n_batch, int n_seq, int n_threads,
               int n_threads_batch, bint flash_attention, bint adaptive_threads, str what, str hint,
               int pooling=-2):
        """Create the llama.cpp context (*n_seq* sequences sharing *n_ctx*
        tokens) with this object's abort callback, its thread governor and a
        batch of n_batch tokens. ContextCreationError names *what* and adds *hint*.
        *pooling* >= -1 (a llama_pooling_type): an embedding context, its
        sequences in one unified KV buffer."""
        model._check()
        cdef llama_context_params p = llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = n_batch
        p.n_ubatch = n_batch
        p.n_seq_max = n_seq
        p.n_threads = n_threads
        p.n_threads_batch = n_threads_batch
        p.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attention else LLAMA_FLASH_ATTN_TYPE_DISABLED
        p.abort_callback = abort_callback
        p.abort_callback_data = <void *>&self.ab
        p.no_perf = True
        if pooling >= -1:
            p.embeddings = True
            p.pooling_type = <llama_pooling_type>pooling
            p.kv_unified = True
        take_errors()
        model._enter()
        try:
            with nogil:
                self.ptr = llama_init_from_model(model.ptr, p)
        finally:
            model._leave_c()
        errors = take_errors()
        if self.ptr == NULL:
            reason = "; ".join(errors) if errors else "llama.cpp gave no reason"
            raise _errors.ContextCreationError(f"could not create {what}: {reason}{hint}")
        self.model = model
        model._contexts.add(self)
        # thread pools of its own, one per thread count the governor uses
        cdef int n_max = max(n_threads, n_threads_batch)
        self.gov = new CGovernor(n_max, adaptive_threads,
                                 _start_threads(n_max) if adaptive_threads else n_max, _first_cap(model))
        if not self.gov.bind(self.ptr):
            raise _errors.ContextCreationError(f"could not start {n_max} compute threads")
        self.n_batch = llama_n_batch(self.ptr)
        self.batch = llama_batch_init(self.n_batch, 0, 1)
        self.has_batch = True

    cdef _free(self):
        _free_decoder(self)
        if self.model is not None:
            self.model._release()  # a closing model waits for its last context

    def close(self):
        """Free it; a thread inside C on it is aborted and awaited first."""
        if self._closed:
            return
        self._closed = True
        mullama_store_flag(&self.ab.flags[0], 1)
        self._wait_out()
        self._free()

    @property
    def closed(self):
        return self._closed

    def __dealloc__(self):
        # no thread is in C (it would hold a reference)
        _free_decoder(self)

    cdef inline int _enter(self) except -1:
        if self._closed:
            raise _errors.ClosedError(f"the {self._what} is closed")
        self.model._check()
        return self._enter_c()

    cdef inline void _leave(self):
        self._leave_c()

    cdef inline void _add(self, int n, llama_token tok, llama_pos pos, int seq, bint logits) noexcept nogil:
        """Row *n* of the batch: *tok* at *pos* of sequence *seq*, with logits or not."""
        self.batch.token[n] = tok
        self.batch.pos[n] = pos
        self.batch.n_seq_id[n] = 1
        self.batch.seq_id[n][0] = seq
        self.batch.logits[n] = logits

    def thread_stats(self):
        """The compute threads: in use now, the maximum, and the governor's counts."""
        if self.gov == NULL:
            raise _errors.ClosedError(f"the {self._what} is closed")
        return _thread_stats(self.gov)

    @property
    def thread_changes(self):
        """How often the governor changed the thread count (a cheap read, for logging)."""
        return self.gov.changes if self.gov != NULL else 0

    def _set_threads(self, int threads):
        """Tests: decode with *threads* from the next step on."""
        _force_threads(self.gov, threads, -1.0)

    def _set_watchdog(self, double seconds):
        """Tests: stop every step at more than one thread after *seconds* (0: the governor's own limits)."""
        _force_threads(self.gov, 1 << 30, seconds)


cdef class ThreadGovernor:
    """The compute-thread governor alone, driven by step times given to it:
    the deterministic harness of the tests. Contexts use the same C++ class
    (``_threads.h``) on their real steps."""

    def __cinit__(self, int max_threads, bint adaptive=True, int start=0, double first_cap=1.0):
        self.g = new CGovernor(max_threads, adaptive, start if start > 0 else max_threads, first_cap)
        self.g.idle_cores = -1.0   # the machine's idle cores are not looked at: set idle_cores to simulate them
        abort_state_init(&self.ab, &_g_shutdown)

    @property
    def idle_cores(self):
        """Idle cores a probe for one more thread sees (negative: unknown, probes allowed)."""
        return self.g.idle_cores

    @idle_cores.setter
    def idle_cores(self, double value):
        self.g.idle_cores = value

    def __dealloc__(self):
        del self.g

    def plan(self, int n_tokens=1):
        """Threads for the next step of *n_tokens*, and its watchdog limit in seconds (0: none)."""
        cdef int threads = self.g.begin(n_tokens, &self.ab)
        return threads, (self.g.limit(CGovernor.bucket(n_tokens), threads, n_tokens)
                         if self.g.adaptive and threads > 1 else 0.0)

    def observe(self, int n_tokens, double seconds, bint watchdog=False):
        """The step planned last took *seconds* (or the watchdog aborted it)."""
        self.g.end(n_tokens, seconds, watchdog)

    def floor(self, int n_tokens, int threads):
        return self.g.floor_at(CGovernor.bucket(n_tokens), threads)

    def stats(self):
        return _thread_stats(self.g)


cdef class _LogitsView:
    """Exports the context's last logits as a float32 buffer (zero-copy)."""

    def __getbuffer__(self, Py_buffer * view, int flags):
        view.buf = <void *>self.data
        view.obj = self
        view.len = self.shape[0] * sizeof(float)
        view.readonly = 0
        view.itemsize = sizeof(float)
        view.format = NULL
        if flags & PyBUF_FORMAT:
            view.format = b"f"
        view.ndim = 1
        view.shape = self.shape
        view.strides = self.strides
        view.suboffsets = NULL
        view.internal = NULL
        self.ctx._exports += 1

    def __releasebuffer__(self, Py_buffer * view):
        self.ctx._exports -= 1
        if self.ctx._exports == 0 and self.ctx._closed:
            self.ctx._free()


def vocab_mismatch(LlamaModel draft not None, LlamaModel target not None):
    """Why *draft* cannot draft for *target* (its tokens are not the same
    tokens), or None. The checks of llama.cpp's speculative decoding
    (common/speculative.cpp): the vocabulary type, BOS and EOS, sizes within
    128 tokens of each other, and the same text for every token from id 5 on."""
    draft._check()
    target._check()
    cdef const llama_vocab * d = draft.vocab
    cdef const llama_vocab * t = target.vocab
    cdef int i, n = min(llama_vocab_n_tokens(d), llama_vocab_n_tokens(t))
    if llama_vocab_type_of(d) != llama_vocab_type_of(t):
        return f"its tokenizer type ({llama_vocab_type_of(d)}) is not the model's ({llama_vocab_type_of(t)})"
    if llama_vocab_get_add_bos(d) != llama_vocab_get_add_bos(t):
        return "one of them adds a BOS token to a prompt and the other does not"
    if llama_vocab_get_add_bos(t) and llama_vocab_bos(d) != llama_vocab_bos(t):
        return f"its BOS token ({llama_vocab_bos(d)}) is not the model's ({llama_vocab_bos(t)})"
    if llama_vocab_get_add_eos(d) != llama_vocab_get_add_eos(t):
        return "one of them adds an EOS token to a prompt and the other does not"
    if llama_vocab_get_add_eos(t) and llama_vocab_eos(d) != llama_vocab_eos(t):
        return f"its EOS token ({llama_vocab_eos(d)}) is not the model's ({llama_vocab_eos(t)})"
    if abs(llama_vocab_n_tokens(d) - llama_vocab_n_tokens(t)) > 128:
        return f"it has {llama_vocab_n_tokens(d)} tokens and the model {llama_vocab_n_tokens(t)}"
    for i in range(5, n):
        if strcmp(llama_vocab_get_text(d, i), llama_vocab_get_text(t, i)) != 0:
            return (f"token {i} is {llama_vocab_get_text(d, i).decode('utf-8', 'replace')!r} in it and "
                    f"{llama_vocab_get_text(t, i).decode('utf-8', 'replace')!r} in the model")
    return None


@cython.no_gc_clear
cdef class DraftModel(_Decoder):
    """A smaller model with the target model's tokens that drafts for
    speculative decoding: a llama.cpp context of its own, one sequence per
    target sequence. Each sequence follows its target's tokens (the common
    start stays in its KV cache, the rest is evaluated) and drafts greedily.
    Used from the thread that runs its target."""

    def __cinit__(self):
        self._what = "draft context"

    def __init__(self, LlamaModel model not None, LlamaModel target not None, int n_seq, int n_ctx_seq,
                 int n_threads=1):
        why = vocab_mismatch(model, target)
        if why is not None:
            raise _errors.IncompatibleDraftModelError(
                f"the draft model {model.path} cannot draft for {target.path}: {why} (speculative decoding "
                "needs a draft model with the same tokens, usually a smaller model of the same family)")
        self._open(model, <uint32_t>(n_seq * n_ctx_seq), 512, n_seq, n_threads, n_threads, False, True,
                   f"a draft context ({n_seq} sequences x {n_ctx_seq} tokens)", "")
        self.n_seq = n_seq
        self.n_ctx_seq = llama_n_ctx_seq(self.ptr)
        self.n_target_vocab = target.n_vocab
        self.seen.resize(n_seq)

    cdef int draft(self, int seq, const vector[llama_token] & hist, llama_token last, int most,
                   vector[llama_token] & out, AbortState * outer) noexcept nogil:
        """The draft model's greedy continuation of *hist* then *last*: at most
        *most* tokens, in *out*, ending before an end-of-generation token or
        one outside the target's vocabulary. Returns its length; 0 also when
        something fails or *outer* (the target's abort state) is cancelled: a
        draft is only an optimisation."""
        cdef vector[llama_token] * seen = &self.seen[seq]
        cdef int total = <int>hist.size() + 1, keep = 0, pos, m, j, rc
        cdef llama_token tok
        cdef float best
        cdef llama_memory_t mem
        out.clear()
        if most < 1 or self.ptr == NULL or total + most > self.n_ctx_seq or abort_state_cancelled(outer):
            return 0
        mem = llama_get_memory(self.ptr)
        while keep < <int>seen.size() and keep < total - 1 and seen[0][keep] == hist[keep]:
            keep += 1
        if keep < <int>seen.size():
            llama_memory_seq_rm(mem, seq, keep, -1)
            seen.resize(keep)
        # what the draft's sequence lacks, one batch per call (a step stays short: no draft until
        # it has caught up), logits for the last token
        pos = keep
        m = min(self.n_batch, total - pos)
        for j in range(m):
            self._add(j, hist[pos + j] if pos + j < total - 1 else last, pos + j, seq, pos + j == total - 1)
        self.batch.n_tokens = m
        rc = _governed_decode(self.ptr, self.batch, self.gov, &self.ab)
        if rc != ST_OK:
            llama_memory_seq_rm(mem, seq, pos, -1)
            return 0
        for j in range(m):
            seen.push_back(self.batch.token[j])
        pos += m
        if pos < total:
            return 0
        while True:
            tok = argmax(llama_get_logits_ith(self.ptr, -1), self.model.n_vocab, &best)
            if tok >= self.n_target_vocab or llama_vocab_is_eog(self.model.vocab, tok):
                break
            out.push_back(tok)
            if <int>out.size() == most or abort_state_cancelled(outer):
                break
            self._add(0, tok, pos, seq, True)
            self.batch.n_tokens = 1
            if _governed_decode(self.ptr, self.batch, self.gov, &self.ab) != ST_OK:
                llama_memory_seq_rm(mem, seq, pos, -1)
                break
            seen.push_back(tok)
            pos += 1
        return <int>out.size()

    def draft_tokens(self, int seq, tokens, int most):
        """The draft for *tokens* (the last one pending) on sequence *seq* (for tests)."""
        self._enter()
        cdef vector[llama_token] hist = tokens[:-1]
        cdef llama_token last = tokens[-1]
        cdef vector[llama_token] out
        cdef AbortState never
        abort_state_init(&never, &_g_shutdown)
        try:
            if not 0 <= seq < self.n_seq:
                raise _errors.MullamaError(f"no sequence {seq}")
            with nogil:
                self.draft(seq, hist, last, most, out, &never)
            return [t for t in out]
        finally:
            self._leave()


@cython.no_gc_clear
cdef class LlamaContext(_Decoder):
    """Owns a ``llama_context`` with one sequence and its token history.

    ``tokens`` is the conversation: every token logically in the context. The
    first ``n_kv`` of them are in llama.cpp's KV cache; the rest (at most the
    last sampled token, or tokens given to :meth:`decode` whose evaluation was
    interrupted) are decoded first by the next call that needs logits.
    """

    def __cinit__(self):
        self._what = "context"
        self._n_kv = 0
        self._exports = 0
        self._logits_ok = False

    def __init__(self, LlamaModel model not None, uint32_t n_ctx=2048, uint32_t n_batch=512, int n_threads=1,
                 int n_threads_batch=1, bint flash_attention=False, bint adaptive_threads=True):
        self._owner = threading.Lock()
        self._open(model, n_ctx, n_batch, 1, n_threads, n_threads_batch, flash_attention, adaptive_threads,
                   f"a context (n_ctx={n_ctx}, n_batch={n_batch})", "; try a smaller context_size or batch_size")
        self.n_ctx = llama_n_ctx(self.ptr)

    cdef _free(self):
        if self._exports == 0:
            _Decoder._free(self)   # else the last logits view frees it

    def set_drafter(self, DraftModel drafter):
        """The draft model of speculative decoding with ``draft_model`` (None: none)."""
        self.drafter = drafter

    def claim(self, bint blocking=False):
        """Take exclusive use of the context; BusyError if another holder has it."""
        if self._closed:
            raise _errors.ClosedError("the context is closed")
        if not self._owner.acquire(blocking):
            raise _errors.BusyError("the context is already in use (a generation or stream is running on it); "
                                    "use one context per concurrent user")

    def release(self):
        self._owner.release()

    # -- abort ------------------------------------------------------------

    def cancel(self):
        """Ask the running evaluation to stop (thread-safe, returns at once)."""
        mullama_store_flag(&self.ab.flags[0], 1)

    def clear_cancel(self):
        mullama_store_flag(&self.ab.flags[0], 0)

    @property
    def cancelled(self):
        return mullama_load_flag(&self.ab.flags[0]) != 0

    # -- state ------------------------------------------------------------

    @property
    def tokens(self):
        if self._in_c:
            raise _errors.BusyError("the context is generating; read its tokens when the generation is done")
        return [t for t in self._tokens]

    @property
    def n_past(self):
        return self._tokens.size()

    @property
    def n_kv(self):
        return self._n_kv

    def truncate(self, Py_ssize_t n):
        """Forget every token from position *n* on (KV cells included)."""
        self._enter()
        try:
            if n < 0 or n > <Py_ssize_t>self._tokens.size():
                raise _errors.InvalidConfigError(f"cannot truncate to {n} tokens: the context holds {self._tokens.size()}")
            if n < self._n_kv:
                llama_memory_seq_rm(llama_get_memory(self.ptr), 0, <llama_pos>n, -1)
                self._n_kv = <int>n
                self._logits_ok = False
            self._tokens.resize(n)
        finally:
            self._leave()

    cdef void _clear(self) noexcept:
        llama_memory_clear(llama_get_memory(self.ptr), False)
        self._tokens.clear()
        self._n_kv = 0
        self._logits_ok = False

    def reset(self):
        """Empty the context (KV cache and history)."""
        self._enter()
        try:
            self._clear()
        finally:
            self._leave()

    def save_state(self, str path):
        self._enter()
        cdef bytes bpath = path.encode("utf-8")
        cdef const char * cpath = bpath
        cdef bint ok
        try:
            with nogil:
                ok = llama_state_save_file(self.ptr, cpath, self._tokens.data(), self._tokens.size())
            if not ok:
                raise _errors.StateError(f"could not write the context state to {path}")
        finally:
            self._leave()

    def load_state(self, str path):
        self._enter()
        cdef bytes bpath = path.encode("utf-8")
        cdef const char * cpath = bpath
        cdef vector[llama_token] toks
        cdef size_t n = 0
        cdef bint ok
        cdef llama_pos pmax
        toks.resize(self.n_ctx)
        try:
            take_errors()
            with nogil:
                ok = llama_state_load_file(self.ptr, cpath, toks.data(), toks.size(), &n)
            errors = take_errors()
            if not ok:
                self._clear()   # llama.cpp leaves the context in an undefined state
                reason = "; ".join(errors) if errors else "not a state file of this model and context size"
                raise _errors.StateError(f"could not load the context state from {path}: {reason}")
            toks.resize(n)
            try:
                self.model._check_tokens(toks)
            except _errors.InvalidTokenError as exc:
                self._clear()
                raise _errors.StateError(f"{path} was saved from another model: {exc}") from None
            pmax = llama_memory_seq_pos_max(llama_get_memory(self.ptr), 0)
            self._tokens = toks
            self._n_kv = min(<int>n, pmax + 1)
            self._logits_ok = False   # the next decode recomputes the last token's (_refresh_last)
        finally:
            self._leave()

    # -- evaluation ---------------------------------------------------------

    cdef int _decode_pending(self) noexcept nogil:
        """Decode tokens[n_kv:], logits for the last one. Returns a Status
        (ST_OK, ST_ABORTED, ST_CTX_FULL) or a llama.cpp error; on failure the
        KV cache is restored to what it held before the call."""
        cdef int end = <int>self._tokens.size()
        cdef int start = self._n_kv
        cdef int i, n, rc = ST_OK
        if end > self.n_ctx:
            return ST_CTX_FULL
        while self._n_kv < end:
            if abort_state_cancelled(&self.ab):
                rc = ST_ABORTED
                break
            n = min(self.n_batch, end - self._n_kv)
            for i in range(n):
                self._add(i, self._tokens[self._n_kv + i], self._n_kv + i, 0, False)
            self.batch.logits[n - 1] = (self._n_kv + n == end)
            self.batch.n_tokens = n
            rc = _governed_decode(self.ptr, self.batch, self.gov, &self.ab)
            if rc != ST_OK:
                break
            self._n_kv += n
        if rc == ST_OK:
            if self._n_kv > start:
                self._logits_ok = True  # the last decoded token is tokens[-1]
            return ST_OK
        # failure: undo the partial evaluation of this call
        llama_memory_seq_rm(llama_get_memory(self.ptr), 0, start, -1)
        self._n_kv = start
        self._logits_ok = False
        return rc

    cdef inline void _refresh_last(self) noexcept nogil:
        """Make the last token pending again when its logits are gone (a state
        load, a truncate, a logits view of an earlier step), so that the next
        decode recomputes them."""
        if not self._logits_ok and self._n_kv == <int>self._tokens.size() and self._n_kv > 0:
            self._n_kv -= 1
            llama_memory_seq_rm(llama_get_memory(self.ptr), 0, self._n_kv, -1)

    cdef int _check(self, int status, int n_new) except -1:
        return _check_status(status, f"{self._tokens.size()} tokens do not fit in the context of {self.n_ctx} "
                                     f"tokens ({n_new} new); use a larger context_size or a shorter prompt")

    def decode(self, tokens):
        """Append *tokens* to the context and evaluate everything pending.

        Returns ``STATUS_OK`` or ``STATUS_ABORTED`` (then the tokens were not
        added); raises ContextOverflowError if they do not fit.
        """
        cdef vector[llama_token] toks = tokens
        self.model._check_tokens(toks)
        self._enter()
        cdef size_t before = self._tokens.size()
        cdef int rc
        try:
            if before + toks.size() > <size_t>self.n_ctx:
                raise _errors.ContextOverflowError(
                    f"{toks.size()} new tokens do not fit: the context holds {before} of {self.n_ctx}; "
                    "use a larger context_size, a shorter prompt, or reset()")
            self._tokens.insert(self._tokens.end(), toks.begin(), toks.end())
            if self._tokens.empty():
                return ST_OK
            with nogil:
                rc = self._decode_pending()
            if rc != ST_OK:
                self._tokens.resize(before)  # the call is all or nothing
                if rc == ST_ABORTED:
                    return ST_ABORTED
                self._check(rc, toks.size())
            return ST_OK
        finally:
            self._leave()

    def logits(self):
        """A zero-copy float32 buffer of the last token's logits (valid until the next decode)."""
        self._enter()
        cdef _LogitsView v
        cdef int rc
        try:
            if self._tokens.empty():
                raise _errors.MullamaError("the context is empty: decode some tokens before asking for logits")
            if not self._logits_ok or self._n_kv < <int>self._tokens.size():
                mullama_store_flag(&self.ab.flags[0], 0)  # an earlier cancel() of nothing must not stick
                self._refresh_last()
                with nogil:
                    rc = self._decode_pending()
                self._check(rc, 0)
            v = _LogitsView.__new__(_LogitsView)
            v.ctx = self
            v.data = llama_get_logits_ith(self.ptr, -1)
            if v.data == NULL:
                raise _errors.DecodeError("llama.cpp returned no logits")
            v.shape[0] = self.model.n_vocab
            v.strides[0] = sizeof(float)
            return v
        finally:
            self._leave()

    cdef int _generate(self, Sampling * smpl, Speculation * spec, int n_max, double deadline, bint want_lp,
                       int n_top, Output * out) noexcept nogil:
        """The generation loop: decode what is pending, sample, stop at an end.
        With *spec*, a step that finds a draft verifies it (_speculate)."""
        cdef int i = 0, rc, st, k, most
        cdef llama_token tok
        cdef double t0
        cdef bint plain
        while i < n_max:
            if abort_state_cancelled(&self.ab):
                return ST_ABORTED
            self._refresh_last()
            k = 0
            plain = spec != NULL and self._n_kv == <int>self._tokens.size() - 1  # one pending token
            if plain and n_max - i > 1:
                most = spec.length(min(n_max - i - 1, self.n_ctx - <int>self._tokens.size(), self.n_batch - 1))
                if most > 0 and history_before_last(spec, self._tokens):
                    t0 = mullama_now()
                    k = _make_draft(spec, self._drafting, 0, spec.hist, self._tokens.back(), most, &self.ab)
            if k > 0:
                st = self._speculate(smpl, spec, &i, n_max, mullama_now() - t0, want_lp, n_top, out)
                if st != ST_OK:
                    return st
            else:
                if self._n_kv < <int>self._tokens.size():
                    if plain:
                        t0 = mullama_now()
                    rc = self._decode_pending()
                    if rc != ST_OK:
                        return rc
                    if plain:
                        spec.plain_step(mullama_now() - t0)
                st = _sample_into(self.ptr, -1, smpl, self.model.vocab, self.model.n_vocab, want_lp, n_top, out,
                                  &tok)
                if st == ST_DEAD_END:
                    return st
                i += 1
                self._tokens.push_back(tok)   # pending until the next step decodes it
                self._logits_ok = False
                if st == ST_EOG:
                    return ST_EOG
            if deadline > 0.0 and mullama_now() >= deadline:
                break
        return ST_OK

    cdef int _speculate(self, Sampling * smpl, Speculation * spec, int * n_done, int n_max, double t_draft,
                        bint want_lp, int n_top, Output * out) noexcept nogil:
        """Verify ``spec.draft`` (see _speculative.h): one decode of the pending
        token and the draft, then sample row after row while the sampled
        token is the drafted one; the cells after the last accepted token are
        dropped and the last sampled token is pending, as after a plain step.
        Counts the sampled tokens into *n_done*; *t_draft*: the seconds the
        draft took (the cost model counts them with the verification).
        Returns ST_OK, ST_EOG, ST_DEAD_END or a failed decode's status
        (nothing of it kept)."""
        cdef int k = <int>spec.draft.size(), start = self._n_kv, j, rc, st = ST_OK, n_acc = 0
        cdef llama_token tok
        cdef double t0 = mullama_now(), seconds
        for j in range(k + 1):
            self._add(j, self._tokens[start] if j == 0 else spec.draft[j - 1], start + j, 0, True)
        self.batch.n_tokens = k + 1
        rc = _governed_decode(self.ptr, self.batch, self.gov, &self.ab)
        seconds = mullama_now() - t0 + t_draft
        if rc != ST_OK:
            llama_memory_seq_rm(llama_get_memory(self.ptr), 0, start, -1)
            self._logits_ok = False
            return rc
        self._n_kv = start + 1
        while True:
            st = _sample_into(self.ptr, n_acc, smpl, self.model.vocab, self.model.n_vocab, want_lp, n_top, out,
                              &tok)
            if st == ST_DEAD_END:
                break
            n_done[0] += 1
            self._tokens.push_back(tok)
            # (no deadline here: the verified rows are computed already, sampling them is cheap;
            # a draft is at most n_max - n_done - 1 tokens, so n_max is never passed)
            if st != ST_OK or n_acc == k or tok != spec.draft[n_acc]:
                break
            n_acc += 1      # the drafted token is the sampled one: its cell (row n_acc) stays
            self._n_kv += 1
        spec.record(k, n_acc, seconds)
        llama_memory_seq_rm(llama_get_memory(self.ptr), 0, self._n_kv, -1)
        self._logits_ok = False
        return st

    def generate(self, SamplerChain sampler not None, int n_max, double budget_s=0.0, bint logprobs=False,
                 int top_logprobs=0, Speculator speculator=None):
        """Sample up to *n_max* tokens without the GIL.

        Stops early after *budget_s* seconds (if > 0, at least one token), at
        an end-of-generation token, on cancel() or when the context is full.
        Returns ``(status, tokens, pieces, logprobs_or_None, top_or_None)``
        (*top_logprobs* > 0, with *logprobs*: each token's most likely
        ``(token, logprob)``, see _take_output): ``pieces[i]``
        is the bytes of ``tokens[i]`` (b"" for an end-of-generation token).
        With *speculator*, steps verify drafts (see _speculative.h); its
        counters add up what was drafted and accepted.
        """
        if n_max <= 0:
            raise _errors.InvalidConfigError(f"n_max must be positive, got {n_max}")
        if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise _errors.InvalidConfigError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
        self._enter()
        cdef Output out
        cdef Sampling * smpl = sampler.s
        cdef Speculation * spec = NULL
        cdef DraftModel drafter = None
        cdef double deadline = 0.0
        cdef int status
        try:
            if speculator is not None:
                spec = speculator.s
                if spec.use_model:
                    drafter = _entered(self.drafter)
            self._drafting = drafter
            if smpl == NULL:
                raise _errors.ClosedError("the sampler is closed")
            if self._tokens.empty():
                raise _errors.MullamaError("the context is empty: give a prompt to generate from")
            if budget_s > 0.0:
                deadline = mullama_now() + budget_s
            with nogil:
                status = self._generate(smpl, spec, n_max, deadline, logprobs, top_logprobs, &out)
            if status < 0:
                _check_status(status, None)
            return (status,) + _take_output(&out, logprobs, top_logprobs)
        finally:
            self._drafting = None
            if drafter is not None:
                drafter._leave()
            self._leave()


# ---------------------------------------------------------------------------
# embeddings

@cython.no_gc_clear
cdef class EmbeddingContext(_Decoder):
    """A context of its own that computes embeddings (never a generation's).

    One :meth:`embed` call evaluates a batch of sequences (at most ``n_seq``,
    ``n_ctx`` tokens together) from an empty cache, as llama.cpp's
    ``llama-embedding`` does, and copies out each sequence's pooled embedding
    (or each token's, with pooling NONE).
    """

    def __cinit__(self):
        self._what = "embedding context"

    def __init__(self, LlamaModel model not None, uint32_t n_ctx, int n_seq, int n_threads, int pooling=-1,
                 bint adaptive_threads=True):
        if n_seq < 1 or n_seq > 256 or n_seq > n_ctx:
            raise _errors.InvalidConfigError(f"n_seq must be between 1 and min(256, n_ctx), got {n_seq}")
        if pooling < -1 or pooling > 4:
            raise _errors.InvalidConfigError(f"pooling must be a llama_pooling_type, got {pooling}")
        self._open(model, n_ctx, n_ctx, n_seq, n_threads, n_threads, False, adaptive_threads,
                   f"an embedding context (n_ctx={n_ctx})", "; try a smaller context_size", pooling)
        self.n_ctx = llama_n_ctx(self.ptr)
        self.n_seq = n_seq
        self.n_embd = llama_model_n_embd_out(model.ptr)
        self.pooling = <int>llama_get_pooling_type(self.ptr)
        self.encoder = llama_model_has_encoder(model.ptr) and not llama_model_has_decoder(model.ptr)

    def cancel(self):
        """Stop the running :meth:`embed` (thread-safe, returns at once)."""
        mullama_store_flag(&self.ab.flags[0], 1)

    def clear_cancel(self):
        mullama_store_flag(&self.ab.flags[0], 0)

    def embed(self, list seqs, float[:, ::1] out):
        """Evaluate the token lists *seqs* together and write their embeddings
        into *out*: one row per sequence, or (pooling NONE) one per token, in
        order. Returns ``STATUS_OK`` or ``STATUS_ABORTED`` (:meth:`cancel`)."""
        self._enter()
        cdef int n = 0, s, j, rows, rc
        cdef const float * e
        cdef vector[llama_token] toks
        cdef llama_memory_t mem
        try:
            if not 0 < len(seqs) <= self.n_seq:
                raise _errors.InvalidConfigError(f"between 1 and {self.n_seq} sequences per batch, got {len(seqs)}")
            for s in range(len(seqs)):
                toks = seqs[s]
                self.model._check_tokens(toks)
                if toks.empty() or n + <int>toks.size() > self.n_batch:
                    raise _errors.ContextOverflowError(
                        f"a batch of {n + toks.size()} tokens does not fit in the embedding context "
                        f"({self.n_batch})" if not toks.empty() else "an empty sequence has no embedding")
                for j in range(<int>toks.size()):
                    self._add(n, toks[j], j, s, True)
                    n += 1
            rows = n if self.pooling == LLAMA_POOLING_TYPE_NONE else len(seqs)
            if out.shape[0] != rows or out.shape[1] != self.n_embd:
                raise _errors.InvalidConfigError(f"out must have shape ({rows}, {self.n_embd})")
            self.batch.n_tokens = n
            with nogil:
                mem = llama_get_memory(self.ptr)
                if mem != NULL:
                    llama_memory_clear(mem, True)
                if self.encoder:
                    rc = _decode_status(llama_encode(self.ptr, self.batch))
                else:
                    rc = _governed_decode(self.ptr, self.batch, self.gov, &self.ab)
            if rc == ST_ABORTED:
                return ST_ABORTED
            _check_status(rc, f"no KV cells for {n} tokens")
            for s in range(rows):
                if self.pooling == LLAMA_POOLING_TYPE_NONE:
                    e = llama_get_embeddings_ith(self.ptr, s)
                else:
                    e = llama_get_embeddings_seq(self.ptr, s)
                if e == NULL:
                    raise _errors.DecodeError("llama.cpp returned no embedding")
                memcpy(&out[s, 0], e, self.n_embd * sizeof(float))
            return ST_OK
        finally:
            self._leave()


# ---------------------------------------------------------------------------
# continuous batching engine

cdef int _common_prefix(const vector[llama_token] & a, const vector[llama_token] & b) noexcept nogil:
    cdef size_t i = 0, n = min(a.size(), b.size())
    while i < n and a[i] == b[i]:
        i += 1
    return <int>i


def common_prefix(a, b):
    """How many tokens two token lists share from their start."""
    cdef vector[llama_token] va = a, vb = b
    return _common_prefix(va, vb)


@cython.no_gc_clear
cdef class BatchEngine(_Decoder):
    """One llama.cpp context decoding many sequences together.

    Each slot is a sequence (its id is the slot index) with its own share of
    the context (``n_ctx_seq`` tokens), its own sampler chain and its own
    output buffer. A step makes one ``llama_decode`` call of every decoding
    sequence's token and prompt chunks of others when the model's decode cells
    are exact (probe_decode_cells), else up to two: the decoding tokens, then
    prompt chunks (see _step). All methods
    but :meth:`cancel_slot` and :meth:`wake` must be called from one thread
    (the engine's driver); those two are thread-safe.
    """

    def __cinit__(self):
        self._what = "engine"
        self._wake = 0
        self._idle_step = 0
        self._next_prefill = 0
        self.refreshed = 0
        self._decode_s = 0.0

    def __init__(self, LlamaModel model not None, int n_seq, int n_ctx_seq, int n_batch=512, int n_threads=1,
                 bint flash_attention=False, int prefill_chunk=256, bint adaptive_threads=True, bint exact=True):
        if n_seq < 1 or n_seq > 256:
            raise _errors.InvalidConfigError(f"n_seq must be between 1 and 256, got {n_seq}")
        self.samplers = [None] * n_seq
        self.smpls.assign(n_seq, NULL)
        self.speculators = [None] * n_seq
        self.specs.assign(n_seq, NULL)
        # kv_unified stays off (llama.cpp's default): each sequence has its own share of the cache
        self._open(model, <uint32_t>(n_seq * n_ctx_seq), n_batch, n_seq, n_threads, n_threads, flash_attention,
                   adaptive_threads, f"a batching context ({n_seq} sequences x {n_ctx_seq} tokens)", "")
        self.n_seq = n_seq
        self.exact = exact
        self.decode_exact = False
        self.n_ctx_seq = llama_n_ctx_seq(self.ptr)
        self.prefill_chunk = max(min(4, self.n_batch), min(prefill_chunk, self.n_batch))  # (see _chunk_size)
        self.one_chunk = flash_attention
        cdef Slot empty
        empty.active = False
        empty.paused = False
        empty.cancel = 0
        empty.finish = ST_OK
        empty.n_prompt_done = 0
        empty.pos = 0
        empty.n_exact = 0
        empty.refreshing = False
        empty.copy_pending = False
        empty.pending = -1
        empty.n_step = 0
        empty.n_draft = 0
        empty.t_draft = 0.0
        empty.i_batch = -1
        empty.n_gen = 0
        empty.max_gen = 0
        empty.want_lp = False
        empty.n_top = 0
        self.slots.assign(n_seq, empty)
        self.prompts.resize(n_seq)
        self.hist.resize(n_seq)
        self.outs.resize(n_seq)

    cdef _free(self):
        _Decoder._free(self)
        for s in self.samplers:
            if s is not None:
                (<SamplerChain>s).close()
        self.samplers = [None] * len(self.samplers)
        self.smpls.assign(self.smpls.size(), NULL)

    # -- slots --------------------------------------------------------------------

    def start(self, int slot, tokens, SamplerChain sampler not None, int max_gen, bint logprobs=False,
              int top_logprobs=0, int reuse=0, int source=-1, Speculator speculator=None):
        """Give *slot* a new request: its prompt tokens and sampling (and,
        with *speculator*, speculative decoding: see _decode_tokens).

        The first *reuse* prompt tokens are taken from the KV cache instead of
        evaluated: from the slot's own cached sequence, or (*source* >= 0)
        copied from sequence *source*, whose cache must hold them
        (:meth:`match`). At least the prompt's last two tokens are evaluated
        (see :meth:`match`). Returns the tokens reused (0 when the model's
        memory cannot drop a sequence's tail, a recurrent model's).
        """
        self._enter()
        cdef vector[llama_token] toks = tokens
        cdef Slot * s
        cdef llama_memory_t mem
        cdef int src = slot if source < 0 else source
        try:
            if slot < 0 or slot >= self.n_seq or self.slots[slot].active:
                raise _errors.MullamaError(f"slot {slot} is not free")
            self.model._check_tokens(toks)
            if toks.empty():
                raise _errors.MullamaError("the prompt is empty")
            if sampler.s == NULL:
                raise _errors.ClosedError("the sampler is closed")
            if <int>toks.size() + max_gen > self.n_ctx_seq:
                raise _errors.ContextOverflowError(
                    f"the prompt ({toks.size()} tokens) plus max_tokens ({max_gen}) do not fit in a request's "
                    f"share of the context ({self.n_ctx_seq} tokens)")
            if src >= self.n_seq:
                raise _errors.MullamaError(f"no sequence {source} to copy from")
            if (reuse < 0 or (reuse > 0 and reuse > <int>toks.size() - 2)
                    or reuse > min(_common_prefix(self.hist[src], toks), self.slots[src].n_exact)):
                raise _errors.MullamaError(f"sequence {src} does not hold the prompt's first {reuse} tokens")
            mem = llama_get_memory(self.ptr)
            s = &self.slots[slot]
            if src != slot and reuse > 0:
                llama_memory_seq_cp(mem, src, slot, -1, -1)  # a full copy of its KV, done by the next decode
                self.hist[slot] = self.hist[src]
                s.copy_pending = True
            if reuse > 0 and not (llama_memory_seq_rm(mem, slot, reuse, -1)
                                  and self._holds_from_start(slot, reuse)):
                reuse = 0
            if reuse == 0:
                llama_memory_seq_rm(mem, slot, -1, -1)
            self.hist[slot].resize(reuse)
            s.active = True
            s.refreshing = False
            s.paused = False
            mullama_store_flag(&s.cancel, 0)
            s.finish = ST_OK
            s.n_prompt_done = reuse
            s.pos = reuse
            s.n_exact = reuse
            s.pending = -1
            s.n_step = 0
            s.i_batch = -1
            s.n_gen = 0
            s.max_gen = max_gen
            s.want_lp = logprobs
            s.n_top = max(0, min(top_logprobs, MAX_TOP_LOGPROBS))
            self.prompts[slot] = toks
            _clear_output(&self.outs[slot])
            self.samplers[slot] = sampler
            self.smpls[slot] = sampler.s
            self.speculators[slot] = speculator
            self.specs[slot] = NULL
            if speculator is not None:
                self.specs[slot] = speculator.s
            return reuse
        finally:
            self._leave()

    cdef bint _holds_from_start(self, int slot, int n) noexcept nogil:
        """The sequence's cells cover what its first *n* tokens' attention needs:
        all of them, or with a sliding window the last n_swa (llama.cpp drops
        the older ones, and a saved state leaves them out), as llama-server checks."""
        cdef llama_pos pmin = llama_memory_seq_pos_min(llama_get_memory(self.ptr), slot)
        return 0 <= pmin <= max(0, n - llama_model_n_swa(self.model.ptr))

    def probe_decode_cells(self, tokens, int tail=3):
        """Whether this build computes a token's cells the same in a decode
        step as in a prompt, for this model: *tokens* are evaluated as one
        prompt in sequence 0 (the reference: its last *tail* tokens' logits);
        then all but those *tail* tokens again as one prompt, and the last
        *tail* tokens decoded one at a time in sequences 0 and 1 together (the
        prompt's cells copied into 1), as the engine's steps decode, then in
        sequence 0 alone; True if each decoded token's logits are bit for bit
        the reference's. Then, with ``exact``, cells of decoded tokens are
        reused too, nothing is refreshed (:meth:`release`), and one decode
        takes the decoding tokens and prompt chunks together
        (:meth:`_mixed_chunks`). Sets :attr:`decode_exact`. Always False with
        flash attention, whose kernel computes several tokens of several
        sequences in one batch otherwise than alone (see _prompt_chunks).

        Only before the first request: the context's cells are cleared.
        Depends on the weights' types and the kernels llama.cpp picks for
        them, which change with the tokens in a batch (x86: repacked gemm from
        4 tokens, the tiled K-quant kernel from 8): the prompts should be long
        enough to take the large-batch kernels (the engine gives 16 tokens).
        F32, Q4_0, Q4_1 and Q8_0 are bit-identical here, repacked Q4_K is not
        (docs/performance.md). Equal logits mean equal computations in every
        layer, with overwhelming likelihood."""
        cdef vector[llama_token] toks = tokens
        cdef int i, k, rc = 0, n = <int>toks.size(), nv = self.model.n_vocab, head = n - tail
        cdef int pairs = self.n_seq >= 2
        cdef bint same = True
        cdef vector[float] ref
        cdef llama_memory_t mem
        if tail < 1 or head < 1 or n > min(self.n_batch, self.n_ctx_seq):
            raise _errors.InvalidConfigError(
                f"probe_decode_cells takes {tail + 1} to {min(self.n_batch, self.n_ctx_seq)} tokens "
                f"(tail {tail} >= 1), got {n}")
        if self.one_chunk:
            self.decode_exact = False
            return False
        self._enter()
        try:
            for i in range(self.n_seq):
                if self.slots[i].active or self.hist[i].size():
                    raise _errors.MullamaError("probe_decode_cells runs before the first request only")
            self.model._check_tokens(toks)
            mem = llama_get_memory(self.ptr)
            ref.resize(<size_t>tail * nv)
            with nogil:
                llama_memory_clear(mem, True)
                for k in range(n):
                    self._add(k, toks[k], k, 0, k >= head)
                self.batch.n_tokens = n
                rc = llama_decode(self.ptr, self.batch)
                for k in range(tail):
                    if rc == 0:
                        memcpy(&ref[<size_t>k * nv], llama_get_logits_ith(self.ptr, head + k), nv * sizeof(float))
                llama_memory_clear(mem, True)
                if rc == 0:
                    for k in range(head):
                        self._add(k, toks[k], k, 0, False)
                    self.batch.n_tokens = head
                    rc = llama_decode(self.ptr, self.batch)
                    if pairs and rc == 0:
                        llama_memory_seq_cp(mem, 0, 1, -1, -1)  # (made by the next decode)
                for i in range(pairs, -1, -1):  # two sequences together, then sequence 0 alone
                    if i == 0 and rc == 0 and same:
                        # (a memory that cannot drop a tail, recurrent: not exact, see can_drop_tail)
                        same = llama_memory_seq_rm(mem, 0, head, -1)
                        llama_memory_seq_rm(mem, 1, -1, -1)
                    for k in range(tail):
                        if rc != 0 or not same:
                            break
                        self._add(0, toks[head + k], head + k, 0, True)
                        if i:
                            self._add(1, toks[head + k], head + k, 1, True)
                        self.batch.n_tokens = 1 + i
                        rc = llama_decode(self.ptr, self.batch)
                        if rc == 0:
                            same = memcmp(llama_get_logits_ith(self.ptr, 0), &ref[<size_t>k * nv],
                                          nv * sizeof(float)) == 0 and \
                                (i == 0 or memcmp(llama_get_logits_ith(self.ptr, 1), &ref[<size_t>k * nv],
                                                  nv * sizeof(float)) == 0)
                llama_memory_clear(mem, True)
            self.decode_exact = False
            _check_status(_decode_status(rc), f"the decode-cells probe of {n} tokens failed")
            self.decode_exact = same
            return same
        finally:
            self._leave()

    def match(self, tokens):
        """How many of *tokens* each sequence's cache holds, and (for the
        requests still evaluating their prompt) will hold once its prompt is
        done: two lists, one count per slot.

        With ``exact`` (the default), only cells computed as an uncached
        prompt evaluation computes them count: with ``decode_exact``
        (probe_decode_cells) all of them; otherwise those of prompt chunks (two
        tokens or more per sequence, never with decode tokens, see _step):
        some of llama.cpp's CPU kernels compute one token per sequence (a decode step) along another
        path (the repacked Q4_K kernels; llamafile's sgemm, left out of mullama's build), so those cells differ in the last
        bits from what a prompt evaluation of the same tokens gives. Reusing
        only the others keeps outputs identical to an uncached run; for the
        same reason the last two prompt tokens are always evaluated, together.
        Without ``exact`` every cell counts, as in llama-server.
        """
        cdef vector[llama_token] toks = tokens
        cdef int i
        held = [0] * self.n_seq
        coming = [0] * self.n_seq
        for i in range(self.n_seq):
            held[i] = min(_common_prefix(self.hist[i], toks), self.slots[i].n_exact)
            if self.slots[i].active and self.slots[i].n_prompt_done < <int>self.prompts[i].size():
                coming[i] = _common_prefix(self.prompts[i], toks)
        return held, coming

    cdef int _check_slot(self, int slot) except -1:
        if slot < 0 or slot >= self.n_seq:
            raise _errors.MullamaError(f"no slot {slot}")
        return 0

    def cached(self, int slot):
        """The tokens whose reusable KV cells sequence *slot* holds (see :meth:`match`)."""
        cdef int i
        self._check_slot(slot)
        return [self.hist[slot][i] for i in range(self.slots[slot].n_exact)]

    cdef bint _copying(self) noexcept nogil:
        cdef int i
        for i in range(self.n_seq):
            if self.slots[i].copy_pending:
                return True
        return False

    def sequence_size(self, int slot):
        """Bytes :meth:`save_sequence` would give for *slot* now (its reusable cells)."""
        self._check_slot(slot)
        if self.hist[slot].empty():
            return 0
        self._enter()
        try:
            return llama_state_seq_get_size(self.ptr, slot)
        finally:
            self._leave()

    def copying(self):
        """A copy between sequences waits for the next decode (no state can be saved or restored until then)."""
        return self._copying()

    def save_sequence(self, int slot, size_t max_bytes=<size_t>-1):
        """A free slot's cached sequence (llama.cpp's sequence state) in an
        anonymous mapping, for :meth:`restore_sequence`; b"" if it holds
        nothing. A free slot holds only reusable cells (:meth:`release` drops
        the others): the state holds the tokens :meth:`cached` gives. b"" too
        if the state is over *max_bytes*, or a copy between sequences has not
        been made yet."""
        self._enter()
        cdef size_t size, got
        cdef uint8_t[::1] buf
        cdef Slot * s
        try:
            self._check_slot(slot)
            s = &self.slots[slot]
            if s.active:
                raise _errors.MullamaError(f"slot {slot} is in use")
            s.refreshing = False
            if self.hist[slot].empty() or self._copying():
                return b""  # (a state read before a pending copy has run would be stale)
            size = llama_state_seq_get_size(self.ptr, slot)
            if size > max_bytes:
                return b""
            # private anonymous pages of their own, returned to the system when
            # the cache drops them (freed heap blocks of this size glibc would
            # keep: RSS above the cache's budget)
            data = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
            buf = data
            with nogil:
                got = llama_state_seq_get_data(self.ptr, &buf[0], size, slot)
            if got != size:
                raise _errors.StateError(f"llama.cpp wrote {got} of {size} bytes of sequence {slot}'s state")
            return data
        finally:
            self._leave()

    def restore_sequence(self, int slot, const uint8_t[::1] data, tokens):
        """Load a sequence saved by :meth:`save_sequence` (whose cache held
        *tokens*) into the free *slot*."""
        self._enter()
        cdef vector[llama_token] toks = tokens
        cdef size_t got
        try:
            self._check_slot(slot)
            if self.slots[slot].active or self._copying():
                raise _errors.StateError(f"slot {slot} is in use, or a copy into it is pending")
            with nogil:
                got = llama_state_seq_set_data(self.ptr, &data[0], data.shape[0], slot)
            if got == 0 or llama_memory_seq_pos_max(llama_get_memory(self.ptr), slot) + 1 != <llama_pos>toks.size():
                llama_memory_seq_rm(llama_get_memory(self.ptr), slot, -1, -1)
                self.hist[slot].clear()
                raise _errors.StateError(f"could not restore a cached sequence of {toks.size()} tokens")
            self.hist[slot] = toks
            self.slots[slot].n_exact = <int>toks.size()
        finally:
            self._leave()

    def set_drafter(self, DraftModel drafter):
        """The draft model of speculative decoding with ``draft_model``: one
        sequence per slot (None: none)."""
        if drafter is not None and drafter.n_seq < self.n_seq:
            raise _errors.MullamaError(f"the draft context has {drafter.n_seq} sequences, the engine {self.n_seq}")
        self.drafter = drafter

    def cancel_slot(self, int slot):
        """Leave *slot* out of every further step (thread-safe)."""
        if 0 <= slot < self.n_seq:
            mullama_store_flag(&self.slots[slot].cancel, 1)
            mullama_store_flag(&self.ab.flags[1], 1)  # a long prompt chunk stops now, not after it
            mullama_store_flag(&self._wake, 1)

    def wake(self):
        """Make a running :meth:`run` return at its next step, or now if the
        step only refreshes free slots (thread-safe)."""
        mullama_store_flag_sc(&self._wake, 1)
        if mullama_load_flag_sc(&self._idle_step):
            mullama_store_flag(&self.ab.flags[1], 1)

    def idle_work(self):
        """Some free slot has a tail to refresh (see :meth:`release`)."""
        cdef int i
        for i in range(self.n_seq):
            if self.slots[i].refreshing and not self.slots[i].active:
                return True
        return False

    def set_paused(self, int slot, bint paused):
        self.slots[slot].paused = paused

    def release(self, int slot, bint keep=True):
        """Free *slot*. Its KV cells stay as a cache of its tokens
        (:meth:`cached`) for a later request with the same prefix, unless
        *keep* is false.

        Cells that cannot be reused as they are (the generated tokens of a
        request, see :meth:`match`, unless ``decode_exact``) are dropped, and their
        tokens evaluated again as a prompt in steps that have nothing else to
        do (a step of only these ends as soon as :meth:`wake` is called), so
        that a follow-up request (the next turn of a chat) finds them cached.
        """
        if self._closed or slot < 0 or slot >= self.n_seq:
            return
        self._enter()
        cdef Slot * s = &self.slots[slot]
        cdef llama_memory_t mem = llama_get_memory(self.ptr)
        cdef int tail
        try:
            self.prompts[slot].clear()
            s.refreshing = False
            s.pending = -1
            s.n_step = 0
            s.i_batch = -1
            if not keep or s.copy_pending:  # (copied cells whose data has not arrived yet: dropped)
                llama_memory_seq_rm(mem, slot, -1, -1)
                self.hist[slot].clear()
                s.n_exact = 0
            elif s.n_exact < <int>self.hist[slot].size():
                tail = <int>self.hist[slot].size() - s.n_exact
                if not llama_memory_seq_rm(mem, slot, s.n_exact, -1):
                    llama_memory_seq_rm(mem, slot, -1, -1)
                    s.n_exact = 0
                elif tail >= 2:  # (one token alone would be decoded as a one-token batch again)
                    self.prompts[slot].assign(self.hist[slot].begin() + s.n_exact, self.hist[slot].end())
                    s.n_prompt_done = 0
                    s.refreshing = True
                self.hist[slot].resize(s.n_exact)
            s.pos = <int>self.hist[slot].size()
            s.active = False
            sampler = self.samplers[slot]
            self.samplers[slot] = None
            self.smpls[slot] = NULL
            self.speculators[slot] = None
            self.specs[slot] = NULL
            if sampler is not None:
                (<SamplerChain>sampler).close()
        finally:
            self._leave()

    def slot_state(self, int slot):
        """(active, finish, cancelled, n_prompt_done, pos, n_gen) of *slot*."""
        cdef Slot * s = &self.slots[slot]
        return (s.active, s.finish, mullama_load_flag(&s.cancel) != 0, s.n_prompt_done, s.pos, s.n_gen)

    def kv_used(self):
        """KV cells held by the running requests, and by the free slots' caches."""
        cdef int i, running = 0, cached = 0
        for i in range(self.n_seq):
            if self.slots[i].active:
                running += <int>self.hist[i].size()
            else:
                cached += <int>self.hist[i].size()
        return running, cached

    def drain(self, int slot):
        """Take the slot's new output: ``(tokens, pieces, logprobs_or_None, top_or_None)``."""
        return _take_output(&self.outs[slot], self.slots[slot].want_lp, self.slots[slot].n_top)

    # -- stepping -------------------------------------------------------------------

    cdef inline bint _runnable(self, Slot * s) noexcept nogil:
        return s.active and s.finish == ST_OK and not s.paused and not mullama_load_flag(&s.cancel)

    cdef int _chunk_size(self, int i, int most) noexcept nogil:
        """The tokens of slot *i*'s next prompt chunk, at most *most* (4 or
        more: only a prompt of one token makes a chunk of one)."""
        cdef int left = <int>self.prompts[i].size() - self.slots[i].n_prompt_done
        cdef int take = min(left, most)
        if left - take == 1 and take > 1:
            take -= 1  # never leave a prompt's last token alone in a batch (see match())
        return take

    cdef int _chunk(self, int i, bint sample, int off, int take) noexcept nogil:
        """Put *take* tokens of slot *i*'s prompt (or the tail it refreshes)
        into the batch from index *off*; the index after them."""
        cdef Slot * s = &self.slots[i]
        cdef int k, size = <int>self.prompts[i].size(), done = s.n_prompt_done
        for k in range(take):
            self._add(off + k, self.prompts[i][done + k], s.pos + k, i, sample and done + k == size - 1)
        s.n_step = take
        if sample and done + take == size:
            s.i_batch = off + take - 1
        return off + take

    cdef bint _prefilling(self, int i) noexcept nogil:
        cdef Slot * s = &self.slots[i]
        return self._runnable(s) and s.pending < 0 and s.n_prompt_done < <int>self.prompts[i].size()

    cdef int _prompt_chunks(self) noexcept nogil:
        """Put the next prompt chunks into the batch, the prefilling slots in
        turn: as many as fit in ``prefill_chunk`` tokens, all of the same
        length, each leaving none or two or more of its prompt's tokens; the
        tokens put (0: no slot is prefilling).

        With equal lengths llama.cpp's split_equal (sequential, the KV cache
        not being unified) cuts the batch only between runs of consecutive
        sequence ids, each a piece of that many tokens per sequence; so each
        token is computed as a prompt evaluated alone computes it (see
        match()). The chunks go into the batch in slot order, which keeps
        consecutive slots in one piece. With flash attention a chunk decoded
        next to other sequences' chunks is not bit for bit the chunk alone (a
        test shows it), so each chunk goes alone."""
        cdef int i, j, left, take, n = 0, size = 0, first = -1, shortest = -1, count = 0, last = -1
        cdef vector[cbool] chosen
        for j in range(self.n_seq):  # the length: the shortest next chunk
            i = (self._next_prefill + j) % self.n_seq
            if self._prefilling(i):
                if first < 0:
                    first = i
                take = self._chunk_size(i, self.prefill_chunk)
                if shortest < 0 or take < size:
                    shortest, size = i, take
        if first < 0:
            return 0
        if self.one_chunk:
            self._next_prefill = first + 1
            return self._chunk(first, True, 0, self._chunk_size(first, self.prefill_chunk))
        if size < 2:  # a one-token prompt: alone (never a piece of one token per sequence with others)
            self._next_prefill = shortest + 1
            return self._chunk(shortest, True, 0, size)
        chosen.resize(self.n_seq, False)
        for j in range(self.n_seq):
            i = (first + j) % self.n_seq
            if not self._prefilling(i) or (count + 1) * size > self.prefill_chunk:
                continue
            left = <int>self.prompts[i].size() - self.slots[i].n_prompt_done
            if left == size or left >= size + 2:
                chosen[i] = True
                count += 1
                last = i
        self._next_prefill = last + 1
        for i in range(self.n_seq):
            if chosen[i]:
                n = self._chunk(i, True, n, size)
        return n

    cdef int _mixed_chunks(self, int off) noexcept nogil:
        """With ``decode_exact`` (a token's cells are the same whatever shares
        its batch, as probe_decode_cells found), or without ``exact`` (nothing
        to keep exact), and without flash attention: add the prefilling
        slots' next prompt chunks to the batch that holds the *off* decoding
        slots' tokens (one each, no drafts), as many as fit in
        ``prefill_chunk`` tokens (and the batch), of any lengths, the
        prefilling slots taking turns, as llama-server does; the rows in
        slot order. Returns the batch's size.

        llama.cpp's split_equal (sequential: the KV cache is not unified)
        cuts a batch into pieces of consecutive sequence ids with as many
        tokens each: in slot order, the decoding tokens and the first token
        of each chunk make one piece and the rest of the chunks the next
        ones, as in two separate decodes; out of order it would make a piece
        per sequence. With such kernels the pieces change no token's result."""
        cdef int j, i, n = 0, first = -1, budget = min(self.prefill_chunk, self.n_batch - off)
        cdef vector[int] take
        for i in range(self.n_seq):  # (most steps only decode: nothing to allocate)
            if self._prefilling(i):
                break
        else:
            return off
        take.assign(self.n_seq, 0)
        for j in range(self.n_seq):
            i = (self._next_prefill + j) % self.n_seq
            if budget < 1:
                break
            if not self._prefilling(i):
                continue
            take[i] = min(<int>self.prompts[i].size() - self.slots[i].n_prompt_done, budget)
            budget -= take[i]
            if first < 0:
                first = i
        if first < 0:
            return off
        self._next_prefill = first + 1
        for i in range(self.n_seq):  # (the decoding slots' rows written again, in slot order)
            if self.slots[i].n_step:
                self._add(n, self.slots[i].pending, self.slots[i].pos, i, True)
                self.slots[i].i_batch = n
                n += 1
            elif take[i]:
                n = self._chunk(i, True, n, take[i])
        return n

    cdef int _decode_batch(self, int n, bint chunk) noexcept nogil:
        """Decode the *n* tokens the slots with ``n_step`` put into the batch;
        then record them (a chunk's are reusable, see match()) and sample the
        slots with ``i_batch``. On failure nothing of it is kept."""
        cdef int i, rc
        cdef Slot * s
        self.batch.n_tokens = n
        self._decode_s = mullama_now()
        rc = _governed_decode(self.ptr, self.batch, self.gov, &self.ab)
        self._decode_s = mullama_now() - self._decode_s
        for i in range(self.n_seq):
            self.slots[i].copy_pending = False  # (llama_decode made the copies first)
        if rc != ST_OK:
            for i in range(self.n_seq):  # undo what the failed decode may have kept
                s = &self.slots[i]
                if s.n_step:
                    llama_memory_seq_rm(llama_get_memory(self.ptr), i, s.pos, -1)
                    s.n_step = 0
                    s.n_draft = 0
                    s.i_batch = -1
            return rc
        for i in range(self.n_seq):
            s = &self.slots[i]
            if s.n_step == 0:
                continue
            if s.pending >= 0:
                s.n_step = 1  # (the drafted tokens' cells are kept or dropped by _sample_slot)
            if (not self.exact or self.decode_exact or (chunk and s.n_step >= 2)) \
                    and s.n_exact == <int>self.hist[i].size():
                s.n_exact += s.n_step
            if s.pending >= 0:
                self.hist[i].push_back(s.pending)
                s.pending = -1
            else:
                self.hist[i].insert(self.hist[i].end(), self.prompts[i].begin() + s.n_prompt_done,
                                    self.prompts[i].begin() + s.n_prompt_done + s.n_step)
                s.n_prompt_done += s.n_step
            s.pos += s.n_step
            if s.refreshing:
                self.refreshed += s.n_step
                if s.n_prompt_done == <int>self.prompts[i].size():
                    s.refreshing = False
                    self.prompts[i].clear()
            s.n_step = 0
            if s.i_batch >= 0:
                self._sample_slot(i, chunk)
        return ST_OK

    cdef void _sample_slot(self, int i, bint chunk) noexcept nogil:
        """Sample slot *i*'s next token from batch row ``i_batch``; with a
        draft (``n_draft`` tokens in the rows after it, their cells after the
        pending token's), go on row after row while the sampled token is the
        drafted one, keep those drafted tokens' cells and drop the others
        (see _speculative.h). *chunk*: the batch was a prompt chunk (its time
        is no decode step's)."""
        cdef Slot * s = &self.slots[i]
        cdef int st, n_acc = 0, k = s.n_draft
        cdef llama_token tok
        while True:
            st = _sample_into(self.ptr, s.i_batch + n_acc, self.smpls[i], self.model.vocab, self.model.n_vocab,
                              s.want_lp, s.n_top, &self.outs[i], &tok)
            if st == ST_DEAD_END:
                s.finish = st
                break
            s.n_gen += 1
            if st == ST_EOG:
                s.finish = ST_EOG
                break
            if s.n_gen >= s.max_gen:
                s.finish = ST_LENGTH
                break
            if n_acc == k or tok != self.specs[i].draft[n_acc]:
                s.pending = tok
                break
            n_acc += 1  # the drafted token is the sampled one: its cell stays
            self.hist[i].push_back(tok)
            s.pos += 1
            if (not self.exact or self.decode_exact) and s.n_exact == <int>self.hist[i].size() - 1:
                s.n_exact += 1
        s.i_batch = -1
        if k:
            self.specs[i].record(k, n_acc, self._decode_s + s.t_draft)
            llama_memory_seq_rm(llama_get_memory(self.ptr), i, s.pos, -1)
            s.n_draft = 0
        elif self.specs[i] != NULL and not chunk:
            self.specs[i].plain_step(self._decode_s)

    cdef int _step(self, int * n_decoded) noexcept nogil:
        """One step: a llama_decode of every decoding slot's next token, then
        one of prompt chunks (the prefilling slots take turns), or, with
        nothing else to do, one refreshing a free slot's tail. Returns a Status
        (ST_OK, or ST_ABORTED with nothing of the failed decode kept) or a
        llama.cpp error; *n_decoded*: the tokens decoded (0: nothing to do).

        Chunks are never decoded with the decoding slots' tokens: llama.cpp
        splits a batch of several sequences into pieces of equal tokens per
        sequence (split_equal), and a token computed in a piece of one token
        per sequence is computed along another path than a prompt's (see
        match()); with chunks of one length only, every chunk token is
        computed as a prompt evaluation computes it. With ``decode_exact``
        (probe_decode_cells: no path differs) or without ``exact``, and
        without flash attention, one decode takes the decoding slots' tokens
        and prompt chunks of any lengths together (_mixed_chunks), except in
        a step that verifies drafts."""
        cdef int i, n, m, rc
        cdef Slot * s
        n_decoded[0] = 0
        n = self._decode_tokens()
        if (self.decode_exact or not self.exact) and not self.one_chunk:
            # one decode of every decoding slot's token and prompt chunks (none with drafts: a
            # verification's time feeds the speculation cost model)
            for i in range(self.n_seq):
                if self.slots[i].n_draft:
                    break
            else:
                m = self._mixed_chunks(n)
                if m:
                    rc = self._decode_batch(m, m > n)
                    if rc == ST_OK:
                        n_decoded[0] = m
                    return rc
        if n:
            rc = self._decode_batch(n, False)
            if rc != ST_OK:
                return rc
            n_decoded[0] = n
        n = self._prompt_chunks()
        if n:
            rc = self._decode_batch(n, True)
            if rc != ST_OK:
                return rc
            n_decoded[0] += n
            return ST_OK
        if n_decoded[0]:
            return ST_OK
        # nothing else to do: refresh a free slot's tail (release()), unless the driver has work
        mullama_store_flag_sc(&self._idle_step, 1)  # (before reading _wake: wake() sets it, then reads this)
        for i in range(self.n_seq):
            s = &self.slots[i]
            if s.active or not s.refreshing or mullama_load_flag_sc(&self._wake):
                continue
            n = self._chunk(i, False, 0, self._chunk_size(i, min(self.prefill_chunk, REFRESH_CHUNK)))
            rc = self._decode_batch(n, True)
            mullama_store_flag(&self._idle_step, 0)
            if rc != ST_OK and rc != ST_ABORTED:  # (a refresh is only an optimisation: drop it)
                s.refreshing = False
                self.prompts[i].clear()
                return ST_OK
            if rc == ST_OK:
                n_decoded[0] = n
            return rc
        mullama_store_flag(&self._idle_step, 0)
        return ST_OK

    cdef int _decode_tokens(self) noexcept nogil:
        """Put every decoding slot's pending token into the batch, each
        followed by its draft when every one of them drafts (speculative
        decoding, see _speculative.h): drafts of one length, the least any of
        them asks, so that llama.cpp's split_equal computes the batch in one
        piece of that many tokens per sequence (a slot without a draft would
        cut it into two). Returns the tokens put."""
        cdef int i, j, k, n = 0, n_dec = 0, most = -1
        cdef Slot * s
        cdef double t0
        for i in range(self.n_seq):
            s = &self.slots[i]
            s.n_step = 0
            s.n_draft = 0
            s.t_draft = 0.0
            s.i_batch = -1
            if not self._runnable(s) or s.pending < 0:
                continue
            if s.pos >= self.n_ctx_seq:
                s.finish = ST_CTX_FULL
                continue
            n_dec += 1
            s.i_batch = 0  # (decoding: placed below)
            if most != 0:  # the draft length all decoding slots ask for (0: one does not draft)
                k = 0 if self.specs[i] == NULL else self.specs[i].length(
                    min(s.max_gen - s.n_gen - 1, self.n_ctx_seq - s.pos - 1))
                most = k if most < 0 else min(most, k)
        if n_dec == 0:
            return 0
        most = max(0, min(most, self.n_batch // n_dec - 1))
        k = most
        for i in range(self.n_seq):  # the drafts (all of them, or none)
            s = &self.slots[i]
            if s.i_batch < 0 or k == 0:
                continue
            t0 = mullama_now()
            k = min(k, _make_draft(self.specs[i], self._drafting, i, self.hist[i], s.pending, most, &self.ab))
            s.t_draft = mullama_now() - t0
        for i in range(self.n_seq):
            s = &self.slots[i]
            if s.i_batch < 0:
                continue
            self._add(n, s.pending, s.pos, i, True)
            for j in range(k):
                self._add(n + 1 + j, self.specs[i].draft[j], s.pos + 1 + j, i, True)
            s.n_draft = k
            s.n_step = 1 + k
            s.i_batch = n
            n += 1 + k
        return n

    cdef bint _needs_driver(self) noexcept nogil:
        cdef int i
        cdef Slot * s
        if mullama_load_flag(&self._wake):
            return True
        for i in range(self.n_seq):
            s = &self.slots[i]
            if s.active and (s.finish != ST_OK or mullama_load_flag(&s.cancel)):
                return True
        return False

    def clear_wake(self):
        mullama_store_flag(&self._wake, 0)

    def run(self, double budget_s=0.02):
        """Step without the GIL until *budget_s* is spent, a slot finishes or is
        cancelled, :meth:`wake` is called, or no slot can run. Returns the number
        of tokens decoded (0: nothing to do)."""
        self._enter()
        cdef int rc = ST_OK, n = 0
        cdef long total = 0
        cdef double deadline = mullama_now() + budget_s
        cdef DraftModel drafter = None
        try:
            drafter = _entered(self.drafter)
            self._drafting = drafter
            with nogil:
                while not mullama_load_flag(&self.ab.flags[0]) and not mullama_load_flag(&_g_shutdown):
                    mullama_store_flag(&self.ab.flags[1], 0)
                    rc = self._step(&n)
                    if rc == ST_ABORTED and not mullama_load_flag(&self.ab.flags[0]):
                        rc = ST_OK  # aborted for a cancelled slot: rolled back, the driver releases it
                        break
                    if rc != ST_OK or n == 0:
                        break
                    total += n
                    if self._needs_driver() or mullama_now() >= deadline:
                        break
            if rc != ST_OK:
                if mullama_load_flag(&self.ab.flags[0]):
                    raise _errors.ClosedError("the engine was closed during a step")
                _check_status(rc, f"no KV cells for a batched step of {self.batch.n_tokens} tokens "
                                  f"({self.n_seq} sequences x {self.n_ctx_seq} tokens)")
            return total
        finally:
            self._drafting = None
            if drafter is not None:
                drafter._leave()
            self._leave()
