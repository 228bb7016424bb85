"""Text → token ids as mistral-common's tekken tokenizer makes them, built from a GGUF's vocabulary.

Why not llama.cpp's tokenizer: its `tekken` pre-tokenizer (0.3.36) has no \\p{M}, so text with
combining marks (Devanagari, Thai, decomposed accents) is split differently from Mistral's own
tokenizer, and its std::regex recurses once per character of a piece, so one "word" of ~25,000
characters crashes the process (spec §4.2). mistral-common's Tekkenizer is a tiktoken encoding
(tekken's split regex + byte strings ranked by merge priority), and the GGUF holds that table: a
normal token is the tekken byte string written with GPT-2's byte→character table, and its id is
its inner rank plus the number of control tokens before it. Taking the ids themselves as ranks keeps
the merge order and makes tiktoken return GGUF ids directly.

Bounds (the only places where ids can differ from mistral-common's): a regex piece longer than
`MAX_PIECE` characters (a base64 blob, "a" * 10**6, a huge run of spaces, on which tiktoken's regex
engine gives up near 10**6 characters and mistral-common fails) is encoded in chunks of `MAX_PIECE`
characters. Normal text has no such piece, and the check that finds one costs a few milliseconds
per megabyte (numpy over the code points); only texts that have a long run pay for the exact split.

Also here, for the fallback on llama.cpp's tokenizer (a vocabulary that is not tekken):
`llama_safe_segments` cuts a text so that no stretch llama.cpp's regex could match as one piece is
long enough to crash it. No llama_cpp import: this module is pure Python + tiktoken + regex.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from quantize.vocab import byte_to_unicode

from .errors import PromptError

# tekken's split regex (tekken.json config.pattern; spec §4.2), as mistral-common uses it.
TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
                  r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
                  r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# GGUF token types (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Longest regex piece encoded whole. Pieces of normal text are far shorter (a long German word,
# a line of indentation, an unpunctuated CJK or Thai sentence: tens to a few hundred characters).
MAX_PIECE = 4096
# Every piece longer than MAX_PIECE contains a run this long of whitespace, of non-whitespace or
# of [\r\n/] (the pieces are: one optional lead character + letters; one digit; space + symbols +
# [\r\n/]*; whitespace), so a text without such a run has no long piece.
_RUN = (MAX_PIECE - 1) // 2

# llama.cpp's regex recurses per character of a piece: 20,000 characters passed, 30,000 crashed
# on an 8 MiB stack. Threads can have far less stack, so its input is held to much shorter runs.
LLAMA_MAX_RUN = 1024

# Unicode White_Space, which is \s in tiktoken's (Rust) regex.
_WHITE_SPACE = [*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F,
                0x205F, 0x3000]
_TABLE_SIZE = 0x3002  # code points above 0x3000 are never whitespace: they all look up the last entry
_IS_WS = np.zeros(_TABLE_SIZE, dtype=bool)
_IS_WS[_WHITE_SPACE] = True
_IS_NL_SLASH = np.zeros(_TABLE_SIZE, dtype=bool)
_IS_NL_SLASH[[0x0A, 0x0D, 0x2F]] = True


class NotTekken(Exception):
    """The vocabulary cannot be tokenized here (not tekken, or its tokens cannot be mapped back to
    bytes); the message says why. The engine then falls back on llama.cpp's tokenizer."""


def check_text(text: str) -> None:
    """PromptError for text that is not valid Unicode (a lone surrogate, e.g. from a JSON "\\ud800")."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(f"the text holds an unpaired surrogate (U+{ord(text[e.start]):04X} at character "
                          f"{e.start}), which is not valid Unicode; send UTF-8 text") from None


def _code_points(text: str) -> np.ndarray:
    """The text's code points, capped to the lookup tables' size (call after check_text)."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    return np.minimum(cp, _TABLE_SIZE - 1)


def _longest_run(mask: np.ndarray) -> int:
    """Length of the longest run of equal values in a boolean array."""
    if len(mask) == 0:
        return 0
    edges = np.flatnonzero(mask[1:] != mask[:-1])
    bounds = np.concatenate(([-1], edges, [len(mask) - 1]))
    return int(np.diff(bounds).max())


def _longest_true_run(mask: np.ndarray) -> int:
    padded = np.concatenate(([False], mask, [False]))
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return int((edges[1::2] - edges[::2]).max()) if len(edges) else 0


