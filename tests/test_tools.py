"""Tool calling through llama.cpp's chat library: the templates of several model
families (read from the fetched llama.cpp tree), the tiny model generating."""

from __future__ import annotations

import json

import jsonschema
import pytest

import mullama
from mullama import ChatTemplateError, InvalidConfigError, StreamConfig
from mullama._tools import ChatPlan

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather of a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"enum": ["x", "y"]}},
                                                     "required": ["city"]}}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
FAMILIES = {
    "qwen2.5": "Qwen-Qwen2.5-7B-Instruct.jinja",
    "hermes3": "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja",
    "llama3.1": "meta-llama-Llama-3.1-8B-Instruct.jinja",
    "mistral-nemo": "mistralai-Mistral-Nemo-Instruct-2407.jinja",
}


@pytest.fixture(scope="module")
def templates(llama_cpp_dir):
    return {k: (llama_cpp_dir / "models" / "templates" / v).read_text() for k, v in FAMILIES.items()}


def assemble(deltas):
    """A client's assembly of a stream of ChatDelta."""
    content, calls, finish = "", {}, None
    for d in deltas:
        content += d.content
        for c in d.tool_calls:
            if c.index not in calls:
                assert c.id and c.name, "a call's first piece carries its id and name"
                calls[c.index] = {"id": c.id, "name": c.name, "arguments": ""}
            else:
                assert c.id is None and c.name is None
            calls[c.index]["arguments"] += c.arguments
        if d.finish_reason is not None:
            finish = d.finish_reason
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("family", list(FAMILIES))
def test_required_tool_call_in_every_family(tiny_model, templates, family):
    c = tiny_model.chat(ASK, StreamConfig.greedy(400), template=templates[family], tools=TOOLS[:1],
                        tool_choice="required")
    assert c.finish_reason == "tool_calls", c.text
    (call,) = c.tool_calls
    # (Mistral's calls carry the id the model wrote; the others get one)
    assert call.name == "get_weather" and call.id and call.type == "function"
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    assert not c.content
    assert c.message()["tool_calls"] == [call.to_openai()]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_streamed_deltas_assemble_into_the_reply(tiny_model, templates, family):
    choice = {"type": "function", "function": {"name": "get_time"}}
    deltas = list(tiny_model.chat_deltas(ASK, StreamConfig.greedy(400), template=templates[family], tools=TOOLS,
                                         tool_choice=choice))
    content, calls, finish = assemble(deltas)
    whole = tiny_model.chat(ASK, StreamConfig.greedy(400), template=templates[family], tools=TOOLS,
                            tool_choice=choice)
    assert finish == whole.finish_reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls] == [(c.name, c.arguments) for c in whole.tool_calls]
    assert calls[0]["name"] == "get_time" and json.loads(calls[0]["arguments"])["city"] in ("x", "y")
    assert content == (whole.content or "")


def test_sampled_tool_calls_always_validate(tiny_model, templates):
    for seed in range(6):
        cfg = StreamConfig(max_tokens=300, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed)
        c = tiny_model.chat(ASK, cfg, template=templates["qwen2.5"], tools=TOOLS, tool_choice="required")
        assert c.finish_reason == "tool_calls" and c.tool_calls, (seed, c.text)
        for call in c.tool_calls:
            schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.name)
            jsonschema.validate(json.loads(call.arguments), schema)


@pytest.mark.parametrize("family, reply, content, calls", [
    ("qwen2.5", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>',
     "", [("get_weather", {"city": "Paris", "unit": "c"})]),
    ("qwen2.5", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "f"}}\n'
                '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"city": "x"}}\n</tool_call>',
     "Let me check.", [("get_weather", {"city": "Rome", "unit": "f"}), ("get_time", {"city": "x"})]),
    ("qwen2.5", "It is sunny.", "It is sunny.", []),
    ("llama3.1", '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "c"}}', "",
     [("get_weather", {"city": "Oslo", "unit": "c"})]),
    ("mistral-nemo", '[TOOL_CALLS][{"name": "get_time", "arguments": {"city": "y"}, "id": "abcdefghi"}]', "",
     [("get_time", {"city": "y"})]),
])
def test_replies_parse_into_content_and_calls(tiny_model, templates, family, reply, content, calls):
    plan = ChatPlan(tiny_model, ASK, tools=TOOLS, template=templates[family], parallel_tool_calls=True)
    parser = plan.reply_parser()
    try:
        # fed in small pieces, as a stream
        deltas = [d for i in range(0, len(reply), 7) for d in parser.feed(reply[i:i + 7])]
        deltas += parser.feed("", final=True)
        got_content, got_calls, _ = assemble(deltas)
        assert got_content.strip() == content
        assert [(c["name"], json.loads(c["arguments"])) for c in got_calls] == calls
        assert [(c.name, json.loads(c.arguments)) for c in parser.calls()] == calls
    finally:
        parser.close()


