"""A run owns its output_dir: refused reuse, --overwrite, config.yaml, resume checks, metrics once per step."""

import dataclasses
import json

import pytest

from tests import helpers
import yaml

from alignkit.train import sft
from alignkit.train.loop import TrainingError


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    return helpers.sft_file(tmp_path_factory.mktemp("sftdata") / "sft.jsonl", 12)


def _cfg(model_dir, data, out, **kw):
    base = dict(model=str(model_dir), data=str(data), output_dir=str(out), batch_size=2, lr=1e-2, log_steps=1,
                max_length=64, seed=3, max_steps=2)
    return sft.SFTConfig(**{**base, **kw})


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _steps(out):
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]


def test_second_run_into_the_same_folder_is_refused_and_leaves_it_untouched(tiny_model_dir, sft_file, tmp_path, one_thread):
    out = tmp_path / "run"
    sft.run(_cfg(tiny_model_dir, sft_file, out))
    before = _snapshot(out)
    with pytest.raises(TrainingError, match=r"(?s)run.*already holds.*--overwrite.*--resume auto"):
        sft.run(_cfg(tiny_model_dir, sft_file, out, lr=1e-3))
    assert _snapshot(out) == before


def test_overwrite_clears_a_run_but_not_a_folder_with_user_files(tiny_model_dir, sft_file, tmp_path, one_thread):
    out = tmp_path / "run"
    sft.run(_cfg(tiny_model_dir, sft_file, out, max_steps=3, save_steps=3))
    sft.run(_cfg(tiny_model_dir, sft_file, out, overwrite=True))
    assert _steps(out) == [1, 2]  # the first run's rows are gone
    assert not (out / "checkpoint-3").exists()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TrainingError, match=r"never writes \(notes.txt\)"):
        sft.run(_cfg(tiny_model_dir, sft_file, out, overwrite=True))
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").exists()


def test_a_folder_with_other_files_but_no_run_outputs_is_fine(tiny_model_dir, sft_file, tmp_path, one_thread):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    sft.run(_cfg(tiny_model_dir, sft_file, out))
    assert (out / "notes.txt").read_text() == "mine"


def test_config_yaml_is_written_in_field_order_and_loads_back(tiny_model_dir, sft_file, tmp_path, one_thread):
    from alignkit.config import parse_config

    out = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, sft_file, out)
    sft.run(cfg)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert list(saved) == [f.name for f in dataclasses.fields(cfg)]
    assert saved["lr"] == 1e-2 and saved["max_steps"] == 2 and saved["output_dir"] == str(out)
    assert parse_config(sft.SFTConfig, ["--config", str(out / "config.yaml")]) == cfg


def test_resume_auto_in_an_empty_folder_starts_fresh(tiny_model_dir, sft_file, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    result = sft.run(_cfg(tiny_model_dir, sft_file, out, resume="auto"))
    assert f"resume auto: no checkpoint in {out}, starting fresh" in capsys.readouterr().out
    assert result.steps == 2 and _steps(out) == [1, 2]


def test_resume_auto_refuses_a_finished_run_without_checkpoints(tiny_model_dir, sft_file, tmp_path, one_thread):
    out = tmp_path / "run"
    sft.run(_cfg(tiny_model_dir, sft_file, out))
    with pytest.raises(TrainingError, match=r"no\s+complete checkpoint"):
        sft.run(_cfg(tiny_model_dir, sft_file, out, resume="auto"))


def test_resume_refuses_a_changed_lr_and_allows_a_longer_run(tiny_model_dir, sft_file, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    sft.run(_cfg(tiny_model_dir, sft_file, out, save_steps=2))
    with pytest.raises(TrainingError, match=r"lr: 0.01 -> 0.001"):
        sft.run(_cfg(tiny_model_dir, sft_file, out, lr=1e-3, max_steps=4, resume="auto"))
    capsys.readouterr()
    result = sft.run(_cfg(tiny_model_dir, sft_file, out, max_steps=4, save_steps=2, log_steps=2, resume="auto"))
    assert f"resuming from {out / 'checkpoint-2'} (step 2 of 4)" in capsys.readouterr().out
    assert [h["step"] for h in result.history] == [4]
    assert _steps(out) == [1, 2, 4]


def test_metrics_hold_each_step_once_after_a_kill(tiny_model_dir, sft_file, tmp_path, capsys, one_thread):
    import shutil

    out = tmp_path / "run"
    sft.run(_cfg(tiny_model_dir, sft_file, out, max_steps=4, save_steps=2))
    # a kill -9 after step 4's metrics were written, before its checkpoint and the final model
    shutil.rmtree(out / "checkpoint-4")
    for p in out.iterdir():
        if p.is_file() and p.name not in ("metrics.jsonl", "config.yaml"):
            p.unlink()
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "train/lo')  # a row cut off mid-write
    # a corrupt newer checkpoint is passed over, and said so
    (out / "checkpoint-3").mkdir()
    sft.run(_cfg(tiny_model_dir, sft_file, out, max_steps=4, save_steps=2, resume="auto"))
    printed = capsys.readouterr().out
    assert f"resume auto: skipped {out / 'checkpoint-3'}: no readable manifest.json" in printed
    assert _steps(out) == [1, 2, 3, 4]
