# cython: language_level=3
# Declarations from llama.cpp's include/llama.h (and the bits of ggml.h it
# uses), only what mullama calls, in llama.h order. Nothing but declarations.

from libcpp cimport bool as cbool
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t


cdef extern from "ggml.h" nogil:
    cdef enum ggml_log_level:
        GGML_LOG_LEVEL_NONE
        GGML_LOG_LEVEL_DEBUG
        GGML_LOG_LEVEL_INFO
        GGML_LOG_LEVEL_WARN
        GGML_LOG_LEVEL_ERROR
        GGML_LOG_LEVEL_CONT

    # if it returns true, execution of llama_decode() will be aborted
    ctypedef cbool (*ggml_abort_callback)(void * data) noexcept nogil
    ctypedef void (*ggml_log_callback)(ggml_log_level level, const char * text, void * user_data) noexcept

    cdef struct ggml_threadpool_params:
        int n_threads       # number of threads
        uint32_t poll       # polling level (0 - no polling, 100 - aggressive polling)
        bint paused         # start in paused state
        # ...

    ctypedef struct ggml_threadpool:
        pass
    ctypedef ggml_threadpool * ggml_threadpool_t

    ggml_threadpool_params ggml_threadpool_params_default(int n_threads)

    # tensor types: GGML_TYPE_COUNT is one past the last; removed types have size 0
    cdef enum ggml_type:
        GGML_TYPE_COUNT
    int64_t ggml_blck_size(ggml_type type)
    size_t  ggml_type_size(ggml_type type)   # size in bytes of one block


cdef extern from "ggml-cpu.h" nogil:
    ggml_threadpool * ggml_threadpool_new(ggml_threadpool_params * params)
    void ggml_threadpool_free(ggml_threadpool * threadpool)


