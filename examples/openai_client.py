"""Talk to `mullama serve` with the official openai client.

Start the server in another terminal (asyncio/uvicorn, or `--backend trio`):

    mullama serve --port 8000

then:

    python examples/openai_client.py [--url http://127.0.0.1:8000/v1]
"""

import argparse

import openai


def main(url: str, api_key: str) -> None:
    client = openai.OpenAI(base_url=url, api_key=api_key)
    model = client.models.list().data[0].id
    print("model:", model)

    # a whole answer
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=32, temperature=0)
    print("chat:", reply.choices[0].message.content, f"[{reply.usage.total_tokens} tokens]")

    # a streamed answer, as server-sent events
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Write a haiku about the sea."}],
        max_tokens=48, temperature=0.7, seed=1, stream=True)
    print("stream: ", end="")
    for chunk in stream:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()

    # plain completion
    done = client.completions.create(model=model, prompt="The largest planet is", max_tokens=8, temperature=0)
    print("completion:", repr(done.choices[0].text))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="unused", help="what the server was started with --api-key (if any)")
    args = ap.parse_args()
    main(args.url, args.api_key)
