"""alignkit distill: a student learns a teacher's token distributions, on its own samples and the data's."""

import json

import pytest

from alignkit.config import ConfigError
from alignkit.train import distill
from alignkit.train.loop import TrainingError
from tests import helpers


@pytest.fixture(scope="module")
def teacher_dir(tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    """The tiny model with noise on every weight: a teacher far from the student (the tiny model itself)."""
    out = tmp_path_factory.mktemp("teacher") / "model"
    helpers.perturbed_model(tiny_model_dir, seed=3).save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


def _cfg(model, teacher, data, out, **kw):
    base = dict(model=str(model), teacher=str(teacher), data=str(data), output_dir=str(out), eval_fraction=0.25,
                max_steps=40, batch_size=8, lr=5e-3, max_length=64, max_new_tokens=8, log_steps=5, seed=0)
    return distill.DistillConfig(**{**base, **kw})


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_distillation_lowers_the_divergence_to_the_teacher(tiny_model_dir, teacher_dir, tmp_path, one_thread,
                                                           divergence):
    data = helpers.sft_file(tmp_path / "sft.jsonl", 64)
    r = distill.run(_cfg(tiny_model_dir, teacher_dir, data, tmp_path / "o", divergence=divergence))
    before, after = r.initial_eval_metrics["loss"], r.eval_metrics["loss"]  # held-out completions, per token
    assert after < before / 3, (before, after)
    on_policy = [h["train/on_policy"] for h in r.history if "train/on_policy" in h]
    assert 0 < sum(on_policy) / len(on_policy) < 1  # lmbda 0.5: some windows on the student's samples


def test_on_policy_steps_follow_lmbda_and_the_seed():
    cfg = distill.DistillConfig(lmbda=0.25, seed=4)
    picks = [distill.on_policy_step(cfg, s) for s in range(400)]
    assert 0.2 < sum(picks) / 400 < 0.3
    assert picks == [distill.on_policy_step(cfg, s) for s in range(400)]  # the same on resume / every process
    assert not any(distill.on_policy_step(distill.DistillConfig(lmbda=0.0), s) for s in range(50))


def test_student_samples_continue_the_prompts(tiny_model_dir, tiny_tokenizer, tmp_path):
    from alignkit.data import pad_batch, tokenize_sft
    from alignkit.models.load import load_causal_lm

    records = [json.loads(line) for line in helpers.sft_file(tmp_path / "s.jsonl", 3).read_text().splitlines()]
    examples, _ = tokenize_sft(records, tiny_tokenizer, 64)
    batch = {**pad_batch(examples, tiny_tokenizer.pad_token_id), "weight": 1.0}
    out = distill.student_samples(distill.DistillConfig(max_new_tokens=5), load_causal_lm(str(tiny_model_dir)),
                                  batch, tiny_tokenizer, step=0)
    for row, ex in enumerate(examples):
        n_prompt = ex["loss_mask"].index(1)
        ids = out["input_ids"][row][out["attention_mask"][row].bool()].tolist()
        assert ids[:n_prompt] == ex["input_ids"][:n_prompt]  # the prompt, then the student's tokens
        assert out["loss_mask"][row][out["attention_mask"][row].bool()].tolist() == (
            [0] * n_prompt + [1] * (len(ids) - n_prompt))


def test_a_teacher_with_another_vocabulary_is_refused(tiny_model_dir, tmp_path):
    from alignkit.models.tiny import build_tiny_llama, save_tiny, train_tokenizer
    from tests.conftest import arithmetic_corpus

    tok = train_tokenizer(arithmetic_corpus(), vocab_size=300)
    other = save_tiny(build_tiny_llama(tok, hidden_size=16, num_layers=1, num_heads=2), tok, tmp_path / "other")
    data = helpers.sft_file(tmp_path / "sft.jsonl", 8)
    with pytest.raises(TrainingError, match="needs one vocabulary"):
        distill.run(_cfg(tiny_model_dir, other, data, tmp_path / "o", max_steps=1))


def test_config_errors():
    with pytest.raises(ConfigError, match="jsd_beta=0.2 is read only with divergence jsd"):
        distill.DistillConfig(model="m", teacher="t", data="d.jsonl", divergence="reverse_kl", jsd_beta=0.2).validate()
    with pytest.raises(ConfigError, match="lmbda must be in"):
        distill.DistillConfig(model="m", teacher="t", data="d.jsonl", lmbda=1.5).validate()
