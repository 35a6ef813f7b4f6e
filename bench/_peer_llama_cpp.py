"""Runs inside the llama-cpp-python environment (bench/peers.py): one measurement, one JSON line out.

Streams use the peer's leanest streaming path: ``Llama.generate`` with each
token turned into text (``detokenize``). Its ``create_completion(stream=True)``,
which its server uses, re-detokenizes the whole completion for every token (and
retries growing spans on text that is not valid UTF-8, as a random-weight model
emits), so it only adds to the figures here.

Async tasks drive llama-cpp-python the way its own server does: its blocking
streaming generator is advanced one chunk at a time in a worker thread
(``anyio.to_thread.run_sync(next, ...)``, as Starlette's
``iterate_in_threadpool``), and one lock lets one request at a time use the
model (as the server's ``llama_outer_lock``). The thread call is not abandoned
on cancellation, so a cancelled request's scope exits when the thread is done,
which is when the model is free for the next request.

Task ``stream``: tokens/s of a streaming completion, sync and under asyncio and trio.

Task ``aggregate``: generated tokens/s of N concurrent streaming requests.

Task ``ttft``: time to first token of N requests submitted at once.

Task ``cancel``: time from cancelling a request to the model being free, during decode or prefill.

Task ``load``: time to a model ready to generate (``Llama(...)``: model and context).

Task ``rss``: resident memory of N ``Llama`` objects that have each generated.

Task ``gil``: another Python thread's speed during a generation (bench/_probes.py).

Task ``prompt``: evaluating a prompt of the given length in batches of 512.

Task ``decode``: greedy single-stream generation from the BOS token, timing
the generation phase the way bench/decode.py times mullama's: from the first
generated token to the last, each token sampled by the binding and turned into
text (``detokenize``), as a streaming caller needs it.
"""

import gc
import json
import random
import statistics
import sys
import time

from llama_cpp import Llama

from _probes import cancel_latency_ms, other_thread_ratio, prompt_rate, prompt_tokens, rss


def _llama(task: dict, n_ctx: int, **kw) -> Llama:
    return Llama(model_path=task["model"], n_ctx=n_ctx, n_threads=task["threads"], n_threads_batch=task["threads"],
                 verbose=False, **kw)


def _completion(llm: Llama, prompt, max_tokens: int):
    """A greedy stream of token texts from scratch (``reset``: no prefix reuse from the previous
    request), ending at the end-of-generation token or after *max_tokens*."""
    llm.reset()
    tokens = llm.tokenize(prompt.encode()) if isinstance(prompt, str) else prompt
    eos = llm.token_eos()
    for n, tok in enumerate(llm.generate(tokens, temp=0.0, reset=True), 1):
        if tok == eos:
            return
        yield llm.detokenize([tok])
        if n == max_tokens:
            return


async def _chunks(llm: Llama, prompt, max_tokens: int):
    """The completion's chunks, each fetched in a worker thread (as the peer's server streams)."""
    import anyio

    it = _completion(llm, prompt, max_tokens)
    try:
        while (chunk := await anyio.to_thread.run_sync(next, it, None)) is not None:
            yield chunk
    finally:
        it.close()


def stream(task: dict) -> dict:
    """Median tokens/s of sync and async streams, interleaved over ``reps``."""
    import anyio

    tokens, prompt = task["tokens"], task["prompt"]
    llm = _llama(task, tokens + 64)

    def sync_rate() -> float:
        t0 = time.perf_counter()
        n = sum(1 for _ in _completion(llm, prompt, tokens))
        return n / (time.perf_counter() - t0)

    async def async_rate() -> float:
        t0 = time.perf_counter()
        n = 0
        async for _ in _chunks(llm, prompt, tokens):
            n += 1
        return n / (time.perf_counter() - t0)

    sync_rate()  # warm-up
    samples: dict = {"sync": [], "asyncio": [], "trio": []}
    for _ in range(task["reps"]):
        samples["sync"].append(sync_rate())
        for backend in ("asyncio", "trio"):
            samples[backend].append(anyio.run(async_rate, backend=backend))
    return {k: statistics.median(v) for k, v in samples.items()}


