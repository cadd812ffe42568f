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


def test_generate_on_cuda(tiny_model_dir, tiny_tokenizer):
    from alignkit.rollout.generate import generate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).cuda()
    outs = generate(model, tiny_tokenizer, ["What is 1+2?", "What is 10+20? The"], max_new_tokens=5)
    assert len(outs) == 2 and all(len(o["token_ids"]) <= 5 for o in outs)
