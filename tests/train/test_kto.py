"""KTO: mismatched pairs for the reference point, class weights, learning from thumbs up/down."""

import json
import random

import pytest

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
    from tests.helpers import assert_same_step, perturbed_model

    records = [{"prompt": f"What is {a}+{a % 3}?" + " Quick." * (a % 2), "completion": f" {a + a % 3}" + "!" * (a % 4),
                "label": a % 3 != 0, "_where": f"<t>:{a}"} for a in range(6)]
    tokens, _ = tokenize_sft(records, tiny_tokenizer, 64)
    examples = kto.with_mismatched_pairs(tokens, [r["label"] for r in records], 64, seed=0)
    reference = make_reference(str(tiny_model_dir), "", lora=False, device="cpu")
    results, logps = [], []
    for share in (True, False):
        policy = perturbed_model(tiny_model_dir)  # away from its reference: non-zero rewards and KL
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
    from tests.helpers import preference_file

    pairs = [json.loads(line) for line in preference_file(tmp_path / "p.jsonl", 64, 0).read_text().splitlines()]
    with (tmp_path / "thumbs.jsonl").open("w") as f:
        for p in pairs:
            f.write(json.dumps({"prompt": p["prompt"], "completion": p["chosen"], "label": True}) + "\n")
            f.write(json.dumps({"prompt": p["prompt"], "completion": p["rejected"], "label": False}) + "\n")
    kto.run(kto.KTOConfig(model=str(tiny_model_dir), data=str(tmp_path / "thumbs.jsonl"), output_dir=str(tmp_path / "o"),
                          max_steps=30, batch_size=8, lr=3e-3, beta=0.1, log_steps=10))
    held_out = [json.loads(line) for line in preference_file(tmp_path / "h.jsonl", 40, 1).read_text().splitlines()]
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


def test_step_reference_point_pools_every_micro_batch_and_process(tiny_model_dir, tiny_tokenizer):
    """`prepare` sets z_ref = max(0, sum_i d_i / n), d_i = log pi(y'_i|x_i) - log pi_ref(y'_i|x_i), over every
    micro-batch and (the accelerator's reduce of [sum, n]) every process; a process with no share of the
    step adds nothing. A step of one micro-batch trains as the batch with its mismatched rows did."""
    import torch

    from alignkit.models.forward import sequence_logprobs
    from alignkit.train.reference import make_reference, reference_sequence_logprobs
    from tests.helpers import assert_same_step, perturbed_model

    records = [{"prompt": f"What is {a}+{a % 3}?", "completion": f" {a + a % 3}" + "!" * (a % 4),
                "label": a % 2 == 0, "_where": f"<t>:{a}"} for a in range(6)]
    tokens, _ = tokenize_sft(records, tiny_tokenizer, 64)
    examples = kto.with_mismatched_pairs(tokens, [r["label"] for r in records], 64, seed=0)
    reference = make_reference(str(tiny_model_dir), "", lora=False, device="cpu")
    policy = perturbed_model(tiny_model_dir, seed=1)
    full = kto.collate(examples, 0)
    with torch.no_grad():
        d = (sequence_logprobs(policy, full)[0] - reference_sequence_logprobs(reference, policy, full))[1::2]
    assert d.mean() > 0.05 and d[:4].mean() != d.mean()  # z_ref is not clamped; the processes differ

    class SecondOfTwo:  # this process holds examples 0-3; the other's [sum, n] is that of examples 4, 5
        device, num_processes, process_index = torch.device("cpu"), 2, 1

        def reduce(self, totals, op):
            assert op == "sum"
            return totals + torch.tensor([float(d[4:].sum()), 2.0], dtype=torch.float64)

    prepare = kto.make_step_reference_point(examples, 0, reference, SecondOfTwo())
    prepared = prepare(policy, [{**kto.collate(examples[:2], 0), "weight": 1.0},
                                {**kto.collate(examples[2:4], 0), "weight": 1.0}], 0)
    for batch, ids in zip(prepared, ([0, 1], [2, 3])):
        assert batch["ids"].tolist() == ids and batch["input_ids"].shape[0] == 2  # own rows only
        torch.testing.assert_close(batch["z_ref"], d.mean(), atol=1e-6, rtol=0)
    stand_in = prepare(policy, [{**kto.collate(examples[:1], 0), "weight": 0.0}], 1)  # no share: the other's pairs only
    torch.testing.assert_close(stand_in[0]["z_ref"], d[4:].mean(), atol=1e-6, rtol=0)

    class One:
        device, num_processes, process_index = torch.device("cpu"), 1, 0

    step = kto.make_kto_step(0.3, 1.0, 1.5, reference)
    own_rows = kto.make_step_reference_point(examples, 0, reference, One())(policy, [{**full, "weight": 1.0}], 0)[0]
    results = []
    for batch in (own_rows, full):
        policy.zero_grad(set_to_none=True)
        loss, metrics = step(policy, batch)
        loss.backward()
        results.append((loss.detach(), metrics, torch.cat([p.grad.flatten() for p in policy.parameters()])))
    assert_same_step(*results)


