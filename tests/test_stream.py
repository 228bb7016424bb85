"""The streaming output parser: reasoning, answer and tool calls, in every way the pieces can arrive.

Expected results are written out by hand from the v15 output format, and the tool-call format
itself is taken from mistral-common: the ids its InstructTokenizerV15 encodes for an assistant
turn (what the model is trained to produce) are fed back through the parser.
"""

from __future__ import annotations

import codecs
import itertools
import json
import subprocess
import sys

import pytest
from mistral_common.protocol.instruct.chunk import TextChunk, ThinkChunk
from mistral_common.protocol.instruct.messages import AssistantMessage
from mistral_common.protocol.instruct.tool_calls import FunctionCall
from mistral_common.protocol.instruct.tool_calls import ToolCall as McToolCall
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from ms4local.stream import (
    ContentDelta, End, MalformedToolCall, ReasoningDelta, StreamParser, Tag, Tags, ToolCall, ToolCallDelta, parse,
)
from quantize.synth import TinySpec, v15_tekken

# What a reasoning answer with two tool calls looks like as text (control tokens spelled out).
SAMPLE = ('[THINK]Let me [think] about <it>.[/THINK]The answer: 4.[TOOL_CALLS]get_weather'
          '[ARGS]{"city": "Paris", "note": "[x]"}[TOOL_CALLS]get_time[ARGS]{}</s>')
SAMPLE_RESULT = {
    "reasoning": "Let me [think] about <it>.",
    "content": "The answer: 4.",
    "calls": [ToolCall(0, "get_weather", '{"city": "Paris", "note": "[x]"}', None), ToolCall(1, "get_time", "{}", None)],
    "arguments": {0: '{"city": "Paris", "note": "[x]"}', 1: "{}"},
    "end": End(unclosed_reasoning=False, eos=True),
}


def summary(events):
    """Deltas joined per kind, completed calls, streamed arguments per call, and the End."""
    events = list(events)
    assert isinstance(events[-1], End) and not any(isinstance(e, End) for e in events[:-1])
    args: dict[int, str] = {}
    for e in events:
        if isinstance(e, ToolCallDelta):
            args[e.index] = args.get(e.index, "") + e.arguments
    return {
        "reasoning": "".join(e.text for e in events if isinstance(e, ReasoningDelta)),
        "content": "".join(e.text for e in events if isinstance(e, ContentDelta)),
        "calls": [e for e in events if isinstance(e, (ToolCall, MalformedToolCall))],
        "arguments": args,
        "end": events[-1],
    }


def splits(text, cuts):
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


# ----------------------------------------------------------------------------- text mode
def test_whole_text():
    assert summary(parse([SAMPLE])) == SAMPLE_RESULT


def test_every_split_in_two_and_three():
    n = len(SAMPLE)
    for cuts in itertools.chain(itertools.combinations(range(1, n), 1), itertools.combinations(range(1, n), 2)):
        assert summary(parse(splits(SAMPLE, cuts))) == SAMPLE_RESULT, cuts


def test_one_character_at_a_time():
    assert summary(parse(list(SAMPLE))) == SAMPLE_RESULT


def test_split_tags_are_held_back_only_as_long_as_needed():
    p = StreamParser()
    assert p.feed("Hello wor") == [ContentDelta("Hello wor")]
    assert p.feed("ld [TH") == [ContentDelta("ld ")]   # "[TH" may still become [THINK]
    assert p.feed("INK]hm") == [ReasoningDelta("hm")]
    assert p.feed("[/") == []
    assert p.feed("x]") == [ReasoningDelta("[/x]")]     # it did not
    assert p.feed("<") == []                             # may be </s>
    assert p.finish() == [ReasoningDelta("<"), End(unclosed_reasoning=True, eos=False)]


def test_unclosed_think():
    assert summary(parse(["[THINK]Still thin", "king about it"])) == {
        "reasoning": "Still thinking about it", "content": "", "calls": [], "arguments": {},
        "end": End(unclosed_reasoning=True, eos=False)}


