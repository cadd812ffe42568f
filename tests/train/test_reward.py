"""Reward models: read at the last real token, all ranking pairs, learning, normalised scoring."""

import json
import random

import torch

from alignkit.data import tokenize_responses
from alignkit.models.reward import RewardModel, load_reward_backbone, reward_forward
from alignkit.train import reward


def test_reward_read_at_last_real_token_under_any_padding(tiny_model_dir):
    model = load_reward_backbone(str(tiny_model_dir)).eval()
    rows = [[1, 40, 41, 42, 2], [1, 50, 2]]
    with torch.no_grad():
        alone = [float(reward_forward(model, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))) for r in rows]
        # pad id 2 = EOS on purpose: a mask built from `input_ids != pad` would read the wrong token
        right = reward_forward(model, torch.tensor([rows[0], rows[1] + [2, 2]]), torch.tensor([[1] * 5, [1] * 3 + [0, 0]]))
        left = reward_forward(model, torch.tensor([rows[0], [2, 2] + rows[1]]), torch.tensor([[1] * 5, [0, 0] + [1] * 3]))
    torch.testing.assert_close(right, torch.tensor(alone), atol=1e-6, rtol=0)
    torch.testing.assert_close(left, torch.tensor(alone), atol=1e-6, rtol=0)


def test_ranking_of_three_gives_three_pairs_in_one_batch(tiny_model_dir, tiny_tokenizer):
    records = [{"prompt": "What is 1+2?", "responses": [" 3", " 4", " 5"], "_where": "<t>:1"},
               {"prompt": "What is 2+2?", "chosen": " 4", "rejected": " 5", "_where": "<t>:2"}]
    examples, _ = tokenize_responses(records, tiny_tokenizer, 32)
    batch = reward.collate_pairs(examples, 0)
    assert batch["better"].tolist() == [0, 0, 1, 3] and batch["worse"].tolist() == [1, 2, 2, 4]
    model = load_reward_backbone(str(tiny_model_dir))
    loss_sum, metrics = reward.rm_step(model, batch)
    r = reward_forward(model, batch["input_ids"], batch["attention_mask"]).detach()
    by_hand = sum(-torch.nn.functional.logsigmoid(r[i] - r[j]) for i, j in [(0, 1), (0, 2), (1, 2), (3, 4)])
    assert abs(float(loss_sum.detach()) - float(by_hand)) < 1e-5 and reward.pair_count(batch) == 4


def test_shared_prompt_rewards_equal_separate_rows(tiny_model_dir, tiny_tokenizer):
    """[prompt | response 1 | ... | response K] in one row gives each response's reward, loss
    and gradients as its own row [prompt | response] does, prompts and response counts varying."""
    records = [{"prompt": "What is 1+2?", "responses": [" 3", " 4 or so", " 5"], "_where": "<t>:1"},
               {"prompt": "Tell me: what is 12+2?", "chosen": " 14", "rejected": " It is 15.", "_where": "<t>:2"},
               {"prompt": "2+2", "chosen": " 4", "rejected": " 5", "margin": 0.5, "_where": "<t>:3"}]
    examples, _ = tokenize_responses(records, tiny_tokenizer, 32)
    examples[2]["margin"] = 0.5
    results = []
    for share in (True, False):
        torch.manual_seed(0)  # the same fresh scalar head both times
        model = load_reward_backbone(str(tiny_model_dir))
        batch = reward.collate_pairs(examples, 0, share_prompt=share)
        assert ("segment_ids" in batch) == share
        loss, metrics = reward.rm_step(model, batch)
        loss.backward()
        results.append((loss.detach(), {k: float(v) for k, v in metrics.items()},
                        torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    (loss_s, m_s, g_s), (loss_r, m_r, g_r) = results
    assert abs(float(loss_s - loss_r)) < 1e-5
    assert all(abs(m_s[k] - m_r[k]) < 1e-4 for k in m_r)
    assert float((g_s - g_r).abs().max()) <= 1e-5 * max(1.0, float(g_r.abs().max()))


def _prefs(path, n, seed):
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 49), rng.randint(0, 49)
            good, bad = f" The answer is {a + b}.", f" {a}{b} maybe"
            f.write(json.dumps({"prompt": f"What is {a}+{b}?", "chosen": good, "rejected": bad}) + "\n")
    return path


def test_reward_model_learns_and_scores_normalised(tiny_model_dir, tmp_path):
    train_file, eval_file = _prefs(tmp_path / "t.jsonl", 64, 0), _prefs(tmp_path / "e.jsonl", 32, 1)
    out = tmp_path / "rm"
    result = reward.run(reward.RewardConfig(model=str(tiny_model_dir), data=str(train_file), eval_data=str(eval_file),
                                            output_dir=str(out), max_steps=25, batch_size=8, lr=3e-3, log_steps=5))
    assert result.eval_metrics["accuracy"] >= 0.95
    assert result.eval_metrics["loss"] < result.initial_eval_metrics["loss"] - 0.3
    rm = RewardModel.load(str(out))
    prompts = [json.loads(line)["prompt"] for line in eval_file.read_text().splitlines()]
    chosen = [json.loads(line)["chosen"] for line in eval_file.read_text().splitlines()]
    rejected = [json.loads(line)["rejected"] for line in eval_file.read_text().splitlines()]
    s_w, s_l = rm.score(prompts, chosen), rm.score(prompts, rejected)
    assert sum(w > l for w, l in zip(s_w, s_l)) >= 0.95 * len(prompts)
    assert abs(sum(s_w + s_l) / (2 * len(prompts))) < 0.05  # normalised over held-out responses
    half = RewardModel.load(str(out), dtype="bfloat16")  # half the memory, as the online trainers' reward_dtype
    assert next(half.model.parameters()).dtype == torch.bfloat16
    h_w = half.score(prompts, chosen)
    assert max(abs(a - b) for a, b in zip(h_w, s_w)) < 0.1 * max(abs(x) for x in s_w + s_l)
    assert sum(w > l for w, l in zip(h_w, half.score(prompts, rejected))) >= 0.95 * len(prompts)


def _rankings(path, n, seed):
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 49), rng.randint(0, 49)
            responses = [f" The answer is {a + b}.", f" The answer is {a + b + 1}, maybe.", f" {a} or {b}", f" {a}{b}{a}"]
            order = list(range(4))
            rng.shuffle(order)  # given with scores, in random order: the loader sorts best first
            f.write(json.dumps({"prompt": f"What is {a}+{b}?", "responses": [responses[i] for i in order],
                                "scores": [4 - i for i in order]}) + "\n")
    return path