def test_a_tool_round_trip_renders_the_calls_and_results(tiny_model, templates):
    first = tiny_model.chat(ASK, StreamConfig.greedy(300), template=templates["qwen2.5"], tools=TOOLS[:1],
                            tool_choice="required")
    call = first.tool_calls[0]
    history = ASK + [first.message(),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    plan = ChatPlan(tiny_model, history, tools=TOOLS[:1], template=templates["qwen2.5"])
    assert '{"temperature": 21}' in plan.prompt and "get_weather" in plan.prompt
    with tiny_model.create_context(2048, threads=1) as ctx:
        again = ctx.chat(history, StreamConfig.greedy(8), template=templates["qwen2.5"], tools=TOOLS[:1],
                         tool_choice="none")
    assert again.tool_calls == () and again.finish_reason in ("length", "stop")


def test_tool_choice_none_leaves_the_reply_free(tiny_model, templates):
    c = tiny_model.chat(ASK, StreamConfig.greedy(12), template=templates["qwen2.5"], tools=TOOLS, tool_choice="none")
    assert c.tool_calls == () and c.content == c.text and c.finish_reason == "length"


def test_a_template_without_tool_calls_is_refused_by_name(tiny_model):
    with pytest.raises(ChatTemplateError, match="describes no tool calls"):
        tiny_model.chat(ASK, StreamConfig.greedy(4), template="chatml", tools=TOOLS)
    with pytest.raises(ChatTemplateError, match="built-in format 'llama3' has no tool calls"):
        tiny_model.chat(ASK, StreamConfig.greedy(4), template="llama3", tools=TOOLS)


@pytest.mark.parametrize("kw, match", [
    ({"tools": "get_weather"}, "tools must be a list"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "1-64 letters"),
    ({"tools": [{"type": "code_interpreter"}]}, r"tools\[0\] must be"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "two tools are named 'get_weather'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]}, "must be a JSON schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": 3}}]}, "description'\\] must be a str"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice must be"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
    ({"tool_choice": "required"}, "need tools"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls must be a bool"),
])
def test_bad_tool_arguments_are_named(tiny_model, templates, kw, match):
    with pytest.raises(InvalidConfigError, match=match):
        tiny_model.chat(ASK, StreamConfig.greedy(4), template=templates["qwen2.5"], **kw)


def test_tools_with_a_text_response_format(tiny_model, templates):
    c = tiny_model.chat(ASK, StreamConfig.greedy(300, response_format={"type": "text"}),
                        template=templates["qwen2.5"], tools=TOOLS[:1], tool_choice="required")
    assert c.finish_reason == "tool_calls"


def test_bad_config_and_kwargs_with_tools_are_named(tiny_model, templates):
    with tiny_model.create_context(1024, threads=1) as ctx:
        with pytest.raises(InvalidConfigError, match="config must be a StreamConfig, got dict"):
            ctx.chat(ASK, {"max_tokens": 4}, template=templates["qwen2.5"], tools=TOOLS)
        with pytest.raises(InvalidConfigError, match="chat_template_kwargs must be a dict, got list"):
            ctx.chat(ASK, template=templates["qwen2.5"], tools=TOOLS, chat_template_kwargs=[1])


def test_tools_and_a_schema_are_not_both_given(tiny_model, templates):
    with pytest.raises(InvalidConfigError, match="not both"):
        tiny_model.chat(ASK, StreamConfig.greedy(4, json_schema={"type": "object"}), template=templates["qwen2.5"],
                        tools=TOOLS)


def test_bad_tool_calls_in_the_history_are_named(tiny_model, templates):
    bad = ASK + [{"role": "assistant", "content": None,
                  "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{"}}]}]
    with pytest.raises(InvalidConfigError, match=r"\['arguments'\] is not valid JSON"):
        tiny_model.chat(bad, StreamConfig.greedy(4), template=templates["qwen2.5"], tools=TOOLS)


