"""Perplexity and KL divergence against a reference: `ms4local eval` as a library.

The figures are llama-perplexity's, computed the same way so they can be compared with numbers
published for other models: the text is tokenized once (with BOS), cut into chunks of `n_ctx`
tokens whose first token is replaced by BOS, and in each chunk only the second half is scored
(every position then sees at least n_ctx/2 tokens of context, so early, context-starved
predictions do not dominate).

With a reference (`--reference`, typically the F32/BF16 file the quantization came from) both
models are loaded and each chunk is run through the reference and then the model; the two
next-token distributions are compared position by position and only the per-position numbers are
kept (one float each), not the logits. llama-perplexity instead writes the reference's logits to
a file (~64 MB per 512-token chunk at 131072 tokens of vocabulary) in a first run; one pass over
both models needs no such file. Per position:

    KLD     Σ_v p_ref(v) · (log p_ref(v) − log p(v))          natural log, ≥ 0
    top-1   argmax p == argmax p_ref
    |Δp|    |p(t*) − p_ref(t*)| with t* = argmax p_ref         how much the favourite moved
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import numpy as np

from .engine import Engine, EngineOptions
from .errors import EvalError, VocabMismatchError
from .info import vocab_size
from .gguf_model import read_model

DEFAULT_CTX = 512  # llama-perplexity's default -c
SLICE = 64  # positions per log-softmax: float64 over 131072 tokens is 64 MiB a slice

Progress = Callable[[int, int, float], None]  # (chunks done, chunks in all, perplexity so far)


def bundled_text() -> str:
    """The public-domain sample shipped with the package (so `eval` works offline)."""
    return resources.files("ms4local").joinpath("data/eval.txt").read_text(encoding="utf-8")


def read_text(path: str | Path) -> tuple[str, str]:
    """A UTF-8 text to score (`--text`) and the name the report gives it; raises EvalError."""
    try:
        return Path(path).read_text(encoding="utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"cannot read --text {path}: {getattr(e, 'strerror', None) or e}") from None


@dataclass(frozen=True)
class KLStats:
    """How far the model's next-token distributions are from the reference's (llama-perplexity's figures)."""

    mean: float
    median: float
    p99: float
    max: float
    top1_agreement: float  # fraction of positions where both models' most likely token is the same
    mean_abs_dp_top: float  # mean |p(t*) − p_ref(t*)|, t* the reference's most likely token
    reference_ppl: float
    ln_ppl_ratio: float  # mean of ln p_ref(x) − ln p(x) over the scored tokens = ln(PPL / PPL_ref)


@dataclass(frozen=True)
class EvalResult:
    model: Path
    reference: Path | None
    text: str  # where the text came from
    n_ctx: int
    chunks: int
    tokens: int  # scored positions
    ppl: float
    ppl_stderr: float  # of the perplexity, from the per-token NLL's standard error (as llama-perplexity)
    kl: KLStats | None
    seconds: float
    n_vocab: int = 0
    text_tokens: int = 0

    def to_json(self) -> dict[str, object]:
        return {
            "model": str(self.model), "reference": None if self.reference is None else str(self.reference),
            "text": self.text, "ctx_size": self.n_ctx, "chunks": self.chunks, "tokens_scored": self.tokens,
            "text_tokens": self.text_tokens, "n_vocab": self.n_vocab,
            "perplexity": self.ppl, "perplexity_stderr": self.ppl_stderr,
            "kl_divergence": None if self.kl is None else {
                "mean": self.kl.mean, "median": self.kl.median, "p99": self.kl.p99, "max": self.kl.max,
                "top1_agreement": self.kl.top1_agreement, "mean_abs_dp_top": self.kl.mean_abs_dp_top,
                "reference_perplexity": self.kl.reference_ppl, "ln_ppl_ratio": self.kl.ln_ppl_ratio},
            "seconds": self.seconds,
        }


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x


@dataclass
class _Acc:
    """Per-position numbers of the scored tokens (a float or two each; never logits)."""

    nll: list[np.ndarray] = field(default_factory=list)
    ref_nll: list[np.ndarray] = field(default_factory=list)
    kld: list[np.ndarray] = field(default_factory=list)
    same_top: list[np.ndarray] = field(default_factory=list)
    dp_top: list[np.ndarray] = field(default_factory=list)

    def add(self, logits: np.ndarray, targets: np.ndarray, ref_logits: np.ndarray | None) -> None:
        for a in range(0, len(targets), SLICE):
            lp = _log_softmax(logits[a:a + SLICE])
            t = targets[a:a + SLICE]
            rows = np.arange(len(t))
            self.nll.append(-lp[rows, t])
            if ref_logits is None:
                continue
            rp = _log_softmax(ref_logits[a:a + SLICE])
            self.ref_nll.append(-rp[rows, t])
            p = np.exp(rp)
            self.kld.append((p * (rp - lp)).sum(axis=1))
            top = rp.argmax(axis=1)
            self.same_top.append(lp.argmax(axis=1) == top)
            self.dp_top.append(np.abs(np.exp(lp[rows, top]) - p[rows, top]))

    def ppl(self) -> tuple[float, float]:
        nll = np.concatenate(self.nll)
        mean = float(nll.mean())
        # llama-perplexity's uncertainty: the standard error of the mean NLL, carried to the PPL.
        err = float(nll.std(ddof=1) / math.sqrt(len(nll))) if len(nll) > 1 else 0.0
        return math.exp(mean), math.exp(mean) * err

    def kl(self) -> KLStats:
        kld = np.concatenate(self.kld)
        nll, ref_nll = np.concatenate(self.nll), np.concatenate(self.ref_nll)
        return KLStats(mean=float(kld.mean()), median=float(np.median(kld)), p99=float(np.percentile(kld, 99)),
                       max=float(kld.max()), top1_agreement=float(np.concatenate(self.same_top).mean()),
                       mean_abs_dp_top=float(np.concatenate(self.dp_top).mean()),
                       reference_ppl=math.exp(float(ref_nll.mean())), ln_ppl_ratio=float((nll - ref_nll).mean()))


def chunk_tokens(tokens: list[int], n_ctx: int, bos: int | None, chunks: int | None) -> list[list[int]]:
    """llama-perplexity's chunks: consecutive n_ctx-token windows, each starting with BOS."""
    n = len(tokens) // n_ctx
    if chunks is not None and chunks > 0:
        n = min(n, chunks)
    out = []
    for i in range(n):
        c = tokens[i * n_ctx:(i + 1) * n_ctx]
        if bos is not None:
            c[0] = bos
        out.append(c)
    return out


def check_vocabularies(model: str | Path, reference: str | Path) -> int:
    """Refuse a pair whose vocabularies differ, from the headers alone (before any weight loads)."""
    m, r = read_model(model), read_model(reference)
    vm, vr = vocab_size(m), vocab_size(r)
    if vm != vr:
        raise VocabMismatchError(f"{Path(model).name} has a vocabulary of {vm} tokens but the reference "
                                 f"{Path(reference).name} has {vr}; compare files converted from the same checkpoint")
    return int(vm or 0)


def evaluate(model: str | Path, *, reference: str | Path | None = None, text: str | None = None,
             text_name: str | None = None, n_ctx: int = DEFAULT_CTX, chunks: int | None = None,
             options: EngineOptions | None = None, progress: Progress | None = None) -> EvalResult:
    """Perplexity of `model` over `text` (the bundled sample when None), and with `reference` the
    KL-divergence figures of `model` against it, in one pass over both.

    `options` sets threads/placement/KV-cache type; its context and batch sizes are replaced by
    `n_ctx` because every position of a chunk must come back in one decode.
    """
    if n_ctx < 8:
        raise EvalError(f"-c/--ctx-size must be at least 8 for an evaluation, got {n_ctx}")
    if chunks is not None and chunks < 0:
        raise EvalError(f"--chunks must be 0 (all) or more, got {chunks}")
    if reference is not None:
        check_vocabularies(model, reference)
    if text is None:
        text, text_name = bundled_text(), text_name or "bundled sample (ms4local/data/eval.txt)"
    if not text.strip():
        raise EvalError("the evaluation text is empty")
    base = options or EngineOptions()
    opts = replace(base, ctx_size=n_ctx, batch_size=n_ctx, ubatch_size=min(base.ubatch_size, n_ctx), vocab_only=False)
    t0 = time.perf_counter()
    ref_engine = Engine(reference, opts) if reference is not None else None
    try:
        with Engine(model, opts) as engine:
            tokens = engine.tokenize(text, add_special=True, parse_special=False)
            if ref_engine is not None:
                if ref_engine.n_vocab != engine.n_vocab:
                    raise VocabMismatchError(f"{Path(model).name} has {engine.n_vocab} tokens in its vocabulary but "
                                             f"the reference has {ref_engine.n_vocab}")
                if ref_engine.tokenize(text, add_special=True, parse_special=False) != tokens:
                    raise VocabMismatchError(f"{Path(model).name} and the reference {Path(reference).name} "  # type: ignore[arg-type]
                                             "tokenize the text differently: their vocabularies are not the same")
            add_bos = engine.metadata.get("tokenizer.ggml.add_bos_token", "true").lower() != "false"
            todo = chunk_tokens(tokens, n_ctx, engine.bos_id if add_bos else None, chunks)
            if not todo:
                raise EvalError(f"the text has {len(tokens)} tokens, fewer than one chunk of -c {n_ctx}; "
                                "lower -c or give a longer --text")
            first = n_ctx // 2
            acc = _Acc()
            for i, chunk in enumerate(todo):
                targets = np.asarray(chunk[first + 1:], dtype=np.int64)
                ref_logits = None
                if ref_engine is not None:
                    ref_logits = ref_engine.logits(chunk)[first:n_ctx - 1]
                acc.add(engine.logits(chunk)[first:n_ctx - 1], targets, ref_logits)
                if progress is not None:
                    progress(i + 1, len(todo), acc.ppl()[0])
            ppl, err = acc.ppl()
            return EvalResult(model=Path(model), reference=None if reference is None else Path(reference),
                              text=text_name or "text", n_ctx=n_ctx, chunks=len(todo),
                              tokens=len(todo) * (n_ctx - 1 - first), ppl=ppl, ppl_stderr=err,
                              kl=acc.kl() if ref_engine is not None else None, seconds=time.perf_counter() - t0,
                              n_vocab=engine.n_vocab, text_tokens=len(tokens))
    finally:
        if ref_engine is not None:
            ref_engine.close()
