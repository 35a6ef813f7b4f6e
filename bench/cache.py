#!/usr/bin/env python3
"""The prompt cache: what reusing a prompt's KV cells saves, in mullama and in
llama-server (built from the same pinned llama.cpp source, ``cache_prompt`` on),
same model, same prompts (as token ids), same run. One JSON line per figure.

* ``cache_chat_ttft``: a 10-turn chat on the default model, the whole history
  resent on every turn (2,000+ tokens by the last), through ``mullama serve``
  and llama-server with one slot each. Each turn streams a greedy reply of up
  to ``--reply-tokens`` tokens, which becomes the assistant message of the
  history, then waits ``think`` seconds (a user reading and typing; the figure
  is given for ``--think`` and for 0, an agent calling back at once). Time to
  first token of the last turn, client side: cached (the conversation so far
  was sent turn by turn) and cold (the same prompt after a different first
  line, so that nothing matches). Targets: mullama's cached ÷ cold ≤ 0.1;
  mullama's cached TTFT ÷ llama-server's ≤ 1.
* ``cache_shared_prefix``: 8 concurrent requests sharing a 1,000-token system
  prompt (4 slots each), against 8 requests whose system prompts differ in
  their first line; aggregate prompt throughput = prompt tokens ÷ time until
  the last request's first token. Target: mullama's shared ÷ distinct ≥ 5.
  A third line gives mullama's ``--inexact-prompt-cache`` (generated cells
  reused as llama-server does) at think time 0.
* ``cache_n_choices``: ``n=4`` completions of one prompt (``AsyncModel.generate_many``,
  ``--choice-tokens`` sampled tokens each) against 4 requests of 4 different prompts of the same
  length, on the default model with 4 slots, in process: prompt tokens evaluated (counted by the engine),
  wall time, and aggregate decode tok/s (tokens after each choice's first, over the span from the first
  first token to the last token). Targets: the prompt evaluated once (plus the two tokens each copy
  evaluates); decode ≥ the 4-request figure.
* ``cache_soak``: ``--soak`` requests with random prefixes (one of 60 prompts
  of 30-150 words, a random suffix), two at a time, through ``AsyncModel`` with a small
  host-memory budget (``--soak-budget-mb``): the host cache's bytes never above
  the budget (checked after every request), and the process's RSS growth against
  the same soak without the cache, each run in a process of its own (target: the
  difference within the budget); also the resident memory emptying the cache
  (``clear_prompt_cache``) gives back.

Rounds alternate the two servers; each round starts a new conversation (its
own first line), so no round is served from an earlier one's cache. Medians
over ``--rounds``. ``--busy N`` runs N CPU-bound processes during the whole
measurement (a busy machine).

Usage: python bench/cache.py [--rounds 3] [--turns 10] [--soak 1000] [--busy 0]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import anyio
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import mullama  # noqa: E402
from mullama import StreamConfig  # noqa: E402
from mullama._chat import chat_tokens  # noqa: E402
from mullama.aio import AsyncModel  # noqa: E402

from _probes import rss  # noqa: E402
from _servers import llama_server, llama_server_binary, mullama_serve  # noqa: E402

THREADS = 2
N_CTX = 4096
TOPICS = ["the tides", "bread", "volcanoes", "chess openings", "bees", "glaciers", "the printing press",
          "comets", "coral reefs", "windmills", "the violin", "deserts"]


def _log(msg: str) -> None:
    print(f"[cache] {msg}", file=sys.stderr, flush=True)


def user_message(turn: int) -> str:
    topic = TOPICS[turn % len(TOPICS)]
    return (f"Turn {turn}. Tell me about {topic}. I would like to know how it works, where it can be seen, "
            f"what people have believed about it over the centuries, and one surprising fact. "
            f"Please keep the tone friendly, because I will ask about other things too.")


def system_message(first_line: str) -> Dict[str, str]:
    return {"role": "system", "content": f"{first_line}\nYou are a friendly assistant who gives detailed answers."}


# -- the two servers -------------------------------------------------------------------

def _client() -> httpx.AsyncClient:
    """A new connection per request (llama-server closes a connection after a stream, which a reused one
    would run into); the same for both servers."""
    return httpx.AsyncClient(limits=httpx.Limits(max_connections=64, max_keepalive_connections=0))


async def ttft(client: httpx.AsyncClient, side: str, url: str, prompt: Sequence[int],
               max_tokens: int) -> "tuple[float, str]":
    """Seconds from sending a streaming request to its first generated text, and
    the text; the stream is read to its end."""
    if side == "mullama":
        path, body = "/v1/completions", {"model": "bench", "prompt": list(prompt), "max_tokens": max_tokens,
                                         "temperature": 0, "stream": True}
    else:
        path, body = "/completion", {"prompt": list(prompt), "n_predict": max_tokens, "temperature": 0,
                                     "stream": True, "cache_prompt": True}
    t0 = time.perf_counter()
    first: Optional[float] = None
    text = []
    async with client.stream("POST", url + path, json=body, timeout=600) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if first is None:
                first = time.perf_counter() - t0
            data = json.loads(line[6:])
            text.append(data["choices"][0]["text"] if side == "mullama" else data.get("content", ""))
    if first is None:
        raise RuntimeError(f"{side} streamed no token")
    return first, "".join(text)


# -- figures -----------------------------------------------------------------------------

async def chat_round(model: mullama.Model, servers: Dict[str, str], rnd: int, turns: int, reply_tokens: int,
                     think: float) -> Dict[str, Dict[str, object]]:
    out: Dict[str, Dict[str, object]] = {}
    order = list(servers) if rnd % 2 == 0 else list(reversed(servers))
    async with _client() as client:
        for side in order:
            url = servers[side]
            tag = random.random()
            messages = [system_message(f"Conversation {rnd}-{tag}")]
            replies = []
            for t in range(turns):
                messages.append({"role": "user", "content": user_message(t)})
                prompt = chat_tokens(model, messages)
                first, reply = await ttft(client, side, url, prompt, reply_tokens)
                replies.append(reply)
                messages.append({"role": "assistant", "content": reply})
                await anyio.sleep(think)
            cold_prompt = chat_tokens(model, [system_message(f"Cold {rnd}-{tag}")] + messages[1:-1])
            cold, _ = await ttft(client, side, url, cold_prompt, reply_tokens)
            out[side] = {"cached": first, "cold": cold, "tokens": len(prompt), "replies": replies}
    return out


async def shared_round(model: mullama.Model, servers: Dict[str, str], rnd: int, n: int,
                       max_tokens: int) -> Dict[str, Dict[str, object]]:
    system = " ".join(f"Rule {i}: answer politely, cite sources when you can, and never guess." for i in range(70))
    out: Dict[str, Dict[str, object]] = {}
    order = list(servers) if rnd % 2 == 0 else list(reversed(servers))
    async with _client() as client:
        for side in order:
            for mode in ("shared", "distinct"):
                tag = random.random()
                prompts = []
                for i in range(n):
                    first = f"Deployment {rnd}-{side}-{tag}" if mode == "shared" else f"Session {i}-{tag}"
                    messages = [{"role": "system", "content": f"{first}\n{system}"},
                                {"role": "user", "content": f"Question {i}: what is rule {i * 7 % 70} about?"}]
                    prompts.append(chat_tokens(model, messages))
                t0 = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    for p in prompts:
                        tg.start_soon(ttft, client, side, servers[side], p, max_tokens)  # (its result unused)
                wall = time.perf_counter() - t0
                out.setdefault(side, {})[mode] = sum(len(p) for p in prompts) / wall
                out[side]["tokens"] = len(prompts[0])
    return out


async def n_choices(path: Path, rounds: int, tokens: int) -> Dict[str, object]:
    words = "river stone cloud lantern meadow signal harbor copper violet orbit".split()
    rng = random.Random(3)
    cfg = StreamConfig(max_tokens=tokens, temperature=0.8, seed=1)
    sides: Dict[str, List[float]] = {k: [] for k in ("n4_wall", "sep_wall", "n4_decode", "sep_decode")}
    evaluated: Dict[str, int] = {}
    async with await AsyncModel.load(path, max_concurrent=4, context_size=1024, threads=THREADS,
                                     adaptive_threads=False) as model:
        def decode_rate(done: List[mullama.Completion]) -> float:
            firsts = [c.timings.time_to_first_token_ms for c in done]
            ends = [c.timings.time_to_first_token_ms + c.timings.generation_ms for c in done]
            return sum(len(c.tokens) - 1 for c in done) / ((max(ends) - min(firsts)) / 1e3)

        for r in range(rounds + 1):
            prompts = [" ".join(rng.choice(words) for _ in range(300)) for _ in range(5)]  # [4]: the n=4 one
            for mode in (("n4", "sep") if r % 2 == 0 else ("sep", "n4")):
                before = model.prompt_cache_stats().evaluated_prompt_tokens
                t0 = time.perf_counter()
                if mode == "n4":
                    done = await model.generate_many(prompts[4], 4, cfg)
                else:
                    done = [None] * 4

                    async def one(i: int) -> None:
                        done[i] = await model.generate(prompts[i], config=cfg)

                    async with anyio.create_task_group() as tg:
                        for i in range(4):
                            tg.start_soon(one, i)
                wall = time.perf_counter() - t0
                evaluated[mode] = model.prompt_cache_stats().evaluated_prompt_tokens - before
                if r:
                    sides[f"{mode}_wall"].append(wall)
                    sides[f"{mode}_decode"].append(decode_rate(done))  # type: ignore[arg-type]
            _log(f"n choices round {r}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in sides.items() if v))
        prompt_tokens = len(await model.tokenize(prompts[4]))
    med = {k: statistics.median(v) for k, v in sides.items()}
    return {"figure": "cache_n_choices", "n": 4, "rounds": rounds, "tokens_each": tokens,
            "prompt_tokens": prompt_tokens, "n4_prompt_tokens_evaluated": evaluated["n4"],
            "separate_prompt_tokens_evaluated": evaluated["sep"],
            "n4_wall_s": round(med["n4_wall"], 2), "separate_wall_s": round(med["sep_wall"], 2),
            "n4_decode_tok_s": round(med["n4_decode"], 1), "separate_decode_tok_s": round(med["sep_decode"], 1),
            "decode_vs_separate": round(med["n4_decode"] / med["sep_decode"], 3),
            "wall_vs_separate": round(med["n4_wall"] / med["sep_wall"], 3)}


async def soak(path: Path, requests: int, budget: int) -> Dict[str, object]:
    rng = random.Random(7)
    async with await AsyncModel.load(path, max_concurrent=2, context_size=1024, threads=THREADS,
                                     prompt_cache_bytes=budget) as model:
        words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
        prefixes = [" ".join(rng.choice(words) for _ in range(rng.randint(30, 150))) for _ in range(60)]
        cfg = StreamConfig.greedy(2)
        await model.generate(prefixes[0], config=cfg)
        rss0 = peak = rss()
        over = 0
        done = 0

        async def client() -> None:  # two at a time: both slots busy, the host cache in use
            nonlocal done, over, peak
            while done < requests:
                done += 1
                suffix = " ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))
                await model.generate(rng.choice(prefixes) + " " + suffix, config=cfg)
                stats = model.prompt_cache_stats()
                over += stats.host_bytes > budget
                if done % 50 == 0:
                    peak = max(peak, rss())
                    _log(f"soak {done}/{requests}: cache {stats.host_bytes >> 20} MiB in {stats.host_entries} "
                         f"entries, rss {rss() >> 20} MiB")

        async with anyio.create_task_group() as tg:
            tg.start_soon(client)
            tg.start_soon(client)
        peak = max(peak, rss())
        stats = model.prompt_cache_stats()
        before = rss()
        model.clear_prompt_cache()
        given_back = before - rss()
    return {"host_cache_mib": round(stats.host_bytes / 2**20, 1), "host_entries": stats.host_entries,
            "times_over_budget": over, "evictions": stats.host_evictions, "restores": stats.host_restores,
            "hit_ratio": round(stats.hit_ratio, 3), "rss_growth": peak - rss0, "given_back": given_back}


def soak_pair(requests: int, budget: int) -> Dict[str, object]:
    """The soak with the cache and without it (the same requests), each in a
    process of its own: the cache's share of RSS is the difference."""
    runs = {}
    for name, b in (("cache", budget), ("none", 0)):
        out = subprocess.run([sys.executable, __file__, "--soak-one", str(requests), str(b)],
                             check=True, stdout=subprocess.PIPE, text=True).stdout
        runs[name] = json.loads(out.strip().splitlines()[-1])
    got, none = runs["cache"], runs["none"]
    over_baseline = got["rss_growth"] - none["rss_growth"]
    return {"figure": "cache_soak", "requests": requests, "budget_mib": round(budget / 2**20, 1),
            **{k: v for k, v in got.items() if k not in ("rss_growth", "given_back")},
            "rss_growth_mib": round(got["rss_growth"] / 2**20, 1),
            "rss_growth_without_cache_mib": round(none["rss_growth"] / 2**20, 1),
            "rss_growth_over_baseline_mib": round(over_baseline / 2**20, 1),
            "rss_given_back_on_clear_mib": round(got["given_back"] / 2**20, 1),
            "within_budget": over_baseline <= budget}


