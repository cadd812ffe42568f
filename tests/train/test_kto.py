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
