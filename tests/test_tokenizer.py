"""Token ids from the converted GGUF equal mistral-common's tekken ids; no input crashes the tokenizer.

mistral-common is the independent reference: it reads the tekken file itself. Our side is the
engine's tokenizer (ms4local/tokenizer.py), built from the GGUF's token strings and types only.
The GGUF comes from both tokenizer sources (tekken.json and tokenizer.json).
"""

from __future__ import annotations

import base64
import json
import random
import re
import struct
import subprocess
import sys
import unicodedata
import warnings

import pytest
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from ms4local import Engine, EngineOptions
from ms4local.errors import Ms4localNotice, PromptError
from ms4local.tokenizer import MAX_PIECE, SpecialTokens, llama_safe_segments
from quantize.synth import FULL_VOCAB, TinySpec, v15_tekken

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3:45pm — isn't it?",
    "french": "Où est la bibliothèque ? L'été dernier, nous sommes allés à Québec.",
    "chinese": "我爱自然语言处理。今天天气很好，我们去公园散步吧！",
    "arabic": "مرحبا بالعالم، كيف حالك اليوم؟",
    "code": "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\tprint(f(10))",
    "emoji": "Hello 👋🏽 world 🌍🚀✨ family: 👨‍👩‍👧‍👦",
    "whitespace": "a  b   c\n\n\n   d\t\t e \r\n  ",
    "digits": "1234567890 3.14159 1,000,000 2026-11-24 0x1F",
    "mixed": "Größe: 12cm; naïve café — «guillemets» and `backticks`",
    # Combining marks (\p{M}), which llama.cpp 0.3.36's tekken pre-tokenizer splits wrongly (spec §4.2).
    "devanagari": "नमस्ते दुनिया, आप कैसे हैं?",
    "thai": "สวัสดีชาวโลก ยินดีที่ได้รู้จัก",
    "bengali": "আমি বাংলায় গান গাই। তোমার নাম কী?",
    "tamil": "வணக்கம் உலகம்! நீங்கள் எப்படி இருக்கிறீர்கள்?",
    "korean_jamo": unicodedata.normalize("NFD", "안녕하세요 세계, 한국어 자모 분해"),
    "vietnamese": "Tiếng Việt có dấu: Xin chào, tôi tên là Nguyễn Văn Hưng.",
    "accents_nfd": unicodedata.normalize("NFD", "Crème brûlée à la française, déjà vu, naïve résumé"),
    "arabic_diacritics": "اَلسَّلَامُ عَلَيْكُمْ",
    "marks_mixed": "Hi नमस्ते 123 🚀 def f(x): return 'é' + \"e\u0301\" # สวัสดี 42",
    "marks_after_symbols": "x\u0301 !\u0301 1\u0301 \u0301\u0301 \n\u0301 a\u20dd",
}
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("tekken") / "tekken.json"
    path.write_text(json.dumps(v15_tekken(FULL_VOCAB)))
    return Tekkenizer.from_file(path)


@pytest.fixture(scope="module", params=["json", "tekken"])
def engine(request, ckpt, gguf_file):
    src = ckpt(TinySpec(), tokenizer=request.param)
    with Engine(gguf_file(src, "F16"), EngineOptions(vocab_only=True)) as e:
        yield e


@pytest.mark.parametrize("name", list(TEXTS))
def test_ids_match_mistral_common(engine, reference, name):
    text = TEXTS[name]
    assert engine.tokenize(text, add_special=False, parse_special=False) == reference.encode(text, bos=False, eos=False)


def test_bos_and_special_tokens(engine, reference):
    assert engine.tokenize("Hi", add_special=True)[0] == reference.bos_id
    for tok in ("[INST]", "[/INST]", "[THINK]", "[/THINK]", "[MODEL_SETTINGS]", "[IMG_BREAK]", "[TOOL_CALLS]", "[ARGS]"):
        assert engine.tokenize(tok, parse_special=True) == [reference.get_special_token(tok)], tok
    assert engine.think_ids == (reference.get_special_token("[THINK]"), reference.get_special_token("[/THINK]"))


def test_detokenize_round_trip(engine):
    for text in TEXTS.values():
        assert engine.detokenize(engine.tokenize(text, parse_special=False)) == text


def test_uses_its_own_tokenizer(engine):
    assert engine.tokenizer is not None and not engine.notices


def test_random_mixed_text_matches(engine, reference):
    """Text the tests do not list: random picks from many scripts, symbols and whitespace."""
    alphabet = ("abcXYZ éÉ\u0301\u0308ñ 0123 ,.;!?/\\()[]{}<>\"' \t\n\r\n  नमस्ते ক্ষ தமிழ் สวัสดี 한글\u1100\u1161 "
                "中文字 カタカナ ابت \u064e\u0651 👋🏽🚀 \u200d \u00a0 \u3000 ²½ Ⅷ")
    rng = random.Random(7)
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
        assert engine.tokenize(text, parse_special=False) == reference.encode(text, bos=False, eos=False), repr(text)


def test_control_text_is_plain_without_parse_special(engine, reference):
    text = "[INST] hi [/INST]</s>"
    assert engine.tokenize(text, parse_special=False) == reference.encode(text, bos=False, eos=False)
    ids = engine.tokenize(text, parse_special=True)
    assert ids[0] == reference.get_special_token("[INST]") and ids[-1] == reference.eos_id


@pytest.mark.parametrize("text", ["a" * 30_000, "ab" * 15_000, "é" * 40_000, "a" * 1_000_000, "ab" * 500_000,
                                  "é" * 500_000, " " * 1_000_000, "\n" * 1_000_000, "!" * 1_000_000,
                                  base64.b64encode(random.Random(1).randbytes(750_000)).decode()],
                         ids=["a30k", "ab15k", "e40k", "a1M", "ab500k", "e500k", "spaces1M", "newlines1M", "bangs1M",
                              "base64_1M"])
