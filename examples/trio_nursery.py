"""mullama.aio under trio: a nursery of concurrent generations under one deadline.

Each task streams its own answer; when the deadline passes, the nursery's
cancel scope stops every generation still running inside llama.cpp, and the
model is immediately ready for more.

    python examples/trio_nursery.py [--model path/to/model.gguf] [--deadline 2.0]
"""

import argparse

import trio

import mullama
from mullama.aio import AsyncModel

PROMPTS = {
    "france": "The capital of France is",
    "story": "Once upon a time, in a small village,",
    "list": "Here is a long list of fruits: apple, banana,",
    "science": "Water boils at",
}


async def write(model: AsyncModel, name: str, prompt: str, out: dict) -> None:
    out[name] = {"text": "", "state": "waiting for a slot or its prompt"}
    try:
        async with model.generate_stream(prompt, mullama.StreamConfig.greedy(400)) as stream:
            async for tok in stream:
                out[name]["text"] += tok.text
                out[name]["state"] = "cut by the deadline"  # unless it finishes
            out[name]["state"] = f"finished ({stream.finish_reason})"
    except mullama.MullamaError as exc:  # the error path to copy: name it, go on with the others
        out[name]["state"] = f"failed: {type(exc).__name__}: {exc}"


async def main(model_path: str, deadline: float) -> None:
    async with await AsyncModel.load(model_path, max_concurrent=4) as model:
        out: dict = {}
        with trio.move_on_after(deadline) as scope:
            async with trio.open_nursery() as nursery:
                for name, prompt in PROMPTS.items():
                    nursery.start_soon(write, model, name, prompt, out)
        print("deadline hit:" if scope.cancelled_caught else "all finished:", f"{deadline} s")
        for name, got in out.items():
            # on a slow machine a prompt may not even be evaluated before the deadline: 0 chars
            print(f"  {name:8} {len(got['text']):4} chars, {got['state']}: {PROMPTS[name]}{got['text'][:60]!r}")
        print("generations still running:", model.active_workers)
        print("next request:", repr(await model.generate_text("The largest planet is", max_tokens=8,
                                                               config=mullama.StreamConfig.greedy())))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a .gguf file (default: the default model, pulled if needed)")
    ap.add_argument("--deadline", type=float, default=2.0, help="seconds before the nursery is cancelled")
    args = ap.parse_args()
    trio.run(main, args.model or str(mullama.default_model_path()), args.deadline)