cdef extern from "llama.h" nogil:
    ctypedef struct llama_vocab:
        pass
    ctypedef struct llama_model:
        pass
    ctypedef struct llama_context:
        pass
    ctypedef struct llama_sampler:
        pass

    ctypedef struct llama_memory_i:
        pass
    ctypedef llama_memory_i * llama_memory_t

    ctypedef int32_t llama_pos
    ctypedef int32_t llama_token
    ctypedef int32_t llama_seq_id

    cdef enum llama_vocab_type:
        LLAMA_VOCAB_TYPE_NONE
        LLAMA_VOCAB_TYPE_SPM
        LLAMA_VOCAB_TYPE_BPE
        LLAMA_VOCAB_TYPE_WPM
        LLAMA_VOCAB_TYPE_UGM
        LLAMA_VOCAB_TYPE_RWKV
        LLAMA_VOCAB_TYPE_PLAMO2

    cdef enum llama_pooling_type:
        LLAMA_POOLING_TYPE_UNSPECIFIED
        LLAMA_POOLING_TYPE_NONE
        LLAMA_POOLING_TYPE_MEAN
        LLAMA_POOLING_TYPE_CLS
        LLAMA_POOLING_TYPE_LAST
        LLAMA_POOLING_TYPE_RANK

    cdef enum llama_flash_attn_type:
        LLAMA_FLASH_ATTN_TYPE_AUTO
        LLAMA_FLASH_ATTN_TYPE_DISABLED
        LLAMA_FLASH_ATTN_TYPE_ENABLED

    cdef enum llama_load_mode:
        LLAMA_LOAD_MODE_AUTO
        LLAMA_LOAD_MODE_NONE
        LLAMA_LOAD_MODE_MMAP

    ctypedef cbool (*llama_progress_callback)(float progress, void * user_data) noexcept

    # Input data for llama_decode; arrays of n_tokens each
    ctypedef struct llama_batch:
        int32_t n_tokens
        llama_token * token
        float * embd
        llama_pos * pos
        int32_t * n_seq_id
        llama_seq_id ** seq_id
        int8_t * logits
        # ...

    cdef struct llama_model_params:
        int32_t n_gpu_layers      # number of layers to store in VRAM, negative = all
        llama_load_mode load_mode
        llama_progress_callback progress_callback
        void * progress_callback_user_data
        bint vocab_only           # only load the vocabulary, no weights
        # ...

    cdef struct llama_context_params:
        uint32_t n_ctx            # text context, 0 = from model
        uint32_t n_batch          # logical maximum batch size for llama_decode
        uint32_t n_ubatch         # physical maximum batch size
        uint32_t n_seq_max        # max number of sequences
        int32_t n_threads         # threads for generation
        int32_t n_threads_batch   # threads for batch processing
        llama_pooling_type pooling_type
        llama_flash_attn_type flash_attn_type
        ggml_abort_callback abort_callback
        void * abort_callback_data
        bint no_perf
        bint embeddings           # extract embeddings
        bint kv_unified           # one KV buffer shared by all sequences
        # ...

    ctypedef struct llama_logit_bias:
        llama_token token
        float bias

    ctypedef struct llama_sampler_chain_params:
        bint no_perf

    ctypedef struct llama_chat_message:
        const char * role
        const char * content

    const char * llama_version()

    llama_model_params llama_model_default_params()
    llama_context_params llama_context_default_params()
    llama_sampler_chain_params llama_sampler_chain_default_params()

    void llama_backend_init()

    void llama_attach_threadpool(llama_context * ctx, ggml_threadpool_t threadpool, ggml_threadpool_t threadpool_batch)
    void llama_detach_threadpool(llama_context * ctx)

    llama_model * llama_model_load_from_file(const char * path_model, llama_model_params params)

    ctypedef enum llama_ftype:
        pass
    ctypedef struct llama_model_quantize_params:  # (the fields mullama sets)
        int32_t nthread
        llama_ftype ftype
        bint pure
    llama_model_quantize_params llama_model_quantize_default_params()
    uint32_t llama_model_quantize(const char * fname_inp, const char * fname_out,
                                  const llama_model_quantize_params * params)
    void llama_model_free(llama_model * model)

    llama_context * llama_init_from_model(llama_model * model, llama_context_params params)
    void llama_free(llama_context * ctx)

    bint llama_supports_gpu_offload()

    uint32_t llama_n_ctx(const llama_context * ctx)
    uint32_t llama_n_ctx_seq(const llama_context * ctx)
    uint32_t llama_n_batch(const llama_context * ctx)
    uint32_t llama_n_seq_max(const llama_context * ctx)

    llama_memory_t llama_get_memory(const llama_context * ctx)

    const llama_vocab * llama_model_get_vocab(const llama_model * model)
    bint llama_model_is_recurrent(const llama_model * model)
    bint llama_model_is_hybrid(const llama_model * model)

    int32_t llama_model_n_ctx_train(const llama_model * model)
    int32_t llama_model_n_embd(const llama_model * model)
    int32_t llama_model_n_layer(const llama_model * model)
    int32_t llama_model_n_head(const llama_model * model)

    int32_t llama_vocab_n_tokens(const llama_vocab * vocab)

    int32_t llama_model_meta_val_str(const llama_model * model, const char * key, char * buf, size_t buf_size)
    int32_t llama_model_meta_count(const llama_model * model)
    int32_t llama_model_meta_key_by_index(const llama_model * model, int32_t i, char * buf, size_t buf_size)
    int32_t llama_model_meta_val_str_by_index(const llama_model * model, int32_t i, char * buf, size_t buf_size)
    int32_t llama_model_desc(const llama_model * model, char * buf, size_t buf_size)
    uint64_t llama_model_size(const llama_model * model)
    const char * llama_model_chat_template(const llama_model * model, const char * name)
    uint64_t llama_model_n_params(const llama_model * model)
    bint llama_model_has_decoder(const llama_model * model)
    bint llama_model_has_encoder(const llama_model * model)
    int32_t llama_model_n_embd_out(const llama_model * model)
    llama_pooling_type llama_get_pooling_type "llama_pooling_type"(const llama_context * ctx)
    float * llama_get_embeddings_ith(llama_context * ctx, int32_t i)
    float * llama_get_embeddings_seq(llama_context * ctx, llama_seq_id seq_id)
    int32_t llama_encode(llama_context * ctx, llama_batch batch)

    # Memory
    void llama_memory_clear(llama_memory_t mem, bint data)
    bint llama_memory_seq_rm(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1)
    llama_pos llama_memory_seq_pos_max(llama_memory_t mem, llama_seq_id seq_id)
    llama_pos llama_memory_seq_pos_min(llama_memory_t mem, llama_seq_id seq_id)
    int32_t llama_model_n_swa(const llama_model * model)
    void llama_memory_seq_cp(llama_memory_t mem, llama_seq_id seq_id_src, llama_seq_id seq_id_dst,
                             llama_pos p0, llama_pos p1)

    # State / sessions
    bint llama_state_load_file(llama_context * ctx, const char * path_session,
                               llama_token * tokens_out, size_t n_token_capacity,
                               size_t * n_token_count_out)
    bint llama_state_save_file(llama_context * ctx, const char * path_session,
                               const llama_token * tokens, size_t n_token_count)
    size_t llama_state_seq_get_size(llama_context * ctx, llama_seq_id seq_id)
    size_t llama_state_seq_get_data(llama_context * ctx, uint8_t * dst, size_t size, llama_seq_id seq_id)
    size_t llama_state_seq_set_data(llama_context * ctx, const uint8_t * src, size_t size,
                                    llama_seq_id dest_seq_id)

    # Decoding
    llama_batch llama_batch_init(int32_t n_tokens, int32_t embd, int32_t n_seq_max)
    void llama_batch_free(llama_batch batch)
    #  0 ok, 1 no KV slot, 2 aborted, -1 invalid batch, < -1 fatal
    int32_t llama_decode(llama_context * ctx, llama_batch batch)

    void llama_set_n_threads(llama_context * ctx, int32_t n_threads, int32_t n_threads_batch)
    void llama_set_abort_callback(llama_context * ctx, ggml_abort_callback abort_callback, void * abort_callback_data)
    float * llama_get_logits_ith(llama_context * ctx, int32_t i)

    # Vocab
    bint llama_vocab_is_eog(const llama_vocab * vocab, llama_token token)
    llama_token llama_vocab_bos(const llama_vocab * vocab)
    llama_token llama_vocab_eos(const llama_vocab * vocab)
    bint llama_vocab_get_add_bos(const llama_vocab * vocab)
    bint llama_vocab_get_add_eos(const llama_vocab * vocab)
    int llama_vocab_type_of "llama_vocab_type"(const llama_vocab * vocab)
    const char * llama_vocab_get_text(const llama_vocab * vocab, llama_token token)

    # Tokenization (thread-safe)
    int32_t llama_tokenize(const llama_vocab * vocab, const char * text, int32_t text_len,
                           llama_token * tokens, int32_t n_tokens_max,
                           bint add_special, bint parse_special)
    int32_t llama_token_to_piece(const llama_vocab * vocab, llama_token token, char * buf,
                                 int32_t length, int32_t lstrip, bint special)
    int32_t llama_detokenize(const llama_vocab * vocab, const llama_token * tokens, int32_t n_tokens,
                             char * text, int32_t text_len_max, bint remove_special, bint unparse_special)

    # Chat templates
    int32_t llama_chat_apply_template(const char * tmpl, const llama_chat_message * chat, size_t n_msg,
                                      bint add_ass, char * buf, int32_t length)
    int32_t llama_chat_builtin_templates(const char ** output, size_t len)

    # Sampling
    void llama_sampler_reset(llama_sampler * smpl)
    void llama_sampler_accept(llama_sampler * smpl, llama_token token)
    void llama_sampler_free(llama_sampler * smpl)
    llama_sampler * llama_sampler_chain_init(llama_sampler_chain_params params)
    void llama_sampler_chain_add(llama_sampler * chain, llama_sampler * smpl)
    llama_sampler * llama_sampler_init_greedy()
    llama_sampler * llama_sampler_init_dist(uint32_t seed)
    llama_sampler * llama_sampler_init_top_k(int32_t k)
    llama_sampler * llama_sampler_init_top_p(float p, size_t min_keep)
    llama_sampler * llama_sampler_init_min_p(float p, size_t min_keep)
    llama_sampler * llama_sampler_init_temp(float t)
    llama_sampler * llama_sampler_init_logit_bias(int32_t n_vocab, int32_t n_logit_bias,
                                                  const llama_logit_bias * logit_bias)
    llama_sampler * llama_sampler_init_penalties(int32_t n_vocab, int32_t penalty_last_n, float penalty_repeat,
                                                 float penalty_freq, float penalty_present)
    llama_sampler * llama_sampler_init_grammar(const llama_vocab * vocab, const char * grammar_str,
                                               const char * grammar_root) except +
    llama_sampler * llama_sampler_init_grammar_lazy_patterns(
        const llama_vocab * vocab, const char * grammar_str, const char * grammar_root,
        const char ** trigger_patterns, size_t num_trigger_patterns,
        const llama_token * trigger_tokens, size_t num_trigger_tokens) except +

    const char * llama_print_system_info()

    void llama_log_set(ggml_log_callback log_callback, void * user_data)
