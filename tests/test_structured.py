"""Structured output: GBNF grammars and JSON schemas in both decode paths (the
context loop and the batching engine), on the tiny model."""

from __future__ import annotations

import json
import re

import anyio
import jsonschema
import pydantic
import pytest

import mullama
from mullama import Grammar, GrammarError, InvalidConfigError, StreamConfig
from mullama.aio import AsyncModel

YES_NO = 'root ::= "yes" | "no"'

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    age: int = pydantic.Field(ge=0, le=150)
    ok: bool


def sampled(seed: int, **kw) -> StreamConfig:
    return StreamConfig(max_tokens=400, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed, **kw)


# ---------------------------------------------------------------------------
# the context loop

def test_a_grammar_constrains_greedy_and_sampled_output(tiny_ctx):
    greedy = tiny_ctx.generate("once upon", StreamConfig.greedy(16, grammar=YES_NO))
    assert greedy.text in ("yes", "no") and greedy.finish_reason == "stop"
    for seed in range(8):
        tiny_ctx.reset()
        c = tiny_ctx.generate("hello", sampled(seed, grammar=YES_NO))
        assert c.text in ("yes", "no") and c.finish_reason == "stop", (seed, c)


def test_output_validates_against_the_schema_over_many_seeds(tiny_ctx):
    for seed in range(12):
        tiny_ctx.reset()
        c = tiny_ctx.generate("{", sampled(seed, json_schema=PERSON))
        assert c.finish_reason == "stop", (seed, c.text)
        jsonschema.validate(json.loads(c.text), PERSON)


def test_a_pydantic_model_is_a_schema(tiny_ctx):
    for seed in range(4):
        tiny_ctx.reset()
        c = tiny_ctx.generate("person:", sampled(seed, json_schema=Person))
        Person.model_validate_json(c.text)


def test_json_object_is_any_json_value():
    # (the tiny model's strings never end: only the grammar is compared here)
    any_json = StreamConfig(response_format={"type": "json_object"}).constraint
    assert any_json is not None and any_json.text == mullama._core.json_schema_to_grammar("{}")


@pytest.mark.parametrize("fmt, check", [
    ({"type": "json_object", "schema": {"type": "array", "items": {"type": "integer"}, "maxItems": 2}},
     lambda v: isinstance(v, list) and len(v) <= 2 and all(type(x) is int for x in v)),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}},
     lambda v: jsonschema.validate(v, PERSON) is None),
])
def test_response_formats(tiny_ctx, fmt, check):
    for seed in range(3):
        tiny_ctx.reset()
        c = tiny_ctx.generate("x", sampled(seed, response_format=fmt))
        assert c.finish_reason == "stop", c.text
        assert check(json.loads(c.text))


def test_text_response_format_is_unconstrained():
    assert StreamConfig(response_format={"type": "text"}).constraint is None


def test_a_grammar_dead_end_ends_the_generation_with_its_reason(tiny_ctx):
    # no token's text can start with a NUL byte: after "ab" the grammar allows nothing
    c = tiny_ctx.generate("once", StreamConfig.greedy(16, grammar='root ::= "ab" "\\x00"'))
    assert c.text == "ab" and c.finish_reason == "grammar_dead_end"
    tiny_ctx.reset()
    c = tiny_ctx.generate("once", StreamConfig(max_tokens=16, seed=1, grammar='root ::= "\\x00"'))
    assert c.text == "" and c.tokens == [] and c.finish_reason == "grammar_dead_end"
    # the context is usable afterwards
    assert tiny_ctx.generate("more", StreamConfig.greedy(4)).finish_reason in ("length", "stop")


def test_a_lazy_grammar_applies_from_its_trigger_token_on(tiny_ctx):
    free = tiny_ctx.generate("once upon", StreamConfig.greedy(8))
    trigger = free.tokens[2]
    tiny_ctx.reset()
    lazy = Grammar(f'root ::= <[{trigger}]> "zz"', trigger_tokens=[trigger])
    c = tiny_ctx.generate("once upon", StreamConfig.greedy(16, grammar=lazy))
    assert c.tokens[:3] == free.tokens[:3]
    prefix = tiny_ctx.model.detokenize(free.tokens[:3])
    assert c.text == prefix + "zz" and c.finish_reason == "stop"


