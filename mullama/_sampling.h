// Sampling for mullama's decode loops: a sampler chain (or plain argmax) plus an
// optional grammar, without the dead ends that abort the process.
//
// llama_sampler_sample() with a grammar in the chain selects *some* token even
// when the grammar allows none, and then accepting it throws (or GGML_ABORTs for
// an end-of-generation token). Here the grammar is kept beside the chain, as
// llama.cpp's common_sampler does it (common/sampling.cpp): sample from the chain,
// check the one token against the grammar, and only when it is refused apply the
// grammar to the whole vocabulary and sample again. A grammar that allows no
// token, or one whose accept throws, is a dead end reported to the caller.
//
// llama.cpp's grammar matches code points, but its UTF-8 decoder takes bytes that
// are not UTF-8 (a token of lead bytes F8-FF, overlong forms, surrogates) as
// code points, so a constrained string could hold invalid text. With a grammar
// the output is also kept valid UTF-8 here: a token that would break it is
// refused like one the grammar refuses.
//
// The grammar syntax check (grammar_error) runs llama.cpp's own GBNF parser
// (src/llama-grammar.h, the pinned version) so the error can be named: llama.cpp
// prints it to stderr and only returns NULL.

#pragma once

#include <algorithm>
#include <cmath>
#include <exception>
#include <string>
#include <vector>

#include "llama.h"
#include "llama-grammar.h"

namespace mullama {

// where a UTF-8 byte stream is: how many continuation bytes it still needs and
// the range the next one must be in (RFC 3629: no overlong forms, no surrogates)
struct Utf8 {
    int need = 0;
    unsigned char lo = 0x80, hi = 0xBF;
};

// advance *u* over *n* bytes; false (and *u* unchanged) if they are not UTF-8
inline bool utf8_feed(Utf8 * u, const char * s, int n) {
    Utf8 v = *u;
    for (int i = 0; i < n; i++) {
        unsigned char c = (unsigned char) s[i];
        if (v.need > 0) {
            if (c < v.lo || c > v.hi) return false;
            v.need--;
            v.lo = 0x80;
            v.hi = 0xBF;
        } else if (c >= 0x80) {
            if (c < 0xC2 || c > 0xF4) return false;
            v.need = c < 0xE0 ? 1 : c < 0xF0 ? 2 : 3;
            if (c == 0xE0) v.lo = 0xA0;
            if (c == 0xED) v.hi = 0x9F;
            if (c == 0xF0) v.lo = 0x90;
            if (c == 0xF4) v.hi = 0x8F;
        }
    }
    *u = v;
    return true;
}

struct Sampling {
    llama_sampler * chain = nullptr;     // NULL: greedy (argmax)
    llama_sampler * grammar = nullptr;   // NULL: unconstrained
    const llama_vocab * vocab = nullptr; // set with the grammar: the UTF-8 guard needs token text
    Utf8 utf8;                           // the constrained output so far
    std::vector<llama_token> preserved;  // sorted: special tokens whose text the output keeps (tool-call tags)
    // a lazy grammar waits while the model thinks (between these tags), as llama.cpp's
    // common_sampler does with its reasoning budget: a tool-call marker in a thought is no call
    bool lazy = false;
    std::string think_start, think_end;
    bool thinking = false;
    std::string recent;                  // output text since the last tag
    std::vector<llama_token_data> cur;   // the candidates, reused token after token
    std::vector<unsigned char> ascii;    // per token: its text is ASCII (made at the first filtering)

