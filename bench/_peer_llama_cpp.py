"""Runs inside the llama-cpp-python environment (bench/peers.py): one measurement, one JSON line out.

Task ``gil``: another Python thread's speed during a generation (bench/_probes.py).

Task ``prompt``: evaluating a prompt of the given length in batches of 512.

Task ``decode``: greedy single-stream generation from the BOS token, timing
the generation phase the way bench/decode.py times mullama's: from the first
generated token to the last, each token sampled by the binding and turned into
text (``detokenize``), as a streaming caller needs it.
"""

import json
import statistics
import sys
import time

from llama_cpp import Llama

from _probes import other_thread_ratio, prompt_rate, prompt_tokens


def decode(task: dict) -> dict:
    tokens, threads, reps = task["tokens"], task["threads"], task["reps"]
    llm = Llama(model_path=task["model"], n_ctx=tokens + 16, n_threads=threads, n_threads_batch=threads,
                n_batch=512, verbose=False)
    bos = llm.token_bos()
    rates = []
    for i in range(reps + 1):  # the first run is the warm-up
        llm.reset()
        n, t0 = 0, None
        for tok in llm.generate([bos], temp=0.0, reset=True):
            llm.detokenize([tok])
            if t0 is None:  # the prompt is evaluated: the generation phase starts
                t0 = time.perf_counter()
                continue
            n += 1
            if n == tokens - 1:
                break
        if i:
            rates.append(n / (time.perf_counter() - t0))
    return {"tok_s": statistics.median(rates)}


def prompt(task: dict) -> dict:
    """Evaluating a prompt of ``tokens`` ids spread over the vocabulary (as bench/decode.py does)."""
    tokens, threads = task["tokens"], task["threads"]
    llm = Llama(model_path=task["model"], n_ctx=tokens + 16, n_threads=threads, n_threads_batch=threads,
                n_batch=512, n_ubatch=512, verbose=False)
    return {"tok_s": prompt_rate(llm.reset, llm.eval, prompt_tokens(llm.n_vocab(), tokens), task["reps"])}


def gil(task: dict) -> dict:
    """Another Python thread's speed while ``tokens`` are generated (bench/_probes.py)."""
    tokens, threads = task["tokens"], task["threads"]
    llm = Llama(model_path=task["model"], n_ctx=tokens + 16, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    bos = llm.token_bos()

    def generate() -> None:
        llm.reset()
        for n, tok in enumerate(llm.generate([bos], temp=0.0, reset=True), 1):
            llm.detokenize([tok])
            if n == tokens:
                break

    return {"ratio": other_thread_ratio(generate, task["reps"])}


if __name__ == "__main__":
    task = json.loads(sys.argv[1])
    print(json.dumps({"decode": decode, "prompt": prompt, "gil": gil}[task["task"]](task)))