async def _serialised(llm: Llama, n: int, prompt, max_tokens: int) -> list:
    """*n* requests submitted at once, one at a time on the model: (submit, first chunk, end, chunks) each."""
    import anyio

    lock = anyio.Lock()
    out = []

    async def one() -> None:
        submit, first, count = time.perf_counter(), None, 0
        async with lock:
            async for _ in _chunks(llm, prompt, max_tokens):
                if first is None:
                    first = time.perf_counter()
                count += 1
        out.append((submit, first, time.perf_counter(), count))

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
    return out


def aggregate(task: dict) -> dict:
    """Generated tokens/s over N concurrent requests, for each N, counted as bench/concurrency.py counts
    mullama's: from the first token of the first to the last token of the last, first tokens excluded."""
    import anyio

    llm = _llama(task, 256)
    anyio.run(_serialised, llm, 1, task["prompt"], 4)  # warm-up
    rates = {}
    for n in task["parallel"]:
        runs = anyio.run(_serialised, llm, n, task["prompt"], task["tokens"])
        rates[str(n)] = sum(c - 1 for *_, c in runs) / (max(r[2] for r in runs) - min(r[1] for r in runs))
    return rates


def ttft(task: dict) -> dict:
    """Time to first token (ms) of ``requests`` requests submitted at once."""
    import anyio

    llm = _llama(task, 256)
    anyio.run(_serialised, llm, 1, task["prompt"], 4)  # warm-up
    runs = anyio.run(_serialised, llm, task["requests"], task["prompt"], task["tokens"])
    return {"ttft_ms": [(first - submit) * 1e3 for submit, first, _, _ in runs]}


def cancel(task: dict) -> dict:
    """Latencies (ms) from cancelling a request at a random moment of its decode or its prefill to the
    moment its scope has exited (the worker thread is done and the model free), as bench/async_overhead.py
    measures mullama's."""
    import anyio

    phase, count = task["phase"], task["count"]
    llm = _llama(task, 4096)
    long_prompt = prompt_tokens(llm.n_vocab(), task["prefill_tokens"])

    prompt, max_tokens = (task["prompt"], 3000) if phase == "decode" else (long_prompt, 1)

    async def consume(on_token) -> None:
        async for _ in _chunks(llm, prompt, max_tokens):
            on_token()

    async def run() -> list:
        rng = random.Random(1)
        got = [await cancel_latency_ms(consume, phase, task["delay_s"], rng) for _ in range(count)]
        return [ms for ms in got if ms is not None]

    return {"latency_ms": anyio.run(run, backend=task["backend"])}


def load(task: dict) -> dict:
    """Median seconds of ``Llama(...)`` (model and a context of ``n_ctx``), after a warm-up load."""
    times = []
    for i in range(task["reps"] + 1):
        t0 = time.perf_counter()
        llm = _llama(task, task["n_ctx"])
        if i:
            times.append(time.perf_counter() - t0)
        llm.close()
        del llm
        gc.collect()
    return {"load_s": statistics.median(times)}


def rss_of(task: dict) -> dict:
    """RSS (bytes) of this process with ``members`` ``Llama`` objects that have each generated."""
    llms = [_llama(task, task["n_ctx"]) for _ in range(task["members"])]
    for llm in llms:
        for _ in _completion(llm, task["prompt"], 32):
            pass
    return {"rss": rss()}


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
    tasks = {"decode": decode, "prompt": prompt, "gil": gil, "stream": stream, "aggregate": aggregate,
             "ttft": ttft, "cancel": cancel, "load": load, "rss": rss_of}
    print(json.dumps(tasks[task["task"]](task)))
