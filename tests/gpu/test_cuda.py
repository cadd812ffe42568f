"""CUDA paths: bf16 mixed precision, log-probs and generation on the GPU. Skipped without CUDA."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignkit.models.forward import forward_logprobs
from alignkit.ops import token_logprobs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_padded_logprobs_on_cuda_match_rows_alone(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).cuda().eval()
    rows = [[1, 40, 41, 42, 43, 44, 45], [1, 50, 51]]
    ids = torch.tensor([[0, 0, 0, 0, 1, 50, 51], rows[0]]).cuda()  # left padding
    mask = (torch.arange(7) >= torch.tensor([[4], [0]])).long().cuda()
    with torch.no_grad():
        lp, _ = forward_logprobs(model, ids, mask)
        alone, _ = forward_logprobs(model, torch.tensor([rows[1]]).cuda(), torch.ones(1, 3, dtype=torch.long).cuda())
    torch.testing.assert_close(lp[0, -2:], alone[0], atol=1e-4, rtol=0)


def test_bf16_token_logprobs_match_fp32_of_the_same_logits():
    logits = torch.randn(4, 16, 1000, device="cuda").bfloat16()
    labels = torch.randint(0, 1000, (4, 16), device="cuda")
    expected = torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(token_logprobs(logits, labels), expected, atol=1e-5, rtol=0)


def test_sft_on_cuda_uses_bf16_autocast_and_learns(tiny_model_dir, tmp_path):
    from alignkit.train import sft

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a}+{b}?", "completion": f" {a + b}"}) + "\n"
                            for a in range(20) for b in range(5)))
    result = sft.run(sft.SFTConfig(model=str(tiny_model_dir), data=str(data), eval_data=str(data),
                                   output_dir=str(tmp_path / "o"), max_steps=60, batch_size=16, lr=3e-3, log_steps=10))
    assert result.device.startswith("cuda") and result.precision == "bf16"
    assert result.eval_metrics["loss"] < 0.7 * result.initial_eval_metrics["loss"]
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert next(saved.parameters()).dtype == torch.float32  # master weights stay fp32 under autocast


def test_sampler_on_cuda_agrees_with_learner(tiny_model_dir):
    from alignkit.rollout.sampler import sample

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).cuda()
    ids = torch.tensor([[0, 0, 1, 50, 51], [1, 40, 41, 42, 43]]).cuda()
    mask = (ids != 0).long()
    g = torch.Generator("cuda").manual_seed(0)
    roll = sample(model, ids, mask, max_new_tokens=12, eos_token_id=2, pad_token_id=0, temperature=0.7, generator=g)
    with torch.no_grad():
        lp, _ = forward_logprobs(model, roll.input_ids, roll.attention_mask, temperature=0.7)
    got = lp[:, ids.shape[1] - 1 :]
    m = roll.completion_mask.bool()
    assert float((got - roll.logprobs).abs()[m].max()) < 1e-4


def test_grpo_on_cuda_bf16(tiny_model_dir, tmp_path):
    from alignkit.train import grpo

    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a}+1?"}) + "\n" for a in range(32)))
    out = tmp_path / "o"
    result = grpo.run(grpo.GRPOConfig(model=str(tiny_model_dir), data=str(data), output_dir=str(out),
                                      reward=["tests.helpers:digit_fraction"], num_generations=4,
                                      batch_size=16, max_new_tokens=8, lr=1e-2, beta=0.04, max_steps=20, log_steps=1,
                                      eval_fraction=0.0))
    assert result.device.startswith("cuda") and result.precision == "bf16"
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rewards = [h["train/reward"] for h in logs]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.1
    assert all(h["train/sampler_logprob_gap"] < 0.1 for h in logs)  # bf16 sampler vs bf16 learner
    print("gap per step:", [round(h["train/sampler_logprob_gap"], 5) for h in logs])