def test_crash_length_words_tokenize_and_round_trip(engine, text):
    ids = engine.tokenize(text, parse_special=False)
    assert 0 < len(ids) <= len(text.encode("utf-8"))
    assert engine.detokenize(ids) == text


def test_long_pieces_only_differ_inside_themselves(engine, reference):
    """Normal text around a crash-length word keeps mistral-common's ids."""
    head, tail = TEXTS["french"] + "\n", "\n" + TEXTS["thai"]  # newlines: piece boundaries either way
    ids = engine.tokenize(head + "x" * (3 * MAX_PIECE) + tail, parse_special=False)
    expect_head = reference.encode(head, bos=False, eos=False)
    expect_tail = reference.encode(tail, bos=False, eos=False)
    assert ids[:len(expect_head)] == expect_head and ids[-len(expect_tail):] == expect_tail
    piece = "y" * (MAX_PIECE - 10)  # below the bound: exact
    text = head + piece + tail
    assert engine.tokenize(text, parse_special=False) == reference.encode(text, bos=False, eos=False)


def test_long_mixed_text_matches(engine, reference):
    rng = random.Random(3)
    text = " ".join(rng.choice(list(TEXTS.values())) for _ in range(3000))
    assert engine.tokenize(text, parse_special=False) == reference.encode(text, bos=False, eos=False)


def test_lone_surrogate_is_a_prompt_error(engine):
    for text in ("\ud800 x", "ok \udfff"):
        with pytest.raises(PromptError, match="surrogate"):
            engine.tokenize(text)
        with pytest.raises(PromptError, match="surrogate"):
            engine.llama_tokenize(text)


def test_special_tokens_longest_first():
    """The trie regex finds what a longest-first alternation finds (llama.cpp's order)."""
    words = ["[INST]", "[/INST]", "[/INST", "<s>", "</s>", "<SPECIAL_1>", "<SPECIAL_10>", "ab", "abcd", "a"]
    st = SpecialTokens({w: i for i, w in enumerate(words)})
    flat = re.compile("|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)))
    rng = random.Random(0)
    parts = ["a", "b", "c", "d", "<SPECIAL_1", "0>", "[INST]", "[/INST", "]", "</s>", "<s>", " "]
    for _ in range(2000):
        text = "".join(rng.choice(parts) for _ in range(8))
        assert [m.group() for m in st.finditer(text)] == [m.group() for m in flat.finditer(text)], text


def test_llama_safe_segments():
    text = "word " * 300 + "a" * 5000 + " tail"
    parts = llama_safe_segments(text, 1024)
    assert "".join(parts) == text
    assert parts[0] == "word " * 299 + "word"  # cut at the word start before the long run, not inside the words
    assert all(len(p) <= 1024 for p in parts[1:]) and parts[-1] == " tail"
    assert llama_safe_segments("short text " * 1000, 1024) == ["short text " * 1000]


def test_llama_tokenize_is_guarded(engine, tmp_path):
    """llama.cpp's own tokenizer segfaults on one 30,000-character piece (spec §4.2); through the
    engine it never sees one. Run in a child process, so a crash fails the test, not the run."""
    code = ("import sys; from ms4local import Engine, EngineOptions\n"
            "with Engine(sys.argv[1], EngineOptions(vocab_only=True)) as e:\n"
            "    for t in ('a' * 30000, 'ab' * 15000, 'é' * 40000, ' ' * 40000):\n"
            "        ids = e.llama_tokenize(t, parse_special=False)\n"
            "        assert e.detokenize(ids) == t\n"
            "print('ok')\n")
    p = subprocess.run([sys.executable, "-c", code, str(engine.path)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", (p.returncode, p.stderr[-2000:])


def _patched(src, dst, old: bytes, new: bytes):
    data = src.read_bytes()
    assert data.count(old) == 1 and len(old) == len(new)
    dst.write_bytes(data.replace(old, new))
    return dst


def _gguf_string(key: str, value: str) -> bytes:
    k, v = key.encode(), value.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<IQ", 8, len(v)) + v


@pytest.mark.parametrize("case", ["other_pre", "unmappable_token"])
def test_other_vocabularies_fall_back_with_one_notice(ckpt, gguf_file, tmp_path, case):
    """A vocabulary that is not tekken (pre = falcon) or a token outside GPT-2's byte form: llama.cpp's
    tokenizer, one notice, still guarded against crash-length pieces."""
    src = gguf_file(ckpt(TinySpec()), "F16")
    if case == "other_pre":
        path = _patched(src, tmp_path / "m.gguf", _gguf_string("tokenizer.ggml.pre", "tekken"),
                        _gguf_string("tokenizer.ggml.pre", "falcon"))
        why = "not the byte-level BPE"
    else:  # "Ġthe" written with two spaces instead of "Ġ": not GPT-2 byte-level text
        path = _patched(src, tmp_path / "m.gguf", struct.pack("<Q", 5) + "Ġthe".encode(),
                        struct.pack("<Q", 5) + b"  the")
        why = "byte-to-character form"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Engine(path, EngineOptions(vocab_only=True)) as e:
            assert e.tokenizer is None
            assert len(e.notices) == 1 and why in e.notices[0] and "llama.cpp" in e.notices[0]
            ids = e.tokenize("Hello world " + "z" * 30_000, add_special=True)
            assert ids[0] == e.bos_id and e.detokenize(ids[1:]) == "Hello world " + "z" * 30_000
    assert [str(w.message) for w in caught if issubclass(w.category, Ms4localNotice)] == e.notices
