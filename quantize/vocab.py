"""Tokenizer files → GGUF vocabulary (spec §4) and chat template (spec §5).

Two sources: HF `tokenizer.json` (byte-level BPE with merges) or Mistral's native `tekken.json`
(ranked byte sequences, no merges: we derive them from the ranks). Either way the GGUF gets
`model = gpt2`, `pre = tekken` (written directly: llama.cpp's converter guesses the pre-tokenizer
from a hash and fails on unknown ones), every token string in GPT-2 byte-to-unicode form, token
types, merges, and special ids read from the files, never hard-coded.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import VocabError

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
TEMPLATE_DIR = Path(__file__).parent / "templates"

# The special tokens of tekken files older than v7, which carried no list of their own.
LEGACY_SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                   "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
                   "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                   "[TOOL_CONTENT]")


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table (space → 'Ġ', newline → 'Ċ')."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def bytes_to_piece(data: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[b] for b in data)


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int
    unk_id: int | None
    pad_id: int | None
    add_bos: bool = True
    add_eos: bool = False
    specials: dict[str, int] = field(default_factory=dict)

    def add_to(self, writer: Any) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("tekken")
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        writer.add_token_merges(self.merges)
        writer.add_bos_token_id(self.bos_id)
        writer.add_eos_token_id(self.eos_id)
        if self.unk_id is not None:
            writer.add_unk_token_id(self.unk_id)
        if self.pad_id is not None:
            writer.add_pad_token_id(self.pad_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)


def tekken_merges(inner: list[bytes]) -> list[tuple[bytes, bytes]]:
    """BPE merges equivalent to tiktoken-style ranks.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank; the same result in
    HF/llama.cpp BPE comes from listing every split (left, right) of each token whose halves are
    tokens too, ordered by the merged token's rank (ties by the halves' ranks).
    """
    rank = {tok: i for i, tok in enumerate(inner)}
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for r, tok in enumerate(inner):
        if len(tok) < 2:
            continue
        found = False
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            rl, rr = rank.get(left), rank.get(right)
            if rl is not None and rr is not None:
                merges.append((r, rl, rr, left, right))
                found = True
        if not found and r >= 256:
            raise VocabError(f"tekken token of rank {r} ({tok!r}) cannot be built from smaller tokens; the file is corrupt")
    merges.sort()
    return [(left, right) for _, _, _, left, right in merges]


def _read_json(path: Path) -> dict[str, Any]:
    """A tokenizer file's JSON object; anything else (a list, a number) is a one-line VocabError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VocabError(f"cannot read {path.name}: {e}; re-download it") from None
    if not isinstance(data, dict):
        raise VocabError(f"{path.name} is not a JSON object (it holds a {type(data).__name__}); re-download it")
    return data


def _fill(vocab_size: int, entries: dict[int, tuple[str, int]]) -> tuple[list[str], list[int]]:
    if entries and max(entries) >= vocab_size:
        raise VocabError(
            f"the tokenizer has token id {max(entries)} but config.json's vocab_size is {vocab_size}; "
            "the tokenizer and the weights do not belong together"
        )
    tokens, types = [], []
    for i in range(vocab_size):
        piece, kind = entries.get(i, (f"[PAD{i}]", UNUSED))
        tokens.append(piece)
        types.append(kind)
    return tokens, types


def _special_id(name: str, specials: dict[str, int], cfg_value: Any, fallback: str) -> int | None:
    """A special id from tokenizer_config's token string, else config.json's id, else the usual string."""
    if isinstance(cfg_value, dict):
        cfg_value = cfg_value.get("content")
    if isinstance(cfg_value, str) and cfg_value in specials:
        return specials[cfg_value]
    if isinstance(cfg_value, int):
        return cfg_value
    return specials.get(fallback)


def from_tokenizer_json(path: Path, vocab_size: int) -> tuple[dict[int, tuple[str, int]], list[str], dict[str, int], bool | None]:
    data = _read_json(path)
    try:
        return _parse_tokenizer_json(path, data)
    except (AttributeError, KeyError, TypeError, ValueError):
        raise VocabError(f"{path.name} is malformed (an entry of the wrong type); re-download it") from None


def _parse_tokenizer_json(path: Path, data: dict[str, Any]) -> tuple[dict[int, tuple[str, int]], list[str], dict[str, int], bool | None]:
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise VocabError(f"{path.name} is not a byte-level BPE tokenizer; Mistral Small 4 needs its tekken tokenizer")
    entries: dict[int, tuple[str, int]] = {int(i): (piece, NORMAL) for piece, i in model["vocab"].items()}
    specials: dict[str, int] = {}
    for tok in data.get("added_tokens") or []:
        kind = CONTROL if tok.get("special") else USER_DEFINED
        entries[int(tok["id"])] = (tok["content"], kind)
        specials[tok["content"]] = int(tok["id"])
    merges = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            merges.append(m)
        else:  # newer list-of-pairs format; a literal space must be the byte-level 'Ġ'
            merges.append(" ".join(part.replace(" ", "\u0120") for part in m))
    add_bos = None
    post = data.get("post_processor") or {}
    if post.get("type") == "TemplateProcessing":
        single = post.get("single") or []
        first = single[0] if single else {}
        add_bos = bool(first.get("SpecialToken", {}).get("id") in ("<s>",))
    elif post.get("type") == "ByteLevel":
        add_bos = False
    return entries, merges, specials, add_bos


