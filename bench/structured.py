#!/usr/bin/env python3
"""The cost of structured output per token: decoding under a JSON schema's grammar
against unconstrained decoding, in mullama and in llama-server (built from the
same pinned llama.cpp source), same model, same prompt, same run.

Figure ``structured_token_cost`` (one JSON line per model: the default model
and the tiny random-weight one, where the grammar's share of a token is
largest): greedy generations of ``--max-tokens`` tokens from one prompt, free
and under ``SCHEMA`` (an object holding a long array of strings, so that the
grammar is active for every token and the output runs to the token limit).

* mullama: ``Context.generate`` (2 threads, fixed), time per generated token
  from the completion's timings (generation only, prompt excluded);
* llama-server: ``POST /completion`` with ``json_schema`` (or without), one
  slot, 2 threads, ``cache_prompt`` off; time per token from the response's
  ``timings.predicted_per_token_ms``.

Rounds alternate (mullama free, mullama constrained, server free, server
constrained), after a warm-up round; medians over ``--rounds``. Reported:
µs per token of each, ``ratio`` = constrained / free for each side, the
grammar's cost per token (constrained - free, µs) for each side, and
``vs_llama_server`` = mullama's ratio / llama-server's ratio (≤ 1: no more
overhead than llama-server). The issue's target: mullama's ratio ≤ 1.1 on the
default model, and ``vs_llama_server`` ≤ 1.

Usage: python bench/structured.py [--rounds 5] [--max-tokens 128] [--models default tiny]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import mullama  # noqa: E402
from mullama import StreamConfig  # noqa: E402
from _servers import llama_server, llama_server_binary  # noqa: E402

SCHEMA = {"type": "object", "required": ["city", "notes"], "additionalProperties": False,
          "properties": {"city": {"type": "string"},
                         "notes": {"type": "array", "items": {"type": "string"}, "minItems": 200}}}
PROMPT = "Write notes about Paris as JSON, with a long list of facts:\n"
THREADS = 2


def _log(msg: str) -> None:
    print(f"[structured] {msg}", file=sys.stderr, flush=True)


def server_per_token_ms(url: str, max_tokens: int, schema: object) -> "tuple[float, str]":
    body: Dict[str, object] = {"prompt": PROMPT, "n_predict": max_tokens, "temperature": 0, "cache_prompt": False}
    if schema is not None:
        body["json_schema"] = schema
    r = httpx.post(url + "/completion", json=body, timeout=600)
    r.raise_for_status()
    data = r.json()
    return data["timings"]["predicted_per_token_ms"], data["content"]


def mullama_per_token_ms(ctx: mullama.Context, max_tokens: int, schema: object) -> "tuple[float, str]":
    ctx.reset()
    c = ctx.generate(PROMPT, StreamConfig.greedy(max_tokens, json_schema=schema))
    return c.timings.generation_ms / max(1, c.timings.generated_tokens - 1), c.text


def measure(name: str, path: Path, binary: Path, rounds: int, max_tokens: int) -> Dict[str, object]:
    n_ctx = 1024
    sides: Dict[str, List[float]] = {k: [] for k in ("mullama_free", "mullama_schema", "server_free",
                                                      "server_schema")}
    texts: Dict[str, str] = {}
    server = llama_server(binary, path, 1, n_ctx, THREADS)
    try:
        with mullama.Model.load(path) as model, \
                model.create_context(n_ctx, threads=THREADS, adaptive_threads=False) as ctx:
            for r in range(rounds + 1):  # round 0 warms up
                for key, schema in (("free", None), ("schema", SCHEMA)):
                    ms, text = mullama_per_token_ms(ctx, max_tokens, schema)
                    if r:
                        sides[f"mullama_{key}"].append(ms)
                    texts[f"mullama_{key}"] = text
                for key, schema in (("free", None), ("schema", SCHEMA)):
                    ms, text = server_per_token_ms(server.url, max_tokens, schema)
                    if r:
                        sides[f"server_{key}"].append(ms)
                    texts[f"server_{key}"] = text
                _log(f"{name} round {r}: " + ", ".join(f"{k} {v[-1]:.3f} ms" for k, v in sides.items() if v))
    finally:
        server.close()
    med = {k: statistics.median(v) for k, v in sides.items()}
    m_ratio = med["mullama_schema"] / med["mullama_free"]
    s_ratio = med["server_schema"] / med["server_free"]
    return {
        "figure": "structured_token_cost", "model": name, "max_tokens": max_tokens, "rounds": rounds,
        "threads": THREADS,
        "mullama_free_us": round(med["mullama_free"] * 1e3, 1),
        "mullama_schema_us": round(med["mullama_schema"] * 1e3, 1),
        "llama_server_free_us": round(med["server_free"] * 1e3, 1),
        "llama_server_schema_us": round(med["server_schema"] * 1e3, 1),
        "mullama_ratio": round(m_ratio, 3), "llama_server_ratio": round(s_ratio, 3),
        "mullama_grammar_us_per_token": round((med["mullama_schema"] - med["mullama_free"]) * 1e3, 1),
        "llama_server_grammar_us_per_token": round((med["server_schema"] - med["server_free"]) * 1e3, 1),
        "vs_llama_server": round(m_ratio / s_ratio, 3),
        "schema_outputs_equal": texts["mullama_schema"] == texts["server_schema"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--models", nargs="+", default=["default", "tiny"], choices=["default", "tiny"])
    a = ap.parse_args()
    binary = llama_server_binary()
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models:
            if name == "default":
                path = mullama.default_model_path()
            else:
                from tiny_model import write_tiny_model

                path = write_tiny_model(Path(tmp) / "tiny.gguf")
            print(json.dumps(measure(name, Path(path), binary, a.rounds, a.max_tokens)), flush=True)


if __name__ == "__main__":
    main()
