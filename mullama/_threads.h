// mullama's compute-thread governor: how many threads a llama.cpp context
// decodes with, chosen step by step from the steps' own times.
//
// Why: ggml's compute threads meet at a spinning barrier after every graph
// node (hundreds per token). When they want more cores than the machine gives
// them (another process, the process's own Python threads, other contexts),
// a thread that waits spins while the one it waits for is descheduled, and
// when both share one core every barrier costs a whole scheduler slice: a
// decode step of 12 ms took seconds. One thread has no barrier and cannot
// collapse. The governor runs each context at the thread count that is
// fastest now:
//
//   * a watchdog: a step that runs far longer than this kind of step takes
//     (4x its quiet time, or 2x the time at one thread fewer while probing)
//     is aborted through the abort callback, rolled back by the caller and
//     run again with one thread fewer, so a collapsed step costs a bounded
//     time instead of seconds;
//   * trials: when steps get slower than their quiet time, a few steps run
//     with one thread fewer and the faster count is kept; when fewer threads
//     than the maximum are in use, a few steps are tried with one more, at
//     intervals that double while the extra thread does not pay (so a quiet
//     machine gets its threads back within a fraction of a second, and a busy
//     one pays for rare, short probes). On Linux a probe waits until the
//     cores this process may use were idle for at least half a core since the
//     last look (/proc/stat): a busy machine then pays for no probe at all.
//     A trial ends early when its first steps already decide;
//   * one ggml thread pool per thread count in use, the others paused: the
//     workers of a pool poll for work after a graph, so a pool larger than the
//     thread count would keep an unused thread spinning.
//
// Steps are compared only with steps of the same size (tokens per decode, in
// power-of-two buckets). The governor's clock is the sum of the step times it
// saw, so tests drive it deterministically by feeding step times. Thread
// counts never change results: ggml splits work by rows, the same arithmetic
// whatever the count.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#ifdef __linux__
#include <sched.h>
#include <unistd.h>
#endif

#include "ggml-cpu.h"
#include "llama.h"

namespace mullama {

static inline double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// What llama.cpp's abort callback reads: cancellation flags and the watchdog.
struct AbortState {
    int flags[2];           // [0] cancel()/close(), [1] the engine: a slot was cancelled
    const int *shutdown;    // interpreter exit
    double deadline;        // watchdog: abort a decode still running at this time (0: off)
    int fired;              // the watchdog aborted the running decode
    unsigned calls;
};

static inline void abort_state_init(AbortState *a, const int *shutdown) {
    a->flags[0] = a->flags[1] = 0;
    a->shutdown = shutdown;
    a->deadline = 0.0;
    a->fired = 0;
    a->calls = 0;
}

// Idle time of the CPUs this process may run on, in seconds, summed over them
// (/proc/stat's idle and iowait); negative where there is no such file.
static inline double idle_cpu_seconds() {
#ifdef __linux__
    cpu_set_t mine;
    if (sched_getaffinity(0, sizeof mine, &mine) != 0) return -1.0;
    FILE *f = std::fopen("/proc/stat", "r");
    if (f == nullptr) return -1.0;
    static const double tick = 1.0 / (double)sysconf(_SC_CLK_TCK);
    char line[512];
    double idle = 0.0;
    while (std::fgets(line, sizeof line, f)) {
        if (std::strncmp(line, "cpu", 3) != 0) break;  // the cpu lines come first
        if (line[3] < '0' || line[3] > '9') continue;  // the "cpu " total line
        char *p = line + 3;
        long cpu = std::strtol(p, &p, 10);
        unsigned long long v[5] = {0, 0, 0, 0, 0};     // user nice system idle iowait
        for (int i = 0; i < 5; i++) v[i] = std::strtoull(p, &p, 10);
        if (cpu >= 0 && cpu < CPU_SETSIZE && CPU_ISSET(cpu, &mine)) idle += (double)(v[3] + v[4]) * tick;
    }
    std::fclose(f);
    return idle;
#else
    return -1.0;
#endif
}

static inline bool abort_state_cancelled(const AbortState *a) {
    return __atomic_load_n(&a->flags[0], __ATOMIC_ACQUIRE) || __atomic_load_n(&a->flags[1], __ATOMIC_ACQUIRE) ||
           __atomic_load_n(a->shutdown, __ATOMIC_ACQUIRE);
}

// Called by ggml's first compute thread after every graph node.
static inline bool abort_callback(void *data) {
    AbortState *a = static_cast<AbortState *>(data);
    if (abort_state_cancelled(a)) return true;
    // the clock is read every 4th node: a node takes microseconds when the step is healthy
    if (a->deadline > 0.0 && (++a->calls & 3u) == 0 && now_s() > a->deadline) {
        a->fired = 1;
        return true;
    }
    return false;
}

class ThreadGovernor {
  public:
    static constexpr int NB = 12;            // step-size buckets: bit length of the token count
    static constexpr int RING = 8;           // recent step times kept per bucket
    static constexpr int TRIAL = 4;          // steps a trial measures
    static constexpr double SLOW = 1.5;      // steps this much slower than quiet start a trial with fewer threads
    static constexpr double UP_GAIN = 0.25;  // one more thread is kept if it brings a quarter of its ideal gain
    static constexpr double WATCH = 4.0;     // watchdog: this many times the step's quiet time
    static constexpr double WATCH_MIN = 0.004;
    static constexpr double RISE = 1.0 / 32;  // the quiet time drifts up this much per step: it follows
                                              // the context's growth and the machine's drift
    static constexpr double GAP_MIN = 0.05;  // seconds of steps between trials, doubling while they fail
    static constexpr double GAP_MAX = 5.0;