def test_template_kwargs_reach_both_renderers(tiny_model, llama_cpp_dir):
    docs_template = ("{% for d in documents %}[doc {{ d.title }}]{% endfor %}"
                     "{% for m in messages %}{{ m.content }}{% endfor %}")
    with tiny_model.create_context(512, threads=1) as ctx:
        toks = ctx.chat_prompt(ASK, docs_template, {"documents": [{"title": "A"}, {"title": "B"}]})
    assert "[doc A][doc B]" in tiny_model.detokenize(toks)
    docs = ChatPlan(tiny_model, ASK, template=docs_template, chat_template_kwargs={"documents": [{"title": "C"}]})
    assert docs.prompt.startswith("[doc C]")
    qwen3 = (llama_cpp_dir / "models" / "templates" / "Qwen-Qwen3-0.6B.jinja").read_text()
    off = ChatPlan(tiny_model, ASK, tools=TOOLS, template=qwen3, chat_template_kwargs={"enable_thinking": False})
    on = ChatPlan(tiny_model, ASK, tools=TOOLS, template=qwen3)
    assert "<think>" in off.prompt and "<think>" not in on.prompt


def test_reasoning_is_split_from_the_content(tiny_model, llama_cpp_dir):
    qwen3 = (llama_cpp_dir / "models" / "templates" / "Qwen-Qwen3-0.6B.jinja").read_text()
    plan = ChatPlan(tiny_model, ASK, tools=TOOLS, template=qwen3)
    parser = plan.reply_parser()
    try:
        deltas = parser.feed("<think>\nIt rains in Paris.\n</think>\n\nTake an umbrella.", final=True)
        assert "".join(d.reasoning_content for d in deltas).strip() == "It rains in Paris."
        assert "".join(d.content for d in deltas).strip() == "Take an umbrella."
    finally:
        parser.close()


def test_parallel_tool_calls_decides_how_many_calls(tiny_model, templates):
    def plan(parallel):
        return ChatPlan(tiny_model, ASK, tools=TOOLS, template=templates["qwen2.5"], tool_choice="required",
                        parallel_tool_calls=parallel)

    assert "tool-calls ::= tool-call space\n" in plan(False).grammar.text
    assert "tool-calls ::= (tool-call space)+\n" in plan(True).grammar.text
    auto = ChatPlan(tiny_model, ASK, tools=TOOLS, template=templates["qwen2.5"]).grammar.text
    assert "tool-calls ::= tool-call space\n" in auto  # auto too: one call unless parallel_tool_calls
    # "required" means a call at once: no free text before it
    assert "until-" not in plan(True).grammar.text.split("root ::= ")[1].splitlines()[0]


# ---------------------------------------------------------------------------
# the async API (asyncio and trio): the engine, a conversation, a pool member

from mullama.aio import AsyncConfig, AsyncModel, ModelPool  # noqa: E402


async def _assemble_async(cm):
    async with cm as deltas:
        return assemble([d async for d in deltas])


