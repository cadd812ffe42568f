"""Process reward models: step data, the separator reading, causality, padding, learning."""

import json

import pytest
import torch

from alignkit.data import DataError, load_records
from alignkit.data.tokenize import pad_steps, tokenize_steps
from alignkit.models.process_reward import ProcessRewardModel, aggregate_steps, load_prm_backbone, step_logits


def test_steps_records_are_checked_with_file_line_field(tmp_path):
    path = tmp_path / "steps.jsonl"
    rows = [{"prompt": "Q: 1+2-1?", "steps": [" 1+2=3", " 3-1=2", " so 2"], "labels": [1, True, 0.5]},
            {"prompt": "Q", "steps": [" a", " b"], "labels": [1]},
            {"prompt": "Q", "steps": [], "labels": []},
            {"prompt": "Q", "steps": [" a"], "labels": [1.5]},
            {"prompt": "Q", "steps": [" a", 3], "labels": [1, 0]},
            {"prompt": "Q", "steps": [" a"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as e:
        load_records(str(path), "steps")
    lines = str(e.value).splitlines()
    assert lines[0] == f"{path}: 5 bad rows (of 6):"
    assert lines[1:] == [f"{path}:2: field 'labels': expected 2 labels (one per step), got 1",
                         f"{path}:3: field 'steps': empty list of steps",
                         f"{path}:4: field 'labels[0]': expected a number in [0, 1], got 1.5",
                         f"{path}:5: field 'steps[1]': expected a string, got int",
                         f"{path}:6: field 'labels': missing (a steps record needs 'prompt', 'steps' and 'labels')"]
    path.write_text(json.dumps(rows[0]) + "\n")
    assert load_records(str(path), "steps")[0]["labels"] == [1.0, 1.0, 0.5]


def test_each_step_is_read_at_its_separator(tiny_tokenizer):
    records = [{"prompt": "What is 1+2-1?", "steps": [" 1+2=3", " 3-1=2", " so 2"], "labels": [1.0, 0.0, 1.0]}]
    (ex,), report = tokenize_steps(records, tiny_tokenizer, 64, separator=";")
    sep = tiny_tokenizer.convert_tokens_to_ids(";")
    marked = [t for t, m in zip(ex["input_ids"], ex["loss_mask"]) if m]
    assert marked == [sep, sep, sep] and ex["step_labels"] == [1.0, 0.0, 1.0]
    assert tiny_tokenizer.decode(ex["input_ids"], skip_special_tokens=True) == "What is 1+2-1? 1+2=3; 3-1=2; so 2;"
    # too long: the prompt goes first (its BOS stays), then whole steps from the end
    (cut,), report = tokenize_steps(records, tiny_tokenizer, len(ex["input_ids"]) - 4, separator=";")
    assert report.prompt_truncated == 1 and cut["step_labels"] == [1.0, 0.0, 1.0] and cut["input_ids"][0] == 1
    n_prompt = ex["loss_mask"].index(1) - 4  # tokens before the first step's piece
    (short,), report = tokenize_steps(records, tiny_tokenizer, len(ex["input_ids"]) - n_prompt - 3, separator=";")
    assert report.completion_truncated == 1 and short["step_labels"] == [1.0, 0.0]
    with pytest.raises(DataError, match="max_length"):
        tokenize_steps(records, tiny_tokenizer, 8, separator=";", truncation="error")


def test_scores_are_causal_and_padding_free(tiny_model_dir, tiny_tokenizer):
    """A step's score does not change when later steps change, and left / right padding give the same scores."""
    torch.manual_seed(0)
    prm = ProcessRewardModel(load_prm_backbone(str(tiny_model_dir)), tiny_tokenizer, separator=";")
    prompts = ["What is 4+5-3?", "What is 12+7+1?", "What is 4+5-3?"]
    steps = [[" 4+5=9", " 9-3=6", " so 6"], [" 12+7=19", " 19+1=20", " so 20"], [" 4+5=9", " 9-3=7 or so", " so 7"]]
    scores = prm.step_scores(prompts, steps, batch_size=8)
    assert [len(s) for s in scores] == [3, 3, 3]
    assert abs(scores[0][0] - scores[2][0]) < 1e-6  # the same first step, different later ones
    alone = [prm.step_scores([p], [s])[0] for p, s in zip(prompts, steps)]
    examples, _ = tokenize_steps([{"prompt": p, "steps": s, "labels": [0.0] * len(s)} for p, s in zip(prompts, steps)],
                                 tiny_tokenizer, 64, separator=";")
    with torch.no_grad():
        for side in ("left", "right"):
            batched = torch.sigmoid(step_logits(prm.model, pad_steps(examples, 0, side=side)))
            torch.testing.assert_close(batched, torch.tensor([x for a in alone for x in a]), atol=1e-6, rtol=0)
    assert prm.split(" 4+5=9; 9-3=6; so 6") == steps[0] and prm.split("") == []
    rewards = prm.score(prompts, [";".join(s) for s in steps])
    assert rewards == pytest.approx([min(s) for s in scores], abs=1e-6)


def test_aggregates():
    assert aggregate_steps([0.9, 0.5, 0.8], "min") == 0.5
    assert aggregate_steps([0.9, 0.5, 0.8], "prod") == pytest.approx(0.36)
    assert aggregate_steps([0.9, 0.5, 0.8], "last") == 0.8
    assert aggregate_steps([0.9, 0.5, 0.7], "mean") == pytest.approx(0.7)
    assert aggregate_steps([], "min") == 0.0
    with pytest.raises(ValueError, match="max"):
        aggregate_steps([0.5], "max")


def test_step_end_columns():
    from alignkit.models.process_reward import step_end_columns

    tokens = [" 4", "+", "5", "=", "9", ";", " 9", "-", "3", "=", "6", ";", " so", " 6", ""]  # "" is EOS decoded
    assert step_end_columns(tokens, ";") == [5, 11, 14]
    assert step_end_columns(tokens[:12], ";") == [5, 11]  # ends on a separator: no step after it
    assert step_end_columns(["a;", "b;c", ";"], ";") == [0, 1, 2]  # a token holding a separator, mid-token
    assert step_end_columns(["ab", "\n\n", "cd"], "\n\n") == [1, 2]
    assert step_end_columns([], ";") == []


def test_process_step_rewards_at_each_steps_last_token(tiny_model_dir, tiny_tokenizer):
    """The PRM's p_k at the policy token that ends step k (score), or p_k - p_{k-1} (delta, summing to p_K)."""
    from alignkit.rollout.sampler import Rollout
    from alignkit.train.online import process_step_rewards

    torch.manual_seed(0)
    prm = ProcessRewardModel(load_prm_backbone(str(tiny_model_dir)), tiny_tokenizer, separator=";")
    texts = [" 4+5=9; 9-3=6; so 6", " 1+1=2; so 2"]
    rows = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] + [2] for t in texts]  # EOS-ended
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    roll = Rollout(prompt_ids=torch.ones(2, 1, dtype=torch.long), prompt_mask=torch.ones(2, 1, dtype=torch.long),
                   completion_ids=ids, completion_mask=mask, logprobs=torch.zeros(ids.shape), ended=torch.ones(2).bool())
    prompts = ["What is 4+5-3?", "What is 1+1?"]
    p = prm.step_scores(prompts, [prm.split(t) for t in texts])
    rewards, steps = process_step_rewards(prm, roll, tiny_tokenizer, prompts, weight=2.0, mode="score")
    sep = tiny_tokenizer.convert_tokens_to_ids(";")
    for r, row in enumerate(rows):
        ends = [c for c, t in enumerate(row) if t == sep] + [len(row) - 1]  # the last step ends at EOS
        assert steps[r].nonzero().flatten().tolist() == ends
        torch.testing.assert_close(rewards[r, ends], 2.0 * torch.tensor(p[r]), atol=1e-6, rtol=0)
    delta, _ = process_step_rewards(prm, roll, tiny_tokenizer, prompts, weight=2.0, mode="delta")
    torch.testing.assert_close(delta.sum(-1), 2.0 * torch.tensor([p[0][-1], p[1][-1]]), atol=1e-6, rtol=0)
    first_end = rows[0].index(sep)
    second_end = rows[0].index(sep, first_end + 1)
    assert float(delta[0, first_end]) == pytest.approx(2.0 * p[0][0], abs=1e-6)
    assert float(delta[0, second_end]) == pytest.approx(2.0 * (p[0][1] - p[0][0]), abs=1e-6)


def test_prm_learns_which_steps_are_malformed(tiny_model_dir, tmp_path, one_thread):
    """`alignkit prm` end to end on the multi-step task's solutions, some with one malformed step (its result
    missing, "9+3=", or its text cut, "9+"), labelled by the task's step checker: the held-out step accuracy
    and first-error accuracy rise from the untrained head's to >= 0.9 and >= 0.8; the saved folder loads back
    as a PRM and as a reward. (Arithmetic slips are not learned by a model this small: see docs/rl.md.)"""
    import random

    from alignkit.rollout.rewards import load_reward_fn
    from alignkit.tasks import arithmetic_steps as task
    from alignkit.train import prm

    rng = random.Random(0)

    def damaged(q):
        steps = q.true_steps()
        k = rng.randrange(len(steps) - 1)  # a calculation step
        steps[k] = steps[k].split("=")[0] + ("=" if rng.random() < 0.5 else "")
        return steps

    def solutions(n, seed):
        rows = []
        for i, q in enumerate(task.questions(n, seed=seed, max_operand=9)):
            steps = q.true_steps() if i % 2 else damaged(q)
            rows.append({"prompt": q.prompt, "steps": [" " + s for s in steps],
                         "labels": [int(x) for x in task.check_steps(q, steps)]})
        return rows

    for name, n, seed in (("train", 2000, 1), ("eval", 200, 2)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in solutions(n, seed)))
    result = prm.run(prm.PRMConfig(model=str(tiny_model_dir), data=str(tmp_path / "train.jsonl"),
                                   eval_data=str(tmp_path / "eval.jsonl"), output_dir=str(tmp_path / "prm"),
                                   step_separator=";", max_steps=300, batch_size=32, lr=3e-3, max_length=64,
                                   log_steps=100, eval_steps=300))
    before, after = result.initial_eval_metrics, result.eval_metrics
    assert before["first_error_accuracy"] < 0.7 and after["first_error_accuracy"] >= 0.8, (before, after)
    assert after["accuracy"] >= 0.9 and after["f1_incorrect"] >= 0.8, after
    loaded = ProcessRewardModel.load(str(tmp_path / "prm"))
    assert loaded.separator == ";"
    reward = load_reward_fn(str(tmp_path / "prm"))
    q = task.questions(1, seed=5, max_operand=9)[0]
    right, wrong = task.format_completion(q.true_steps()), task.format_completion(damaged(q))
    scores = loaded.score([q.prompt] * 2, [right, wrong])
    assert reward([q.prompt] * 2, [right, wrong]) == pytest.approx(scores) and scores[0] > scores[1]