    int n_max;
    int level;              // threads in use (outside a trial)
    bool adaptive;
    double first_cap;       // watchdog when nothing is known about a step's size yet (seconds)
    double forced_limit = 0.0;  // tests: the watchdog limit of every step (0: computed)
    double idle_cores = -2.0;   // tests: idle cores to assume at a probe (-2: measure; -1: unknown)
    // statistics
    long steps = 0, changes = 0, watchdog_aborts = 0, trials = 0;
    double last_step = 0.0, clock = 0.0;

    ThreadGovernor(int n_max_, bool adaptive_, int start, double first_cap_)
        : n_max(std::max(1, n_max_)), adaptive(adaptive_), first_cap(first_cap_),
          floor_(NB * (std::max(1, n_max_) + 1), 0.0) {
        level = adaptive ? std::min(std::max(start, 1), n_max) : n_max;
        for (int b = 0; b < NB; b++) ring_n_[b] = ring_pos_[b] = 0;
    }

    ~ThreadGovernor() { release(); }

    // Use *ctx* (borrowed); the governor attaches its pools to it.
    bool bind(llama_context *ctx) {
        ctx_ = ctx;
        applied_ = 0;
        if (adaptive && idle_cores <= -2.0) {    // the first look at the CPUs, for the first probe
            idle_at_ = idle_cpu_seconds();
            idle_t_ = now_s();
        }
        return apply(level) == level || apply(n_max) == n_max;
    }

    // Free the pools: after the context that used them is freed.
    void release() {
        for (auto &p : pools_) ggml_threadpool_free(p.second);
        pools_.clear();
        ctx_ = nullptr;
        applied_ = 0;
    }

    int threads() const { return trial_level_ ? trial_level_ : level; }

    // Use *threads* from the next step on (tests; the governor may move on from there).
    void force(int threads) {
        trial_level_ = 0;
        set_level(std::min(std::max(threads, 1), n_max));
    }

    // Before a decode of *n* tokens: set its thread count, arm the watchdog.
    int begin(int n, AbortState *ab) {
        int want = apply(threads());
        ab->fired = 0;
        ab->calls = 0;
        double lim = adaptive && want > 1 ? limit(bucket(n), want, n) : 0.0;
        ab->deadline = lim > 0.0 ? now_s() + lim : 0.0;
        return want;
    }

    // The watchdog limit of a step of *n* tokens at *threads*, in seconds (0: none).
    double limit(int b, int threads, int n) const {
        if (forced_limit > 0.0) return forced_limit;
        double lim, f = floor_at(b, threads);
        if (f > 0.0) {
            lim = WATCH * f;
        } else {                                 // a first step of this size: a generous limit
            double e = estimate(b, threads, n);
            lim = e > 0.0 ? 2 * WATCH * e : first_cap * std::max(1.0, n / 32.0);
        }
        if (trial_level_ > level) {  // probing one more thread: it must not be much slower than one fewer
            double fewer = floor_at(b, trial_level_ - 1);
            if (fewer <= 0.0) fewer = estimate(b, trial_level_ - 1, n);
            if (fewer > 0.0) lim = std::min(lim, 2.0 * fewer);
        }
        return std::max(lim, WATCH_MIN);
    }