def test_a_lazy_grammar_applies_from_its_trigger_pattern_on(tiny_ctx):
    first, second = (t.text for t in list(tiny_ctx.stream("hello there", StreamConfig.greedy(8)))[:2])
    assert first and second and second not in first
    tiny_ctx.reset()
    # the pattern's group is where the grammar starts: at the second token's text
    lazy = Grammar(f'root ::= {json.dumps(second)} "zz"', triggers=[f"^{re.escape(first)}({re.escape(second)})"])
    c = tiny_ctx.generate("hello there", StreamConfig.greedy(16, grammar=lazy))
    assert c.text == first + second + "zz" and c.finish_reason == "stop"


@pytest.mark.parametrize("grammar, expected", [
    ('root ::= "a"\nbad rule', r"line 2, column 5: expecting ::="),
    ('root ::= foo', r"undefined rule 'foo'"),
    ('root ::= "unterminated', r"line 1, column 23: unexpected end of input \(at the end\)"),
    ('root ::= [a-', r"unexpected end of input"),
    ('other ::= "a"', r"does not contain a 'root' symbol"),
    ('root ::= root "a" | "a"', r"left recursion"),
    ('root ::= <[99999]>', r"token id 99999 is outside the vocabulary \(512 tokens\)"),
    # what would make llama.cpp's parser allocate without end, or overflow the stack
    ('root ::= "a"{3,1}', r"column 13: repetition \{3,1\}: the minimum is above the maximum"),
    ('root ::= [a-z]{0, 1000000}', r"a repetition of more than 100000 times"),
    ('root ::= ' + "(" * 600 + '"a"' + ")" * 600, r"column 510: groups nested more than 500 levels deep"),
    ("\n".join([f"r{i} ::= r{i + 1}" for i in range(20000)] + ['r20000 ::= "a"', "root ::= r0"]),
     r"line 10001, .*more than 10000 rules"),
    ('root ::= "{" "(" [(] "#" # a (comment {3,1}\n', None),
])
def test_an_invalid_grammar_is_named_before_anything_is_decoded(tiny_ctx, grammar, expected):
    before = tiny_ctx.n_past
    if expected is None:  # (braces, parentheses and comments inside literals and classes are text)
        assert tiny_ctx.generate("once upon", StreamConfig.greedy(8, grammar=grammar)).text == "{((#"
        return
    with pytest.raises(GrammarError, match=expected):
        tiny_ctx.generate("once upon", StreamConfig.greedy(4, grammar=grammar))
    assert tiny_ctx.n_past == before


def test_a_prefill_the_grammar_refuses_is_an_error_not_an_abort(tiny_ctx, tiny_model):
    eos = tiny_model._core.special_tokens()[1]
    with pytest.raises(GrammarError, match="refuses its prefill tokens"):
        tiny_ctx.generate("hi", StreamConfig(grammar=Grammar('root ::= "a"', prefill_tokens=(eos,))))
    a = next(t for t in range(tiny_model.n_vocab) if tiny_model.token_to_piece(t) == b"a")
    ok = tiny_ctx.generate("hi", StreamConfig.greedy(8, grammar=Grammar('root ::= "ab"', prefill_tokens=(a,))))
    assert ok.text == "b" and ok.finish_reason == "stop"