def test_reward_model_on_rankings_of_four_puts_best_above_worst(tiny_model_dir, tmp_path):
    train_file, eval_file = _rankings(tmp_path / "t.jsonl", 48, 0), _rankings(tmp_path / "e.jsonl", 30, 1)
    out = tmp_path / "rm"
    reward.run(reward.RewardConfig(model=str(tiny_model_dir), data=str(train_file), eval_data=str(eval_file),
                                   data_kind="ranking", output_dir=str(out), max_steps=30, batch_size=4, lr=3e-3,
                                   log_steps=10))
    from alignkit.data import load_records

    rm = RewardModel.load(str(out))
    records = load_records(str(eval_file), "ranking")
    best = rm.score([r["prompt"] for r in records], [r["responses"][0] for r in records])
    worst = rm.score([r["prompt"] for r in records], [r["responses"][-1] for r in records])
    assert sum(b > w for b, w in zip(best, worst)) >= 0.9 * len(records)


def test_lora_reward_model_learns_resumes_and_saves_a_plain_model(tiny_model_dir, tmp_path, one_thread):
    """LoRA adapters on the backbone, the scalar head trained in full; the saved model is merged:
    plain AutoModelForSequenceClassification weights that RewardModel.load scores with."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from tests.helpers import preference_file

    train_file, eval_file = preference_file(tmp_path / "t.jsonl", 64, 0), preference_file(tmp_path / "e.jsonl", 32, 1)
    kw = dict(model=str(tiny_model_dir), data=str(train_file), eval_data=str(eval_file), max_steps=20, batch_size=8,
              lr=3e-3, log_steps=5, lora_r=4, save_steps=10)
    result = reward.run(reward.RewardConfig(output_dir=str(tmp_path / "rm"), **kw))
    assert result.initial_eval_metrics["accuracy"] < 0.5 and result.eval_metrics["accuracy"] >= 0.9
    assert result.eval_metrics["loss"] < result.initial_eval_metrics["loss"] - 0.3

    out = tmp_path / "rm"
    adapter = load_file(out / "adapter/adapter_model.safetensors")
    assert any(k.endswith("score.weight") for k in adapter) and any("lora_A" in k for k in adapter)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    merged = AutoModelForSequenceClassification.from_pretrained(out).state_dict()
    base = load_reward_backbone(str(tiny_model_dir)).state_dict()
    assert merged.keys() == base.keys()  # no lora_A/B, base_layer or modules_to_save keys
    changed = [k for k in base if k != "score.weight" and not torch.equal(base[k], merged[k])]
    assert changed and all("proj" in k for k in changed)

    rm = RewardModel.load(str(out))
    records = [json.loads(line) for line in eval_file.read_text().splitlines()]
    prompts = [r["prompt"] for r in records]
    s_w, s_l = rm.score(prompts, [r["chosen"] for r in records]), rm.score(prompts, [r["rejected"] for r in records])
    assert sum(w > l for w, l in zip(s_w, s_l)) >= 0.9 * len(records)
    assert abs(sum(s_w + s_l) / (2 * len(records))) < 0.05  # normalisation stats saved with the merged model

    # resume from a LoRA checkpoint: the base from `model`, adapters and head from checkpoint-10/adapter
    reward.run(reward.RewardConfig(output_dir=str(tmp_path / "resumed"), resume=str(out / "checkpoint-10"), **kw))
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "resumed/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_position_warning_reads_each_sequence_of_a_grouped_example():
    """A ranking example's input_ids concatenate its responses (for the length sort only): the
    positions its rows reach are its longest sequence's, so 2 rows of 10 and 12 tokens under a
    16-position model warn of nothing, and a 20-token row does."""
    from types import SimpleNamespace

    from alignkit.train.loop import position_warnings, row_lengths

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=16))
    grouped = {"sequences": [[5] * 10, [6] * 12], "input_ids": [5] * 10 + [6] * 12}
    assert row_lengths([grouped, {"input_ids": [1] * 7}]) == [12, 7]
    assert position_warnings(model, row_lengths([grouped])) == []
    long = {"sequences": [[5] * 10, [6] * 20], "input_ids": [5] * 10 + [6] * 20}
    assert position_warnings(model, row_lengths([grouped, long])) == [
        "WARNING: 1 of 2 rows are longer than the model's max_position_embeddings (16), up to 20 tokens; "
        "lower max_length to keep rows within it"]
