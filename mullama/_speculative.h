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
// A verification costs more than a plain step: a CPU computes every row, and on
// this project's 2-core reference machine a batch of k + 1 tokens took about
// 1 + 0.5 k plain steps (measured on the default model). Drafting pays only when
// enough of the draft is accepted, so each generation keeps a cost model, measured
// as it goes: `t_step`, a plain step's time; `alpha`, what a drafted token adds to
// a verification, in plain steps; `p`, the chance that a drafted token is accepted
// when the one before it was. A step drafts the k tokens that maximise the expected
// tokens per cost, (1 + p + ... + p^k) / (1 + alpha k), and does not draft when no
// k beats a plain step. Then it pauses for 8 steps, 16 the next time, up to 256,
// and afterwards tries a draft again (at least one token), so that a generation
// whose drafts start to be right is noticed: on text that does not repeat its
// input, speculation costs a probe now and then.

#pragma once

#include <algorithm>
#include <vector>

#include "llama.h"
#include "ngram-map.h"

namespace mullama {

struct Speculation {
    static constexpr double P0 = 0.7;      // the acceptance chance before anything is measured
    static constexpr double ALPHA0 = 0.5;  // a drafted token's cost, in plain steps, before it is measured
    static constexpr double RATE = 0.2;    // the weight of a new measurement (exponential averages)
    static const int MAX_PAUSE = 256;      // the longest pause, in steps

    // settings
    bool use_model = false;  // drafts come from a draft model (DraftModel in _core.pyx), not prompt lookup
    int ngram_min = 3;    // the shortest n-gram looked up (longest first)
    int ngram_max = 5;
    int max_draft = 16;   // most tokens in a draft
    bool adaptive = true; // false: always draft up to max_draft (no cost model)

    // the cost model (one generation)
    double t_step = 0.0;  // seconds of a plain step (0: not measured yet)
    double alpha = ALPHA0;
    double p = P0;
    int pause = 0;        // steps left without a draft
    int next_pause = 8;   // the next pause's length

    // counters (one generation)
    long drafts = 0;      // verifications
    long drafted = 0;     // tokens drafted
    long accepted = 0;    // drafted tokens the model accepted

    std::vector<llama_token> draft;  // the draft being verified
    std::vector<llama_token> hist;   // scratch: the history before the pending token

    void reset() {
        t_step = 0.0;
        alpha = ALPHA0;
        p = P0;
        pause = 0;
        next_pause = 8;
        drafts = drafted = accepted = 0;
        draft.clear();
    }

    // the draft length worth verifying now (at most `most`; 0: draft nothing this step)
    int length(int most) {
        most = std::min(most, max_draft);
        if (most < 1 || !adaptive) {
            return most < 1 ? 0 : most;
        }
        if (pause > 0) {
            pause--;
            return pause == 0 ? std::max(1, best(most)) : 0;  // (the pause's last step tries again)
        }
        int k = best(most);
        if (k == 0) {
            pause = next_pause;
            next_pause = std::min(MAX_PAUSE, next_pause * 2);
        }
        return k;
    }

    // the k <= most with the most expected tokens per cost, 0 if none beats a plain step
    int best(int most) const {
        double e = 1.0, pk = 1.0, value = 1.0;
        int k_best = 0;
        for (int k = 1; k <= most; k++) {
            pk *= p;
            e += pk;
            double v = e / (1.0 + alpha * k);
            if (v > value) {
                value = v;
                k_best = k;
            }
        }
        return k_best;
    }

    // a plain step (one token) took `seconds`
    void plain_step(double seconds) {
        t_step = t_step == 0.0 ? seconds : (1.0 - RATE) * t_step + RATE * seconds;
    }

    // a verification of `n` drafted tokens took `seconds`; `n_acc` of them were accepted
    void record(int n, int n_acc, double seconds) {
        drafts++;
        drafted += n;
        accepted += n_acc;
        for (int i = 0; i < n_acc; i++) {
            p = (1.0 - RATE) * p + RATE;
        }
        if (n_acc < n) {
            p = (1.0 - RATE) * p;
        }
        if (t_step > 0.0 && n > 0) {
            double a = (seconds / t_step - 1.0) / n;
            alpha = std::min(4.0, std::max(0.05, (1.0 - RATE) * alpha + RATE * a));
        }
        if (n_acc > 0) {
            next_pause = 8;
        }
    }
};

// Prompt lookup: the draft (at most `most` tokens, in s->draft) that follows the
// latest earlier occurrence of the last n-gram of `hist` and then `last` (the
// pending token), trying n from ngram_max down to ngram_min. Returns its length
// (0, no draft, also when memory runs out: a draft is only an optimisation).
inline int lookup_draft(Speculation * s, const std::vector<llama_token> & hist, llama_token last,
                        int most) noexcept {
    s->draft.clear();
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
