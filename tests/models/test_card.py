"""Every saved model directory carries a model card the Hub's parser reads."""

import pytest
from huggingface_hub import ModelCard

from alignkit.models import card
from alignkit.train import dpo, sft
from tests import helpers


def test_sft_and_dpo_models_have_a_card(tiny_model_dir, tmp_path, one_thread, monkeypatch):
    monkeypatch.setattr(card, "COMMAND", ["alignkit", "sft", "--data", "s.jsonl"])
    data = helpers.sft_file(tmp_path / "s.jsonl", 16)
    sft.run(sft.SFTConfig(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "sft"), max_steps=2,
                          batch_size=4, eval_fraction=0.25, max_length=64))
    parsed = ModelCard.load(tmp_path / "sft" / "README.md")
    assert parsed.data.library_name == "transformers" and parsed.data.tags == ["alignkit", "sft"]
    text = parsed.text
    assert "The demonstrations in" in text and "alignkit sft --data s.jsonl" in text
    assert helpers_sha(data) in text  # the data file's fingerprint
    assert "| loss |" in text and "lr: 0.0002" in text  # final metrics and the resolved config

    prefs = helpers.preference_file(tmp_path / "p.jsonl", 8, 0)
    dpo.run(dpo.DPOConfig(model=str(tiny_model_dir), data=str(prefs), output_dir=str(tmp_path / "dpo"), max_steps=1,
                          batch_size=4, max_length=64))
    text = ModelCard.load(tmp_path / "dpo" / "README.md").text
    assert "The preference pairs in" in text and "beta 0.1" in text and "No held-out evaluation" in text


def helpers_sha(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(("name", "keys", "phrase"), [
    ("grpo", {"reward": ["runs/rm", "mod:gold"], "reward_weights": [1.0, 0.0], "beta": 0.04},
     "The reward `runs/rm` (weight 1), `mod:gold` (weight 0)"),
    ("rm", {}, "A reward model"),
    ("pretrain", {}, "Not aligned"),
    ("distill", {"teacher": "runs/ppo"}, "The token distributions of the teacher `runs/ppo`"),
])
def test_what_it_was_aligned_to(name, keys, phrase):
    from types import SimpleNamespace

    cfg = SimpleNamespace(**{"data": "d.jsonl", "beta": 0.1, "reward": [], "reward_weights": [], **keys})
    assert phrase in card.aligned_to(name, cfg)


def test_a_hub_base_model_goes_in_the_metadata(tmp_path):
    from types import SimpleNamespace

    cfg = SimpleNamespace(model="Qwen/Qwen2.5-0.5B", data="", eval_data="", output_dir=str(tmp_path / "m"))
    out = tmp_path / "m"
    out.mkdir()
    card.write_model_card(out, "sft", cfg, {"model": cfg.model}, {}, {})
    assert ModelCard.load(out / "README.md").data.base_model == "Qwen/Qwen2.5-0.5B"
