"""The first hour of a new user (issue 17): each ordinary mistake, as a table.

Every case runs `alignkit COMMAND ...` in-process and must end in exit code 1 and one
`alignkit COMMAND: error: ...` line naming the thing at fault, with no traceback. Cases
marked `before_load` must fail before any model is loaded: loading one raises here.
Cases with `keep` name a folder that must come through byte-identical.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignkit.cli import main


def no_reward(prompts, completions, **fields):
    """Every reward fails (None): with reward_on_error mask, every completion is masked."""
    return [None] * len(completions)


def same_reward(prompts, completions, **fields):
    """Every completion scores the same: every group's advantage is 0."""
    return [1.0] * len(completions)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_dir):
    """Data files and folders the cases refer to as {name}."""
    root = tmp_path_factory.mktemp("first_hour")
    f = {"model": str(tiny_model_dir), "root": str(root)}
    f["sft"] = _jsonl(root / "sft.jsonl", [{"prompt": f"What is {a}+1?", "completion": f" {a + 1}"} for a in range(8)])
    f["pref"] = _jsonl(root / "pref.jsonl", [{"prompt": f"What is {a}+1?", "chosen": f" {a + 1}", "rejected": " no"}
                                              for a in range(8)])
    f["ranking"] = _jsonl(root / "ranking.jsonl", [{"prompt": f"Q{a}", "responses": [" a", " b", " c"]} for a in range(4)])
    f["unpaired"] = _jsonl(root / "unpaired.jsonl", [{"prompt": f"Q{a}", "completion": " yes", "label": a % 2 == 0}
                                                      for a in range(6)])
    f["good_only"] = _jsonl(root / "kto.jsonl", [{"prompt": f"Q{a}", "completion": " yes", "label": True} for a in range(6)])
    f["prompts"] = _jsonl(root / "prompts.jsonl", [{"prompt": f"What is {a}+1?"} for a in range(8)])
    f["csv_in_jsonl"] = root / "pairs.jsonl"
    f["csv_in_jsonl"].write_text("prompt,chosen,rejected\nhi,hello,go away\nbye,goodbye,whatever\n")
    f["a_file"] = root / "not_a_folder"
    f["a_file"].write_text("x")
    # a finished run, which a second run must not clobber
    finished = root / "finished"
    assert main(["sft", "--model", f["model"], "--data", str(f["sft"]), "--output_dir", str(finished),
                 "--max_steps", "1", "--batch_size", "4"]) == 0
    f["finished"] = str(finished)
    return {k: str(v) for k, v in f.items()}


