"""No accepted key is inert: every field of each command's config is read on that command's path.

Each command runs on tiny data in a few configurations (defaults; the optional features on;
a resume) with its config wrapped so that every field read is recorded. Reads by
`dataclasses` (asdict, replace: writing config.yaml copies every field) and by `validate()`
(a range check is not a use) do not count. A field that no run reads is a key the command
accepts and ignores.
"""

import dataclasses
import json
import sys

import pytest

from tests.helpers import prompts_file

READS: set[str] = set()
NOT_A_USE = {"dataclasses", "copy", __name__}


def tracked(cls):
    """A subclass of the config dataclass `cls` whose instances record each field read."""
    fields = {f.name for f in dataclasses.fields(cls)}

    class Tracked(cls):
        def __getattribute__(self, name):
            if name in fields:
                caller = sys._getframe(1)
                if caller.f_globals.get("__name__") not in NOT_A_USE and caller.f_code.co_name != "validate":
                    READS.add(name)
            return object.__getattribute__(self, name)

    Tracked.__name__ = Tracked.__qualname__ = cls.__name__
    return Tracked


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    return {
        "sft": _jsonl(root / "sft.jsonl", [{"prompt": f"What is {a}+1?", "completion": f" {a + 1}"} for a in range(8)]),
        "preference": _jsonl(root / "pref.jsonl", [{"prompt": f"What is {a}+1?", "chosen": f" {a + 1}",
                                                     "rejected": " no"} for a in range(8)]),
        "unpaired": _jsonl(root / "kto.jsonl", [{"prompt": f"Q{a}", "completion": " yes", "label": a % 2 == 0}
                                                for a in range(8)]),
        "text": _jsonl(root / "text.jsonl", [{"text": f"The sum of {a} and 1 is {a + 1}."} for a in range(16)]),
        "prompts": str(prompts_file(root / "prompts.jsonl", n=8)),
        "steps": _jsonl(root / "steps.jsonl", [{"prompt": f"What is {a}+1+1?", "steps": [f" {a}+1={a + 1}", " so 3"],
                                                "labels": [1, a % 2]} for a in range(8)]),
    }


@pytest.fixture(scope="module")
def process_reward_model(data, tiny_model_dir, tmp_path_factory):
    """A PRM folder for the online trainers' `process_reward` (trained for one step: any weights will do)."""
    from alignkit.train import prm

    folder = tmp_path_factory.mktemp("prm") / "prm"
    prm.run(prm.PRMConfig(model=str(tiny_model_dir), data=data["steps"], output_dir=str(folder), max_steps=1,
                          step_separator="+"))
    return str(folder)


REWARD = ["tests.helpers:digit_fraction"]
# command: (module, config class name, data kind, keys for a short run)
COMMANDS = {
    "sft": ("sft", "SFTConfig", "sft", {}),
    "dpo": ("dpo", "DPOConfig", "preference", {}),
    "kto": ("kto", "KTOConfig", "unpaired", {}),
    "rm": ("reward", "RewardConfig", "preference", {}),
    "prm": ("prm", "PRMConfig", "steps", {"step_separator": ";"}),
    "pretrain": ("pretrain", "PretrainConfig", "text", {"model": "tiny", "tiny_hidden_size": 16, "tiny_layers": 1,
                                                         "tiny_heads": 2, "tiny_vocab_size": 300}),
    "grpo": ("grpo", "GRPOConfig", "prompts", {"reward": REWARD, "num_generations": 2, "batch_size": 4,
                                                "max_new_tokens": 4}),
    "rloo": ("grpo", "RLOOConfig", "prompts", {"reward": REWARD, "num_generations": 2, "batch_size": 4,
                                                "max_new_tokens": 4, "beta": 0.1}),
    "ppo": ("ppo", "PPOConfig", "prompts", {"reward": REWARD, "rollout_batch_size": 4, "batch_size": 2,
                                             "ppo_epochs": 1, "max_new_tokens": 4,
                                             "gradient_checkpointing": False}),  # refused when set (read)
    "bon": ("bon", "BoNConfig", "prompts", {"reward": REWARD, "num_samples": 2, "max_new_tokens": 4,
                                            "require_eos": False}),
    "iterative-dpo": ("iterative_dpo", "IterativeDPOConfig", "prompts", {"reward": REWARD, "num_samples": 2,
                                                                         "max_new_tokens": 4, "require_eos": False}),
    "distill": ("distill", "DistillConfig", "sft", {"teacher": "the tiny model", "max_new_tokens": 4, "lmbda": 0.5}),
}
# The optional paths, switched on where the command has the key.
FEATURES = {"lr_scheduler": "cosine_with_min_lr", "warmup_ratio": 0.5, "eval_fraction": 0.25, "eval_steps": 1, "save_steps": 1, "save_total_limit": 1, "logging": "tensorboard",
            "lora_r": 2, "lora_dropout": 0.1, "use_rslora": True, "use_dora": True, "precompute_ref": True, "on_nan": "skip", "target_kl": 1.0, "kl_budget": 1.0, "kl_in_reward": True,
            "reward_on_error": "mask", "packing": False, "share_backbone": True, "rounds": 2, "dynamic_sampling": True,
            "early_stop_patience": 5, "chat_template": "chatml", "assistant_only_loss": True,
            "gradient_checkpointing": True, "process_reward": "the PRM folder", "process_reward_mode": "score"}


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_key_is_read_on_the_commands_path(command, data, tiny_model_dir, process_reward_model, tmp_path,
                                                one_thread):
    import importlib

    module_name, class_name, kind, keys = COMMANDS[command]
    module = importlib.import_module(f"alignkit.train.{module_name}")
    cls = tracked(getattr(module, class_name))
    names = {f.name for f in dataclasses.fields(cls)}
    base = {"model": str(tiny_model_dir), "data": data[kind], "max_steps": 2, "log_steps": 1, "seed": 1, **keys}
    if "teacher" in keys:  # distill: the tiny model teaches itself
        base["teacher"] = str(tiny_model_dir)
    features = {k: v for k, v in FEATURES.items() if k in names and k not in keys}
    if "process_reward" in features:
        features["process_reward"] = process_reward_model
        if command == "rloo":  # process advantages take the place of the leave-one-out baseline
            features["advantage"] = "grpo"
    features["best_metric"] = "reward" if command in ("grpo", "rloo", "ppo", "bon", "iterative-dpo") else "loss"  # an online eval: greedy reward
    runs = [
        {**base, "output_dir": str(tmp_path / "plain"), "max_steps": 0, "epochs": 0.25},
        {**base, **features, "output_dir": str(tmp_path / "all")},
        {**base, **features, "output_dir": str(tmp_path / "all"), "max_steps": 2 if command in ("bon", "iterative-dpo") else 3,
         "resume": "auto"},
    ]
    READS.clear()
    for i, kwargs in enumerate(runs):
        if command in ("bon", "iterative-dpo") and i == 2:  # an interrupted last round, so that the resume resumes it
            (tmp_path / "all" / "round-1" / "round.json").unlink()
        module.run(cls(**{k: v for k, v in kwargs.items() if k in names}))
    unread = sorted(names - READS)
    assert not unread, f"alignkit {command} accepts keys its path never reads: {unread}"
