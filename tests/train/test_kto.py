"""KTO: mismatched pairs for the reference point, class weights, learning from thumbs up/down."""

import json
import random

from alignkit.data import tokenize_sft
from alignkit.train import kto


def test_mismatched_pairs_use_own_prompt_and_another_completion(tiny_tokenizer):
    records = [{"prompt": f"What is {a}+1?", "completion": f" {a + 1}", "_where": f"<t>:{a}"} for a in range(5)]
    tokens, _ = tokenize_sft(records, tiny_tokenizer, 64)
    examples = kto.with_mismatched_pairs(tokens, [True, False, True, True, False], 64, seed=0)
    partners = []
    for ex, tok in zip(examples, tokens):
        own, mismatched = ex["sequences"]
        assert own == tok["input_ids"]
        cut = tok["loss_mask"].index(1)
        assert mismatched[:cut] == tok["input_ids"][:cut]  # its own prompt...
        completion = mismatched[cut:]
        partner = next(j for j, t in enumerate(tokens) if t["input_ids"][t["loss_mask"].index(1):] == completion)
        assert ex["loss_masks"][1] == [0] * cut + [1] * len(completion)
        partners.append(partner)
    assert all(p != i for i, p in enumerate(partners)) and sorted(partners) == list(range(5))  # ...another's completion


def _feedback(path, n, seed, desirable_share):
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 49), rng.randint(0, 49)
            good = rng.random() < desirable_share
            completion = f" The answer is {a + b}." if good else f" {a}{b} maybe"
            f.write(json.dumps({"prompt": f"What is {a}+{b}?", "completion": completion, "label": good}) + "\n")
    return path


def test_shared_prompt_step_equals_separate_rows(tiny_model_dir, tiny_tokenizer):
    """[prompt | completion | partner's completion] in one row gives the loss, metrics and gradients of
    the two rows of pad_groups, for the reference on the fly; a cut prompt falls back to separate rows."""
    import torch

    from alignkit.models.forward import sequence_logprobs
    from alignkit.train.reference import make_reference
    from tests.train.test_dpo import _perturbed, assert_same_step

    records = [{"prompt": f"What is {a}+{a % 3}?" + " Quick." * (a % 2), "completion": f" {a + a % 3}" + "!" * (a % 4),
                "label": a % 3 != 0, "_where": f"<t>:{a}"} for a in range(6)]
    tokens, _ = tokenize_sft(records, tiny_tokenizer, 64)
    examples = kto.with_mismatched_pairs(tokens, [r["label"] for r in records], 64, seed=0)
    reference = make_reference(str(tiny_model_dir), "", lora=False, device="cpu")
    results, logps = [], []
    for share in (True, False):
        policy = _perturbed(tiny_model_dir)  # away from its reference: non-zero rewards and KL
        batch = kto.collate(examples, 0, share_prompt=share)
        assert ("segment_ids" in batch) == share
        with torch.no_grad():  # every row, the mismatched ones too: z_ref may clamp their effect to 0
            logps.append(sequence_logprobs(policy, batch)[0])
        loss, metrics = kto.make_kto_step(0.3, 1.0, 1.5, reference)(policy, batch)
        loss.backward()
        results.append((loss.detach(), metrics, torch.cat([p.grad.flatten() for p in policy.parameters()])))
    assert_same_step(*results)
    torch.testing.assert_close(logps[0], logps[1], atol=1e-5, rtol=0)
    cut = kto.with_mismatched_pairs(tokens, [r["label"] for r in records], 12, seed=0)  # partner cuts the prompt
    assert "segment_ids" not in kto.collate(cut, 0, share_prompt=True)


def test_kto_learns_from_imbalanced_thumbs(tiny_model_dir, tmp_path, capsys):
    train_file = _feedback(tmp_path / "t.jsonl", 80, 0, desirable_share=0.25)
    eval_file = _feedback(tmp_path / "e.jsonl", 40, 1, desirable_share=0.5)
    result = kto.run(kto.KTOConfig(model=str(tiny_model_dir), data=str(train_file), eval_data=str(eval_file),
                                   output_dir=str(tmp_path / "o"), max_steps=30, batch_size=8, lr=3e-3, beta=0.1,
                                   log_steps=10))
    out = capsys.readouterr().out
    n_good = sum(json.loads(line)["label"] for line in train_file.read_text().splitlines())
    assert f"weights {(80 - n_good) / n_good:.3g} / 1" in out  # the minority class is upweighted to balance
    before, after = result.initial_eval_metrics, result.eval_metrics
    assert abs(before["rewards/desirable"]) < 1e-6 and abs(before["rewards/undesirable"]) < 1e-6  # pi == pi_ref
    assert after["rewards/desirable"] > 0.1 and after["rewards/undesirable"] < -0.1
    assert after["loss"] < before["loss"] - 0.1


def test_kto_on_split_preferences_ranks_held_out_pairs(tiny_model_dir, tmp_path):
    """The preference set of the DPO test split into thumbs up (chosen) and down (rejected)."""
    import torch
    from transformers import AutoModelForCausalLM

    from alignkit.data import pad_groups, tokenize_responses
    from alignkit.models.forward import sequence_logprobs
    from alignkit.models.load import load_tokenizer
    from tests.train.test_dpo import _preference_file

    pairs = [json.loads(line) for line in _preference_file(tmp_path / "p.jsonl", 64, 0).read_text().splitlines()]
    with (tmp_path / "thumbs.jsonl").open("w") as f:
        for p in pairs:
            f.write(json.dumps({"prompt": p["prompt"], "completion": p["chosen"], "label": True}) + "\n")
            f.write(json.dumps({"prompt": p["prompt"], "completion": p["rejected"], "label": False}) + "\n")
    kto.run(kto.KTOConfig(model=str(tiny_model_dir), data=str(tmp_path / "thumbs.jsonl"), output_dir=str(tmp_path / "o"),
                          max_steps=30, batch_size=8, lr=3e-3, beta=0.1, log_steps=10))
    held_out = [json.loads(line) for line in _preference_file(tmp_path / "h.jsonl", 40, 1).read_text().splitlines()]
    for r in held_out:
        r["_where"] = "<held-out>"
    tok_examples, _ = tokenize_responses(held_out, load_tokenizer(str(tiny_model_dir)), 64)
    batch = pad_groups(tok_examples, 0)
    with torch.no_grad():
        policy = sequence_logprobs(AutoModelForCausalLM.from_pretrained(tmp_path / "o"), batch)[0]
        ref = sequence_logprobs(AutoModelForCausalLM.from_pretrained(tiny_model_dir), batch)[0]
    reward = policy - ref
    accuracy = float((reward[0::2] > reward[1::2]).float().mean())
    assert accuracy >= 0.85

