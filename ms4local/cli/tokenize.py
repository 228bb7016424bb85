"""`ms4local tokenize`: the ids the engine evaluates for a text, with a GGUF's vocabulary.

Two modes: TEXT (or --file) tokenizes a string (like llama.cpp's llama-tokenize); `--messages FILE`
prints the prompt ids the engine would evaluate for a conversation, i.e. the GGUF's chat template
rendered with the tools and reasoning effort, then tokenized (what `chat` feeds the model).
The ids are mistral-common's (ms4local/tokenizer.py); `--compare-llama` shows where llama.cpp's own
tokenizer would split the text differently.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import ui
from ..engine import Engine, EngineOptions, check_model_path
from ..prompt import load_conversation
from ..tokenizer import llama_safe_segments
from . import options
from .errors import fail, handle_errors


@handle_errors
@options.from_hub(projector=False)
def tokenize(
    model: options.Model,
    text: Annotated[Optional[str], typer.Argument(
        help="Text to tokenize; control tokens like [INST] are parsed.", show_default=False)] = None,
    file: Annotated[Optional[Path], typer.Option(
        "-f", "--file", metavar="FILE", show_default=False,
        help="Read the text from FILE (UTF-8) instead of TEXT.")] = None,
    messages: Annotated[Optional[str], typer.Option(
        "--messages", metavar="FILE", show_default=False,
        help='Tokenize a conversation instead: a JSON list of messages, or {"messages": [...], "tools": [...]}.')] = None,
    tools: Annotated[Optional[str], typer.Option(
        "--tools", metavar="FILE", show_default=False, help="A JSON list of tool definitions (with --messages).")] = None,
    reasoning_effort: options.ReasoningEffort = "none",
    bos: Annotated[bool, typer.Option("--bos/--no-bos", help="Add BOS as the model's metadata asks (TEXT only).")] = True,
    compare_llama: Annotated[bool, typer.Option(
        "--compare-llama", help="Also tokenize with llama.cpp's own tokenizer and show where it differs (TEXT only).")] = False,
    as_json: options.Json = False,
) -> None:
    """Print token ids and pieces of a text, or the prompt ids of a conversation (--messages)."""
    if sum(x is not None for x in (text, file, messages)) != 1:
        raise fail("give one of TEXT, --file FILE or --messages FILE", 2)
    if compare_llama and messages is not None:
        raise fail("--compare-llama applies to a text (TEXT or --file), not to --messages", 2)
    if file is not None:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise fail(f"cannot read {file}: {getattr(e, 'strerror', None) or e}", 1) from None
    options.check_reasoning_effort(reasoning_effort)
    if messages is None and (tools is not None or reasoning_effort != "none"):
        raise fail("--tools and --reasoning-effort apply to a conversation; add --messages FILE", 2)
    options.check_text(TEXT=text)
    check_model_path(model)
    # Read the files before loading the model: a typo should not wait for the load.
    conversation = load_conversation(messages, tools) if messages is not None else None
    prompt = None
    llama_ids: list[int] | None = None
    with Engine(model, EngineOptions(vocab_only=True)) as engine:
        if conversation is not None:
            msgs, tool_defs = conversation
            prompt = engine.render(msgs, reasoning_effort=reasoning_effort, tools=tool_defs)
            ids = engine.prompt_tokens(msgs, reasoning_effort=reasoning_effort, tools=tool_defs)
        else:
            ids = engine.tokenize(text or "", add_special=bos, parse_special=True)
            if compare_llama:
                llama_ids = engine.llama_tokenize(text or "", add_special=bos, parse_special=True)
        piece = {i: engine.piece(i).decode("utf-8", "replace") for i in {*ids, *(llama_ids or ())}}
        pieces = [piece[i] for i in ids]
    diffs = differences(ids, llama_ids, piece) if llama_ids is not None else None
    cut = compare_llama and len(llama_safe_segments(text or "")) > 1
    if as_json:
        out: dict = {"ids": ids, "pieces": pieces}
        if prompt is not None:
            out["prompt"] = prompt
        if diffs is not None:
            out["llama"] = {"ids": llama_ids, "differences": diffs, "cut": cut}
        print(json.dumps(out, ensure_ascii=False))
        return
    # One write: a long text has hundreds of thousands of lines.
    print("\n".join(f"{i:>7} -> {p!r}" for i, p in zip(ids, pieces)), flush=True)
    if diffs is None:
        return
    assert llama_ids is not None
    if cut:
        ui.err.print("note: the text has a run without spaces long enough to crash llama.cpp's tokenizer; it was "
                     "given to llama.cpp in parts, so its ids for that run are not its own", style="yellow",
                     markup=False, highlight=False)
    if not diffs:
        ui.out.print(f"llama.cpp's tokenizer gives the same {len(ids)} ids", markup=False, highlight=False)
        return
    ui.out.print(f"llama.cpp's tokenizer differs in {len(diffs)} place{'s' if len(diffs) > 1 else ''} "
                 f"({len(ids)} ids here, {len(llama_ids)} there):", markup=False, highlight=False)
    for d in diffs:
        where = d["text"] if len(d["text"]) <= 80 else d["text"][:80] + f"… ({len(d['text'])} characters)"
        ui.out.print(f"  at token {d['at']} {where!r}:\n    ours:      {_show(d['ours'])}\n"
                     f"    llama.cpp: {_show(d['llama'])}", markup=False, highlight=False)


def _show(tokens: list[dict], most: int = 40) -> str:
    shown = " ".join(f"{t['id']}:{t['piece']!r}" for t in tokens[:most])
    return shown + (f" … ({len(tokens)} tokens)" if len(tokens) > most else "")


def differences(ours: list[int], theirs: list[int], piece: dict[int, str]) -> list[dict]:
    """Where two tokenizations of the same text differ: the text and both runs of tokens."""
    def tokens(ids: list[int]) -> list[dict]:
        return [{"id": i, "piece": piece[i]} for i in ids]

    # Common ends first; the alignment (quadratic at worst) runs on the middle only, and a huge
    # middle is shown as one difference.
    lo = 0
    while lo < min(len(ours), len(theirs)) and ours[lo] == theirs[lo]:
        lo += 1
    hi = 0
    while hi < min(len(ours), len(theirs)) - lo and ours[-1 - hi] == theirs[-1 - hi]:
        hi += 1
    a, b = ours[lo:len(ours) - hi], theirs[lo:len(theirs) - hi]
    if len(a) + len(b) > 20_000:
        opcodes = [("replace", 0, len(a), 0, len(b))]
    else:
        opcodes = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    out = []
    for op, a0, a1, b0, b1 in opcodes:
        a0, a1, b0, b1 = a0 + lo, a1 + lo, b0 + lo, b1 + lo
        if op != "equal":
            out.append({"at": a0, "text": "".join(piece[i] for i in ours[a0:a1]) or "".join(piece[i] for i in theirs[b0:b1]),
                        "ours": tokens(ours[a0:a1]), "llama": tokens(theirs[b0:b1])})
    return out