def test_ppo_and_grpo_take_step_rewards_from_a_prm(tiny_model_dir, tiny_tokenizer, tmp_path, one_thread):
    """process_reward: PPO adds each step's reward at its last token (delta mode: they sum to w p_K per
    completion), GRPO turns them into per-token process advantages; a wrong folder or rloo is refused."""
    from alignkit.config import ConfigError
    from alignkit.train import grpo, ppo, prm
    from tests.helpers import prompts_file

    steps = tmp_path / "steps.jsonl"
    steps.write_text("".join(json.dumps({"prompt": f"What is {a}+1+1?", "steps": [f" {a}+1={a + 1}", " so 3"],
                                         "labels": [1, a % 2]}) + "\n" for a in range(16)))
    prm.run(prm.PRMConfig(model=str(tiny_model_dir), data=str(steps), output_dir=str(tmp_path / "prm"), max_steps=2,
                          step_separator="+"))
    prompts = prompts_file(tmp_path / "prompts.jsonl", n=8)
    common = dict(model=str(tiny_model_dir), data=str(prompts), reward=["tests.helpers:digit_fraction"],
                  process_reward=str(tmp_path / "prm"), process_reward_weight=2.0, max_new_tokens=8, max_steps=2,
                  log_steps=1, seed=0)
    history = ppo.run(ppo.PPOConfig(**common, output_dir=str(tmp_path / "ppo"), rollout_batch_size=4,
                                    batch_size=2, ppo_epochs=1)).history
    logged = [h for h in history if "train/process_reward" in h]
    assert logged and all(h["train/steps_per_completion"] >= 1 for h in logged)
    # delta mode: a completion's step rewards sum to w p_K, in (0, w)
    assert all(0 < h["train/process_reward"] < 2.0 for h in logged)
    history = grpo.run(grpo.GRPOConfig(**common, output_dir=str(tmp_path / "grpo"), num_generations=4,
                                       batch_size=8)).history
    logged = [h for h in history if "train/process_reward" in h]
    assert logged and all(h["train/process_reward"] > 0 for h in logged)
    with pytest.raises(ConfigError, match="advantage grpo"):
        grpo.RLOOConfig(**common, output_dir=str(tmp_path / "rloo")).validate()
    with pytest.raises(ConfigError, match="not a process reward model"):
        grpo.GRPOConfig(**{**common, "process_reward": str(tiny_model_dir)}, output_dir=str(tmp_path / "x")).validate()