    // After the decode: its wall time, and whether the watchdog aborted it
    // (then the caller rolls it back and runs it again).
    void end(int n, double elapsed, bool watchdog) {
        int b = bucket(n), used = applied_ ? applied_ : threads();
        steps++;
        last_step = elapsed;
        clock += elapsed;
        if (!adaptive) {
            note(b, used, elapsed);
            return;
        }
        if (watchdog) {
            watchdog_aborts++;
            if (trial_level_ > level) {          // the extra thread does not pay: stop probing for a while
                end_trial(false);
            } else {                             // collapsing here: one thread fewer at once, and one
                trial_level_ = 0;                // probe back soon, whatever /proc/stat says (a single
                set_level(std::max(1, used - 1));  // slow step may be a hiccup of the machine)
                down_gap_ = GAP_MIN;
                probe_gap_ = GAP_MIN;
                next_probe_ = clock;
                probe_now_ = true;
            }
            return;
        }
        note(b, used, elapsed);
        if (trial_level_) {
            trial_steps_++;
            if (b == trial_bucket_) trial_t_[trial_got_++] = elapsed;
            // fewer threads are kept when no slower; one more when it pays (L -> L+1 ideally
            // divides the time by (L+1)/L); two steps decide when they agree by a wide margin
            double m = trial_got_ ? median(trial_t_, trial_got_) : 0.0, gain = 1.0 - UP_GAIN / trial_level_;
            bool down = trial_level_ < level;
            if (trial_got_ == TRIAL) {
                end_trial(down ? m <= trial_base_ : m < gain * trial_base_);
            } else if (trial_got_ >= 2 && !down && (m < 0.8 * gain * trial_base_ || m > 1.2 * trial_base_)) {
                end_trial(m < gain * trial_base_);
            } else if (trial_got_ >= 2 && down && (m < 0.8 * trial_base_ || m > 1.5 * trial_base_)) {
                end_trial(m <= trial_base_);
            } else if (trial_steps_ >= 4 * TRIAL) {
                trial_level_ = 0;                // the step sizes changed: no verdict
            }
            return;
        }
        if (level > 1 && clock >= next_down_) {
            double recent[RING];
            int k = recent_at(b, level, recent, 3);
            if (k == 3 && median(recent, 3) > SLOW * floor_at(b, level)) {
                k = recent_at(b, level, recent, RING);
                start_trial(level - 1, b, median(recent, k));
                return;
            }
        }
        if (level < n_max && clock >= next_probe_) {
            double recent[RING];
            int k = recent_at(b, level, recent, RING);
            if (k < 2) return;
            if (!probe_now_ && !room_for_one_more()) {   // no idle core to take: look again later
                next_probe_ = clock + probe_gap_;
                return;
            }
            start_trial(level + 1, b, median(recent, k));
        }
    }

    // The quiet step time of bucket *b* at *threads* (0: unknown).
    double floor_at(int b, int threads) const { return floor_[b * (n_max + 1) + threads]; }

    static int bucket(int n) {
        int b = 0;
        while (n > 0 && b < NB - 1) {
            n >>= 1;
            b++;
        }
        return b;
    }

  private:
    std::vector<double> floor_;
    double ring_t_[NB][RING];
    int ring_l_[NB][RING];
    int ring_pos_[NB], ring_n_[NB];
    int trial_level_ = 0, trial_bucket_ = -1, trial_got_ = 0, trial_steps_ = 0;
    double trial_t_[TRIAL];
    double trial_base_ = 0.0;
    double next_probe_ = 0.0, probe_gap_ = GAP_MIN;
    bool probe_now_ = false;                 // the next probe skips the look at /proc/stat
    double next_down_ = 0.0, down_gap_ = GAP_MIN;
    double idle_at_ = -1.0, idle_t_ = 0.0;  // the last look at the CPUs' idle time
    llama_context *ctx_ = nullptr;
    std::vector<std::pair<int, ggml_threadpool *>> pools_;  // by thread count; the front was used last
    int applied_ = 0;

    void note(int b, int threads, double t) {
        double &f = floor_[b * (n_max + 1) + threads];
        f = f > 0.0 ? std::min(f * (1.0 + RISE), t) : t;
        ring_t_[b][ring_pos_[b]] = t;
        ring_l_[b][ring_pos_[b]] = threads;
        ring_pos_[b] = (ring_pos_[b] + 1) % RING;
        ring_n_[b] = std::min(ring_n_[b] + 1, RING);
    }

    // the last (up to) *want* step times of bucket *b* at *threads*, newest first
    int recent_at(int b, int threads, double *out, int want) const {
        int k = 0;
        for (int i = 1; i <= ring_n_[b] && k < want; i++) {
            int j = (ring_pos_[b] - i + RING) % RING;
            if (ring_l_[b][j] == threads) out[k++] = ring_t_[b][j];
        }
        return k;
    }

