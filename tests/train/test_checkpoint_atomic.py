"""kill -9 during checkpoint writes never leaves a checkpoint that resume accepts."""

import random
import signal
import subprocess
import sys
import time

from transformers import AutoModelForCausalLM

from alignkit.train.loop import checkpoint_problem, latest_checkpoint, load_state

CHILD = r"""
import sys, torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, get_scheduler
from alignkit.models.load import load_tokenizer
from alignkit.train.loop import TrainConfig, save_checkpoint
model_dir, out, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
model, tok = AutoModelForCausalLM.from_pretrained(model_dir), load_tokenizer(model_dir)
opt = torch.optim.AdamW(model.parameters())
sched = get_scheduler("constant", opt)
acc, cfg = Accelerator(cpu=True), TrainConfig(output_dir=out)
for step in range(first, first + 10_000):
    save_checkpoint(cfg, acc, model, tok, opt, sched, step % 3 + first, {"note": "kill test"})  # re-saves steps too
    print("saved", flush=True)
"""


def test_kill_9_during_saves_never_leaves_an_accepted_partial_checkpoint(tiny_model_dir, tmp_path):
    rng = random.Random(0)
    out = tmp_path / "run"
    for attempt in range(10):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tiny_model_dir), str(out), str(attempt * 10)],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert child.stdout.readline().strip() == "saved"  # at least one complete save happened
        time.sleep(rng.uniform(0.0, 0.3))  # then kill -9 at a random moment, most likely mid-write
        child.send_signal(signal.SIGKILL)
        child.wait()
        latest = latest_checkpoint(out)
        assert latest is not None and checkpoint_problem(latest) is None
        load_state(latest / "training_state.pt")
        AutoModelForCausalLM.from_pretrained(latest)


def test_a_corrupted_file_fails_the_manifest(tiny_model_dir, tmp_path):
    from accelerate import Accelerator
    import torch
    from transformers import get_scheduler

    from alignkit.models.load import load_tokenizer
    from alignkit.train.loop import TrainConfig, save_checkpoint

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model_dir), load_tokenizer(str(tiny_model_dir))
    opt = torch.optim.AdamW(model.parameters())
    sched = get_scheduler("constant", opt)
    cfg, acc = TrainConfig(output_dir=str(tmp_path)), Accelerator(cpu=True)
    save_checkpoint(cfg, acc, model, tok, opt, sched, 1, {})
    save_checkpoint(cfg, acc, model, tok, opt, sched, 2, {})
    assert latest_checkpoint(tmp_path).name == "checkpoint-2"
    weights = tmp_path / "checkpoint-2/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7] + b"garbage")
    assert "model.safetensors" in checkpoint_problem(tmp_path / "checkpoint-2")
    assert latest_checkpoint(tmp_path).name == "checkpoint-1"  # falls back to the last intact one
