"""mullama.aio under asyncio: a streamed chat answer, concurrent requests, a timeout.

    python examples/asyncio_chat.py [--model path/to/model.gguf]
"""

import argparse
import asyncio

import mullama
from mullama.aio import AsyncModel


async def main(model_path: str) -> None:
    async with await AsyncModel.load(model_path, max_concurrent=4) as model:
        # 1. stream a chat answer, formatted with the model's own chat template
        messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
        async with model.chat_stream(messages, mullama.StreamConfig.greedy(48)) as stream:
            async for batch in stream.batches():  # or token by token: `async for tok in stream`
                print("".join(tok.text for tok in batch), end="", flush=True)
        print()

        # 2. several requests at once: the batching engine decodes them together
        questions = ["What is 2 + 2?", "What is the capital of Italy?", "Which planet is the largest?"]
        answers = await asyncio.gather(*(
            model.chat([{"role": "user", "content": q}], mullama.StreamConfig.greedy(24)) for q in questions))
        for q, a in zip(questions, answers):
            print(f"{q} -> {a.text.strip()!r} ({a.finish_reason}, {a.metrics.time_to_first_token_ms:.0f} ms to first token)")

        # 3. a timeout cancels the generation inside llama.cpp; the model is ready again at once
        counting = model.generate_text("1, 2, 3, 4,", max_tokens=1500, config=mullama.StreamConfig.greedy())
        try:
            print("finished within the timeout:", len(await asyncio.wait_for(counting, timeout=0.5)), "chars")
        except asyncio.TimeoutError:
            print("timed out")
        print("generations still running:", model.active_workers)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a .gguf file (default: the default model, pulled if needed)")
    args = ap.parse_args()
    asyncio.run(main(args.model or str(mullama.default_model_path())))
