"""DPO: precomputed vs on-the-fly reference, LoRA reference, and learning from preferences."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignkit.data import pad_groups, tokenize_responses
from alignkit.data.tokenize import pad_shared_prompt
from alignkit.models.forward import sequence_logprobs
from alignkit.models.load import apply_lora
from alignkit.train import dpo
from alignkit.train.reference import make_reference, precompute_reference, reference_sequence_logprobs
from tests.helpers import assert_same_step, perturbed_model, preference_file

PAIRS = [{"prompt": f"What is {a}+{b}?", "chosen": f" The answer is {a + b}.", "rejected": f" It is {a * b + 1} or so",
          "_where": f"<t>:{a}"} for a, b in [(1, 2), (3, 4), (10, 7), (21, 5)]]


def test_precomputed_reference_equals_on_the_fly(tiny_model_dir, tiny_tokenizer):
    examples, _ = tokenize_responses(PAIRS, tiny_tokenizer, 64)
    reference = make_reference(str(tiny_model_dir), "", lora=False, device="cpu")  # a frozen copy
    cfg = dpo.DPOConfig(beta=0.3)
    results = []
    for precompute in (False, True):
        policy = perturbed_model(tiny_model_dir)
        exs = copy.deepcopy(examples)
        if precompute:
            precompute_reference(reference, policy, exs, lambda b: pad_groups(b, 0), 3, "cpu")
            assert all(len(ex["ref_logps"]) == 2 for ex in exs)
        batch = pad_groups(exs, 0)
        assert ("ref_logps" in batch) == precompute
        loss, metrics = dpo.make_dpo_step(cfg, None if precompute else reference)(policy, batch)
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in policy.parameters()])))
    (loss_fly, grad_fly), (loss_pre, grad_pre) = results
    assert abs(float(loss_fly - loss_pre)) <= 1e-5
    assert float((grad_fly - grad_pre).abs().max()) <= 1e-5 * max(1.0, float(grad_fly.abs().max()))


def test_precompute_on_a_fresh_run_uses_the_policy_itself(tiny_model_dir, tiny_tokenizer, monkeypatch):
    """Before the first update the policy holds the starting weights: its log-probs are the
    reference's, so precomputing them loads no second copy."""
    examples, _ = tokenize_responses(PAIRS, tiny_tokenizer, 64)
    expected = copy.deepcopy(examples)
    precompute_reference(make_reference(str(tiny_model_dir), "", lora=False, device="cpu"), None, expected,
                         lambda b: pad_shared_prompt(b, 0), 3, "cpu")
    import alignkit.models.load

    def no_copy(*args, **kwargs):
        raise AssertionError("a reference copy was loaded")

    monkeypatch.setattr(alignkit.models.load, "load_causal_lm", no_copy)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    reference = make_reference(str(tiny_model_dir), "", lora=False, device="cpu", before_first_update=True)
    precompute_reference(reference, policy, examples, lambda b: pad_shared_prompt(b, 0), 3, "cpu")
    assert policy.training  # back in training mode afterwards
    for got, want in zip(examples, expected):
        torch.testing.assert_close(torch.tensor(got["ref_logps"]), torch.tensor(want["ref_logps"]), atol=1e-6, rtol=0)


def test_reference_stored_in_bfloat16_is_close_to_float32(tiny_model_dir, tiny_tokenizer):
    examples, _ = tokenize_responses(PAIRS, tiny_tokenizer, 64)
    batch = pad_shared_prompt(examples, 0)
    full = reference_sequence_logprobs(make_reference(str(tiny_model_dir), "", lora=False, device="cpu"), None, batch)
    half = make_reference(str(tiny_model_dir), "", lora=False, device="cpu", dtype="bfloat16")
    assert half(None, lambda m: next(m.parameters()).dtype) == torch.bfloat16  # stored at half size
    logps = reference_sequence_logprobs(half, None, batch)
    assert logps.dtype == torch.float32  # summed in float32 whatever the weights' dtype
    # bf16 keeps 8 bits of mantissa: per-token errors ~1e-2 of a log-prob, summed over a response
    assert float((logps - full).abs().max()) < 0.05 * float(full.abs().max()), (logps, full)


def test_shared_prompt_step_equals_separate_rows(tiny_model_dir, tiny_tokenizer):
    """share_prompt (one [prompt | chosen | rejected] row per pair) gives the loss, metrics and gradients
    of chosen and rejected as separate rows, for the reference on the fly and precomputed, sigmoid, IPO, and the
    losses that read token counts (sigmoid_norm) or no reference (simpo)."""
    pairs = PAIRS + [{"prompt": "What is 2+2? " * 8, "chosen": " 4.", "rejected": " The answer is 22."}]
    examples, report = tokenize_responses(pairs, tiny_tokenizer, 40)
    assert report.prompt_truncated >= 1  # a prompt cut by truncation, and prompts of different lengths
    reference = make_reference(str(tiny_model_dir), "", lora=False, device="cpu")
    for loss_type in ("sigmoid", "ipo", "sigmoid_norm", "simpo"):
        for precompute in (False, True):
            results = []
            for pad in (pad_shared_prompt, pad_groups):
                policy = perturbed_model(tiny_model_dir)
                exs = copy.deepcopy(examples)
                if precompute:
                    precompute_reference(reference, policy, exs, lambda b: pad(b, 0), 3, "cpu")
                cfg = dpo.DPOConfig(beta=0.3, loss_type=loss_type)
                step = dpo.make_dpo_step(cfg, None if precompute else reference)
                loss, metrics = step(policy, pad(exs, 0))
                loss.backward()
                results.append((loss.detach(), metrics, torch.cat([p.grad.flatten() for p in policy.parameters()])))
            assert_same_step(*results)