def has_long_run(text: str, length: int = _RUN) -> bool:
    """True when `text` may hold a regex piece longer than MAX_PIECE (see _RUN)."""
    if len(text) < length:
        return False
    cp = _code_points(text)
    return _longest_run(_IS_WS[cp]) >= length or _longest_true_run(_IS_NL_SLASH[cp]) >= length


def llama_safe_segments(text: str, limit: int = LLAMA_MAX_RUN) -> list[str]:
    """`text` in consecutive parts (one in the common case) such that llama.cpp's regex never sees
    a stretch of more than `limit` characters without a word start, which could crash it.

    A word start is a space that follows a non-space: every byte-level BPE split regex (gpt2,
    llama3, tekken…) starts a piece there, so cutting there changes nothing. Only a longer stretch
    is also cut inside, every `limit` characters; only its tokens can differ from an uncut run.
    """
    if len(text) <= limit:
        return [text]
    cp = _code_points(text)
    ws = _IS_WS[cp]
    starts = np.flatnonzero((cp[1:] == 0x20) & ~ws[:-1]) + 1
    bounds = np.concatenate(([0], starts, [len(text)]))
    long = np.flatnonzero(np.diff(bounds) > limit)
    if len(long) == 0:
        return [text]
    cuts: list[int] = []
    for k in long:
        a, b = int(bounds[k]), int(bounds[k + 1])
        cuts += range(a, b, limit)
        cuts.append(b)
    edges = sorted(set(cuts) | {0, len(text)})
    return [text[a:b] for a, b in zip(edges, edges[1:]) if b > a]


# The 256 characters GPT-2 writes bytes with: the printable Latin-1 ones stand for themselves,
# the other 68 bytes are moved to U+0100..U+0143.
_NOT_GPT2 = re.compile("[^!-~\u00a1-\u00ac\u00ae-\u00ff\u0100-\u0143]")


@functools.cache
def _gpt2_table() -> dict[int, str]:
    """GPT-2's printable character → byte table, as str.translate wants it (ord → one-byte char):
    the inverse of the table the converter writes token strings with."""
    return {ord(ch): chr(b) for b, ch in byte_to_unicode().items()}


@functools.cache
def _pieces_regex() -> object:
    """tekken's regex for the exact split of a text that has a long run (the `regex` module has
    \\p{..}; tiktoken's own copy of the regex is not reachable from Python)."""
    import regex

    return regex.compile(TEKKEN_PATTERN)


def _trie_regex(words: list[str]) -> str:
    """A regex matching any of `words` (sorted), preferring the longest at each position."""
    trie: dict[str, dict] = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict[str, dict]) -> str:
        alts = [re.escape(ch) + emit(child) for ch, child in sorted(node.items()) if ch]
        if "" in node:
            alts.append("")  # the word ending here, tried after every longer one
        if len(alts) == 1:
            return alts[0]
        return "(?:" + "|".join(alts) + ")"

    return emit(trie)


class SpecialTokens:
    """The texts a tokenizer matches whole inside text (control and user-defined tokens).

    llama.cpp looks for them longest first, so "[/INST]" wins over "[/INST" were both tokens. The
    regex is a trie ("[" then "INST]" or "/INST]" …) that tries longer continuations first, which
    finds the same token at each position and compiles ~10× faster than a flat alternation of
    1000 texts.
    """

    def __init__(self, ids: Mapping[str, int]) -> None:
        self._ids = {t: i for t, i in ids.items() if t}
        self._re = re.compile(_trie_regex(sorted(self._ids))) if self._ids else None

    def __getitem__(self, text: str) -> int:
        return self._ids[text]

    def __contains__(self, text: object) -> bool:
        return text in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def finditer(self, text: str) -> Iterator[re.Match[str]]:
        return iter(()) if self._re is None else self._re.finditer(text)


