"""`ms4local eval` and `quantize --eval-against` (issue #7).

The expected numbers are computed here, in the test, from llama-cpp-python logits (`Engine.logits`)
with numpy: the chunking (llama-perplexity's: n_ctx windows starting with BOS, second half scored),
the log-softmax, the KL divergence and the agreement figures are written out again, independently
of ms4local/evaluate.py.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from helpers import BIN
from ms4local import Engine, EngineOptions
from ms4local.errors import EvalError, VocabMismatchError
from ms4local.evaluate import bundled_text, evaluate
from quantize import convert
from quantize.synth import TinySpec

# Experts dominate, ne0 multiples of 256 (real K-quant blocks): Q4_K_M is visibly worse than F16.
SPEC = TinySpec(layers=2, hidden=256, heads=2, q_lora=256, kv_lora=256, nope=32, rope=32, v_dim=64, experts=16,
                top_k=4, moe_inter=256, vocab=2000, dtype="BF16", seed=11)
N_CTX, CHUNKS = 128, 4


@pytest.fixture(scope="module")
def models(ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    src = ckpt(SPEC)
    return {t: convert(src, out=d / f"M-{t}.gguf", out_type=t, quant_report=False).output
            for t in ("F32", "F16", "Q8_0", "Q4_K_M")}


def logp(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def direct(model, reference=None, n_ctx=N_CTX, chunks=CHUNKS) -> dict:
    """The figures from Engine.logits, computed position by position in plain numpy."""
    opts = EngineOptions(ctx_size=n_ctx, batch_size=n_ctx)
    with Engine(model, opts) as e:
        ids = e.tokenize(bundled_text(), add_special=True, parse_special=False)
        assert ids[0] == e.bos_id
        windows = []
        for c in range(min(chunks, len(ids) // n_ctx)):
            w = ids[c * n_ctx:(c + 1) * n_ctx]
            windows.append([e.bos_id] + w[1:])
        logits = [e.logits(w) for w in windows]
    ref_logits = None
    if reference is not None:
        with Engine(reference, opts) as r:
            ref_logits = [r.logits(w) for w in windows]
    nll, ref_nll, kld, same, dp = [], [], [], [], []
    half = n_ctx // 2
    for c, w in enumerate(windows):
        for j in range(half, n_ctx - 1):  # logits at j predict token j+1
            lp = logp(logits[c][j:j + 1])[0]
            nll.append(-lp[w[j + 1]])
            if ref_logits is not None:
                rp = logp(ref_logits[c][j:j + 1])[0]
                ref_nll.append(-rp[w[j + 1]])
                kld.append(float(np.sum(np.exp(rp) * (rp - lp))))
                top = int(np.argmax(rp))
                same.append(int(np.argmax(lp)) == top)
                dp.append(abs(np.exp(lp[top]) - np.exp(rp[top])))
    out = {"ppl": float(np.exp(np.mean(nll))), "tokens": len(nll)}
    if kld:
        k = np.array(kld)
        out |= {"kld_mean": k.mean(), "kld_max": k.max(), "kld_p99": np.percentile(k, 99), "top1": np.mean(same),
                "dp": np.mean(dp), "ref_ppl": float(np.exp(np.mean(ref_nll)))}
    return out


def test_perplexity_matches_a_direct_computation(models):
    res = evaluate(models["Q8_0"], n_ctx=N_CTX, chunks=CHUNKS)
    want = direct(models["Q8_0"])
    assert res.chunks == CHUNKS and res.tokens == want["tokens"] == CHUNKS * (N_CTX // 2 - 1)
    assert res.ppl == pytest.approx(want["ppl"], rel=1e-9)
    assert res.kl is None
    assert 1 < res.ppl < 3 * 2000  # a random model: about as unsure as a uniform guess, not wildly off


def test_kl_divergence_matches_a_direct_computation(models):
    res = evaluate(models["Q4_K_M"], reference=models["F32"], n_ctx=N_CTX, chunks=CHUNKS)
    want = direct(models["Q4_K_M"], models["F32"])
    k = res.kl
    assert k.mean == pytest.approx(want["kld_mean"], rel=1e-6)
    assert k.max == pytest.approx(want["kld_max"], rel=1e-6)
    assert k.p99 == pytest.approx(want["kld_p99"], rel=1e-6)
    assert k.top1_agreement == pytest.approx(want["top1"])
    assert k.mean_abs_dp_top == pytest.approx(want["dp"], rel=1e-6)
    assert k.reference_ppl == pytest.approx(want["ref_ppl"], rel=1e-9)
    assert res.ppl == pytest.approx(want["ppl"], rel=1e-9)


def test_kl_divergence_orders_the_quant_types(models):
    same = evaluate(models["F32"], reference=models["F32"], n_ctx=N_CTX, chunks=2).kl
    assert same.mean == 0 and same.max == 0 and same.top1_agreement == 1 and same.mean_abs_dp_top == 0
    f16 = evaluate(models["F16"], reference=models["F32"], n_ctx=N_CTX, chunks=CHUNKS).kl
    q8 = evaluate(models["Q8_0"], reference=models["F32"], n_ctx=N_CTX, chunks=CHUNKS).kl
    q4 = evaluate(models["Q4_K_M"], reference=models["F32"], n_ctx=N_CTX, chunks=CHUNKS).kl
    print(f"mean KLD vs F32: F16 {f16.mean:.2e}, Q8_0 {q8.mean:.2e}, Q4_K_M {q4.mean:.2e}")
    assert 0 < f16.mean < 1e-4  # F16 storage: tiny
    assert f16.mean < q8.mean < q4.mean
    assert q4.mean > 10 * f16.mean and q4.top1_agreement < f16.top1_agreement
    assert f16.p99 <= f16.max and q4.p99 <= q4.max


def test_mismatched_vocab_is_refused_before_loading(ckpt, models, tmp_path, cli_env):
    other = convert(ckpt(TinySpec(vocab=2048)), out=tmp_path / "Other-F32.gguf", out_type="F32").output
    with pytest.raises(VocabMismatchError, match="2000 tokens.*2048"):
        evaluate(models["Q8_0"], reference=other, n_ctx=N_CTX, chunks=1)
    p = subprocess.run([str(BIN / "ms4local"), "eval", str(models["Q8_0"]), "--reference", str(other), "-c", "64"],
                       capture_output=True, text=True, env=cli_env, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "vocabulary" in lines[0]


def test_short_text_and_bad_options_are_typed_errors(models):
    with pytest.raises(EvalError, match="fewer than one chunk"):
        evaluate(models["Q8_0"], text="only a few words", n_ctx=N_CTX)
    with pytest.raises(EvalError, match="empty"):
        evaluate(models["Q8_0"], text="   ", n_ctx=N_CTX)


def test_custom_text_and_progress(models, tmp_path):
    seen = []
    text = "The quick brown fox jumps over the lazy dog. " * 60
    res = evaluate(models["Q8_0"], text=text, text_name="fox", n_ctx=64, chunks=3,
                   progress=lambda done, total, ppl: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)] and res.text == "fox"
    assert res.ppl == pytest.approx(direct_text(models["Q8_0"], text, 64, 3), rel=1e-9)


def direct_text(model, text, n_ctx, chunks) -> float:
    with Engine(model, EngineOptions(ctx_size=n_ctx, batch_size=n_ctx)) as e:
        ids = e.tokenize(text, add_special=True, parse_special=False)
        nll = []
        for c in range(chunks):
            w = [e.bos_id] + ids[c * n_ctx + 1:(c + 1) * n_ctx]
            lp = logp(e.logits(w))
            nll += [-lp[j, w[j + 1]] for j in range(n_ctx // 2, n_ctx - 1)]
    return float(np.exp(np.mean(nll)))


def test_cli_eval_json(models, cli_env):
    p = subprocess.run([str(BIN / "ms4local"), "eval", str(models["F16"]), "--reference", str(models["F32"]),
                        "-c", str(N_CTX), "--chunks", "2", "--json"], capture_output=True, text=True, env=cli_env,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got["chunks"] == 2 and got["tokens_scored"] == 2 * (N_CTX // 2 - 1) and got["ctx_size"] == N_CTX
    assert set(got["kl_divergence"]) == {"mean", "median", "p99", "max", "top1_agreement", "mean_abs_dp_top",
                                         "reference_perplexity", "ln_ppl_ratio"}
    want = direct(models["F16"], models["F32"], chunks=2)
    assert got["perplexity"] == pytest.approx(want["ppl"], rel=1e-9)
    assert got["kl_divergence"]["mean"] == pytest.approx(want["kld_mean"], rel=1e-6)


def test_quantize_eval_against_prints_size_and_kld(ckpt, models, tmp_path, cli_env):
    out = tmp_path / "M-Q4_K_M.gguf"
    p = subprocess.run([str(BIN / "ms4local"), "quantize", str(ckpt(SPEC)), "-o", str(out), "--type", "Q4_K_M",
                        "--eval-against", str(models["F32"]), "--eval-ctx", str(N_CTX), "--eval-chunks", "2"],
                       capture_output=True, text=True, env=cli_env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "file size" in p.stdout and "KL divergence mean" in p.stdout and "same top token" in p.stdout
    want = direct(out, models["F32"], chunks=2)
    assert f"{want['kld_mean']:.6f}" in p.stdout
    # A missing reference fails before any quantizing.
    p = subprocess.run([str(BIN / "ms4local"), "quantize", str(ckpt(SPEC)), "-o", str(tmp_path / "x.gguf"),
                        "--type", "Q8_0", "--eval-against", str(tmp_path / "missing.gguf")],
                       capture_output=True, text=True, env=cli_env, timeout=300)
    assert p.returncode != 0 and "missing.gguf" in p.stderr and not (tmp_path / "x.gguf").exists()
