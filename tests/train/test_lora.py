"""LoRA as users configure it: target modules, dropout, rsLoRA and DoRA each train a few SFT
steps, shape only what they should, and save a plain merged model; bad keys fail in one line."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignkit.config import ConfigError
from alignkit.models.load import apply_lora, lora_targets
from alignkit.train import sft
from alignkit.train.loop import load_trainable_model
from tests import helpers

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    return helpers.sft_file(tmp_path_factory.mktemp("loradata") / "sft.jsonl", 16)


def _cfg(model_dir, data, out, **kw):
    return sft.SFTConfig(model=str(model_dir), data=str(data), output_dir=str(out), max_steps=3, batch_size=4,
                         lr=1e-2, log_steps=1, max_length=64, seed=3, lora_r=4, **kw)


def _lora_layers(model):
    """{module name: peft LoRA layer} of the adapted linear layers."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


# option -> (its keys, the layers (dotted name suffixes) that get adapters, the scaling with r = 4)
OPTIONS = {
    "subset": ({"lora_target_modules": ["q_proj", "v_proj"]}, ("q_proj", "v_proj"), 2.0),  # alpha = 2r: 8 / 4
    "regex": ({"lora_target_modules": [r".*layers\.1\.self_attn\.(q|k)_proj"]},
              ("1.self_attn.q_proj", "1.self_attn.k_proj"), 2.0),
    "dropout": ({"lora_dropout": 0.1}, LINEAR, 2.0),
    "rslora": ({"use_rslora": True, "lora_alpha": 6.0}, LINEAR, 3.0),  # 6 / sqrt(4), where plain LoRA has 6 / 4
    "dora": ({"use_dora": True}, LINEAR, 2.0),
}


def _layer_as_configured(layer, keys: dict, scaling: float) -> bool:
    """The LoRA layer's scaling, dropout and DoRA magnitude vector exactly as `keys` ask."""
    dropout = layer.lora_dropout["default"]
    wanted_dropout = keys.get("lora_dropout", 0.0)
    return (math.isclose(layer.scaling["default"], scaling)
            and (dropout.p == wanted_dropout if wanted_dropout else isinstance(dropout, torch.nn.Identity))
            and ("default" in layer.lora_magnitude_vector) == keys.get("use_dora", False))


@pytest.mark.parametrize("option", list(OPTIONS))
def test_lora_option_trains_only_its_layers_and_saves_a_plain_model(option, tiny_model_dir, sft_file, tmp_path,
                                                                     one_thread):
    keys, targets, scaling = OPTIONS[option]
    cfg = _cfg(tiny_model_dir, sft_file, tmp_path / "run", **keys)
    cfg.validate()
    result = sft.run(cfg)
    assert result.steps == 3 and all(math.isfinite(h["train/loss"]) for h in result.history if "train/loss" in h)

    fresh = load_trainable_model(cfg, None)  # the adapters as the run started them
    resumed = load_trainable_model(cfg, tmp_path / "run")  # the trained adapters, as resume loads them
    for model in (fresh, resumed):
        layers = _lora_layers(model)
        assert all(name.endswith(targets) for name in layers)
        assert all(any(name.endswith(t) for name in layers) for t in targets)
        assert all(_layer_as_configured(layer, keys, scaling) for layer in layers.values())
    trained = dict(resumed.named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in fresh.named_parameters() if "lora_" in n)

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert merged.keys() == base.keys()  # a plain model: no lora_A/B, base_layer or magnitude keys
    changed = {k.removesuffix(".weight") for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.endswith(targets) for k in changed)


def test_lora_targets_follow_peft_semantics():
    assert lora_targets(["all-linear"]) == "all-linear"
    assert lora_targets(["q_proj"]) == ["q_proj"]  # a name, not a regex that only a top-level q_proj would match
    assert lora_targets(["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    assert lora_targets([r".*\.(q|v)_proj"]) == r".*\.(q|v)_proj"


@pytest.mark.parametrize("targets", [["q_proj", "v_prj"], [r".*\.qkv_proj"]])
def test_target_that_matches_nothing_names_the_key_and_real_layers(targets, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ConfigError, match=r"layers include: .*q_proj, k_proj, v_proj") as e:
        apply_lora(model, 4, target_modules=targets)
    # only the entry that matches nothing is named (q_proj alone would match)
    assert str(e.value).startswith(f"lora_target_modules: {targets[-1]!r} matches no module of the model")


def test_target_layer_lora_cannot_wrap_is_a_config_error(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ConfigError, match=r"lora_target_modules \['input_layernorm'\]: .*layers include"):
        apply_lora(model, 4, target_modules=["input_layernorm"])


@pytest.mark.parametrize("key, value", [("lora_dropout", 0.1), ("use_rslora", True), ("use_dora", True),
                                        ("lora_target_modules", ["q_proj"]), ("lora_alpha", 16.0)])
def test_lora_key_without_lora_r_is_refused(key, value, tmp_path):
    cfg = sft.SFTConfig(output_dir=str(tmp_path / "o"), **{key: value})
    with pytest.raises(ConfigError, match=f"^{key} needs lora_r > 0"):
        cfg.validate()
    sft.SFTConfig(output_dir=str(tmp_path / "o"), lora_r=4, **{key: value}).validate()


@pytest.mark.parametrize("key, value, wanted", [("lora_dropout", 1.0, r"in \[0, 1\)"), ("lora_r", -1, ">= 0"),
                                                ("lora_target_modules", [], "one or more")])
def test_lora_key_out_of_range_is_refused(key, value, wanted, tmp_path):
    with pytest.raises(ConfigError, match=f"{key} must be {wanted}"):
        sft.SFTConfig(output_dir=str(tmp_path / "o"), **{"lora_r": 4, key: value}).validate()
