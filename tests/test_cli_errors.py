"""Every command-line mistake ends in one `alignkit COMMAND: error: ...` line, before any model loads."""

import os
import subprocess
import sys

import pytest

from alignkit.cli import main


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(f'{{"prompt": "What is {a}+1?", "completion": " {a + 1}"}}\n' for a in range(4)))
    return path


def one_error_line(err: str, command: str = "sft") -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"alignkit {command}: error: ") and "Traceback" not in err, err
    return lines[0]


# (argv after `alignkit sft`, what the one error line must contain)
CASES = [
    ([], "missing required keys model, data"),
    (["--batch_size", "0"], "batch_size must be >= 1"),
    (["--grad_accum", "0"], "grad_accum must be >= 1"),
    (["--lr", "-1"], "lr must be > 0"),
    (["--max_steps", "-1"], "max_steps must be >= 0"),
    (["--eval_fraction", "1"], "eval_fraction must be in [0, 1)"),
    (["--learning_rate", "1e-4"], "unknown key '--learning_rate' (alignkit calls it '--lr')"),
    (["--per_device_train_batch_size", "4"], "alignkit calls it '--batch_size'"),
    (["--lrr", "0.1"], "unknown key '--lrr' (did you mean '--lr'?)"),
]


@pytest.mark.parametrize("args,expected", CASES, ids=[" ".join(a) or "no-args" for a, _ in CASES])
def test_config_mistakes_are_one_line(args, expected, capsys):
    assert main(["sft", *args]) == 1
    assert expected in one_error_line(capsys.readouterr().err)


def test_yaml_key_from_trl_points_at_alignkit_name(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: m\nlearning_rate: 0.1\n")
    assert main(["sft", "--config", str(cfg)]) == 1
    assert "run.yaml:2: unknown key 'learning_rate' (alignkit calls it 'lr')" in one_error_line(capsys.readouterr().err)


def test_grpo_group_size_checked_before_loading(capsys):
    assert main(["grpo", "--num_generations", "3", "--batch_size", "16"]) == 1
    assert "multiple of num_generations (3)" in one_error_line(capsys.readouterr().err, "grpo")


def test_eval_without_arguments_names_missing_keys(capsys):
    assert main(["eval"]) == 1
    assert "models, prompts, reward" in one_error_line(capsys.readouterr().err, "eval")


def test_mistyped_model_paths(tmp_path, data, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "q").mkdir()
    (tmp_path / "empty").mkdir()
    for model, expected in [
        ("q/sftt", "model 'q/sftt': no such directory"),  # `q` is here: a local path, not a Hub id
        ("./sftt", "model './sftt': no such directory"),
        (str(tmp_path / "nope" / "m"), f"model '{tmp_path / 'nope' / 'm'}': no such directory"),
        ("empty", "model 'empty': no config.json (not a save_pretrained directory)"),
    ]:
        assert main(["sft", "--model", model, "--data", str(data), "--output_dir", str(tmp_path / "o")]) == 1
        assert expected in one_error_line(capsys.readouterr().err)


def test_hub_id_offline_is_one_line(tmp_path, data):
    # A subprocess: huggingface_hub reads HF_HUB_OFFLINE once, when it is imported.
    proc = subprocess.run([sys.executable, "-m", "alignkit", "sft", "--model", "no-such-org/no-such-model",
                           "--data", str(data), "--output_dir", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert "model 'no-such-org/no-such-model': no such local directory, and the Hub cannot be reached" in line


def test_interrupt_and_unexpected_errors(tiny_model_dir, data, tmp_path, monkeypatch, capsys):
    from alignkit.train import sft

    argv = ["sft", "--model", str(tiny_model_dir), "--data", str(data), "--output_dir", str(tmp_path / "o"),
            "--save_steps", "5"]

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(sft, "run", interrupted)
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"alignkit sft: interrupted; --resume auto continues from the latest checkpoint in {tmp_path / 'o'}"

    def broken(cfg):
        raise RuntimeError("boom")

    monkeypatch.setattr(sft, "run", broken)
    assert main(argv) == 1
    assert one_error_line(capsys.readouterr().err) == (
        "alignkit sft: error: RuntimeError: boom (ALIGNKIT_DEBUG=1 shows the traceback)")
    monkeypatch.setenv("ALIGNKIT_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(argv)


def test_version(capsys):
    import alignkit

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"alignkit {alignkit.__version__}"


def test_help_mentions_config(capsys):
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    assert "--config FILE.yaml" in capsys.readouterr().out


def test_real_process_mistyped_model(tmp_path, data):
    """The whole path through `python -m alignkit`: exit code, one line, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "alignkit", "sft", "--model", str(tmp_path / "sftt"),
                           "--data", str(data), "--output_dir", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"model '{tmp_path / 'sftt'}': no such directory" in one_error_line(proc.stderr)


def test_label_ai_mistakes_are_one_line(tmp_path, capsys):
    """A mistyped judge, and an endpoint that does not answer, each end in one error line."""
    data = tmp_path / "c.jsonl"
    data.write_text('{"prompt": "p", "responses": [" a", " b"]}\n')
    assert main(["label-ai", "--judge", str(tmp_path / "rmm"), "--data", str(data), "--output", str(tmp_path / "o.jsonl")]) == 1
    assert "judge '" in one_error_line(capsys.readouterr().err, "label-ai")
    assert main(["label-ai", "--judge", "openai-chat:m@http://127.0.0.1:9/v1", "--data", str(data), "--output",
                 str(tmp_path / "o.jsonl"), "--timeout", "1", "--max_retries", "0"]) == 1
    line = one_error_line(capsys.readouterr().err, "label-ai")
    assert "judge endpoint http://127.0.0.1:9/v1: no answer within 1 s after 1 tries" in line and "FeedbackError" not in line
