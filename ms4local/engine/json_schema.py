"""JSON schema → GBNF through llama-cpp-python's copy of llama.cpp's converter (the server's
response_format and tool arguments)."""

from __future__ import annotations

from typing import Any

from ..errors import PromptError
from ..grammar import check_grammar, check_schema, integer_bounds, integer_rule
from .library import schema_converter


def json_grammar(schemas: dict[str, Any]) -> str:
    """GBNF with one rule per entry of `schemas` (rule name → JSON schema), each matching the JSON
    values the schema allows, plus the helper rules they share. The caller writes `root`.

    llama-cpp-python's copy of llama.cpp's schema converter does the work, so a schema means here
    what it means to llama-server. It signals unsupported schemas with asserts, ValueErrors and
    KeyErrors alike (and recursion for self-referencing ones), so every failure becomes one
    PromptError naming the schema as the cause.
    """
    RESERVED_NAMES, SchemaConverter = schema_converter()

    class Converter(SchemaConverter):
        """The converter, plus integer bounds (ms4local/grammar.py), which this copy ignores."""

        def visit(self, schema: Any, name: str) -> str:
            bounds = integer_bounds(schema) if isinstance(schema, dict) and schema.get("type") == "integer" \
                and not {"$ref", "oneOf", "anyOf", "allOf", "const", "enum"} & set(schema) else None
            if bounds is None:
                return super().visit(schema, name)
            rule = name + "-" if name in RESERVED_NAMES else name or "root"
            return self._add_rule(rule, integer_rule(*bounds))

    check_schema(*schemas.values())  # the converter expands counts in Python: bounded first
    conv = Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    for name, schema in schemas.items():
        try:
            key = conv.visit(conv.resolve_refs(schema, "request"), name)
            if key != name:  # a primitive schema gets the primitive's rule name: point `name` at it
                conv._add_rule(name, key)
        except RecursionError:
            raise PromptError("the JSON schema nests or refers to itself too deeply to become a grammar") from None
        except PromptError:
            raise
        except Exception as e:  # the converter's own checks; see the docstring
            raise PromptError(f"the JSON schema cannot be turned into a grammar: {e or type(e).__name__}") from None
    grammar = conv.format_grammar()
    check_grammar(grammar)
    return grammar