    static double median(const double *v, int n) {  // 1 <= n <= 8
        double s[RING > TRIAL ? RING : TRIAL];
        for (int i = 0; i < n; i++) {            // insertion sort: n <= 8
            int j = i;
            for (; j > 0 && s[j - 1] > v[i]; j--) s[j] = s[j - 1];
            s[j] = v[i];
        }
        return n % 2 ? s[n / 2] : 0.5 * (s[n / 2 - 1] + s[n / 2]);
    }

    // A step's time estimated from other buckets or thread counts (0: nothing known).
    double estimate(int b, int threads, int n) const {
        for (int d = 1; d <= n_max; d++) {       // the same size at the nearest thread count
            if (threads + d <= n_max && floor_at(b, threads + d) > 0.0)
                return floor_at(b, threads + d) * (threads + d) / threads;
            if (threads - d >= 1 && floor_at(b, threads - d) > 0.0) return floor_at(b, threads - d);
        }
        for (int d = 1; d < NB; d++) {            // the nearest size at this thread count, scaled up:
            for (int c : {b - d, b + d}) {        // decode steps cost little more than one token,
                if (c < 1 || c >= NB || floor_at(c, threads) <= 0.0) continue;   // prompt steps
                double rep = 1.5 * (1 << (c - 1));                               // cost per token
                return floor_at(c, threads) * (c < b ? n / rep : (n + 16.0) / (rep + 16.0));
            }
        }
        return 0.0;
    }

    // Were this process's CPUs idle for half a core or more since the last look?
    // (True where that cannot be known: the probe itself then decides.)
    bool room_for_one_more() {
        if (idle_cores > -2.0) return idle_cores < 0.0 || idle_cores >= 0.5;
        double idle = idle_cpu_seconds(), t = now_s();
        if (idle < 0.0) return true;
        double before = idle_at_, since = t - idle_t_;
        if (before < 0.0) {                      // the first look: decide at the next
            idle_at_ = idle;
            idle_t_ = t;
            return false;
        }
        if (since < 0.1) return false;           // too short for the kernel's ticks
        idle_at_ = idle;
        idle_t_ = t;
        return (idle - before) / since >= 0.5;
    }

    void start_trial(int threads, int b, double base) {
        probe_now_ = false;
        trials++;
        trial_level_ = threads;
        trial_bucket_ = b;
        trial_got_ = trial_steps_ = 0;
        trial_base_ = base;
    }

    void end_trial(bool keep) {
        bool up = trial_level_ > level;
        int t = trial_level_;
        trial_level_ = 0;
        if (keep) {
            set_level(t);
            probe_gap_ = down_gap_ = GAP_MIN;    // keep climbing (or descending) while it pays
            next_probe_ = next_down_ = clock + (up ? 0.0 : GAP_MIN);
        } else if (up) {
            probe_gap_ = std::min(2 * probe_gap_, GAP_MAX);
            next_probe_ = clock + probe_gap_;
        } else {
            down_gap_ = std::min(2 * down_gap_, GAP_MAX);
            next_down_ = clock + down_gap_;
        }
    }

    void set_level(int l) {
        if (l != level) changes++;
        level = l;
    }

    // Make the context decode with *threads* threads: its own pool, the others paused.
    int apply(int threads) {
        if (threads == applied_) return threads;
        if (ctx_ == nullptr) return applied_ = threads;   // no context: the governor alone (tests)
        ggml_threadpool *pool = nullptr;
        for (size_t i = 0; i < pools_.size(); i++) {
            if (pools_[i].first == threads) {
                pool = pools_[i].second;
                std::rotate(pools_.begin(), pools_.begin() + i, pools_.begin() + i + 1);
                break;
            }
        }
        if (pool == nullptr) {
            ggml_threadpool_params tp = ggml_threadpool_params_default(threads);
            pool = ggml_threadpool_new(&tp);
            if (pool == nullptr) return applied_ ? applied_ : threads;
            pools_.insert(pools_.begin(), {threads, pool});
            // keep at most three pools: the one in use, and the two used last
            if (pools_.size() > 3) {
                ggml_threadpool_free(pools_.back().second);
                pools_.pop_back();
            }
        }
        llama_attach_threadpool(ctx_, pool, pool);
        llama_set_n_threads(ctx_, threads, threads);
        return applied_ = threads;
    }
};

}  // namespace mullama
