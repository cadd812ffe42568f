"""Plain helpers that several test modules share (fixtures live in conftest.py).

The reward functions are also named by dotted path, e.g. reward="tests.helpers:contains_seven":
a trainer imports them at run time, in torchrun workers and CLI subprocesses too.
"""

import json
import os
import random
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

DIGITS = set("0123456789")


def digit_fraction(prompts, completions, **_):
    """A reward a random model can climb: the share of digits in the completion."""
    return [sum(ch in DIGITS for ch in c) / max(len(c), 1) for c in completions]


def contains_seven(prompts, completions, **_):
    """A verifiable reward: 1 when the completion contains the target token '7'."""
    return [1.0 if "7" in c else 0.0 for c in completions]


def prompts_file(path, n=48):
    """n prompt records "What is a+(a % 5)?" with their `answer`, written to `path` (returned)."""
    with path.open("w") as f:
        for a in range(n):
            f.write(json.dumps({"prompt": f"What is {a}+{a % 5}?", "answer": a + a % 5}) + "\n")
    return path


def preference_file(path, n, seed):
    """n preference records (the right sum chosen, two digits run together rejected), written to `path`."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 49), rng.randint(0, 49)
            f.write(json.dumps({"prompt": f"What is {a}+{b}?", "chosen": f" The answer is {a + b}.",
                                "rejected": f" {a}{b} maybe"}) + "\n")
    return path


def perturbed_model(model_dir, seed=0):
    """The model at `model_dir` with N(0, 0.05^2) noise on every weight: away from its reference."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def assert_same_step(first, second):
    """Two (loss, metrics, gradient) results of one step in two layouts: equal to 1e-5 (metrics 1e-4)."""
    (loss_a, m_a, grad_a), (loss_b, m_b, grad_b) = first, second
    assert abs(float(loss_a - loss_b)) <= 1e-5
    assert all(abs(float(m_a[k] - m_b[k])) <= 1e-4 for k in m_b)
    assert float((grad_a - grad_b).abs().max()) <= 1e-5 * max(1.0, float(grad_b.abs().max()))


def sft_file(path, n: int):
    """`n` prompt/completion rows ("What is a+b?" -> " The answer is c."), for the SFT loop tests."""
    rows = [{"prompt": f"What is {a}+{a % 7}?", "completion": f" The answer is {a + a % 7}."} for a in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(trainer: str, args: dict, nproc: int = 2, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node 2 -m alignkit <trainer> --key value ...`
    (or `launcher` in place of the torchrun part, e.g. `accelerate launch --config_file ...`)."""
    launcher = launcher or [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd = [*launcher, "-m", "alignkit", trainer]
    for k, v in args.items():
        cmd += [f"--{k}" if v else f"--no-{k}"] if isinstance(v, bool) else [f"--{k}", str(v)]
    # No ACCELERATE_USE_CPU: make_accelerator must form the gloo group by itself.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def max_abs_diff(a, b) -> float:
    """max |w_a - w_b| over the model.safetensors of two save_pretrained folders."""
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)