def _snapshot(folder):
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# (issue item, command and arguments with {placeholders}, what the one error line contains, before_load, keep)
CASES = [
    ("1 mistyped model path", "dpo --model {root}/q/sftt --data {pref} --output_dir {root}/o1",
     "model '{root}/q/sftt': no such directory", True, None),
    ("1 eval with a mistyped model", "eval --models dpo={root}/out/nosuch --prompts {prompts} "
     "--reward tests.test_first_hour:same_reward --output {root}/eval.json",
     "model '{root}/out/nosuch': no such directory", True, None),
    ("2 second run into a finished run's folder", "kto --model {model} --data {unpaired} --output_dir {finished}",
     "already holds a run's outputs", True, "finished"),
    ("2 resume auto over a finished run with no checkpoint",
     "sft --model {model} --data {sft} --output_dir {finished} --resume auto",
     "no complete checkpoint to resume from", True, "finished"),
    ("2 resume with overwrite", "sft --model {model} --data {sft} --output_dir {finished} --resume auto --overwrite",
     "resume and overwrite exclude each other", True, "finished"),
    ("3 grpo num_generations 1", "grpo --model {model} --data {prompts} --reward tests.test_first_hour:same_reward "
     "--num_generations 1", "num_generations must be >= 2", True, None),
    ("3 sft epochs 0", "sft --model {model} --data {sft} --epochs 0", "epochs must be > 0 when max_steps is 0", True, None),
    ("3 dpo with every row truncated", "dpo --model {model} --data {pref} --max_length 4 --output_dir {root}/o3",
     "every one of the 16 response examples is longer than max_length=4", True, None),
    ("4 sft with no arguments", "sft", "missing required keys model, data", True, None),
    ("4 eval with no arguments", "eval", "missing required keys models, prompts, reward", True, None),
    ("4 a reward that does not import", "grpo --model {model} --data {prompts} --reward tests.nosuch:fn "
     "--num_generations 2 --batch_size 4", "reward 'tests.nosuch:fn': cannot import it", True, None),
    ("4 output_dir is a file", "sft --model {model} --data {sft} --output_dir {a_file}", "output_dir {a_file}: is a file",
     True, None),
    ("4 batch_size 0", "sft --model {model} --data {sft} --batch_size 0", "batch_size must be >= 1", True, None),
    ("4 batch_size not a number", "sft --model {model} --data {sft} --batch_size abc",
     "--batch_size: expected an integer, got 'abc'", True, None),
    ("4 KTO with one label", "kto --model {model} --data {good_only} --output_dir {root}/o4",
     "all 6 training rows are desirable (label true); KTO needs both classes", True, None),
    ("4 GRPO batch not a multiple of the group", "grpo --model {model} --data {prompts} "
     "--reward tests.test_first_hour:same_reward --num_generations 3 --batch_size 16",
     "batch_size (16) counts completions and must be a multiple of num_generations (3)", True, None),
    ("5 negative lr", "dpo --model {model} --data {pref} --lr -1e-5", "lr must be > 0", True, None),
    ("6 a file given a split", "dpo --model {model} --data {pref} --split train_prefs --output_dir {root}/o6",
     "split applies to a `datasets` name or folder", True, None),
    ("6 learning_rate", "dpo --learning_rate 1e-5", "unknown key '--learning_rate' (alignkit calls it '--lr')", True, None),
    ("6 num_train_epochs", "sft --num_train_epochs 2", "alignkit calls it '--epochs'", True, None),
    ("6 gradient_accumulation_steps", "sft --gradient_accumulation_steps 2", "alignkit calls it '--grad_accum'",
     True, None),
    ("6 max_seq_length", "sft --max_seq_length 128", "alignkit calls it '--max_length'", True, None),
    ("7 wandb not installed", "sft --model {model} --data {sft} --logging wandb",
     "logging wandb: the wandb package is not installed", True, None),
    ("10 max_steps -1", "sft --model {model} --data {sft} --max_steps -1", "max_steps must be >= 0", True, None),
    ("10 CSV in a .jsonl file", "dpo --model {model} --data {csv_in_jsonl} --output_dir {root}/o10",
     "looks like CSV", True, None),
    ("10 a missing .txt data file", "pretrain --data {root}/corpus.txt --output_dir {root}/o10t",
     "{root}/corpus.txt: file not found", True, None),
    ("principle: unknown literal value", "sft --model {model} --data {sft} --truncation right",
     "--truncation: expected one of left, error, got 'right'", True, None),
    ("principle: a YAML config that is a folder", "sft --config {root}", "is a directory, not a YAML config file",
     True, None),
]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading any model raises, so a case that fails later than its check shows up."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the mistake was caught")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


@pytest.mark.parametrize("item,command,expected,before_load,keep", CASES, ids=[c[0] for c in CASES])
def test_each_mistake_is_one_line(item, command, expected, before_load, keep, files, request, capsys, one_thread):
    if before_load:
        request.getfixturevalue("no_model_loading")
    before = _snapshot(files[keep]) if keep else None
    argv = [part.format(**files) for part in command.split()]
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"alignkit {argv[0]}: error: "), err
    assert expected.format(**files) in lines[0], err
    if keep:
        assert _snapshot(files[keep]) == before


def test_ranking_data_given_to_rm_gets_a_hint(files, capsys, no_model_loading):
    """A short block: one line per bad row, then the hint naming the key that fixes it."""
    assert main(["rm", "--model", files["model"], "--data", files["ranking"], "--output_dir", files["root"] + "/rk"]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0] == f"alignkit rm: error: {files['ranking']}: 4 bad rows (of 4):" and "Traceback" not in err
    assert lines[1] == f"{files['ranking']}:1: field 'chosen': missing (a preference record needs 'prompt', 'chosen' and 'rejected')"
    assert lines[-1] == ("these rows look like ranking data (prompt, responses): for `alignkit rm` pass "
                         "--data_kind ranking") and len(lines) == 6