@pytest.mark.anyio
async def test_async_tool_calls_equal_sync(tiny_model, tiny_model_path, templates):
    kw = dict(template=templates["hermes3"], tools=TOOLS, tool_choice="required")
    cfg = StreamConfig.greedy(300)
    expected = tiny_model.chat(ASK, cfg, **kw)
    async with await AsyncModel.load(tiny_model_path, max_concurrent=2, context_size=4096, threads=1) as model:
        got = await model.chat(ASK, cfg, **kw)
        content, calls, finish = await _assemble_async(model.chat_deltas(ASK, cfg, **kw))
        async with model.chat_stream(ASK, cfg, **kw) as stream:
            text = "".join([t.text async for t in stream])
        conv = await model.create_context(4096)
        async with conv:
            in_conv = await conv.chat(ASK, cfg, **kw)
            conv_deltas = await _assemble_async(conv.chat_deltas(ASK, cfg, **kw))
        assert model.kv_used() == 0
    assert (got.text, got.finish_reason) == (expected.text, "tool_calls")
    assert [(c.name, c.arguments) for c in got.tool_calls] == [(c.name, c.arguments) for c in expected.tool_calls]
    assert [(c["name"], c["arguments"]) for c in calls] == [(c.name, c.arguments) for c in expected.tool_calls]
    assert finish == "tool_calls" and text == expected.text and in_conv.text == expected.text
    assert conv_deltas[1] == calls or [(c["name"], c["arguments"]) for c in conv_deltas[1]] == \
        [(c["name"], c["arguments"]) for c in calls]


@pytest.mark.anyio
async def test_pool_members_call_tools(tiny_model, tiny_model_path, templates):
    kw = dict(template=templates["qwen2.5"], tools=TOOLS[:1], tool_choice="required")
    expected = tiny_model.chat(ASK, StreamConfig.greedy(300), **kw)
    async with ModelPool(AsyncConfig(tiny_model_path, context_size=4096, threads=1), 1) as pool:
        async with pool.acquire() as member:
            got = await member.chat(ASK, StreamConfig.greedy(300), **kw)
            _, calls, finish = await _assemble_async(member.chat_deltas(ASK, StreamConfig.greedy(300), **kw))
    assert got.tool_calls and got.tool_calls[0].arguments == expected.tool_calls[0].arguments
    assert finish == "tool_calls" and calls[0]["arguments"] == expected.tool_calls[0].arguments


@pytest.mark.anyio
async def test_async_plain_chat_gives_content_deltas(tiny_model_path):
    async with await AsyncModel.load(tiny_model_path, max_concurrent=1, context_size=1024, threads=1) as model:
        whole = await model.chat(ASK, StreamConfig.greedy(12), template="chatml")
        content, calls, finish = await _assemble_async(model.chat_deltas(ASK, StreamConfig.greedy(12),
                                                                         template="chatml"))
        with pytest.raises(InvalidConfigError, match="need tools"):
            await model.chat(ASK, tool_choice="required", template="chatml")
    assert content == whole.content == whole.text and calls == [] and finish == whole.finish_reason == "length"


@pytest.mark.parametrize("family", ["qwen2.5", "hermes3", "mistral-nemo"])
def test_plain_chat_gives_the_same_tokens_with_either_renderer(tiny_model, templates, family):
    """Plain chat uses the sandboxed Jinja renderer, chat with tools llama.cpp's library: for these
    templates a conversation's prompt tokens are the same either way (the README says where they differ)."""
    from mullama._chat import chat_tokens

    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": [{"type": "text", "text": "Weather today?"}]}]
    plan = ChatPlan(tiny_model, conv, template=templates[family])
    assert chat_tokens(tiny_model, conv, templates[family]) == plan.tokens


def test_a_call_cut_short_is_reported_as_far_as_it_got(tiny_model, templates):
    kw = dict(template=templates["qwen2.5"], tools=TOOLS[:1], tool_choice="required")
    full = tiny_model.chat(ASK, StreamConfig.greedy(400), **kw)
    cut = tiny_model.chat(ASK, StreamConfig.greedy(len(full.tokens) - 6), **kw)
    assert full.finish_reason == "tool_calls" and cut.finish_reason == "length"
    assert [c.name for c in cut.tool_calls] == ["get_weather"]
    content, calls, finish = assemble(tiny_model.chat_deltas(ASK, StreamConfig.greedy(len(full.tokens) - 6), **kw))
    assert finish == "length" and [c["name"] for c in calls] == ["get_weather"]