    Sampling() = default;
    Sampling(const Sampling &) = delete;
    Sampling & operator=(const Sampling &) = delete;
    ~Sampling() {
        if (chain != nullptr) llama_sampler_free(chain);
        if (grammar != nullptr) llama_sampler_free(grammar);
    }
};

// what sample() returns when the grammar allows no token
static const llama_token DEAD_END = -1;

inline llama_token argmax(const float * logits, int n_vocab, float * best) {
    llama_token tok = 0;
    float b = logits[0];
    for (int j = 1; j < n_vocab; j++) {
        if (logits[j] > b) {
            b = logits[j];
            tok = j;
        }
    }
    *best = b;
    return tok;
}

// apply the chain to the candidates (what llama_sampler_sample does) or take their argmax
inline llama_token select(Sampling * s, llama_token_data_array * cur_p) {
    if (s->chain != nullptr) {
        llama_sampler_apply(s->chain, cur_p);
        if (cur_p->selected < 0 || cur_p->selected >= (int64_t) cur_p->size) {
            return DEAD_END;
        }
        return cur_p->data[cur_p->selected].id;
    }
    size_t k = 0;
    for (size_t j = 1; j < cur_p->size; j++) {
        if (cur_p->data[j].logit > cur_p->data[k].logit) k = j;
    }
    return cur_p->data[k].id;
}

inline llama_token_data_array fill(Sampling * s, const float * logits, int n_vocab) {
    s->cur.resize(n_vocab);
    for (llama_token t = 0; t < n_vocab; t++) {
        s->cur[t] = llama_token_data{t, logits[t], 0.0f};
    }
    return llama_token_data_array{s->cur.data(), s->cur.size(), -1, false};
}

// whether *tok* is written as its special text (a preserved token) rather than as nothing
inline bool special_text(const Sampling * s, llama_token tok) {
    return !s->preserved.empty() && std::binary_search(s->preserved.begin(), s->preserved.end(), tok);
}

// the state after *tok*'s text; false if it would make the output invalid UTF-8
inline bool utf8_after(const Sampling * s, llama_token tok, Utf8 * u) {
    char buf[256];
    int n = llama_token_to_piece(s->vocab, tok, buf, sizeof buf, 0, special_text(s, tok));
    *u = s->utf8;
    return n >= 0 && utf8_feed(u, buf, n);
}

// whether the grammar applies to the next token (not a lazy one while the model thinks)
inline bool grammar_active(const Sampling * s) {
    return s->grammar != nullptr && !(s->lazy && s->thinking);
}

// follow the thinking tags through the output
inline void track_thinking(Sampling * s, llama_token tok) {
    if (s->think_start.empty() || s->vocab == nullptr) return;
    char buf[256];
    int n = llama_token_to_piece(s->vocab, tok, buf, sizeof buf, 0, true);
    if (n > 0) s->recent.append(buf, n);
    for (;;) {
        const std::string & tag = s->thinking ? s->think_end : s->think_start;
        size_t at = s->recent.find(tag);
        if (at == std::string::npos) break;
        s->thinking = !s->thinking;
        s->recent.erase(0, at + tag.size());
    }
    size_t keep = std::max(s->think_start.size(), s->think_end.size());
    if (s->recent.size() > 2 * keep + 256) s->recent.erase(0, s->recent.size() - keep);
}

inline bool grammar_allows(Sampling * s, llama_token tok) {
    Utf8 u;
    if (!utf8_after(s, tok, &u)) return false;
    llama_token_data one = {tok, 1.0f, 0.0f};
    llama_token_data_array arr = {&one, 1, -1, false};
    llama_sampler_apply(s->grammar, &arr);
    return arr.data[0].logit != -INFINITY;
}

// Sample a token from *logits* and accept it into the chain and the grammar.
// Returns DEAD_END when the grammar allows no token or refuses the one taken.
// *best* is set to the largest logit when the argmax found it, else NAN.
inline llama_token sample(Sampling * s, const float * logits, int n_vocab, float * best) noexcept {
    *best = NAN;
    try {
        llama_token tok;
        if (s->chain == nullptr) {
            tok = argmax(logits, n_vocab, best);
        } else {
            llama_token_data_array cur_p = fill(s, logits, n_vocab);
            tok = select(s, &cur_p);
        }
        const bool active = grammar_active(s);
        if (active && tok != DEAD_END && !grammar_allows(s, tok)) {
            // rejected: the grammar (and the UTF-8 guard) first, then the chain, over the whole vocabulary
            llama_token_data_array cur_p = fill(s, logits, n_vocab);
            llama_sampler_apply(s->grammar, &cur_p);
            bool any = false;
            Utf8 u;
            if (s->ascii.empty()) {
                s->ascii.resize(n_vocab);
                char buf[256];
                for (llama_token t = 0; t < n_vocab; t++) {
                    int len = llama_token_to_piece(s->vocab, t, buf, sizeof buf, 0, special_text(s, t));
                    bool plain = len >= 0;
                    for (int k = 0; k < len && plain; k++) plain = (unsigned char) buf[k] < 0x80;
                    s->ascii[t] = plain;
                }
            }
            for (size_t j = 0; j < cur_p.size; j++) {
                if (cur_p.data[j].logit == -INFINITY) continue;
                if (s->utf8.need == 0 && s->ascii[cur_p.data[j].id]) {
                    any = true;  // ASCII after a whole character: always UTF-8
                } else if (!utf8_after(s, cur_p.data[j].id, &u)) {
                    cur_p.data[j].logit = -INFINITY;
                } else {
                    any = true;
                }
            }
            if (!any) {
                return DEAD_END;
            }
            tok = select(s, &cur_p);
            *best = NAN;
        }
        if (tok == DEAD_END) {
            return DEAD_END;
        }
        if (active) {
            llama_sampler_accept(s->grammar, tok);
        }
        if (s->grammar != nullptr) {
            Utf8 u;
            utf8_after(s, tok, &u);
            s->utf8 = u;
            track_thinking(s, tok);
        }
        if (s->chain != nullptr) llama_sampler_accept(s->chain, tok);
        return tok;
    } catch (const std::exception &) {
        return DEAD_END;   // the grammar could not accept the token
    }
}

// most log-probabilities of alternatives per token (OpenAI's top_logprobs bound)
static const int MAX_TOP_LOGPROBS = 20;

// Append the *k* largest logits' tokens and log-probabilities (logit - *lse*, the
// log of the softmax's sum), most likely first (ties: the lower id first), to
// *toks* and *lps*: one pass over the vocabulary with an insertion array.
inline void top_logprobs(const float * logits, int n_vocab, int k, float lse, std::vector<llama_token> & toks,
                         std::vector<float> & lps) {
    llama_token idx[MAX_TOP_LOGPROBS];
    float val[MAX_TOP_LOGPROBS];
    int m = 0;
    if (k > MAX_TOP_LOGPROBS) k = MAX_TOP_LOGPROBS;
    for (int j = 0; j < n_vocab; j++) {
        const float v = logits[j];
        if (m == k && !(v > val[m - 1])) continue;
        int p = m < k ? m++ : k - 1;
        while (p > 0 && val[p - 1] < v) {
            val[p] = val[p - 1];
            idx[p] = idx[p - 1];
            p--;
        }
        val[p] = v;
        idx[p] = j;
    }
    for (int i = 0; i < k; i++) {
        toks.push_back(i < m ? idx[i] : -1);
        lps.push_back(i < m ? val[i] - lse : -INFINITY);
    }
}

// Feed *tokens* to the grammar as if generated (e.g. the part of the reply a
// chat template already wrote). Returns false if the grammar refuses them.
inline bool grammar_prefill(Sampling * s, const llama_token * tokens, int n) noexcept {
    try {
        Utf8 u;
        for (int i = 0; i < n; i++) {
            if (grammar_active(s)) {
                // a token the grammar refuses is not accepted: accepting an end-of-generation
                // token the grammar cannot end on aborts the process
                llama_token_data one = {tokens[i], 1.0f, 0.0f};
                llama_token_data_array arr = {&one, 1, -1, false};
                llama_sampler_apply(s->grammar, &arr);
                if (one.logit == -INFINITY) return false;
                llama_sampler_accept(s->grammar, tokens[i]);
            }
            if (utf8_after(s, tokens[i], &u)) s->utf8 = u;
            track_thinking(s, tokens[i]);
        }
        return true;
    } catch (const std::exception &) {
        return false;
    }
}

// most nesting of groups, and most rules, a grammar may have: llama.cpp parses and
// walks grammars recursively, and deeper ones overflow the stack
static const int MAX_GRAMMAR_DEPTH = 500;
static const long MAX_GRAMMAR_RULES = 10000;
// most repetitions of one item ({m,n}): each is a rule of its own
static const unsigned long long MAX_GRAMMAR_REPEAT = 100000;

// What llama.cpp's parser would choke on rather than refuse (a repetition {m,n}
// with m > n wraps around and allocates until memory runs out; deep nesting or a
// long chain of rules overflows the stack): "" if none, else the problem and
// where (*offset). A lexical scan outside literals, classes, token references
// and comments; the parser checks the rest.
inline std::string grammar_limits(const std::string & src, long * offset) {
    int depth = 0;
    long rules = 0;
    const size_t n = src.size();
    for (size_t i = 0; i < n; i++) {
        const char c = src[i];
        if (c == '#') {
            while (i < n && src[i] != '\n' && src[i] != '\r') i++;
        } else if (c == '"' || c == '[' || c == '<') {
            const char end = c == '"' ? '"' : c == '[' ? ']' : '>';
            for (i++; i < n && src[i] != end; i++) {
                if (src[i] == '\\' && c != '<') i++;
            }
        } else if (c == '(') {
            if (++depth > MAX_GRAMMAR_DEPTH) {
                *offset = (long) i;
                return "groups nested more than " + std::to_string(MAX_GRAMMAR_DEPTH) + " levels deep";
            }
        } else if (c == ')') {
            depth--;
        } else if (c == ':' && src.compare(i, 3, "::=") == 0) {
            if (++rules > MAX_GRAMMAR_RULES) {
                *offset = (long) i;
                return "more than " + std::to_string(MAX_GRAMMAR_RULES) + " rules";
            }
        } else if (c == '{') {
            size_t j = i + 1;
            unsigned long long lo = 0, hi = 0;
            bool has_lo = false, has_hi = false, comma = false;
            while (j < n && (src[j] == ' ' || src[j] == '\t')) j++;
            for (; j < n && src[j] >= '0' && src[j] <= '9'; j++) {
                lo = std::min(lo * 10 + (unsigned) (src[j] - '0'), MAX_GRAMMAR_REPEAT + 1);
                has_lo = true;
            }
            while (j < n && (src[j] == ' ' || src[j] == '\t')) j++;
            if (j < n && src[j] == ',') {
                comma = true;
                for (j++; j < n && (src[j] == ' ' || src[j] == '\t'); j++) {}
                for (; j < n && src[j] >= '0' && src[j] <= '9'; j++) {
                    hi = std::min(hi * 10 + (unsigned) (src[j] - '0'), MAX_GRAMMAR_REPEAT + 1);
                    has_hi = true;
                }
            }
            if (!has_lo) continue;  // the parser names the syntax error
            if (lo > MAX_GRAMMAR_REPEAT || hi > MAX_GRAMMAR_REPEAT) {
                *offset = (long) i;
                return "a repetition of more than " + std::to_string(MAX_GRAMMAR_REPEAT) + " times";
            }
            if (comma && has_hi && lo > hi) {
                *offset = (long) i;
                return "repetition {" + std::to_string(lo) + "," + std::to_string(hi) +
                       "}: the minimum is above the maximum";
            }
        }
    }
    return "";
}

// The syntax error of a GBNF grammar ("" if it parses), found by llama.cpp's
// own parser, and the byte offset in *src* where it stopped (-1 if unknown).
inline std::string grammar_error(const llama_vocab * vocab, const std::string & src, long * offset) {
    *offset = -1;
    std::string limit = grammar_limits(src, offset);
    if (!limit.empty()) {
        return limit;
    }
    llama_grammar_parser parser(vocab);
    const char * pos = src.c_str();
    try {
        // llama_grammar_parser::parse without its stderr report: skip blank
        // space and comments, parse rules, then check every referenced rule exists
        for (;;) {
            while (*pos == ' ' || *pos == '\t' || *pos == '\r' || *pos == '\n' || *pos == '#') {
                if (*pos == '#') {
                    while (*pos && *pos != '\r' && *pos != '\n') pos++;
                } else {
                    pos++;
                }
            }
            if (!*pos) break;
            pos = parser.parse_rule(pos);
        }
        for (const auto & kv : parser.symbol_ids) {
            if (kv.second >= parser.rules.size() || parser.rules[kv.second].empty()) {
                return "undefined rule '" + kv.first + "'";
            }
        }
        const uint32_t n_vocab = vocab != nullptr ? (uint32_t) llama_vocab_n_tokens(vocab) : 0;
        for (const auto & rule : parser.rules) {
            for (const auto & elem : rule) {
                if ((elem.type == LLAMA_GRETYPE_TOKEN || elem.type == LLAMA_GRETYPE_TOKEN_NOT) && elem.value >= n_vocab) {
                    return "token id " + std::to_string(elem.value) + " is outside the vocabulary (" +
                           std::to_string(n_vocab) + " tokens)";
                }
            }
        }
    } catch (const std::exception & e) {
        // llama.cpp's messages end in " at <the rest of the grammar>"
        std::string msg = e.what();
        if (msg == "unexpected end of input") {
            *offset = (long) src.size();
            return msg;
        }
        for (size_t at = msg.find(" at "); at != std::string::npos; at = msg.find(" at ", at + 1)) {
            size_t rest = msg.size() - at - 4;
            if (rest <= src.size() && msg.compare(at + 4, rest, src, src.size() - rest, rest) == 0) {
                *offset = (long) (src.size() - rest);
                return msg.substr(0, at);
            }
        }
        return msg;
    }
    return "";
}

}  // namespace mullama
