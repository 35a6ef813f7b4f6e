"""Chat templates and chat generation: sync, async (asyncio and trio), pool."""

from __future__ import annotations

import pytest

import mullama
from mullama import StreamConfig
from mullama._chat import chat_tokens
from mullama.aio import AsyncModel, ModelPool

GREEDY = StreamConfig.greedy(12)
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
# a small Jinja template in the Hugging Face style, for the tiny model (which has none)
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
    "<{{ m['role'] }}>{{ m['content'] | trim }}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_default_model_uses_its_own_template(default_model):
    text = default_model.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    # the template's special tokens become single special tokens, not text
    toks = chat_tokens(default_model, [{"role": "user", "content": "What is 2+2?"}])
    im_start = default_model.tokenize("<|im_start|>", add_bos=False, special=True)
    assert len(im_start) == 1 and toks[0] == im_start[0] and toks.count(im_start[0]) == 3


def test_default_model_chat_answers_and_stops_at_end_of_turn(default_model):
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    done = default_model.chat(msgs, StreamConfig.greedy(64))
    assert "Paris" in done.text
    assert done.finish_reason == "stop" and "<|im_end|>" not in done.text
    assert "".join(t.text for t in default_model.chat_stream(msgs, StreamConfig.greedy(64))) == done.text


def test_model_without_template_needs_one(tiny_model):
    with pytest.raises(mullama.ChatTemplateError, match="no chat template.*chatml"):
        tiny_model.apply_chat_template(CONV)
    with pytest.raises(mullama.ChatTemplateError, match="no chat template"):
        tiny_model.chat(CONV)


def test_builtin_template_by_name(tiny_model):
    assert "chatml" in mullama.builtin_templates() and "llama3" in mullama.builtin_templates()
    assert tiny_model.apply_chat_template(CONV, template="chatml") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n")
    assert tiny_model.apply_chat_template(CONV, template="chatml", add_generation_prompt=False).endswith(
        "Say hi<|im_end|>\n")


def test_jinja_template(tiny_model):
    bos = tiny_model.token_to_piece(tiny_model._core.special_tokens()[0], special=True).decode()
    text = tiny_model.apply_chat_template(CONV, template=TEMPLATE)
    assert text == f"{bos}<system>Be brief.</s>\n<user>Say hi</s>\n<assistant>"
    # the template wrote BOS: it is not added a second time
    toks = chat_tokens(tiny_model, CONV, TEMPLATE)
    assert toks == tiny_model.tokenize(text, add_bos=False, special=True)
    assert toks.count(tiny_model._core.special_tokens()[0]) == 1


def test_template_errors_are_named(tiny_model):
    with pytest.raises(mullama.ChatTemplateError, match="refused the messages: bad role tool"):
        tiny_model.apply_chat_template([{"role": "tool", "content": "x"}], template=TEMPLATE)
    with pytest.raises(mullama.ChatTemplateError, match="not valid Jinja"):
        tiny_model.apply_chat_template(CONV, template="{% for m in messages %}")
    with pytest.raises(mullama.ChatTemplateError, match="failed"):
        tiny_model.apply_chat_template(CONV, template="{{ messages[5]['content'].upper() }}")
    # the sandbox: a template cannot reach Python internals
    with pytest.raises(mullama.ChatTemplateError):
        tiny_model.apply_chat_template(CONV, template="{{ messages.__class__.__subclasses__() }}")
    with pytest.raises(mullama.InvalidConfigError, match="template must be"):
        tiny_model.apply_chat_template(CONV, template="  ")
    # a mistyped built-in name is not taken for a template that renders as itself
    with pytest.raises(mullama.ChatTemplateError, match="unknown chat template 'chatlm'.*chatml"):
        tiny_model.apply_chat_template(CONV, template="chatlm")
    with pytest.raises(mullama.InvalidConfigError, match="NUL"):
        tiny_model.apply_chat_template([{"role": "user", "content": "a\0b"}], template="chatml")


def test_generation_tag(tiny_model):
    """transformers' {% generation %} block (it marks assistant text for training) renders its body."""
    tmpl = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}<a>{{ m['content'] }}"
            "{% endgeneration %}{% else %}<u>{{ m['content'] }}{% endif %}{% endfor %}")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tiny_model.apply_chat_template(msgs, template=tmpl) == "<u>hi<a>yo"


@pytest.mark.parametrize("messages, match", [
    ("hello", "must be a list"),
    ([], "must not be empty"),
    ([{"content": "x"}], r"messages\[0\]\['role'\]"),
    ([{"role": "user", "content": "x"}, "hi"], r"messages\[1\] must be a dict"),
    ([{"role": "user", "content": 5}], "string or a list of text parts"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "only text content"),
])
def test_bad_messages(tiny_model, messages, match):
    with pytest.raises(mullama.InvalidConfigError, match=match):
        tiny_model.apply_chat_template(messages, template="chatml")


def test_text_parts_and_missing_content(tiny_model):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi"}]}]
    assert tiny_model.apply_chat_template(parts, template="chatml") == tiny_model.apply_chat_template(
        [{"role": "user", "content": "Say hi"}], template="chatml")
    assert "<|im_start|>assistant\n<|im_end|>" in tiny_model.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}], template="chatml")