def _policy_away_from(model_dir, out):
    """The tiny model perturbed (tokenizer beside it), so that log pi - log pi_ref and z_ref are not 0."""
    import shutil

    from tests.helpers import perturbed_model

    shutil.copytree(model_dir, out)
    perturbed_model(model_dir, seed=1).save_pretrained(out)
    return out


@pytest.mark.parametrize("precompute_ref,share_prompt", [(False, True), (True, False)])
def test_one_step_is_the_same_however_it_is_split(tiny_model_dir, tmp_path, one_thread, precompute_ref, share_prompt):
    """z_ref is the mean over the whole optimiser step's mismatched pairs, not each micro-batch's:
    8 examples as 8 x 1, 1 x 8 and 2 x 4 (batch_size x grad_accum) give the same weights.

    AdamW's first step moves a weight by about lr sign(g): a gradient that changed with the split
    shows as up to 2 lr = 6e-5 where a sign flips. lr is small because float32 noise in g (~1e-9
    on weights whose gradients nearly cancel, |g| ~ eps = 1e-8) moves them by ~lr eps dg / g^2:
    1e-7 here at lr 3e-5, 4e-7 at 1e-4.
    """
    from safetensors.torch import load_file

    data = _feedback(tmp_path / "t.jsonl", 8, 2, desirable_share=0.5)
    policy = _policy_away_from(tiny_model_dir, tmp_path / "policy")
    weights, kl = {}, {}
    for batch_size, grad_accum in [(8, 1), (1, 8), (2, 4)]:
        out = tmp_path / f"o{batch_size}x{grad_accum}"
        result = kto.run(kto.KTOConfig(model=str(policy), ref_model=str(tiny_model_dir), data=str(data),
                                       output_dir=str(out), max_steps=1, batch_size=batch_size, grad_accum=grad_accum,
                                       lr=3e-5, warmup_ratio=0.0, beta=0.5, log_steps=1,
                                       precompute_ref=precompute_ref, share_prompt=share_prompt))
        weights[batch_size, grad_accum] = load_file(out / "model.safetensors")
        kl[batch_size, grad_accum] = result.history[0]["train/kl"]
    assert kl[8, 1] > 0.01  # z_ref is not clamped to 0: the test can tell the splits apart
    diffs = {split: max(float((weights[split][k] - w).abs().max()) for k, w in weights[8, 1].items())
             for split in [(1, 8), (2, 4)]}
    print({f"{b} x {a}": f"max |dw| {d:.3g}, kl {kl[b, a]:.6f} (8 x 1: {kl[8, 1]:.6f})" for (b, a), d in diffs.items()})
    assert all(d <= 1e-6 for d in diffs.values()), diffs
    assert all(abs(kl[split] - kl[8, 1]) <= 1e-5 for split in diffs), kl  # z_ref, from float32 log-probs


@pytest.mark.slow
def test_two_processes_share_one_reference_point(tiny_model_dir, tmp_path, one_thread):
    """torchrun, 2 processes x 2 x 2 against 1 process x 4 x 2 (batch_size x grad_accum): z_ref is
    reduced over the processes as [sum, count], so the logged KL and the weights agree."""
    from safetensors.torch import load_file

    from tests.helpers import torchrun

    data = _feedback(tmp_path / "t.jsonl", 8, 2, desirable_share=0.5)
    policy = _policy_away_from(tiny_model_dir, tmp_path / "policy")
    args = dict(model=str(policy), ref_model=str(tiny_model_dir), data=str(data), max_steps=1, grad_accum=2, lr=3e-5,
                warmup_ratio=0.0, beta=0.5, log_steps=1)
    kto.run(kto.KTOConfig(**args, batch_size=4, output_dir=str(tmp_path / "one")))
    torchrun("kto", {**args, "batch_size": 2, "output_dir": tmp_path / "two"})
    kl = [json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[0])["train/kl"]
          for run in ("one", "two")]
    one, two = load_file(tmp_path / "one/model.safetensors"), load_file(tmp_path / "two/model.safetensors")
    diff = max(float((one[k] - two[k]).abs().max()) for k in one)
    print(f"kto 2 processes vs 1: max |dw| = {diff:.3g}, kl {kl[1]:.6f} vs {kl[0]:.6f}")
    assert kl[0] > 0.01 and abs(kl[0] - kl[1]) <= 1e-5
    assert diff <= 1e-6
