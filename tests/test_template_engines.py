"""ms4local's template stays within what llama.cpp's own Jinja engine reads as jinja2 does.

llama-server (default `--jinja`) renders GGUF templates with llama.cpp's C++ Jinja engine
(common/jinja), not jinja2. `make compat` runs the template in a real llama-server and compares
the ids with mistral-common; building llama-server takes too long for the test suite, so these
checks hold the template to the rules that make it work there, cheaply:

- `obj.name` resolves to a built-in method first when one exists (value.cpp: get, items, keys,
  values, length, string, tojson, dictsort, join on objects), so `namespace(items=[])` then
  `ns.items` is the method: "Function has no builtins" when llama-server loads the file;
- dict methods other than `.items()` are Python's, not every engine's: subscripts and
  `is defined` instead of `.get()`;
- llama.cpp's `tojson` writes floats with 6 significant digits (1.0 as 1): JSON is written by the
  template's json_dumps macro, which gives floats their string form and tojson the rest.
"""

from __future__ import annotations

import re

from quantize.vocab import default_chat_template

OBJECT_BUILTINS = {"get", "items", "keys", "values", "length", "string", "tojson", "dictsort", "join"}


def code() -> str:
    """The template without its comments."""
    return re.sub(r"\{#.*?#\}", "", default_chat_template(), flags=re.S)


def test_no_namespace_attribute_is_named_like_a_builtin():
    names = set()
    for args in re.findall(r"namespace\(([^)]*)\)", code()):
        names |= set(re.findall(r"(\w+)\s*=", args))
    assert names, "the template has namespaces; the pattern must find their attributes"
    assert not names & OBJECT_BUILTINS


def test_no_dict_methods_but_items():
    methods = set(re.findall(r"\.(\w+)\(", code()))
    assert methods <= {"items", "rstrip"}, methods


def test_tojson_only_inside_the_json_writer():
    text = code()
    macro = re.search(r"\{%-? macro json_dumps\(v\).*?\{%-? endmacro", text, flags=re.S)
    assert macro and "v is float" in macro.group(0)
    assert "tojson" not in text.replace(macro.group(0), "")
