"""Talk to `mullama serve` with the official openai client.

Start the server in another terminal (asyncio/uvicorn, or `--backend trio`):

    mullama serve --port 8000 --chat-template-file examples/chatml_tools.jinja

(the default model's own chat template has no tool calls; this one, ChatML with
<tool_call> tags, has them. Without it the tool calls below are refused with a 400.)

then:

    python examples/openai_client.py [--url http://127.0.0.1:8000/v1]
"""

import argparse
import json

import openai
import pydantic


class City(pydantic.BaseModel):
    name: str
    country: str


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


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

    # structured output: the reply follows a JSON schema (here a pydantic model the client parses)
    parsed = client.chat.completions.parse(
        model=model, messages=[{"role": "user", "content": "Which city is the capital of France?"}],
        response_format=City, max_tokens=64, temperature=0)
    print("structured:", parsed.choices[0].message.parsed)

    # tool calls: the model asks for a call, the caller runs it and gives the result back
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    try:
        asked = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL],
                                               tool_choice="required", max_tokens=64, temperature=0)
    except openai.BadRequestError as exc:
        print("tools: refused by this server:", exc.body["message"])
        return
    call = asked.choices[0].message.tool_calls[0]
    print("tool call:", call.function.name, json.loads(call.function.arguments))
    messages += [asked.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"celsius": 21})}]
    answer = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL], max_tokens=32,
                                            temperature=0)
    print("after the call:", answer.choices[0].message.content)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="unused", help="what the server was started with --api-key (if any)")
    args = ap.parse_args()
    main(args.url, args.api_key)
