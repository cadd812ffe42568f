"""Iterative DPO end to end on the tiny model with the digit_fraction reward; pairing by hand."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from alignkit.data import tokenize_prompts
from alignkit.evaluate.policies import completion_logprobs
from alignkit.rollout.best_of_n import Samples
from alignkit.train import iterative_dpo
from alignkit.train.loop import TrainingError
from tests.helpers import prompts_file

REWARD = "tests.helpers:digit_fraction"

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(model_dir, data, out, **kw):
    base = dict(model=str(model_dir), data=str(data), output_dir=str(out), reward=[REWARD], num_samples=4,
                max_new_tokens=8, require_eos=False, lr=1e-2, epochs=4, batch_size=8, beta=0.1, log_steps=1, seed=1)
    return iterative_dpo.IterativeDPOConfig(**{**base, **kw})


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_best_worst_pairs_by_hand():
    s = Samples(n=3, completion_ids=[[1]] * 9, texts=[""] * 9,
                rewards=[0.2, 0.9, 0.1,   0.5, 0.5, 0.5,   0.3, 0.8, 0.4],
                ended=[True, True, True,  True, True, True,  False, True, False])
    pairs, counts = iterative_dpo.best_worst_pairs(s, require_eos=False, min_gap=0.0)
    assert pairs == [(1, 2), (7, 6)] and counts == {"dropped_no_eos": 0, "skipped_ties": 1, "skipped_few": 0}
    # prompt 2 keeps only row 7 when completions must end: too few for a pair
    pairs, counts = iterative_dpo.best_worst_pairs(s, require_eos=True, min_gap=0.0)
    assert pairs == [(1, 2)] and counts == {"dropped_no_eos": 2, "skipped_ties": 1, "skipped_few": 1}
    pairs, counts = iterative_dpo.best_worst_pairs(s, require_eos=False, min_gap=0.6)  # 0.9-0.1 = 0.8 > 0.6
    assert pairs == [(1, 2)] and counts["skipped_ties"] == 2


def test_pair_examples_are_the_sampled_ids():
    s = Samples(n=2, completion_ids=[[7, 8, 2], [9]], texts=["", ""], rewards=[1.0, 0.0], ended=[True, False])
    (ex,) = iterative_dpo.pair_examples([{"input_ids": [1, 5, 6]}], s, [(0, 1)])
    assert ex == {"id": 0, "sequences": [[1, 5, 6, 7, 8, 2], [1, 5, 6, 9]],
                  "loss_masks": [[0, 0, 0, 1, 1, 1], [0, 0, 0, 1]], "input_ids": [1, 5, 6, 7, 8, 2, 1, 5, 6, 9]}


def _logps(model_dir, tokenizer, rows, side):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts, _ = tokenize_prompts([{"prompt": r["prompt"]} for r in rows], tokenizer, 64)
    return completion_logprobs(model, prompts, [r[f"{side}_ids"] for r in rows], 1, tokenizer.pad_token_id, 64)[0]


def test_each_round_samples_from_the_previous_rounds_policy_and_learns(tiny_model_dir, tiny_tokenizer, tmp_path):
    out = tmp_path / "o"
    result = iterative_dpo.run(_cfg(tiny_model_dir, prompts_file(tmp_path / "p.jsonl"), out, rounds=2))
    r0, r1 = result.rounds
    assert r0.samples == 43 * 4 and r0.pairs + r0.skipped_ties == 43  # 48 prompts, 10% held out
    assert r0.chosen_reward > r0.rejected_reward + 0.2
    # the policy learned: round 1's samples (from round 0's model) score higher, and greedy held-out reward rose
    # measured at seed 1: 0.212 -> 0.369 (0.682 in a third round)
    assert r1.sample_reward > r0.sample_reward + 0.08, (r0.sample_reward, r1.sample_reward)
    assert r1.eval_reward_after > r0.eval_reward_before, (r0.eval_reward_before, r1.eval_reward_after)
    # which policy wrote each round's pairs: their recorded log-probs are those of the round's start model
    for r, writer, other in ((0, tiny_model_dir, out / "round-0"), (1, out / "round-0", tiny_model_dir)):
        rows = _rows(out / f"round-{r}" / "pairs.jsonl")
        assert len(rows) == result.rounds[r].pairs and all(row["round"] == r for row in rows)
        for side in ("chosen", "rejected"):
            recorded = torch.tensor([row[f"{side}_logp"] for row in rows])
            assert torch.allclose(torch.tensor(_logps(writer, tiny_tokenizer, rows, side)), recorded, atol=1e-4)
            assert not torch.allclose(torch.tensor(_logps(other, tiny_tokenizer, rows, side)), recorded, atol=1e-2)
        assert all(row["chosen_reward"] > row["rejected_reward"] for row in rows)
    final, last_round = load_file(out / "model.safetensors"), load_file(out / "round-1/model.safetensors")
    assert all(torch.equal(final[k], last_round[k]) for k in last_round)


def test_a_resumed_run_continues_at_the_same_round_and_pair(tiny_model_dir, tmp_path):
    data, out = prompts_file(tmp_path / "p.jsonl"), tmp_path / "o"
    iterative_dpo.run(_cfg(tiny_model_dir, data, out, rounds=2, save_steps=4))
    full = load_file(out / "model.safetensors")
    pairs = _rows(out / "round-1" / "pairs.jsonl")
    # as if killed in round 1 just after its checkpoint at step 4 (of 24): only round 0 and that checkpoint remain
    for path in out.iterdir():
        if path.name not in ("round-0", "round-1", "config.yaml"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for path in (out / "round-1").iterdir():
        if path.name != "checkpoint-4":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    result = iterative_dpo.run(_cfg(tiny_model_dir, data, out, rounds=2, save_steps=4, resume="auto"))
    assert [r.round for r in result.rounds] == [0, 1]
    assert min(h["step"] for h in result.history) == 5  # round 1 went on after its step 4; round 0 was not redone
    assert _rows(out / "round-1" / "pairs.jsonl") == pairs  # the same pairs, drawn again from round 0's model
    again = load_file(out / "model.safetensors")
    assert all(torch.equal(full[k], again[k]) for k in full)


def test_no_pair_says_why(tiny_model_dir, tmp_path):
    with pytest.raises(TrainingError, match="no pair from 43 prompts .* ties within min_reward_gap 2.0"):
        iterative_dpo.run(_cfg(tiny_model_dir, prompts_file(tmp_path / "p.jsonl"), tmp_path / "o", min_reward_gap=2.0))
