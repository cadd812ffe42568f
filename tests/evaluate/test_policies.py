import json

import pytest
import torch

from alignkit.evaluate.policies import EvalConfig, completion_logprobs, distinct_n, evaluate, win_rate


def test_distinct_n_and_win_rate_by_hand():
    seqs = [[1, 2, 3], [1, 2, 4]]
    assert distinct_n(seqs, 1) == 4 / 6  # {1,2,3,4} of 6 unigrams
    assert distinct_n(seqs, 2) == 3 / 4  # (1,2) twice, (2,3), (2,4)
    assert distinct_n([[5]], 2) == 0.0
    assert win_rate([1.0, 0.5, 0.0], [0.0, 0.5, 1.0]) == 0.5  # win + tie + loss = 1.5 of 3
    with pytest.raises(ValueError):
        win_rate([1.0], [])


def test_completion_logprobs_match_the_sampler(tiny_model_dir, tiny_tokenizer, one_thread):
    from alignkit.data import pad_batch, tokenize_prompts
    from alignkit.models.load import load_causal_lm
    from alignkit.rollout.sampler import sample

    model = load_causal_lm(str(tiny_model_dir)).eval()
    examples, _ = tokenize_prompts([{"prompt": "What is 1+2?"}, {"prompt": "What is 30+4? The"}], tiny_tokenizer, 64)
    batch = pad_batch(examples, tiny_tokenizer.pad_token_id, side="left")
    r = sample(model, batch["input_ids"].repeat_interleave(2, 0), batch["attention_mask"].repeat_interleave(2, 0),
               max_new_tokens=6, eos_token_id=2, pad_token_id=0, temperature=0.7,
               generator=torch.Generator().manual_seed(0))
    ids = [row[m.bool()].tolist() for row, m in zip(r.completion_ids, r.completion_mask)]
    logp, entropy = completion_logprobs(model, examples, ids, 2, 0, batch_size=3, temperature=0.7)
    assert logp == pytest.approx(r.logprobs.sum(-1).tolist(), abs=1e-4)
    assert all(e > 0 for e in entropy)


def test_evaluate_reference_against_itself_and_a_changed_policy(tiny_model_dir, tiny_tokenizer, tmp_path, one_thread):
    from alignkit.models.load import load_causal_lm

    changed = load_causal_lm(str(tiny_model_dir))
    with torch.no_grad():
        changed.lm_head.weight.add_(torch.randn_like(changed.lm_head.weight), alpha=0.5)
    changed.save_pretrained(tmp_path / "changed")
    tiny_tokenizer.save_pretrained(tmp_path / "changed")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i}+{i}?"}) + "\n" for i in range(8)))
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"What is {i}+1? The answer is {i + 1}."}) + "\n" for i in range(8)))
    cfg = EvalConfig(models=[f"ref={tiny_model_dir}", f"same={tiny_model_dir}", f"changed={tmp_path / 'changed'}"],
                     prompts=str(prompts), reward=["alignkit.tasks.sentiment:gold_reward"],
                     proxy_reward="alignkit.tasks.sentiment:gold_reward", text_data=str(text),
                     samples_per_prompt=2, max_new_tokens=6, bootstrap_rounds=10, output=str(tmp_path / "eval.json"))
    result = evaluate(cfg)
    m = result["models"]
    assert m["same"]["kl"] == pytest.approx(0.0, abs=1e-5) and m["same"]["win_rate"] == 0.5
    assert m["same"]["gold"] == m["ref"]["gold"] == m["ref"]["proxy"]
    assert m["changed"]["kl"] != 0.0 and abs(m["changed"]["kl"]) < 1e3
    assert m["changed"]["text_nll"] != pytest.approx(m["ref"]["text_nll"])
    assert all(0 <= m[k]["distinct_2"] <= 1 and m[k]["length"] > 0 for k in m)
    assert len(result["leaderboard"]) == 3 and len(result["samples"]) == 5
    assert json.loads((tmp_path / "eval.json").read_text())["reference"] == "ref"
