"""Loading checkpoints, configs and models never runs code it was not asked to."""

import os
import pickle

import pytest

from alignkit.config import ConfigError, parse_config
from alignkit.train.loop import TrainingError, load_state
from alignkit.train.sft import SFTConfig


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    with (tmp_path / "training_state.pt").open("wb") as f:
        pickle.dump({"optimizer": _Payload(marker)}, f)
    with pytest.raises(TrainingError, match="refused to load"):
        load_state(tmp_path / "training_state.pt")
    assert not marker.exists()


def test_yaml_python_tags_are_an_error_and_run_nothing(tmp_path):
    marker = tmp_path / "pwned"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f'model: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match=r"run.yaml:1: key 'model'"):
        parse_config(SFTConfig, ["--config", str(cfg)])
    assert not marker.exists()


def test_remote_code_is_never_trusted_implicitly(monkeypatch, tiny_model_dir):
    import transformers

    from alignkit.models.load import load_causal_lm, load_tokenizer

    seen = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append(kwargs.get("trust_remote_code", False))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    load_causal_lm(str(tiny_model_dir))
    load_tokenizer(str(tiny_model_dir))
    assert seen == [False, False]


def test_hub_datasets_load_without_remote_code(monkeypatch):
    # datasets >= 4 runs no loading scripts at all; alignkit never asks it to trust remote code either.
    import datasets

    from alignkit.data import load_records

    seen = []

    def spy(name, *args, **kwargs):
        seen.append((name, kwargs))
        return datasets.Dataset.from_list([{"text": "a review"}])

    monkeypatch.setattr(datasets, "load_dataset", spy)
    assert [r["text"] for r in load_records("someone/reviews", "text")] == ["a review"]
    assert seen == [("someone/reviews", {"split": "train"})]
