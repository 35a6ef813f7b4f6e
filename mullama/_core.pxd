# cython: language_level=3
# The C-level interface of mullama._core, for Cython code that cimports it:
# the layouts of the owner classes (their attributes and cdef methods), the C
# types those layouts use, and the Status codes. Nothing but declarations:
# mullama/_core.pyx implements every method and documents each class.
#
# The attributes are declared here only; each cdef method's signature is
# declared here and repeated, with its body, in the .pyx (Cython checks that
# the two match). The class decorators are not here: Cython takes a class's
# directives from its definition in the .pyx, so @cython.no_gc_clear stays
# there (LlamaModel, SamplerChain, _Decoder, LlamaContext, BatchEngine);
# putting it here would do nothing. Every class of the module is here, in the
# .pyx's order (the order the types are created in), the private helpers
# _LoadState and _LogitsView included.
#
# inline methods stay inline and are called directly on their own class; a
# subclass calls those it inherits (_InC's _enter_c/_leave_c, _Decoder's
# _enter/_leave) through the vtable, as Cython does for inline or final
# methods declared in a .pxd (cython/cython#6284). Only GIL-held entry and exit
# points of calls are concerned; the nogil loops' inline methods (_refresh_last,
# _runnable, _add) are called directly.
#
# A module that cimports this compiles against mullama/_llama.pxd, so it needs
# llama.cpp's include/ and ggml/include/ (the pinned version, see
# tools/fetch_llama_cpp.py) and this directory (_threads.h) on its include path.

from libc.stdint cimport uint32_t
from libcpp.string cimport string
from libcpp.vector cimport vector

from mullama._llama cimport (llama_batch, llama_context, llama_model, llama_pos, llama_sampler, llama_token,
                             llama_vocab)


cdef extern from "_sampling.h" namespace "mullama" nogil:
    # a request's sampling: its chain (NULL: greedy) and grammar (NULL: none),
    # sampled without dead ends (see _sampling.h)
    cdef cppclass Sampling:
        llama_sampler * chain
        llama_sampler * grammar
        const llama_vocab * vocab
        vector[llama_token] preserved
        bint lazy
        string think_start
        string think_end
        bint thinking
    const llama_token DEAD_END
    llama_token sample(Sampling * s, const float * logits, int n_vocab, float * best) noexcept
    llama_token argmax(const float * logits, int n_vocab, float * best) noexcept
    bint special_text(const Sampling * s, llama_token tok) noexcept
    bint grammar_prefill(Sampling * s, const llama_token * tokens, int n) noexcept
    string grammar_error(const llama_vocab * vocab, const string & src, long * offset) except +
    const int MAX_TOP_LOGPROBS
    void top_logprobs(const float * logits, int n_vocab, int k, float lse, vector[llama_token] & toks,
                      vector[float] & lps) noexcept


cdef extern from "_speculative.h" namespace "mullama" nogil:
    # a request's speculative decoding: settings, adaptation, counters (see _speculative.h)
    cdef cppclass Speculation:
        bint use_model
        int ngram_min
        int ngram_max
        int max_draft
        bint adaptive
        long drafts
        long drafted
        long accepted
        vector[llama_token] draft
        vector[llama_token] hist
        void reset()
        int length(int most)
        void plain_step(double seconds)
        void record(int n, int n_acc, double seconds)
    int lookup_draft(Speculation * s, const vector[llama_token] & hist, llama_token last, int most) noexcept
    bint history_before_last(Speculation * s, const vector[llama_token] & tokens) noexcept


cdef extern from "_common.h" nogil:
    ctypedef struct common_chat_templates:
        pass


cdef extern from "_common.h" namespace "mullama" nogil:
    # llama.cpp's common library (see _common.h): JSON text in and out
    cdef cppclass ChatParser:
        pass
    void quiet_common_log()
    string schema_to_grammar(const string & schema_json) except +
    common_chat_templates * chat_templates_new(const llama_model * model, const string & override_src) except +
    void chat_templates_free(common_chat_templates * t)
    string chat_apply(const common_chat_templates * t, const string & request_json) except +
    ChatParser * chat_parser_new(int format, const string & generation_prompt, const string & parser,
                                 const string & reasoning_format, bint parse_tool_calls) except +
    void chat_parser_free(ChatParser * cp)
    string chat_parse(ChatParser * cp, const string & text, bint partial) except +


cdef extern from "_threads.h" namespace "mullama" nogil:
    # the abort callback's state and the compute-thread governor (see _threads.h;
    # the functions that use them are declared in _core.pyx)
    cdef struct AbortState:
        int flags[2]     # [0] cancel()/close(), [1] the engine: a slot was cancelled
        int fired        # the watchdog aborted the running decode

    cdef cppclass CGovernor "mullama::ThreadGovernor":
        int n_max
        bint adaptive
        long steps, changes, watchdog_aborts, trials
        double last_step
        double forced_limit
        double idle_cores
        void force(int threads)
        CGovernor(int n_max, bint adaptive, int start, double first_cap)
        bint bind(llama_context * ctx)
        int threads()
        int begin(int n, AbortState * ab)
        double limit(int b, int threads, int n)
        void end(int n, double elapsed, bint watchdog)
        double floor_at(int b, int threads)
        @staticmethod
        int bucket(int n)


