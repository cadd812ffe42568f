"""Session-cached tiny models: built once per test session, never downloaded; `transformers serve` on one."""

import random
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from alignkit.models.tiny import build_tiny_llama, save_tiny, train_tokenizer


def arithmetic_corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        lines.append(f"What is {a}+{b}? The answer is {a + b}.")
    return lines


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A 320-token byte-level BPE tokenizer (pad=0, <s>=1, </s>=2)."""
    return train_tokenizer(arithmetic_corpus(), vocab_size=320)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_tokenizer, tmp_path_factory):
    """A ~0.1M-parameter Llama saved with `save_pretrained`, tokenizer beside it."""
    model = build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=4)
    return save_tiny(model, tiny_tokenizer, tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a busy 2-core machine: OpenMP threads cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def served(tiny_model_dir):
    """`transformers serve` on the tiny checkpoint; yields its /v1 base URL."""
    exe = Path(sys.executable).with_name("transformers")
    if not exe.exists() and shutil.which("transformers") is None:
        pytest.skip("the transformers CLI is not installed")
    from tests.helpers import free_port

    port = free_port()
    proc = subprocess.Popen([str(exe if exe.exists() else "transformers"), "serve", str(tiny_model_dir),
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={"HF_HUB_OFFLINE": "1",
                                                                                        "PATH": "/usr/bin:/bin"})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"transformers serve did not start (exit code {proc.poll()})")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(10)