def from_tekken_json(path: Path, vocab_size: int) -> tuple[dict[int, tuple[str, int]], list[str], dict[str, int], bool | None]:
    data = _read_json(path)
    try:
        return _parse_tekken_json(path, data, vocab_size)
    except (AttributeError, KeyError, TypeError, ValueError):  # binascii.Error is a ValueError
        raise VocabError(f"{path.name} is malformed (an entry of the wrong type); re-download it") from None


def _parse_tekken_json(path: Path, data: dict[str, Any],
                       vocab_size: int) -> tuple[dict[int, tuple[str, int]], list[str], dict[str, int], bool | None]:
    try:
        config = data["config"]
        n_special = int(config["default_num_special_tokens"])
        ranks = data["vocab"]
    except (KeyError, TypeError, ValueError):
        raise VocabError(f"{path.name} is not a tekken tokenizer file (no config/vocab); re-download it") from None
    listed = data.get("special_tokens")
    if listed is None:
        listed = [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(LEGACY_SPECIALS)]
    entries: dict[int, tuple[str, int]] = {}
    specials: dict[str, int] = {}
    for tok in listed:
        entries[int(tok["rank"])] = (tok["token_str"], CONTROL)
        specials[tok["token_str"]] = int(tok["rank"])
    for i in range(n_special):
        if i not in entries:
            entries[i] = (f"<SPECIAL_{i}>", CONTROL)
            specials[f"<SPECIAL_{i}>"] = i
    inner = [base64.b64decode(t["token_bytes"]) for t in ranks[: vocab_size - n_special]]
    for r, tok in enumerate(inner):
        entries[r + n_special] = (bytes_to_piece(tok), NORMAL)
    merges = [f"{bytes_to_piece(a)} {bytes_to_piece(b)}" for a, b in tekken_merges(inner)]
    return entries, merges, specials, True


def load_vocab(directory: Path, vocab_size: int, config: dict[str, Any] | None = None) -> Vocab:
    """The GGUF vocabulary of a checkpoint: tokenizer.json if present, else tekken.json."""
    directory = Path(directory)
    config = config or {}
    if (directory / "tokenizer.json").is_file():
        entries, merges, specials, add_bos = from_tokenizer_json(directory / "tokenizer.json", vocab_size)
    elif (directory / "tekken.json").is_file():
        entries, merges, specials, add_bos = from_tekken_json(directory / "tekken.json", vocab_size)
    else:
        raise VocabError(f"no tokenizer.json or tekken.json in {directory}; the checkpoint is incomplete")
    tokens, types = _fill(vocab_size, entries)
    tok_cfg = {}
    if (directory / "tokenizer_config.json").is_file():
        tok_cfg = _read_json(directory / "tokenizer_config.json")
    if add_bos is None:
        add_bos = bool(tok_cfg.get("add_bos_token", True))

    def pick(key: str, fallback: str) -> int | None:
        return _special_id(key, specials, tok_cfg.get(f"{key}_token", config.get(f"{key}_token_id")), fallback)

    bos, eos = pick("bos", "<s>"), pick("eos", "</s>")
    if bos is None or eos is None:
        raise VocabError("the tokenizer defines no BOS/EOS token (<s>, </s>); the checkpoint is incomplete")
    return Vocab(tokens, types, merges, bos, eos, pick("unk", "<unk>"), pick("pad", "<pad>"),
                 add_bos=add_bos, add_eos=False, specials=specials)


def load_chat_template(directory: Path) -> str | None:
    """The checkpoint's own chat template, from any of the places HF keeps it, or None.

    The template must compile: it is embedded as it is, and a broken one would only fail at the
    first chat, which then suggests re-converting — from the same broken file."""
    directory = Path(directory)
    cfg_path = directory / "tokenizer_config.json"
    if cfg_path.is_file():
        tpl = _read_json(cfg_path).get("chat_template")
        if isinstance(tpl, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default") or next(iter(named.values()), None)
        if isinstance(tpl, str) and tpl.strip():
            return check_template(tpl, cfg_path.name)
    if (directory / "chat_template.jinja").is_file():
        try:
            tpl = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise VocabError(f"cannot read chat_template.jinja: {e}; re-download it") from None
        return check_template(tpl, "chat_template.jinja")
    if (directory / "chat_template.json").is_file():
        tpl = _read_json(directory / "chat_template.json").get("chat_template")
        if isinstance(tpl, str) and tpl.strip():
            return check_template(tpl, "chat_template.json")
    return None


def check_template(template: str, source: str) -> str:
    """`template` if it compiles in the sandbox the runtime renders it with (ms4local/prompt.py);
    else a VocabError naming `source`, the file it came from."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
    except TemplateError as e:
        line = getattr(e, "lineno", None)
        where = f" (line {line})" if line else ""
        reason = " ".join(str(e.message or e).split())
        raise VocabError(f"the chat template in {source} does not compile{where}: {reason}; fix or remove it, "
                         "or re-download the checkpoint") from None
    return template


def default_chat_template() -> str:
    """The project's Mistral Small 4 template (system, tools, reasoning_effort, [THINK], images)."""
    return (TEMPLATE_DIR / "mistral4.jinja").read_text(encoding="utf-8")