def test_unclosed_think_then_eos():
    s = summary(parse(["[THINK]cut short</s>"]))
    assert s["reasoning"] == "cut short" and s["end"] == End(unclosed_reasoning=True, eos=True)


def test_text_after_eos_is_ignored():
    p = StreamParser()
    assert p.feed("done</s>more") == [ContentDelta("done")]
    assert p.feed("[THINK]x") == []
    assert p.finish() == [End(unclosed_reasoning=False, eos=True)]


def test_stray_tags():
    # [/THINK] without [THINK] is dropped; [TOOL_CALLS] inside reasoning is part of the thought;
    # [ARGS] in the answer reads as text.
    s = summary(parse(["a[/THINK]b[THINK]c[TOOL_CALLS]d[THINK]e[/THINK]f[ARGS]g"]))
    assert (s["content"], s["reasoning"], s["calls"]) == ("abf[ARGS]g", "c[TOOL_CALLS]de", [])


# ----------------------------------------------------------------------------- tool calls
def test_single_call_streamed_arguments():
    pieces = ["Sure.", "[TOOL_CALLS]", "get_", "weather", "[ARGS]", '{"ci', 'ty": "Pa', "ris", '"}', "</s>"]
    p = StreamParser()
    events = [p.feed(x) for x in pieces] + [p.finish()]
    assert events[4] == [ToolCallDelta(0, "get_weather", "")]  # the name is announced at [ARGS]
    assert [e for batch in events[5:9] for e in batch] == [
        ToolCallDelta(0, "get_weather", '{"ci'), ToolCallDelta(0, "get_weather", 'ty": "Pa'),
        ToolCallDelta(0, "get_weather", "ris"), ToolCallDelta(0, "get_weather", '"}')]
    assert events[9] == [ToolCall(0, "get_weather", '{"city": "Paris"}', None)]
    assert summary(itertools.chain.from_iterable(events))["content"] == "Sure."
    assert events[9][0].parsed_arguments() == {"city": "Paris"}


def test_multiple_calls_and_call_ids():
    s = summary(parse(['[TOOL_CALLS]a[ARGS]{"x": 1}[TOOL_CALLS]b[CALL_ID]abc123def[ARGS]{"y": [1, 2]}[TOOL_CALLS] c [ARGS] {} ']))
    assert s["calls"] == [ToolCall(0, "a", '{"x": 1}'), ToolCall(1, "b", '{"y": [1, 2]}', "abc123def"), ToolCall(2, "c", " {} ")]
    assert s["end"] == End(unclosed_reasoning=False, eos=False)


@pytest.mark.parametrize("text, name, arguments, error", [
    ('[TOOL_CALLS]f[ARGS]{"a": }</s>', "f", '{"a": }', "not valid JSON"),
    ('[TOOL_CALLS]f[ARGS]{"a": 1', "f", '{"a": 1', "not valid JSON"),            # cut off (no EOS)
    ('[TOOL_CALLS]f[ARGS]{"a": 1} and more</s>', "f", '{"a": 1} and more', "not valid JSON"),
    ("[TOOL_CALLS]f[ARGS][1, 2]</s>", "f", "[1, 2]", "must be a JSON object, got list"),
    ("[TOOL_CALLS]f[ARGS]</s>", "f", "", "not valid JSON"),
    ("[TOOL_CALLS]f{}</s>", "f{}", "", "no [ARGS]"),
    ("[TOOL_CALLS][ARGS]{}</s>", "", "{}", "no name"),
])
def test_malformed_calls_are_reported_not_raised(text, name, arguments, error):
    for pieces in ([text], list(text)):
        (call,) = summary(parse(pieces))["calls"]
        assert isinstance(call, MalformedToolCall) and (call.name, call.arguments) == (name, arguments)
        assert error in call.error


def test_malformed_call_does_not_spoil_the_next():
    s = summary(parse(['[TOOL_CALLS]f[ARGS]{oops}[TOOL_CALLS]g[ARGS]{"ok": true}</s>']))
    assert isinstance(s["calls"][0], MalformedToolCall) and s["calls"][1] == ToolCall(1, "g", '{"ok": true}')