def test_model_chat_equals_context_chat(tiny_model):
    one_off = tiny_model.chat(CONV, GREEDY, template="chatml")
    with tiny_model.create_context(512, threads=1) as ctx:
        in_ctx = ctx.chat(CONV, GREEDY, template="chatml")
        assert ctx.tokens == chat_tokens(tiny_model, CONV, "chatml") + in_ctx.tokens
    assert one_off.tokens == in_ctx.tokens and one_off.text == in_ctx.text
    streamed = list(tiny_model.chat_stream(CONV, GREEDY, template="chatml"))
    assert [t.id for t in streamed] == one_off.tokens


def test_context_chat_reuses_the_shared_prefix(tiny_model):
    with tiny_model.create_context(1024, threads=1) as ctx:
        first = ctx.chat(CONV, GREEDY, template="chatml")
        conv2 = CONV + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Again"}]
        full = chat_tokens(tiny_model, conv2, "chatml")
        shared = len(chat_tokens(tiny_model, CONV, "chatml"))
        second = ctx.chat(conv2, GREEDY, template="chatml")
        # only the tokens after the shared prefix were evaluated
        assert second.timings.prompt_tokens < len(full) - shared + 1
        assert ctx.tokens == full + second.tokens
        # a different conversation keeps only what it shares (here: nothing past the system turn)
        other = [CONV[0], {"role": "user", "content": "Something else"}]
        third = ctx.chat(other, GREEDY, template="chatml")
        assert ctx.tokens == chat_tokens(tiny_model, other, "chatml") + third.tokens
        # the same conversation again evaluates one token (the logits need it)
        again = ctx.chat(other, GREEDY, template="chatml")
        assert again.timings.prompt_tokens == 1 and again.tokens == third.tokens


def test_penalties(tiny_model):
    for name in ("frequency_penalty", "presence_penalty"):
        with pytest.raises(mullama.InvalidConfigError, match=name):
            StreamConfig(**{name: 2.5})
        with pytest.raises(mullama.InvalidConfigError, match=name):
            StreamConfig(**{name: float("nan")})
    with tiny_model.create_context(512, threads=1) as ctx:
        plain = ctx.generate("ab", StreamConfig.greedy(48))
        ctx.reset()
        assert ctx.generate("ab", StreamConfig.greedy(48)).tokens == plain.tokens
        for name in ("frequency_penalty", "presence_penalty"):
            ctx.reset()
            penalised = ctx.generate("ab", StreamConfig.greedy(48, **{name: 2.0}))
            # greedy decoding of the tiny model repeats itself; a penalty breaks the loop
            assert penalised.tokens != plain.tokens
            assert len(set(penalised.tokens)) > len(set(plain.tokens))


@pytest.mark.anyio
async def test_async_chat_equals_sync(tiny_model_path, tiny_model):
    expected = tiny_model.chat(CONV, GREEDY, template="chatml")
    async with await AsyncModel.load(tiny_model_path, context_size=512, threads=1, max_concurrent=2) as model:
        got = await model.chat(CONV, GREEDY, template="chatml")
        assert got.tokens == expected.tokens and got.text == expected.text
        short = await model.chat(CONV, GREEDY, max_tokens=3, template="chatml")
        assert short.tokens == expected.tokens[:3] and short.finish_reason == "length"
        async with model.chat_stream(CONV, GREEDY, template="chatml") as stream:
            assert "".join([t.text async for t in stream]) == expected.text
        assert await model.tokenize_chat(CONV, template="chatml") == chat_tokens(tiny_model, CONV, "chatml")
        with pytest.raises(mullama.ChatTemplateError, match="no chat template"):
            await model.chat(CONV)
        with pytest.raises(mullama.ChatTemplateError, match="no chat template"):
            await model.tokenize_chat(CONV)
        with pytest.raises(mullama.InvalidConfigError, match="must not be empty"):
            model.chat_stream([])

        conv = await model.create_context()
        first = await conv.chat(CONV, GREEDY, template="chatml")
        assert first.tokens == expected.tokens
        conv2 = CONV + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Again"}]
        second = await conv.chat(conv2, GREEDY, template="chatml")
        assert conv.tokens == chat_tokens(tiny_model, conv2, "chatml") + second.tokens
        assert second.timings.prompt_tokens < len(chat_tokens(tiny_model, conv2, "chatml")) - len(first.tokens)


@pytest.mark.anyio
async def test_pool_member_chat(tiny_model_path, tiny_model):
    expected = tiny_model.chat(CONV, GREEDY, template="chatml")
    async with ModelPool(mullama.aio.AsyncConfig(tiny_model_path, context_size=512, threads=1), 1) as pool:
        async with pool.acquire() as m:
            assert (await m.chat(CONV, GREEDY, template="chatml")).tokens == expected.tokens
            async with m.chat_stream(CONV + [{"role": "assistant", "content": expected.text}], GREEDY,
                                     template="chatml") as stream:
                assert [t async for t in stream]


def test_messages_are_checked_once():
    """check_messages makes plain dicts with text content; what it made passes again as it is
    (a request's messages go through the server, the model and the renderer: one walk, not three),
    while anything else is checked in full."""
    from mullama._chat import check_messages

    given = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    checked = check_messages(given)
    assert checked == [{"role": "user", "content": "ab"}] and given[0]["content"] != "ab"
    assert check_messages(checked) is checked
    again = list(checked)  # a plain list of the same dicts: checked again
    assert check_messages(again) is not again and check_messages(again) == checked
    with pytest.raises(mullama.InvalidConfigError, match=r"messages\[1\]"):
        check_messages(checked + [{"role": "", "content": "x"}])