def _nested(depth):
    schema = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize("schema, expected", [
    ('{"type": ', r"not valid JSON"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, r"missing|\$ref"),
    ({"type": "string", "pattern": "^(a$"}, r"pattern|parenthes"),
    ({"type": "frobnicate"}, r"frobnicate|type"),
    (False, r"allows no output"),
    ({"type": "object", "properties": {"a": {"type": "array", "minItems": 4, "maxItems": 2}}},
     r"at #/properties/a: minItems 4 is above maxItems 2"),
    ({"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(5000)}}, r"at most 65536"),
    (_nested(5000), r"cannot be written as JSON|too deeply"),
])
def test_an_invalid_schema_is_named(schema, expected):
    with pytest.raises(GrammarError, match=expected):
        StreamConfig(json_schema=schema)


@pytest.mark.parametrize("kw, expected", [
    ({"grammar": YES_NO, "json_schema": PERSON}, "at most one"),
    ({"response_format": {"type": "xml"}}, "response_format type"),
    ({"response_format": {"type": "json_schema"}}, "needs"),
    ({"response_format": "json"}, "must be a dict"),
    ({"json_schema": 3}, "must be a dict"),
    ({"grammar": 3}, "must be a str or a Grammar"),
    ({"grammar": "  "}, "empty"),
    ({"grammar": 'root ::= "\ud800"'}, "not valid text: surrogates not allowed at character 10"),
])
def test_bad_constraint_settings(kw, expected):
    with pytest.raises((InvalidConfigError, GrammarError), match=expected):
        StreamConfig(**kw)


def test_bad_grammar_settings():
    with pytest.raises(InvalidConfigError, match="trigger must be a str"):
        Grammar(YES_NO, triggers=[3])
    with pytest.raises(InvalidConfigError, match="root must be a rule name"):
        Grammar(YES_NO, root="")
    with pytest.raises(InvalidConfigError, match="bool"):
        Grammar(YES_NO, trigger_tokens=[True])


def test_an_invalid_trigger_pattern_is_a_grammar_error(tiny_ctx):
    with pytest.raises(GrammarError, match="trigger pattern"):
        tiny_ctx.generate("x", StreamConfig.greedy(4, grammar=Grammar(YES_NO, triggers=["(unclosed"])))


def test_a_config_with_a_schema_is_hashable_and_text_is_no_constraint():
    assert hash(StreamConfig(json_schema=PERSON)) == hash(StreamConfig(json_schema=dict(PERSON)))
    assert StreamConfig(response_format={"type": "text"}).response_format is None
    with pytest.raises(InvalidConfigError, match="must be a dict"):
        StreamConfig(response_format={"type": "json_object", "schema": []})


def test_replace_keeps_a_schema_config_valid():
    cfg = StreamConfig(json_schema=PERSON)
    again = cfg.replace(temperature=0.0)
    assert again.constraint == cfg.constraint and again.json_schema == PERSON


# ---------------------------------------------------------------------------
# the batching engine (asyncio and trio)

pytest_anyio = pytest.mark.anyio


@pytest_anyio
async def test_constrained_and_free_requests_batched_equal_one_at_a_time(tiny_model_path):
    cfgs = [StreamConfig.greedy(300, json_schema=PERSON), StreamConfig.greedy(24),
            sampled(5, json_schema=PERSON), StreamConfig.greedy(16, grammar=YES_NO),
            sampled(7), StreamConfig.greedy(16, grammar='root ::= "ab" "\\x00"')]
    prompts = ["{", "once upon", "x", "hello", "abc", "once"]
    with mullama.Model.load(tiny_model_path) as m:
        expected = []
        for p, cfg in zip(prompts, cfgs):
            with m.create_context(1024, threads=1) as ctx:
                expected.append(ctx.generate(p, cfg))
    async with await AsyncModel.load(tiny_model_path, max_concurrent=4, context_size=4096, threads=1) as model:
        got = [None] * len(cfgs)

        async def one(i):
            got[i] = await model.generate(prompts[i], config=cfgs[i])

        async with anyio.create_task_group() as tg:
            for i in range(len(cfgs)):
                tg.start_soon(one, i)
        assert model.kv_used() == 0 and model.active_workers == 0
    for g, e in zip(got, expected):
        assert (g.tokens, g.text, g.finish_reason) == (e.tokens, e.text, e.finish_reason)
    assert got[0].finish_reason == got[2].finish_reason == "stop"
    jsonschema.validate(json.loads(got[0].text), PERSON)
    jsonschema.validate(json.loads(got[2].text), PERSON)
    assert got[5].finish_reason == "grammar_dead_end" and got[5].text == "ab"


@pytest_anyio
async def test_schema_output_validates_on_the_engine(tiny_model_path):
    async with await AsyncModel.load(tiny_model_path, max_concurrent=4, context_size=4096, threads=1) as model:
        results = []

        async def one(seed):
            results.append(await model.generate("{", config=sampled(seed, json_schema=PERSON)))

        async with anyio.create_task_group() as tg:
            for seed in range(8):
                tg.start_soon(one, seed)
    for c in results:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), PERSON)


@pytest_anyio
async def test_an_invalid_grammar_fails_the_request_not_the_engine(tiny_model_path):
    async with await AsyncModel.load(tiny_model_path, max_concurrent=2, context_size=1024, threads=1) as model:
        with pytest.raises(GrammarError, match="undefined rule"):
            await model.generate("x", config=StreamConfig.greedy(4, grammar="root ::= nope"))
        ok = await model.generate("x", config=StreamConfig.greedy(4, grammar=YES_NO))
        assert ok.text in ("yes", "no")
        assert model.kv_used() == 0


