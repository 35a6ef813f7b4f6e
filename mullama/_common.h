// mullama's wrappers around llama.cpp's common library (common/, built static from
// the pinned source): the calls _core.pyx makes, with JSON text in and out so the
// Cython side needs no declaration of common's C++ types.
//
// Everything here may throw (std::exception subclasses, common_json_error); the
// Cython declarations are `except +`, so errors arrive in Python as exceptions.

#pragma once

#include <memory>
#include <random>
#include <string>
#include <vector>

#include "chat.h"
#include "json.h"
#include "json-schema-to-grammar.h"
#include "log.h"

namespace mullama {

// common's own log (LOG_ERR ...) prints to stderr from a thread of its own; every
// error it reports is also thrown, so it is switched off (before its first use)
inline void quiet_common_log() {
    common_log_set_verbosity_thold(-1);
}

// A JSON schema (as JSON text) converted to a GBNF grammar by llama.cpp's own
// converter, the one llama-server uses. Throws std::invalid_argument naming the
// schema path of a schema it cannot convert.
inline std::string schema_to_grammar(const std::string & schema_json) {
    return json_schema_to_grammar(common_json::parse(schema_json), true);
}

// -- chat templates with tools (common/chat.h), as llama-server applies them ---------

inline common_chat_templates * chat_templates_new(const llama_model * model, const std::string & override_src) {
    return common_chat_templates_init(model, override_src).release();
}

inline void chat_templates_free(common_chat_templates * t) {
    common_chat_templates_free(t);
}

// Render a request (JSON: messages, tools, tool_choice, parallel_tool_calls,
// add_generation_prompt, enable_thinking, reasoning_format, chat_template_kwargs)
// and return what generating its answer needs (JSON: prompt, grammar,
// grammar_lazy, triggers, preserved_tokens, additional_stops, format_id,
// generation_prompt, parser, supports_thinking and its tags, caps).
inline std::string chat_apply(const common_chat_templates * t, const std::string & request_json) {
    const common_json req = common_json::parse(request_json);
    common_chat_templates_inputs in;
    in.messages = common_chat_msgs_parse_oaicompat(req.at("messages"));
    if (req.contains("tools") && !req.at("tools").is_null()) {
        in.tools = common_chat_tools_parse_oaicompat(req.at("tools"));
    }
    in.tool_choice = common_chat_tool_choice_parse_oaicompat(req.value("tool_choice", std::string("auto")));
    in.parallel_tool_calls = req.value("parallel_tool_calls", false);
    in.add_generation_prompt = req.value("add_generation_prompt", true);
    in.enable_thinking = req.value("enable_thinking", true);
    in.reasoning_format = common_reasoning_format_from_name(req.value("reasoning_format", std::string("none")));
    if (req.contains("chat_template_kwargs")) {
        for (const auto & [key, value] : req.at("chat_template_kwargs").items()) {
            in.chat_template_kwargs[key] = value.dump();
        }
    }
    const common_chat_params p = common_chat_templates_apply(t, in);
    common_json out = common_json::object();
    out["prompt"] = p.prompt;
    out["grammar"] = p.grammar;
    out["grammar_lazy"] = p.grammar_lazy;
    common_json triggers = common_json::array();
    for (const auto & tr : p.grammar_triggers) {
        common_json j = common_json::object();
        j["type"] = tr.type == COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN ? "token"
                  : tr.type == COMMON_GRAMMAR_TRIGGER_TYPE_WORD ? "word"
                  : tr.type == COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN ? "pattern" : "pattern_full";
        j["value"] = tr.value;
        j["token"] = common_json_value((int64_t) tr.token);
        triggers.push_back(j);
    }
    out["triggers"] = triggers;
    out["preserved_tokens"] = p.preserved_tokens;
    out["additional_stops"] = p.additional_stops;
    out["format_id"] = common_json_value((int64_t) p.format);
    out["generation_prompt"] = p.generation_prompt;
    out["parser"] = p.parser;
    out["supports_thinking"] = p.supports_thinking;
    out["thinking_start_tag"] = p.thinking_start_tag;
    out["thinking_end_tags"] = p.thinking_end_tags;
    out["caps"] = common_chat_templates_get_caps(t);
    return out.dump();
}

// Parses a generated reply into content, reasoning_content and tool_calls, as it
// grows; each parse also gives the changes since the previous one.
struct ChatParser {
    common_chat_parser_params params;
    common_chat_msg msg;                 // the last parse
    std::vector<std::string> ids;        // tool call ids, kept from parse to parse
    std::mt19937_64 rng{std::random_device{}()};

    std::string new_id() {
        static const char chars[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        std::string id = "call_";
        for (int i = 0; i < 24; i++) id += chars[rng() % (sizeof chars - 1)];
        return id;
    }
};

inline ChatParser * chat_parser_new(int format, const std::string & generation_prompt, const std::string & parser,
                                    const std::string & reasoning_format, bool parse_tool_calls) {
    std::unique_ptr<ChatParser> cp(new ChatParser());
    cp->params.format = (common_chat_format) format;
    cp->params.generation_prompt = generation_prompt;
    cp->params.reasoning_format = common_reasoning_format_from_name(reasoning_format);
    cp->params.parse_tool_calls = parse_tool_calls;
    if (!parser.empty()) {
        cp->params.parser.load(parser);
    }
    return cp.release();
}

inline void chat_parser_free(ChatParser * cp) {
    delete cp;
}

// Parse *text* (the whole reply so far; *partial* while it may still grow).
// Returns JSON {"message": OpenAI's message, "diffs": [{"reasoning_content",
// "content", "index", "id", "name", "arguments"}, ...]} (the diffs since the last
// parse, llama.cpp's common_chat_msg_diff). Throws if a final reply does not
// match the template's format.
inline std::string chat_parse(ChatParser * cp, const std::string & text, bool partial) {
    common_chat_msg next = common_chat_parse(text, partial, cp->params);
    common_json diffs = common_json::array();
    if (!next.empty()) {
        next.set_tool_call_ids(cp->ids, [cp]() { return cp->new_id(); });
        for (const auto & d : common_chat_msg_diff::compute_diffs(cp->msg, next)) {
            common_json j = common_json::object();
            j["reasoning_content"] = d.reasoning_content_delta;
            j["content"] = d.content_delta;
            j["index"] = common_json_value((int64_t) (d.tool_call_index == std::string::npos ? -1 : (int64_t) d.tool_call_index));
            j["id"] = d.tool_call_delta.id;
            j["name"] = d.tool_call_delta.name;
            j["arguments"] = d.tool_call_delta.arguments;
            diffs.push_back(j);
        }
        cp->msg = next;
    }
    common_json out = common_json::object();
    out["message"] = cp->msg.to_json_oaicompat();
    out["diffs"] = diffs;
    return out.dump();
}

}  // namespace mullama