# ----------------------------------------------------------------------------- token mode
IDS = Tags.from_ids(think=34, think_end=35, tool_calls=9, args=32, call_id=33, eos=[2])


def test_token_mode_uses_ids_not_text():
    pieces = [(34, "[THINK]"), (5000, "[THINK]"), (35, "[/THINK]"), (6000, "[/THINK]"), (7000, "[TOOL_CALLS]"),
              (9, "ignored"), (8000, "f"), (32, ""), (8001, "{}"), (2, "")]
    s = summary(parse(pieces, IDS))
    assert s["reasoning"] == "[THINK]" and s["content"] == "[/THINK][TOOL_CALLS]"
    assert s["calls"] == [ToolCall(0, "f", "{}")] and s["end"].eos


def test_held_back_text_is_released_by_a_token_piece():
    p = StreamParser(IDS)
    assert p.feed("x [TH") == [ContentDelta("x ")]
    assert p.feed("INK]", token=5000) == [ContentDelta("[THINK]")]


def test_tags_from_ids_skip_missing_tokens():
    tags = Tags.from_ids(think=34, think_end=None, eos=2)
    assert tags.ids == {34: Tag.THINK, 2: Tag.EOS}


def test_feed_after_finish_is_an_error():
    p = StreamParser()
    p.finish()
    with pytest.raises(RuntimeError):
        p.feed("x")


# ----------------------------------------------------------------------------- against mistral-common
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """mistral-common's v15 tokenizer over its shipped tekken vocabulary (small slice, fast)."""
    data = v15_tekken(TinySpec().vocab)
    named = {t["rank"]: t for t in data["special_tokens"]}  # list every special rank, as real files do
    data["special_tokens"] = [named.get(i, {"rank": i, "token_str": f"<SPECIAL_{i}>", "is_control": True})
                              for i in range(data["config"]["default_num_special_tokens"])]
    path = tmp_path_factory.mktemp("reference") / "tekken.json"
    path.write_text(json.dumps(data))
    return MistralTokenizer.from_file(path)


def test_parses_what_mistral_common_encodes(reference):
    inner = reference.instruct_tokenizer
    tek = inner.tokenizer
    args = [{"city": "Zürich", "when": ["today", "tomorrow"]}, {}]
    message = AssistantMessage(
        content=[ThinkChunk(thinking="The user wants weather; call the tool."), TextChunk(text="Let me look that up.")],
        tool_calls=[McToolCall(id="call00001", function=FunctionCall(name="get_weather", arguments=json.dumps(args[0]))),
                    McToolCall(id="call00002", function=FunctionCall(name="get_time", arguments=json.dumps(args[1])))])
    ids = inner.encode_assistant_message(message, is_before_last_user_message=False)
    tags = Tags.from_ids(**{k: tek.get_special_token(v) for k, v in {
        "think": "[THINK]", "think_end": "[/THINK]", "tool_calls": "[TOOL_CALLS]", "args": "[ARGS]",
        "call_id": "[CALL_ID]"}.items()}, eos=tek.eos_id)
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    pieces = [(t, decoder.decode(tek.id_to_byte_piece(t, SpecialTokenPolicy.KEEP))) for t in ids]
    expected = {"reasoning": "The user wants weather; call the tool.", "content": "Let me look that up.",
                "calls": [("get_weather", args[0]), ("get_time", args[1])], "eos": True}

    def check(events):
        s = summary(events)
        assert all(isinstance(c, ToolCall) and c.id is None for c in s["calls"])  # v15 writes no [CALL_ID]
        got = {"reasoning": s["reasoning"], "content": s["content"],
               "calls": [(c.name, c.parsed_arguments()) for c in s["calls"]], "eos": s["end"].eos}
        assert got == expected

    check(parse(pieces, tags))                                   # token mode
    check(parse([text for _, text in pieces]))                   # the same pieces as text
    text = "".join(text for _, text in pieces)
    for cut in range(1, len(text)):                              # and the text split anywhere
        check(parse([text[:cut], text[cut:]]))


def test_no_llama_cpp_import():
    code = "import sys, ms4local.stream; assert 'llama_cpp' not in sys.modules, 'llama_cpp imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