def rounds_of(path: Path, binary: Path, slots: int, n: int, one_round,
              extra: Sequence[str] = ()) -> List[Dict[str, Dict[str, object]]]:
    """*n* measured rounds (after a warm-up) of ``one_round(servers, r)`` against both servers."""
    ours = mullama_serve(path, slots, N_CTX, THREADS, extra=extra)
    theirs = llama_server(binary, path, slots, N_CTX, THREADS)
    servers = {"mullama": ours.url, "llama_server": theirs.url}
    rounds = []
    try:
        for r in range(n + 1):  # round 0 warms up
            got = anyio.run(one_round, servers, r)
            _log(f"round {r}: " + json.dumps({k: {m: v for m, v in d.items() if m != "replies"}
                                              for k, d in got.items()}))
            if r:
                rounds.append(got)
    finally:
        ours.close()
        theirs.close()
    return rounds


def median(rounds: List[Dict[str, Dict[str, object]]], side: str, key: str) -> float:
    return statistics.median(float(g[side][key]) for g in rounds)  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--reply-tokens", type=int, default=160, help="most tokens of each chat reply")
    ap.add_argument("--think", type=float, default=2.0, help="seconds between a chat reply and the next turn")
    ap.add_argument("--shared", type=int, default=8, help="requests sharing a system prompt")
    ap.add_argument("--max-tokens", type=int, default=8, help="tokens of each shared-prompt request")
    ap.add_argument("--choice-tokens", type=int, default=64, help="tokens of each of the n=4 choices")
    ap.add_argument("--only", nargs="+", choices=["chat", "shared", "n", "soak"],
                    default=["chat", "shared", "n", "soak"], help="the figures to measure")
    ap.add_argument("--soak", type=int, default=1000, help="requests of the soak (0: none)")
    ap.add_argument("--soak-budget-mb", type=float, default=16)
    ap.add_argument("--busy", type=int, default=0, help="CPU-bound processes running meanwhile")
    ap.add_argument("--soak-one", nargs=2, type=int, metavar=("REQUESTS", "BUDGET"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.soak_one:  # (one soak run, for soak_pair)
        print(json.dumps(anyio.run(soak, Path(mullama.default_model_path()), *a.soak_one)), flush=True)
        return
    path = Path(mullama.default_model_path())
    binary = llama_server_binary()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.busy)]
    try:
        with mullama.Model.load(path, vocab_only=True) as model:
            for think, exact in ((a.think, True), (0.0, True), (0.0, False)) if "chat" in a.only else ():
                rounds = rounds_of(path, binary, 1, a.rounds,
                                   lambda servers, r: chat_round(model, servers, r, a.turns, a.reply_tokens, think),
                                   () if exact else ("--inexact-prompt-cache",))
                m_c, m_0 = median(rounds, "mullama", "cached"), median(rounds, "mullama", "cold")
                s_c, s_0 = median(rounds, "llama_server", "cached"), median(rounds, "llama_server", "cold")
                print(json.dumps({
                    "figure": "cache_chat_ttft", "turns": a.turns, "think_s": think, "exact": exact, "busy": a.busy,
                    "rounds": a.rounds, "last_turn_prompt_tokens": int(median(rounds, "mullama", "tokens")),
                    "mullama_cached_ms": round(m_c * 1e3, 1), "mullama_cold_ms": round(m_0 * 1e3, 1),
                    "llama_server_cached_ms": round(s_c * 1e3, 1), "llama_server_cold_ms": round(s_0 * 1e3, 1),
                    "mullama_cached_vs_cold": round(m_c / m_0, 3), "llama_server_cached_vs_cold": round(s_c / s_0, 3),
                    "cached_vs_llama_server": round(m_c / s_c, 3),
                    "same_replies": all(g["mullama"]["replies"] == g["llama_server"]["replies"] for g in rounds)}),
                    flush=True)
            if "shared" in a.only:
                rounds = rounds_of(path, binary, 4, a.rounds,
                                   lambda servers, r: shared_round(model, servers, r, a.shared, a.max_tokens))
                m_s, m_d = median(rounds, "mullama", "shared"), median(rounds, "mullama", "distinct")
                s_s, s_d = median(rounds, "llama_server", "shared"), median(rounds, "llama_server", "distinct")
                print(json.dumps({
                    "figure": "cache_shared_prefix", "requests": a.shared, "slots": 4, "busy": a.busy,
                    "rounds": a.rounds, "prompt_tokens_each": int(median(rounds, "mullama", "tokens")),
                    "mullama_shared_tok_s": round(m_s), "mullama_distinct_tok_s": round(m_d),
                    "llama_server_shared_tok_s": round(s_s), "llama_server_distinct_tok_s": round(s_d),
                    "mullama_shared_vs_distinct": round(m_s / m_d, 2),
                    "llama_server_shared_vs_distinct": round(s_s / s_d, 2),
                    "shared_vs_llama_server": round(m_s / s_s, 3)}), flush=True)
        if "n" in a.only:
            print(json.dumps(anyio.run(n_choices, path, a.rounds, a.choice_tokens)), flush=True)
        if a.soak and "soak" in a.only:
            print(json.dumps(soak_pair(a.soak, int(a.soak_budget_mb * 2**20))), flush=True)
    finally:
        for p in busy:
            p.kill()
            p.wait()


if __name__ == "__main__":
    main()