@pytest_anyio
async def test_a_cancelled_constrained_request_frees_its_slot(tiny_model_path):
    # an unbounded grammar (letters forever) so that only the cancel ends it
    cfg = StreamConfig(max_tokens=2000, temperature=1.0, seed=3, grammar='root ::= [a-z]+')
    async with await AsyncModel.load(tiny_model_path, max_concurrent=1, context_size=4096, threads=1) as model:
        seen = 0
        with anyio.CancelScope() as scope:
            async with model.generate_stream("x", cfg) as stream:
                async for tok in stream:
                    assert tok.text.isalpha() and tok.text.islower()
                    seen += 1
                    if seen == 20:
                        scope.cancel()
        assert seen == 20
        with anyio.fail_after(30):
            while model.active_workers or model.kv_used():
                await anyio.sleep(0.01)
        again = await model.generate("x", config=StreamConfig.greedy(4, grammar=YES_NO))
        assert again.text in ("yes", "no")


# ---------------------------------------------------------------------------
# the converter never crashes on a schema: a grammar or a GrammarError

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_KEYS = ["type", "properties", "items", "enum", "const", "$ref", "anyOf", "oneOf", "allOf", "pattern", "format",
         "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems", "required", "additionalProperties",
         "$defs", "prefixItems", "exclusiveMinimum", "not"]
_LEAF = (st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False)
         | st.sampled_from(["string", "integer", "number", "object", "array", "boolean", "null", "#/$defs/a",
                            "^a+$", "date", "uuid", "(", "a", ""]))
_SCHEMA = st.recursive(_LEAF, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.sampled_from(_KEYS + ["a", "b"]), inner, max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=_SCHEMA.filter(lambda s: s is not None))
def test_any_schema_gives_a_grammar_or_a_grammar_error(schema):
    try:
        cfg = StreamConfig(json_schema=schema)
    except (GrammarError, InvalidConfigError) as exc:
        assert str(exc)
        return
    assert cfg.constraint is not None and "root ::=" in cfg.constraint.text


# ---------------------------------------------------------------------------
# every schema shape the README lists, at temperature 1.0 over several seeds

_DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
_TIME = r"[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{3})?(Z|[+-][0-9]{2}:[0-9]{2})"
SHAPES = {
    "type list": {"type": ["integer", "null", "boolean"]},
    "properties, required, additionalProperties": PERSON,
    "items, minItems, maxItems": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
    "prefixItems": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "boolean"}]},
    "enum": {"enum": ["red", 1, None, True, {"k": [1]}]},
    "const": {"const": {"k": [1, "two"]}},
    "anyOf": {"anyOf": [{"type": "integer"}, {"type": "boolean"}]},
    "oneOf": {"oneOf": [{"type": "null"}, {"type": "string", "maxLength": 3}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                        {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}]},
    "$ref, $defs": {"$defs": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
                    "type": "array", "items": {"$ref": "#/$defs/n"}, "maxItems": 3},
    "minLength, maxLength": {"type": "string", "minLength": 2, "maxLength": 5},
    "minimum, maximum": {"type": "integer", "minimum": -5, "maximum": 300},
    "exclusiveMinimum, exclusiveMaximum": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
    "number": {"type": "number"},
    "pattern": {"type": "string", "pattern": "^[a-c]{2,4}-[0-9]{1,3}$"},
    "format date": {"type": "string", "format": "date"},
    "format time": {"type": "string", "format": "time"},
    "format date-time": {"type": "string", "format": "date-time"},
    "format uuid": {"type": "string", "format": "uuid"},
}
_FORMATS = {"date": f"^{_DATE}$", "time": f"^{_TIME}$", "date-time": f"^{_DATE}T{_TIME}$",
            "uuid": "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_listed_schema_shape_validates(tiny_ctx, shape):
    schema = SHAPES[shape]
    for seed in range(4):
        tiny_ctx.reset()
        c = tiny_ctx.generate("value:", sampled(seed, json_schema=schema))
        assert c.finish_reason == "stop", (seed, c.text)
        value = json.loads(c.text)
        jsonschema.validate(value, schema)
        if "format" in schema:
            assert re.match(_FORMATS[schema["format"]], value), value


# ---------------------------------------------------------------------------
# top log-probabilities (issue 15): found in the C loop, in both decode paths

def test_top_logprobs_are_the_most_likely_tokens_of_the_raw_distribution(tiny_model):
    import numpy as np

    with tiny_model.create_context(512, threads=1) as ctx:
        ctx.eval(tiny_model.tokenize("once upon"))
        logits = np.array(ctx.logits(), dtype=np.float64)
        ctx.reset()
        c = ctx.generate("once upon", StreamConfig.greedy(6, top_logprobs=5))
    logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    first = c.top_logprobs[0]
    assert [t for t, _ in first] == [int(i) for i in np.argsort(-logp, kind="stable")[:5]]
    assert [lp for _, lp in first] == pytest.approx([float(logp[t]) for t, _ in first], abs=1e-4)
    for toks, chosen, lp in zip(c.top_logprobs, c.tokens, c.logprobs):
        assert len(toks) == 5 and toks[0] == (chosen, lp)  # greedy: the chosen token is the most likely
        assert all(a[1] >= b[1] for a, b in zip(toks, toks[1:]))
    assert StreamConfig(top_logprobs=3).include_probabilities
    with pytest.raises(InvalidConfigError, match="top_logprobs must be between 0 and 20"):
        StreamConfig(top_logprobs=21)


@pytest_anyio
async def test_top_logprobs_on_the_engine_equal_one_at_a_time(tiny_model, tiny_model_path):
    cfgs = [StreamConfig.greedy(8, top_logprobs=k) for k in (1, 3, 20)] + [sampled(2, top_logprobs=4)] + [
        StreamConfig.greedy(8, top_logprobs=2, logit_bias={400: 5.0, 455: -100})]
    with tiny_model.create_context(1024, threads=1) as ctx:
        expected = []
        for cfg in cfgs:
            ctx.reset()
            expected.append(ctx.generate("hello", cfg))
    async with await AsyncModel.load(tiny_model_path, max_concurrent=4, context_size=4096, threads=1) as model:
        got = [None] * len(cfgs)

        async def one(i):
            got[i] = await model.generate("hello", config=cfgs[i])

        async with anyio.create_task_group() as tg:
            for i in range(len(cfgs)):
                tg.start_soon(one, i)
        async with model.generate_stream("hello", cfgs[1]) as stream:
            streamed = [t.top_logprobs async for t in stream]
    for g, e in zip(got, expected):
        assert [[t for t, _ in row] for row in g.top_logprobs] == [[t for t, _ in row] for row in e.top_logprobs]
    assert [[t for t, _ in row] for row in streamed] == [[t for t, _ in row] for row in got[1].top_logprobs]


# ---------------------------------------------------------------------------
# logit_bias (issue 15): in the sampler chain, both decode paths

def test_logit_bias_bans_and_forces_tokens(tiny_model):
    with tiny_model.create_context(512, threads=1) as ctx:
        free = ctx.generate("once upon", StreamConfig.greedy(6))
        ctx.reset()
        banned = ctx.generate("once upon", StreamConfig.greedy(6, logit_bias={free.tokens[0]: -100}))
        ctx.reset()
        forced = ctx.generate("once upon", StreamConfig.greedy(6, logit_bias={free.tokens[0]: 100}))
    assert banned.tokens[0] != free.tokens[0] and free.tokens[0] not in banned.tokens
    assert forced.tokens == [free.tokens[0]] * 6
    assert StreamConfig(logit_bias={5: 1, 3: -2.5}).logit_bias == ((3, -2.5), (5, 1.0))
    for bad, match in (({-1: 1}, "logit_bias token must be"), ({5: 101}, r"logit_bias\[5\] must be"),
                       ({True: 1}, "logit_bias token must be an integer"), (["x"], "logit_bias must be a dict")):
        with pytest.raises(InvalidConfigError, match=match):
            StreamConfig(logit_bias=bad)
    with tiny_model.create_context(64, threads=1) as ctx:
        with pytest.raises(mullama.InvalidTokenError, match="logit_bias token 9999 is outside the vocabulary"):
            ctx.generate("x", StreamConfig(logit_bias={9999: 1}))
        assert ctx.n_past == 0  # refused before anything was decoded