class Tokenizer:
    """mistral-common's tekken tokenization over a GGUF vocabulary; thread-safe.

    `tokens` and `types` are the GGUF's `tokenizer.ggml.tokens` / `token_type` arrays (index = id),
    `model` and `pre` its `tokenizer.ggml.model` / `pre`. NotTekken when they do not describe a
    tekken vocabulary whose normal tokens map back to distinct byte strings covering all 256 bytes.
    """

    def __init__(self, tokens: Sequence[str], types: Sequence[int], *, model: str = "gpt2", pre: str = "tekken",
                 bos_id: int | None = None, eos_id: int | None = None, add_bos: bool = True,
                 add_eos: bool = False) -> None:
        import tiktoken

        if model != "gpt2" or pre != "tekken":
            raise NotTekken(f"its tokenizer is {model!r}/{pre!r}, not the byte-level BPE 'gpt2'/'tekken'")
        if len(tokens) != len(types):
            raise NotTekken(f"it has {len(tokens)} token texts but {len(types)} token types")
        normal = [i for i, t in enumerate(types) if t == NORMAL and tokens[i]]
        texts = [tokens[i] for i in normal]
        # One translate over all normal tokens: each GPT-2 character stands for one byte, so the
        # byte strings are cut back out of the result by the texts' lengths.
        joined = "".join(texts)
        odd = _NOT_GPT2.search(joined)
        if odd is not None:
            k = int(np.searchsorted(np.cumsum([len(t) for t in texts]), odd.start(), side="right"))
            raise NotTekken(f"token {normal[k]} ({texts[k]!r}) is not written in GPT-2's byte-to-character form")
        data = joined.translate(_gpt2_table()).encode("latin-1")
        ranks: dict[bytes, int] = {}
        pos = 0
        for i, t in zip(normal, texts):
            ranks[data[pos:pos + len(t)]] = i
            pos += len(t)
        if len(ranks) != len(normal):
            raise NotTekken("two of its tokens stand for the same bytes")
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise NotTekken(f"{len(missing)} of the 256 single bytes have no token (e.g. byte {missing[0]})")
        # Ranks are the GGUF ids: tekken ids are inner rank + number of control tokens, so their
        # order is the merge order, and tiktoken hands back GGUF ids.
        self._enc = tiktoken.Encoding("tekken", pat_str=TEKKEN_PATTERN, mergeable_ranks=ranks, special_tokens={})
        matched = {tokens[i]: i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED, UNKNOWN)}
        self.specials = SpecialTokens(matched)
        # llama.cpp splits user-defined tokens out even when it parses no control tokens.
        self.user_defined = SpecialTokens({tokens[i]: i for i, t in enumerate(types) if t == USER_DEFINED})
        self.n_vocab = len(tokens)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos = add_bos and bos_id is not None
        self.add_eos = add_eos and eos_id is not None

    def encode(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of `text`, with llama_tokenize's flags: `add_special` adds BOS (and EOS) as the
        vocabulary asks; `parse_special` reads control-token text ("[INST]") as the token, otherwise
        it is plain text, as mistral-common's `encode` reads every text. PromptError for text that
        is not valid Unicode."""
        check_text(text)
        out = [self.bos_id] if add_special and self.add_bos else []
        specials = self.specials if parse_special else self.user_defined
        pos = 0
        for m in specials.finditer(text):
            if m.start() > pos:
                out += self._plain(text[pos:m.start()])
            out.append(specials[m.group()])
            pos = m.end()
        if pos < len(text):
            out += self._plain(text[pos:] if pos else text)
        if add_special and self.add_eos:
            out.append(self.eos_id)
        return out  # type: ignore[return-value]

    def encode_plain(self, text: str) -> list[int]:
        """mistral-common's `encode(text, bos=False, eos=False)`: no token is read as special."""
        check_text(text)
        return self._plain(text)

    def _plain(self, text: str) -> list[int]:
        if not has_long_run(text):
            return self._enc.encode_ordinary(text)
        # A long run: split exactly, encode the text between over-long pieces as usual (a span
        # that starts and ends on piece boundaries splits the same on its own) and each over-long
        # piece in chunks of MAX_PIECE characters.
        out: list[int] = []
        start = 0
        for m in _pieces_regex().finditer(text, concurrent=True):  # type: ignore[attr-defined]
            a, b = m.span()
            if b - a <= MAX_PIECE:
                continue
            if a > start:
                out += self._enc.encode_ordinary(text[start:a])
            for i in range(a, b, MAX_PIECE):
                out += self._enc.encode_ordinary(text[i:min(i + MAX_PIECE, b)])
            start = b
        if start < len(text):
            out += self._enc.encode_ordinary(text[start:])
        return out

    def token_bytes(self, token: int) -> bytes:
        """The bytes of a normal token (b"" for others)."""
        try:
            return self._enc.decode_single_token_bytes(token)
        except KeyError:
            return b""
