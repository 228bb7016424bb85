"""Request bodies of the OpenAI-compatible API, as pydantic models (they also make /openapi.json).

Only the shape is checked here; meaning (roles in order, efforts, images, schemas) is judged by
the routes, which answer 400 with a message that names the field. Unknown fields are ignored, as
OpenAI-compatible servers do, so clients that send newer fields keep working.

One check here looks at the whole decoded body, before any field: every string (keys too) must be
Unicode that UTF-8 can encode. JSON's `\ud800` escapes decode to lone surrogates, which Python
keeps in a str but which no tokenizer, template or log can encode; refused here, they never reach
the queue or the engine thread.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Body):
    url: str
    detail: Optional[str] = None


class ContentPart(_Body):
    """`{"type": "text", "text": ...}` or `{"type": "image_url", "image_url": {"url": ...}}`."""

    type: str
    text: Optional[str] = None
    image_url: Optional[Union[ImageURL, str]] = None


class FunctionCall(_Body):
    name: str
    arguments: Union[str, dict[str, Any], None] = None


class ToolCallIn(_Body):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallIn]] = None
    tool_call_id: Optional[str] = None
    reasoning_content: Optional[str] = None


class FunctionDef(_Body):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Body):
    name: str


class ToolChoiceNamed(_Body):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(_Body):
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class StreamOptions(_Body):
    include_usage: Optional[bool] = None


class _Sampling(_Body):
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repeat_penalty: Optional[float] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    n: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[Any] = None
    logit_bias: Optional[dict[str, float]] = None


def _bad_unicode(value: Any, where: str = "") -> str | None:
    """The path of the first string in `value` that is not valid Unicode (a lone surrogate), or None.
    Iterative, so that a deeply nested body cannot exhaust the stack."""
    todo: list[tuple[Any, str]] = [(value, where)]
    while todo:
        item, at = todo.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return at or "body"
        elif isinstance(item, dict):
            for key, sub in item.items():
                path = f"{at}.{key}" if at else str(key)
                if isinstance(key, str) and _bad_unicode(key) is not None:
                    return path.encode("utf-8", "backslashreplace").decode("utf-8")
                todo.append((sub, path))
        elif isinstance(item, list):
            todo.extend((sub, f"{at}[{i}]") for i, sub in enumerate(item))
    return None


class _Request(_Sampling):
    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = _bad_unicode(data)
        if where is not None:
            raise PydanticCustomError("invalid_unicode", "{where}: the text holds a lone surrogate (such as "
                                      "\\ud800), which is not valid Unicode", {"where": where})
        return data


class ChatRequest(_Request):
    messages: list[Message]
    max_completion_tokens: Optional[int] = None
    reasoning_effort: Optional[str] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], ToolChoiceNamed, None] = None
    response_format: Optional[ResponseFormat] = None


class CompletionRequest(_Request):
    prompt: Union[str, list[str]]
    echo: Optional[bool] = None
    suffix: Optional[str] = None
