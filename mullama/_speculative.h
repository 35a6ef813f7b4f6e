// Speculative decoding for mullama's decode loops: what a request drafts (the
// tokens after an earlier occurrence of its last n-gram, found by llama.cpp's own
// common_ngram_simple_draft, or a draft model's greedy continuation) and how the
// draft length adapts to what the model accepts.
//
// A draft is verified in one batched decode of the pending token and the draft,
// with logits for every row; the loop samples row after row with the request's own
// sampling and keeps the draft while the sampled token equals it. The drafts are
// point masses, so this is standard speculative sampling: the accepted token has
// the target's probability and a rejection samples the residual distribution. As
// every row is sampled only after the rows before it were accepted, the samplers
// (penalties, grammar, random state) see exactly what a plain decode shows them.
//
// The cost of a verification grows with the draft (a CPU computes each row); a
// draft that is rejected at once is pure loss. So the most tokens drafted (`cap`)
// doubles after a fully accepted draft and drops to what was accepted (at least
// one) after a rejection, and after `STRIKES` drafts in a row with nothing
// accepted drafting pauses for a number of steps that doubles each time (up to
// `MAX_PAUSE`): on free-form text, where drafts are rarely right, speculation
// switches itself off.

#pragma once

#include <algorithm>
#include <vector>

#include "llama.h"
#include "ngram-map.h"

namespace mullama {

struct Speculation {
    static const int STRIKES = 2;      // rejected drafts in a row before a pause
    static const int MAX_PAUSE = 256;  // the longest pause, in steps

    // settings
    bool use_model = false;  // drafts come from a draft model (DraftModel in _core.pyx), not prompt lookup
    int ngram_min = 3;    // the shortest n-gram looked up (longest first)
    int ngram_max = 5;
    int max_draft = 16;   // most tokens in a draft

    // adaptation (one generation)
    int cap = 16;         // most tokens in the next draft
    int strikes = 0;      // drafts in a row that had nothing accepted
    int pause = 0;        // steps left without a draft
    int next_pause = 8;   // the next pause's length

    // counters (one generation)
    long drafts = 0;      // verifications
    long drafted = 0;     // tokens drafted
    long accepted = 0;    // drafted tokens the model accepted

    std::vector<llama_token> draft;  // the draft being verified
    std::vector<llama_token> hist;   // scratch: the history before the pending token

    void reset() {
        cap = max_draft;
        strikes = 0;
        pause = 0;
        next_pause = 8;
        drafts = drafted = accepted = 0;
        draft.clear();
    }

    // record a verification of `n` drafted tokens, `n_acc` of them accepted
    void record(int n, int n_acc) {
        drafts++;
        drafted += n;
        accepted += n_acc;
        if (n_acc == n) {
            cap = std::min(max_draft, cap * 2);
        } else {
            cap = std::max(1, n_acc);
        }
        if (n_acc > 0) {
            strikes = 0;
            next_pause = 8;
        } else if (++strikes >= STRIKES) {
            strikes = 0;
            pause = next_pause;
            next_pause = std::min(MAX_PAUSE, next_pause * 2);
        }
    }

    // whether this step may draft (a pause counts down one step)
    bool ready() {
        if (pause > 0) {
            pause--;
            return false;
        }
        return true;
    }
};

// Prompt lookup: the draft (at most `most` tokens, in s->draft) that follows the
// latest earlier occurrence of the last n-gram of `hist` and then `last` (the
// pending token), trying n from ngram_max down to ngram_min. Returns its length
// (0, no draft, also when memory runs out: a draft is only an optimisation).
inline int lookup_draft(Speculation * s, const std::vector<llama_token> & hist, llama_token last,
                        int most) noexcept {
    s->draft.clear();
    most = std::min(most, s->cap);
    if (most < 1 || hist.empty()) {
        return 0;
    }
    try {
        for (int n = s->ngram_max; n >= s->ngram_min; n--) {
            common_ngram_simple_config config;
            config.size_ngram = (uint16_t) n;
            config.size_mgram = (uint16_t) std::max(most, n);  // (it drafts nothing shorter than n)
            s->draft = common_ngram_simple_draft(config, hist, last);
            if (!s->draft.empty()) {
                break;
            }
        }
    } catch (...) {
        s->draft.clear();
    }
    if ((int) s->draft.size() > most) {
        s->draft.resize(most);
    }
    return (int) s->draft.size();
}

// s->hist made the history before the pending token: `tokens` without its last
// (the lookup and the draft model take the history as a vector of its own).
// False when memory runs out.
inline bool history_before_last(Speculation * s, const std::vector<llama_token> & tokens) noexcept {
    try {
        s->hist.assign(tokens.begin(), tokens.end() - (tokens.empty() ? 0 : 1));
        return true;
    } catch (...) {
        return false;
    }
}

}  // namespace mullama