def _reply_after(model, plan, written):
    """The reply's end when the model has *written* its start (fed to the grammar as a prefill): the
    status, the calls parsed from the whole reply and its deltas."""
    from mullama._generation import new_sampler

    head = model.tokenize(written, add_bos=False, special=True)
    sampler = new_sampler(model._core, plan.config(StreamConfig.greedy(200)))
    try:
        sampler.prefill(head)
        with model.create_context(4096, threads=1) as ctx:
            ctx.eval(plan.tokens + head)
            status, _, pieces, _, _ = ctx._core.generate(sampler, 200)
    finally:
        sampler.close()
    parser = plan.reply_parser()
    try:
        deltas = parser.feed(written + b"".join(pieces).decode("utf-8"), final=True)
        return status, parser.calls(), deltas
    finally:
        parser.close()


def test_an_auto_tool_grammar_waits_for_its_trigger(tiny_model, templates):
    """tool_choice="auto": the grammar is lazy, free text until the template's tool-call marker, then
    the call follows the grammar (the model "writes" the marker here: a random model never would)."""
    plan = ChatPlan(tiny_model, ASK, tools=TOOLS[:1], template=templates["qwen2.5"])
    assert plan.grammar is not None and plan.grammar.lazy and plan.grammar.triggers
    status, (call,), _ = _reply_after(tiny_model, plan, "<tool_call>\n")
    assert status == mullama._core.STATUS_EOG and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER)


def test_a_pydantic_model_is_a_tool_s_parameters(tiny_model, templates):
    import pydantic

    class Weather(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=6)
        days: int = pydantic.Field(ge=1, le=7)

    tool = {"type": "function", "function": {"name": "forecast", "parameters": Weather}}
    c = tiny_model.chat(ASK, StreamConfig.greedy(300), template=templates["qwen2.5"], tools=[tool],
                        tool_choice="required")
    Weather.model_validate_json(c.tool_calls[0].arguments)


def test_a_thinking_template_goes_through_llama_cpp_s_library(tiny_model, templates, llama_cpp_dir):
    """Plain chat with a template that lets the model think is rendered and parsed by llama.cpp's
    chat library, as llama-server does, so the thinking comes back as reasoning_content."""
    from mullama._tools import plan_chat

    qwen3 = (llama_cpp_dir / "models" / "templates" / "Qwen-Qwen3-0.6B.jinja").read_text()
    assert plan_chat(tiny_model, ASK, qwen3) is not None
    assert plan_chat(tiny_model, ASK, templates["qwen2.5"]) is None
    assert plan_chat(tiny_model, ASK, "chatml") is None and plan_chat(tiny_model, ASK, None) is None
    c = tiny_model.chat(ASK, StreamConfig.greedy(16), template=qwen3)
    assert c.tool_calls == () and c.finish_reason == "length" and c.content == c.text.strip()


def test_a_one_off_chat_stream_makes_its_context_only_when_read(tiny_model, templates):
    def contexts():
        return sum(isinstance(o, mullama._core.LlamaContext) and not o.closed for o in list(mullama._core._live))

    before = contexts()
    for method in (tiny_model.chat_stream, tiny_model.chat_deltas):
        it = method(ASK, StreamConfig.greedy(4), template=templates["qwen2.5"], tools=TOOLS)
        assert contexts() == before  # checked and rendered, but no KV cache held yet
        it.close()
        stream = method(ASK, StreamConfig.greedy(4), template="chatml")
        next(stream)
        assert contexts() == before + 1
        stream.close()
        assert contexts() == before


def test_a_tool_marker_in_a_thought_is_no_call(tiny_model, llama_cpp_dir):
    """With a thinking template, the lazy tool grammar waits while the model thinks (as llama.cpp's
    reasoning budget makes it): "<tool_call>" inside <think>...</think> does not start a call."""
    qwen3 = (llama_cpp_dir / "models" / "templates" / "Qwen-Qwen3-0.6B.jinja").read_text()
    plan = ChatPlan(tiny_model, ASK, tools=TOOLS[:1], template=qwen3)
    assert plan.grammar.lazy and plan.grammar.reasoning == ("<think>", "</think>")
    # (a grammar triggered inside the thought would refuse "but not yet")
    status, (call,), deltas = _reply_after(
        tiny_model, plan, "<think>\nI could write <tool_call>\n but not yet.\n</think>\n\n<tool_call>\n")
    assert status == mullama._core.STATUS_EOG and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    assert "<tool_call>" in "".join(d.reasoning_content for d in deltas)
