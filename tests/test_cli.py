import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM

from alignkit.config import ConfigError, parse_config
from alignkit.train.sft import SFTConfig


def test_sft_from_yaml_with_override_and_reload(tiny_model_dir, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(f'{{"prompt": "What is {a}+1?", "completion": " {a + 1}"}}\n' for a in range(12)))
    out = tmp_path / "out"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndata: {data}\noutput_dir: {out}\nmax_steps: 50\nbatch_size: 4\n")
    proc = subprocess.run([sys.executable, "-m", "alignkit", "sft", "--config", str(cfg), "--max_steps", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sft finished: 2 steps" in proc.stdout  # the override won over the YAML's 50
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"


def test_yaml_unknown_key_names_file_and_line(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: m\nlrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"run.yaml:2: unknown key 'lrr' .*did you mean 'lr'"):
        parse_config(SFTConfig, ["--config", str(cfg)])


def test_yaml_values_are_typed_and_cli_wins(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 0.5\nbatch_size: 3\nlogging: tensorboard\n")
    parsed = parse_config(SFTConfig, ["--config", str(cfg), "--batch_size", "5"])
    assert (parsed.lr, parsed.batch_size, parsed.logging) == (0.5, 5, "tensorboard")


def test_bad_data_file_is_a_one_line_error(tiny_model_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    proc = subprocess.run([sys.executable, "-m", "alignkit", "sft", "--model", str(tiny_model_dir), "--data", str(data),
                           "--output_dir", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "bad.jsonl:2" in proc.stderr and "completion" in proc.stderr and "Traceback" not in proc.stderr


def test_yaml_booleans_become_flags(tmp_path):
    from alignkit.train.pretrain import PretrainConfig

    cfg = tmp_path / "run.yaml"
    cfg.write_text("packing: false\n")
    assert parse_config(PretrainConfig, ["--config", str(cfg)]).packing is False
    assert parse_config(PretrainConfig, ["--config", str(cfg), "--packing"]).packing is True


def test_tensorboard_logging_writes_events(tiny_model_dir, tmp_path):
    from alignkit.train import sft

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(f'{{"prompt": "What is {a}+1?", "completion": " {a + 1}"}}\n' for a in range(8)))
    sft.run(sft.SFTConfig(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "o"),
                          max_steps=2, batch_size=4, log_steps=1, logging="tensorboard"))
    assert list((tmp_path / "o").rglob("events.out.tfevents.*"))


def test_trainers_and_the_package_never_import_the_app_stack():
    """`import alignkit` and every trainer stay free of the web framework, the database and the HTTP client."""
    code = ("import sys, alignkit, alignkit.cli, alignkit.train.dpo, alignkit.train.grpo, alignkit.evaluate.policies; "
            "print(sorted(m for m in ('fastapi', 'sqlalchemy', 'openai', 'uvicorn', 'alembic') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_app_commands_in_the_usage_and_their_help():
    usage = subprocess.run([sys.executable, "-m", "alignkit"], capture_output=True, text=True, timeout=120).stdout
    assert "app " in usage and "export " in usage
    help_ = subprocess.run([sys.executable, "-m", "alignkit", "export", "--help"], capture_output=True, text=True,
                           timeout=120).stdout
    assert "--campaign" in help_ and "ranking" in help_
