"""Prometheus text exposition (format 0.0.4) of the server's metrics.

Counters and histograms of the requests, written by hand: a scrape reads
the live counters of the Runtime and the engine at that moment.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from .._errors import ClosedError

if TYPE_CHECKING:
    from .._context import ThreadStats
    from .._generation import RequestMetrics
    from ..aio import AsyncModel, Runtime

__all__ = ["ServerMetrics", "Family", "Histogram", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_RATE = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000)


class Histogram:
    """A Prometheus histogram; ``listeners`` are called with each observed value
    (:mod:`mullama.ray` forwards them to Ray's metrics)."""

    __slots__ = ("name", "help", "bounds", "counts", "total", "n", "listeners")

    def __init__(self, name: str, help: str, bounds: Sequence[float]) -> None:
        self.name = name
        self.help = help
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0
        self.n = 0
        self.listeners: List[Callable[[float], None]] = []

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1
        for listener in self.listeners:
            listener(value)

    def lines(self) -> List[str]:
        name = self.name
        out = [f"# HELP {name} {self.help}", f"# TYPE {name} histogram"]
        cumulative = 0
        for bound, count in zip(self.bounds, self.counts):
            cumulative += count
            out.append(f'{name}_bucket{{le="{_num(bound)}"}} {cumulative}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.n}')
        out.append(f"{name}_sum {_num(self.total)}")
        out.append(f"{name}_count {self.n}")
        return out


def _num(v: float) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


def _labels(labels: "Labels") -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _escape(value: str) -> str:
    """A label value as the text format writes it (backslash, quote and newline escaped)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


Labels = Tuple[Tuple[str, str], ...]


class Family(NamedTuple):
    """A counter or a gauge: its name, kind, help text and (labels, value) samples."""

    name: str
    kind: str
    help: str
    samples: List[Tuple[Labels, float]]


class ServerMetrics:
    """What the server counts; :meth:`render` writes it with the live gauges."""

    def __init__(self) -> None:
        #: (endpoint, status) -> responses
        self.responses: Dict[Tuple[str, str], int] = {}
        self.in_flight = 0
        #: finish reason -> generations (``disconnected`` when the client left)
        self.generations: Dict[str, int] = {}
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.queue = Histogram("mullama_request_queue_seconds",
                               "Time requests waited for a slot of the batching engine.", _SECONDS)
        self.first_token = Histogram("mullama_time_to_first_token_seconds",
                                     "Time from submission to the first generated token.", _SECONDS)
        self.duration = Histogram("mullama_generation_duration_seconds",
                                  "Wall time of generations, queue included.", _SECONDS)
        self.prompt_rate = Histogram("mullama_prompt_tokens_per_second",
                                     "Prompt evaluation speed of each request.", _RATE)
        self.generation_rate = Histogram("mullama_generation_tokens_per_second", "Decode speed of each request.",
                                         _RATE)
        self.histograms = (self.queue, self.first_token, self.duration, self.prompt_rate, self.generation_rate)

    def response(self, endpoint: str, status: int) -> None:
        key = (endpoint, str(status))
        self.responses[key] = self.responses.get(key, 0) + 1

    def generation(self, m: "RequestMetrics", duration_s: float, reason: Optional[str] = None) -> None:
        reason = reason or m.finish_reason or "unknown"
        self.generations[reason] = self.generations.get(reason, 0) + 1
        self.prompt_tokens += m.prompt_tokens
        self.generated_tokens += m.generated_tokens
        self.queue.observe(m.queue_ms / 1e3)
        self.duration.observe(duration_s)
        if m.generated_tokens:
            self.first_token.observe(m.time_to_first_token_ms / 1e3)
            self.prompt_rate.observe(m.prompt_tokens_per_s)
        if m.generated_tokens > 1:
            self.generation_rate.observe(m.generation_tokens_per_s)

    def render(self, model: Optional["AsyncModel"], runtime: Optional["Runtime"]) -> str:
        """The text exposition: the histograms after the counters and gauges of :meth:`families`."""
        out: List[str] = []
        for f in self.families(model, runtime):
            out.append(f"# HELP {f.name} {f.help}")
            out.append(f"# TYPE {f.name} {f.kind}")
            out.extend(f"{f.name}{_labels(labels)} {_num(value)}" for labels, value in f.samples)
        for h in self.histograms:
            out.extend(h.lines())
        return "\n".join(out) + "\n"

    def families(self, model: Optional["AsyncModel"], runtime: Optional["Runtime"]) -> List["Family"]:
        """The counters and gauges now: the server's own, and the live ones of
        ``model``'s engine and of ``runtime`` (each omitted if None)."""
        out: List[Family] = []

        def metric(name: str, kind: str, help: str, samples: Sequence[Tuple[Labels, float]]) -> None:
            out.append(Family(name, kind, help, list(samples)))

        metric("mullama_http_responses_total", "counter", "HTTP responses by endpoint and status code.",
               [((("endpoint", e), ("status", s)), n) for (e, s), n in sorted(self.responses.items())])
        metric("mullama_http_requests_in_flight", "gauge", "HTTP requests being answered now.",
               [((), self.in_flight)])
        metric("mullama_generations_total", "counter",
               "Generations ended, by finish reason (disconnected: the client left).",
               [((("finish_reason", r),), n) for r, n in sorted(self.generations.items())])
        metric("mullama_prompt_tokens_total", "counter", "Prompt tokens of ended generations.",
               [((), self.prompt_tokens)])
        metric("mullama_generated_tokens_total", "counter", "Tokens generated by ended generations.",
               [((), self.generated_tokens)])
        if model is not None:
            cfg = model.config
            metric("mullama_engine_slots", "gauge", "Requests the batching engine decodes together (max_concurrent).",
                   [((), cfg.max_concurrent)])
            metric("mullama_engine_active_requests", "gauge", "Requests holding a slot now.",
                   [((), model.active_workers)])
            metric("mullama_engine_waiting_requests", "gauge", "Requests queued for a slot now.",
                   [((), model.waiting)])
            metric("mullama_engine_max_queue", "gauge", "Queue length beyond which requests get 503.",
                   [((), cfg.max_queue)])
            metric("mullama_kv_cells_used", "gauge", "KV cache cells held by running requests.",
                   [((), model.kv_used())])
            pc = model.prompt_cache_stats()
            metric("mullama_prompt_tokens_cached_total", "counter",
                   "Prompt tokens reused from the prompt cache rather than evaluated.", [((), pc.cached_prompt_tokens)])
            metric("mullama_prompt_tokens_evaluated_total", "counter", "Prompt tokens evaluated.",
                   [((), pc.evaluated_prompt_tokens)])
            metric("mullama_prompt_tokens_refreshed_total", "counter",
                   "Generated tokens evaluated again in idle steps so that follow-up requests reuse them.",
                   [((), pc.refreshed_tokens)])
            metric("mullama_prompt_cache_decoded_cells_reused", "gauge",
                   "1 if generated tokens' KV cells are reused as they are (nothing refreshed), else 0.",
                   [((), int(pc.decoded_cells_reused))])
            metric("mullama_prompt_cache_slot_cells", "gauge",
                   "KV cells free slots keep for later prompts (inside the KV cache allocated at load).",
                   [((), pc.slot_cells)])
            metric("mullama_prompt_cache_bytes", "gauge", "Bytes the host-memory prompt cache holds.",
                   [((), pc.host_bytes)])
            metric("mullama_prompt_cache_budget_bytes", "gauge", "The host-memory prompt cache's budget.",
                   [((), pc.host_budget)])
            metric("mullama_prompt_cache_entries", "gauge", "Sequences the host-memory prompt cache holds.",
                   [((), pc.host_entries)])
            metric("mullama_prompt_cache_evictions_total", "counter",
                   "Sequences evicted from the host-memory prompt cache to stay within its budget.",
                   [((), pc.host_evictions)])
            sp = model.speculative_stats()
            metric("mullama_speculative_drafts_total", "counter",
                   "Drafts verified by speculative decoding (one batched decode each), of ended requests.",
                   [((), sp.drafts)])
            metric("mullama_speculative_drafted_tokens_total", "counter",
                   "Tokens drafted by speculative decoding, of ended requests.", [((), sp.drafted_tokens)])
            metric("mullama_speculative_accepted_tokens_total", "counter",
                   "Drafted tokens the model accepted (each saved a decode step), of ended requests.",
                   [((), sp.accepted_tokens)])
            metric("mullama_speculative_acceptance_rate", "gauge",
                   "Accepted drafted tokens over drafted tokens, of ended requests (0 without drafts).",
                   [((), sp.acceptance_rate)])
            metric("mullama_engine_tokens_in_flight", "gauge",
                   "Tokens generated so far by the requests holding a slot (their progress).",
                   [((), model.tokens_in_flight)])
            try:
                ts: Optional[ThreadStats] = model.thread_stats()
            except ClosedError:  # closing as we render
                ts = None
            if ts is not None:
                metric("mullama_engine_compute_threads", "gauge",
                       "Compute threads the engine decodes with now (fewer than the maximum under CPU contention).",
                       [((), ts.threads)])
                metric("mullama_engine_compute_threads_max", "gauge", "The most compute threads the engine uses.",
                       [((), ts.max_threads)])
                metric("mullama_engine_decode_steps_total", "counter", "llama_decode calls of the engine.",
                       [((), ts.steps)])
                metric("mullama_engine_thread_changes_total", "counter",
                       "Times the thread governor changed the engine's compute thread count.", [((), ts.changes)])
                metric("mullama_engine_watchdog_aborts_total", "counter",
                       "Decode steps stopped for running far longer than usual (CPU contention) and run again "
                       "with fewer threads.", [((), ts.watchdog_aborts)])
                metric("mullama_engine_last_step_seconds", "gauge", "Wall time of the engine's last decode step.",
                       [((), ts.last_step_ms / 1e3)])
        if runtime is not None:
            rm = runtime.metrics()
            metric("mullama_runtime_active_tasks", "gauge", "Runtime tasks and blocking calls running now.",
                   [((), rm.active_tasks)])
            metric("mullama_runtime_completed_tasks_total", "counter", "Runtime tasks and blocking calls ended.",
                   [((), rm.completed_tasks)])
            metric("mullama_runtime_worker_threads", "gauge", "llama.cpp compute threads per model.",
                   [((), rm.worker_threads)])
            metric("mullama_runtime_blocking_threads", "gauge", "Threads running blocking calls now.",
                   [((), rm.blocking_threads)])
            metric("mullama_runtime_generations_total", "counter", "Generations finished by the runtime's models.",
                   [((), rm.total_generations)])
            metric("mullama_runtime_generation_seconds_avg", "gauge", "Mean wall time of those generations.",
                   [((), rm.avg_generation_ms / 1e3)])
            metric("mullama_runtime_uptime_seconds", "gauge", "Time since the runtime started.",
                   [((), rm.uptime_seconds)])
        return out