# how a generation call, or a request in the batching engine, ended (the Python
# layer names them: mullama/_generation.py)
cdef enum Status:
    ST_OK = 0          # not ended: a chunk finished (token or time budget), more may follow
    ST_EOG = 1         # the model produced an end-of-generation token
    ST_ABORTED = 2     # cancel() (or close, or interpreter exit) stopped it
    ST_CTX_FULL = 3    # the context window (a request's share of it) is full
    ST_LENGTH = 4      # the request generated its max_tokens (the engine)
    ST_DEAD_END = 5    # the grammar allows no next token

cdef enum:
    PIECE_BUF = 256    # bytes of one token's text (longer pieces do not exist in real vocabularies)
    REFRESH_CHUNK = 64 # tokens of one idle refresh step: a request arriving aborts it, losing at most these


cdef struct Output:
    # what a generation produced since it was last taken: the tokens, their
    # text (the pieces back to back) with each piece's length, and the
    # log-probabilities when asked for
    vector[llama_token] tok
    string text
    vector[int] len
    vector[float] lp
    vector[llama_token] top_tok   # n_top per token, with top_lp: the most likely alternatives
    vector[float] top_lp


cdef struct Slot:
    # one request of the batching engine (its sequence id is the slot index)
    bint active          # a request owns this slot
    bint paused          # its consumer is behind: leave it out of the next steps
    int cancel           # set from any thread; the slot is left out of every step
    int finish           # a Status: ST_OK while the request needs more steps
    int n_prompt_done    # prompt tokens already in the KV cache
    int pos              # tokens of this sequence in the KV cache
    int n_exact          # the first n_exact of them were computed in batches of 2 or more tokens (reusable)
    bint refreshing      # free, re-evaluating its tail (prompts[slot]) in idle steps to make it reusable
    bint copy_pending    # its cells were copied from another sequence; the data arrives with the next decode
    llama_token pending  # sampled, not yet decoded (-1: none)
    int n_step           # tokens this slot put into the current batch
    int n_draft          # of them, drafted tokens to verify (after the pending one)
    double t_draft       # seconds its draft took (speculation's cost model)
    int i_batch          # batch index whose logits this slot samples (-1: none)
    int n_gen            # tokens generated
    int max_gen
    bint want_lp
    int n_top            # log-probabilities of this many most likely tokens, per token


cdef class _InC:
    # counts the threads inside a nogil section of an owner
    cdef int _in_c
    cdef object _idle        # threading.Condition
    cdef object __weakref__

    cdef inline int _enter_c(self) except -1
    cdef inline void _leave_c(self)


cdef class _LoadState:
    # carries LlamaModel.load's progress callback into C and its exception back out
    cdef object fn
    cdef object exc
    cdef bint cancelled   # the callback returned False


cdef class LlamaModel(_InC):
    cdef llama_model * ptr
    cdef const llama_vocab * vocab
    cdef readonly int n_vocab
    cdef readonly object path
    cdef object _contexts   # WeakSet of LlamaContext / BatchEngine created from this model
    cdef bint _closing      # close() was called; ptr is freed once no context needs it

    cdef inline _check(self)
    cdef inline int _enter(self) except -1
    cdef _release(self)
    cdef int _check_tokens(self, vector[llama_token] & toks) except -1


cdef class SamplerChain:
    cdef Sampling * s          # the chain (NULL: greedy) and the grammar (NULL: none)
    cdef readonly bint greedy

    cdef _set_grammar(self, LlamaModel model, str grammar, str root, triggers, trigger_tokens, reasoning,
                      bint reasoning_open)


cdef class Speculator:
    cdef Speculation * s


cdef class ChatTemplates:
    cdef common_chat_templates * ptr
    cdef readonly LlamaModel model

    cdef _check(self)


cdef class ChatOutputParser:
    cdef ChatParser * ptr


cdef class _Decoder(_InC):
    # what LlamaContext and BatchEngine share
    cdef llama_context * ptr
    cdef readonly LlamaModel model
    cdef llama_batch batch
    cdef bint has_batch
    cdef readonly int n_batch
    cdef bint _closed
    cdef str _what           # "context" / "engine", for messages
    cdef CGovernor * gov     # how many compute threads, and their pools (_threads.h)
    cdef AbortState ab       # flags: [0] cancel()/close(), [1] the engine: a slot was cancelled

    cdef _open(self, LlamaModel model, uint32_t n_ctx, uint32_t n_batch, int n_seq, int n_threads,
               int n_threads_batch, bint flash_attention, bint adaptive_threads, str what, str hint,
               int pooling=*)
    cdef _free(self)
    cdef inline int _enter(self) except -1
    cdef inline void _leave(self)
    cdef inline void _add(self, int n, llama_token tok, llama_pos pos, int seq, bint logits) noexcept nogil


