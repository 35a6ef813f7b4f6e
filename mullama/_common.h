// mullama's wrappers around llama.cpp's common library (common/, built static from
// the pinned source): the calls _core.pyx makes, with strings in and out so the
// Cython side needs no declaration of common's C++ types.

#pragma once

#include <string>

#include "json.h"
#include "json-schema-to-grammar.h"

namespace mullama {

// A JSON schema (as JSON text) converted to a GBNF grammar by llama.cpp's own
// converter, the one llama-server uses. Throws std::invalid_argument naming the
// schema path of a schema it cannot convert.
inline std::string schema_to_grammar(const std::string & schema_json) {
    return json_schema_to_grammar(common_json::parse(schema_json), true);
}

}  // namespace mullama