def test_lora_reference_with_adapters_disabled_equals_frozen_base(tiny_model_dir, tiny_tokenizer):
    examples, _ = tokenize_responses(PAIRS, tiny_tokenizer, 64)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    policy = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), r=4)
    with torch.no_grad():  # make the adapters do something, as after training
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    reference = make_reference(str(tiny_model_dir), "", lora=True, device="cpu")
    for batch in (pad_groups(examples, 0), pad_shared_prompt(examples, 0)):  # rows of their own, or shared
        with torch.no_grad():
            expected = sequence_logprobs(base, batch)[0]
            with_adapters = sequence_logprobs(policy, batch)[0]
        assert float((with_adapters - expected).abs().max()) > 1e-3  # the adapters matter...
        torch.testing.assert_close(reference_sequence_logprobs(reference, policy, batch), expected, atol=1e-6, rtol=0)  # ...and are off here


def test_dpo_learns_held_out_preferences(tiny_model_dir, tmp_path):
    train_file = preference_file(tmp_path / "train.jsonl", 64, 0)
    eval_file = preference_file(tmp_path / "eval.jsonl", 32, 1)
    result = dpo.run(dpo.DPOConfig(model=str(tiny_model_dir), data=str(train_file), eval_data=str(eval_file),
                                   output_dir=str(tmp_path / "o"), max_steps=30, batch_size=8, lr=3e-3, beta=0.1,
                                   precompute_ref=True, log_steps=10))
    before, after = result.initial_eval_metrics, result.eval_metrics
    assert abs(before["loss"] - 0.6931) < 1e-3  # pi == pi_ref at the start: -log sigmoid(0)
    assert after["rewards/accuracy"] >= 0.9
    assert after["loss"] < before["loss"] - 0.3
    assert after["rewards/margin"] > 1.0
    assert after["rewards/chosen"] > 0  # held-out chosen log-prob rose relative to the reference


@pytest.mark.parametrize("loss_type", ["sigmoid", "bco_pair"])  # bco_pair: its running mean is checkpointed too
def test_dpo_resume_at_step_7_of_20_equals_uninterrupted(tiny_model_dir, tmp_path, loss_type):
    from safetensors.torch import load_file

    data = preference_file(tmp_path / "train.jsonl", 24, 0)

    def cfg(out, **kw):
        return dpo.DPOConfig(model=str(tiny_model_dir), data=str(data), output_dir=str(out), max_steps=20, batch_size=4,
                             lr=3e-3, log_steps=1, seed=5, loss_type=[loss_type], **kw)

    dpo.run(cfg(tmp_path / "full", save_steps=7))
    dpo.run(cfg(tmp_path / "resumed", resume=str(tmp_path / "full/checkpoint-7")))
    losses = {}
    for name in ("full", "resumed"):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert sorted(losses["resumed"]) == list(range(8, 21))
    assert all(losses["full"][s] == losses["resumed"][s] for s in losses["resumed"])
    wa, wb = load_file(tmp_path / "full/model.safetensors"), load_file(tmp_path / "resumed/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_share_prompt_off_trains_the_same(tiny_model_dir, tmp_path):
    data = preference_file(tmp_path / "train.jsonl", 16, 0)
    losses = {}
    for share in (True, False):
        result = dpo.run(dpo.DPOConfig(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / str(share)),
                                       max_steps=3, batch_size=4, lr=3e-3, log_steps=1, share_prompt=share))
        losses[share] = [r["train/loss"] for r in result.history if "train/loss" in r]
    assert len(losses[True]) == 3
    assert all(abs(a - b) <= 1e-5 for a, b in zip(losses[True], losses[False]))


def test_a_reference_free_loss_loads_no_reference_and_learns(tiny_model_dir, tmp_path, monkeypatch):
    def no_reference(*args, **kwargs):
        raise AssertionError("a reference-free loss loaded a reference model")

    monkeypatch.setattr(dpo, "make_reference", no_reference)
    train_file = preference_file(tmp_path / "train.jsonl", 64, 0)
    eval_file = preference_file(tmp_path / "eval.jsonl", 32, 1)
    result = dpo.run(dpo.DPOConfig(model=str(tiny_model_dir), data=str(train_file), eval_data=str(eval_file),
                                   output_dir=str(tmp_path / "o"), max_steps=30, batch_size=8, lr=3e-3, beta=2.0,
                                   loss_type=["simpo"], simpo_gamma=1.0, log_steps=10))
    before, after = result.initial_eval_metrics, result.eval_metrics
    assert after["loss"] < before["loss"] - 0.3
    assert after["rewards/accuracy"] >= 0.9  # held-out: beta log pi(y_w) > beta log pi(y_l)


def test_loss_keys_are_checked():
    from alignkit.config import ConfigError

    def check(**kw):
        dpo.DPOConfig(model="m", data="d.jsonl", **kw).validate()

    with pytest.raises(ConfigError, match=r"unknown loss_type 'dpo'; valid names: sigmoid, hinge"):
        check(loss_type=["dpo"])
    with pytest.raises(ConfigError, match=r"discopop_tau=0.1 is read by no loss in loss_type \['sigmoid'\]; "
                                          "it applies to discopop"):
        check(discopop_tau=0.1)
    with pytest.raises(ConfigError, match="label_smoothing=0.1 is read by no loss"):
        check(loss_type=["ipo"], label_smoothing=0.1)
    with pytest.raises(ConfigError, match="uses no reference model"):
        check(loss_type=["orpo"], precompute_ref=True)
    with pytest.raises(ConfigError, match="loss_weights has 1 values for 2"):
        check(loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    assert dpo.DPOConfig(loss_type="ipo").loss_type == ["ipo"]