cdef class ThreadGovernor:
    cdef CGovernor * g
    cdef AbortState ab


cdef class _LogitsView:
    # exports a context's last logits as a float32 buffer
    cdef LlamaContext ctx
    cdef float * data
    cdef Py_ssize_t shape[1]
    cdef Py_ssize_t strides[1]


cdef class DraftModel(_Decoder):
    cdef readonly int n_seq
    cdef readonly int n_ctx_seq
    cdef int n_target_vocab
    cdef vector[vector[llama_token]] seen   # each sequence's tokens in the draft's KV cache

    cdef int draft(self, int seq, const vector[llama_token] & hist, llama_token last, int most,
                   vector[llama_token] & out, AbortState * outer) noexcept nogil


cdef class LlamaContext(_Decoder):
    cdef readonly int n_ctx
    cdef vector[llama_token] _tokens
    cdef int _n_kv
    cdef bint _logits_ok     # the last decode produced logits for tokens[-1]
    cdef int _exports        # live buffer exports of the logits
    cdef object _owner       # threading.Lock: one user at a time (claim/release)
    cdef DraftModel drafter  # drafts for speculative decoding with a draft model (None: none)
    cdef DraftModel _drafting  # the drafter a running call entered (None: no drafting with a model)

    cdef _free(self)
    cdef void _clear(self) noexcept
    cdef int _decode_pending(self) noexcept nogil
    cdef inline void _refresh_last(self) noexcept nogil
    cdef int _check(self, int status, int n_new) except -1
    cdef int _generate(self, Sampling * smpl, Speculation * spec, int n_max, double deadline, bint want_lp,
                       int n_top, Output * out) noexcept nogil
    cdef int _speculate(self, Sampling * smpl, Speculation * spec, int * n_done, int n_max, double t_draft,
                        bint want_lp, int n_top, Output * out) noexcept nogil


cdef class BatchEngine(_Decoder):
    cdef readonly int n_seq
    cdef readonly int n_ctx_seq
    cdef int prefill_chunk
    cdef bint one_chunk      # one prompt chunk per step (flash attention: see _prompt_chunks)
    cdef readonly bint exact  # reuse only cells computed in batches of 2+ tokens (see match())
    cdef public bint decode_exact  # decode steps compute cells as prompts do (probe_decode_cells)
    cdef vector[Slot] slots
    cdef vector[vector[llama_token]] prompts
    cdef vector[vector[llama_token]] hist   # each sequence's tokens in the KV cache (its size is the slot's pos)
    cdef vector[Output] outs
    cdef list samplers       # the SamplerChain of each slot (keeps its pointer alive)
    cdef vector[Sampling *] smpls  # their sampling, for the nogil step
    cdef list speculators    # the Speculator of each slot (None: no speculative decoding)
    cdef vector[Speculation *] specs  # theirs, for the nogil step (NULL: none)
    cdef int _wake           # the driver has work: return from run() early
    cdef int _idle_step      # the running step holds only refresh tokens: wake() aborts it
    cdef int _next_prefill   # the slot whose prompt chunk comes next (prefilling slots take turns)
    cdef readonly long refreshed  # tokens re-evaluated by refresh steps
    cdef double _decode_s    # seconds of the last llama_decode (speculation's cost model)
    cdef DraftModel drafter  # drafts for speculative decoding with a draft model (None: none)
    cdef DraftModel _drafting  # the drafter a running call entered (None: no drafting with a model)

    cdef _free(self)
    cdef inline bint _runnable(self, Slot * s) noexcept nogil
    cdef bint _holds_from_start(self, int slot, int n) noexcept nogil
    cdef int _check_slot(self, int slot) except -1
    cdef bint _copying(self) noexcept nogil
    cdef int _chunk_size(self, int i, int most) noexcept nogil
    cdef int _chunk(self, int i, bint sample, int off, int take) noexcept nogil
    cdef bint _prefilling(self, int i) noexcept nogil
    cdef int _prompt_chunks(self) noexcept nogil
    cdef int _mixed_chunks(self, int off) noexcept nogil
    cdef int _decode_batch(self, int n, bint chunk) noexcept nogil
    cdef int _decode_tokens(self) noexcept nogil
    cdef void _sample_slot(self, int i, bint chunk) noexcept nogil
    cdef int _step(self, int * n_decoded) noexcept nogil
    cdef bint _needs_driver(self) noexcept nogil


cdef class EmbeddingContext(_Decoder):
    cdef readonly int n_ctx
    cdef readonly int n_seq
    cdef readonly int n_embd
    cdef readonly int pooling     # a llama_pooling_type (the model's, or the one asked for)
    cdef bint encoder             # an encoder-only model: llama_encode
