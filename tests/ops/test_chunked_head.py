"""The chunked output head against the full logits: values and gradients, and the memory it saves."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignkit.models import forward
from alignkit.ops import entropy_from_logits, token_logprobs
from alignkit.ops.chunked_head import chunked_head


def full_path(hidden, weight, bias, targets, temperature):
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits / temperature
    if logits.dtype == torch.float32:  # alignkit's full path
        return token_logprobs(logits, targets.clamp(min=0)), entropy_from_logits(logits), logits.argmax(-1)
    logp = torch.log_softmax(logits, -1)  # the same in float64 (alignkit's ops compute in float32)
    return (logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0], -(logp.exp() * logp).sum(-1),
            logits.argmax(-1))


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 9), h=st.integers(1, 12), v=st.integers(2, 40),
       chunk=st.integers(1, 11), temperature=st.sampled_from([1.0, 0.7, 1.3]), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_values_and_gradients_equal_the_full_path(b, t, h, v, chunk, temperature, bias, seed):
    """In float64 the chunked path equals the full path to rounding (the math is the same); in float32
    it is within 1e-5 of each output's largest entry of the exact (float64) values."""
    exact = run_paths(b, t, h, v, chunk, temperature, bias, seed, torch.float64)
    approx = run_paths(b, t, h, v, chunk, temperature, bias, seed, torch.float32)
    for (lp, ent, am, grads), tol in ((exact[1], 1e-10), (approx[1], 1e-5)):
        for a, c in zip([lp, ent, *grads], [exact[0][0], exact[0][1], *exact[0][3]]):
            assert float((a.double() - c).abs().max()) <= tol * max(1.0, float(c.abs().max())), (a, c)
    assert torch.equal(exact[1][2], exact[0][2])


def run_paths(b, t, h, v, chunk, temperature, bias, seed, dtype):
    """(full path, chunked path) outputs: log-probs, entropies, argmaxes (masked), gradients."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64).to(dtype)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64).to(dtype)
    bias_t = torch.randn(v, generator=g, dtype=torch.float64).to(dtype) if bias else None
    targets = torch.randint(0, v, (b, t), generator=g)
    targets[0, -1] = -100  # a padded position: read as 0, masked below
    mask = (targets >= 0).to(dtype)
    upstream_lp = torch.randn(b, t, generator=g, dtype=torch.float64).to(dtype)
    upstream_ent = torch.randn(b, t, generator=g, dtype=torch.float64).to(dtype)

    grads = []
    for fn in ("full", "chunked"):
        params = [x.clone().requires_grad_(True) for x in (hidden, weight)] + (
            [bias_t.clone().requires_grad_(True)] if bias else [])
        hb = params[2] if bias else None
        if fn == "full":
            lp, ent, am = full_path(params[0], params[1], hb, targets, temperature)
        else:
            lp, ent, am = chunked_head(params[0], params[1], targets, hb, temperature, chunk=chunk, entropy=True)
        ((lp * upstream_lp * mask).sum() + (ent * upstream_ent * mask).sum()).backward()
        grads.append((lp.detach() * mask, ent.detach() * mask, am * mask.long(), [p.grad for p in params]))
    return grads


def test_token_stats_through_a_model_equals_forward_logprobs(tiny_model_dir, monkeypatch):
    """Through the tiny Llama: padding, `columns` and temperature; the head chunked ("on") or not."""
    from alignkit.models.load import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir))
    ids = torch.randint(3, 300, (3, 10))
    attn = torch.ones_like(ids)
    attn[1, :4] = 0  # left padding
    columns = torch.tensor([2, 5, 6, 8])
    results = {}
    for mode in ("off", "on"):
        monkeypatch.setattr(forward, "CHUNKED_HEAD", mode)
        model.zero_grad()
        stats = forward.token_stats(model, ids, attn, 0.8, columns=columns, entropy=True)
        (stats.logprobs.sum() + 0.5 * stats.entropy.sum()).backward()
        results[mode] = (stats.logprobs.detach(), stats.entropy.detach(),
                         torch.cat([p.grad.flatten() for p in model.parameters()]))
    for a, b in zip(results["on"], results["off"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_auto_chunks_only_above_a_gib_of_logits(tiny_model_dir, monkeypatch):
    from alignkit.models.load import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir))  # vocabulary 320
    assert not forward.uses_chunked_head(model, rows=100_000)  # 32M logits: the full path
    assert forward.uses_chunked_head(model, rows=forward.AUTO_ELEMENTS // 320 + 1)
    monkeypatch.setattr(forward, "CHUNKED_HEAD", "off")
    assert not forward.uses_chunked_head(model, rows=10**9)


@pytest.mark.slow
def test_peak_memory_at_a_128k_vocabulary_is_lower_by_the_logits():
    """V = 128,256, 4 x 512 tokens, H = 64: the full path holds the float32 logits (1.05 GB) and their
    softmax in the backward; the chunked one holds one chunk. Measured with the allocator's peak
    (CPU: torch's own counters are not kept, so tracemalloc cannot see tensor memory; we read the
    process's peak RSS growth in a fresh subprocess for each path)."""
    import json
    import subprocess
    import sys

    script = """
import json, resource, sys, torch
from alignkit.ops import token_logprobs
from alignkit.ops.chunked_head import chunked_head
torch.manual_seed(0)
V, N, H = 128256, 2048, 64
hidden = torch.randn(N, H, requires_grad=True)
weight = (torch.randn(V, H) * 0.02).requires_grad_(True)
targets = torch.randint(0, V, (N,))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] == "full":
    lp = token_logprobs((hidden @ weight.t())[None], targets[None])[0]
else:
    lp = chunked_head(hidden, weight, targets)[0]
lp.sum().backward()
print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}))
"""
    peaks = {}
    for path in ("full", "chunked"):
        out = subprocess.run([sys.executable, "-c", script, path], capture_output=True, text=True, check=True)
        peaks[path] = json.loads(out.stdout.strip().splitlines()[-1])["peak_kib"] * 1024
    logits_bytes = 128256 * 2048 * 4
    assert peaks["full"] - peaks["chunked"] >= logits_bytes, peaks


def test_shared_prompt_rows_chunked_equal_full(tiny_model_dir, tiny_tokenizer, monkeypatch):
    """DPO's one-row-per-pair layout: the chunked head reads each response's first token from the
    last prompt column, as the full path's `sources` do."""
    from alignkit.data import tokenize_responses
    from alignkit.data.tokenize import pad_shared_prompt
    from alignkit.models.forward import sequence_logprobs
    from alignkit.models.load import load_causal_lm

    pairs = [{"prompt": "What is 2+2?", "chosen": " 4.", "rejected": " The answer is 22."},
             {"prompt": "What is 13+5? Think.", "chosen": " It is 18.", "rejected": " 135"}]
    examples, _ = tokenize_responses(pairs, tiny_tokenizer, 64)
    batch = pad_shared_prompt(examples, 0)
    model = load_causal_lm(str(tiny_model_dir))
    results = {}
    for mode in ("off", "on"):
        monkeypatch.setattr(forward, "CHUNKED_HEAD", mode)
        model.zero_grad()
        logps, n = sequence_logprobs(model, batch, temperature=0.9)
        logps.sum().backward()
        results[mode] = (logps.detach(), n, torch.cat([p.grad.flatten() for p in model.parameters()]))
    for a, b in zip(results["on"], results["off"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