def test_grpo_stops_when_every_reward_is_invalid(files, tmp_path, capsys, one_thread):
    code = main(["grpo", "--model", files["model"], "--data", files["prompts"], "--output_dir", str(tmp_path / "g"),
                 "--reward", "tests.test_first_hour:no_reward", "--reward_on_error", "mask", "--num_generations", "2",
                 "--batch_size", "4", "--max_steps", "3", "--max_new_tokens", "4"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    # the bar is closed first: the error is the last line, whole
    assert err.strip().splitlines()[-1].startswith("alignkit grpo: error: step 1: every reward was invalid"), err
    assert not (tmp_path / "g" / "model.safetensors").exists()  # no "model saved" for a run that learned nothing


def test_grpo_stops_after_max_flat_steps_of_equal_rewards(files, tmp_path, capsys, one_thread):
    code = main(["grpo", "--model", files["model"], "--data", files["prompts"], "--output_dir", str(tmp_path / "g"),
                 "--reward", "tests.test_first_hour:same_reward", "--num_generations", "2", "--batch_size", "4",
                 "--max_steps", "5", "--max_new_tokens", "4", "--max_flat_steps", "3", "--log_steps", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "step 3: every group's rewards were equal for 3 steps in a row" in err, err
    metrics = [json.loads(line) for line in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "train/loss" in m] == [1, 2]  # stopped before step 3's update


def test_identical_pairs_are_dropped_and_counted(files, tmp_path, capsys, one_thread):
    pref = _jsonl(tmp_path / "pref.jsonl", [{"prompt": f"Q{a}", "chosen": " yes", "rejected": " yes" if a < 2 else " no"}
                                           for a in range(6)])
    assert main(["dpo", "--model", files["model"], "--data", str(pref), "--output_dir", str(tmp_path / "d"),
                 "--max_steps", "1", "--batch_size", "2"]) == 0
    out = capsys.readouterr().out
    assert f"dropped 2 of 6 pairs whose chosen equals rejected (they carry no preference): {pref}:1, {pref}:2" in out


def test_save_total_limit_keeps_the_newest_checkpoints(files, tmp_path, one_thread):
    out = tmp_path / "s"
    assert main(["sft", "--model", files["model"], "--data", files["sft"], "--output_dir", str(out), "--batch_size", "2",
                 "--max_steps", "5", "--save_steps", "1", "--save_total_limit", "2"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]


def test_outputs_are_announced(files, tmp_path, capsys, one_thread):
    """config.yaml in every output_dir, the TensorBoard folder printed, the rows past the
    model's positions warned about."""
    out = tmp_path / "t"
    long = _jsonl(tmp_path / "long.jsonl", [{"prompt": "word " * 200, "completion": " yes"}] * 2)  # ~1,000 tokens
    assert main(["sft", "--model", files["model"], "--data", str(long), "--output_dir", str(out), "--max_steps", "1",
                 "--max_length", "1024", "--logging", "tensorboard"]) == 0
    printed = capsys.readouterr().out
    assert f"tensorboard logs: {out / 'sft'} (view: tensorboard --logdir {out})" in printed
    assert list((out / "sft").rglob("events.out.tfevents*"))
    limit = json.loads((Path(files["model"]) / "config.json").read_text())["max_position_embeddings"]
    assert limit < 1000 and f"WARNING: 2 of 2 rows are longer than the model's max_position_embeddings ({limit})" in printed
    assert (out / "config.yaml").is_file()


def test_help_shows_underscore_keys(capsys):
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    text = capsys.readouterr().out
    assert "--max_steps" in text and "--max-steps" not in text and "--config FILE.yaml" in text


def test_progress_in_a_log_file_is_a_few_lines(files, tmp_path):
    """Off a terminal the bar prints whole lines, at most every few seconds (not a redraw per step)."""
    proc = subprocess.run([sys.executable, "-m", "alignkit", "sft", "--model", files["model"], "--data", files["sft"],
                           "--output_dir", str(tmp_path / "p"), "--max_steps", "40", "--batch_size", "1"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    bar_lines = [line for line in proc.stderr.splitlines() if line.startswith("sft:")]
    assert "\r" not in proc.stderr and 1 <= len(bar_lines) <= 6, proc.stderr
    assert "40/40" in bar_lines[-1]


def test_metrics_hold_each_step_once_after_kill_9_and_resume(files, tmp_path):
    """A real kill -9 after a checkpoint, with rows past it already written; resume auto then
    finishes the run, and metrics.jsonl has steps 1..N exactly once."""
    out, steps = tmp_path / "k", 300
    argv = [sys.executable, "-m", "alignkit", "sft", "--model", files["model"], "--data", files["sft"],
            "--output_dir", str(out), "--max_steps", str(steps), "--batch_size", "1", "--save_steps", "40",
            "--log_steps", "1", "--lr", "1e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 240
    while time.monotonic() < deadline and child.poll() is None:
        rows = metrics.read_text().count("\n") if metrics.exists() else 0
        if (out / "checkpoint-40").is_dir() and rows >= 45:
            break
        time.sleep(0.005)
    assert child.poll() is None, "the run ended before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    killed_rows = metrics.read_text().count("\n")
    assert not (out / "model.safetensors").exists() and killed_rows < steps
    proc = subprocess.run(argv + ["--resume", "auto"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "resuming from" in proc.stdout
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, steps + 1))
