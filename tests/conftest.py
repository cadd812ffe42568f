"""Session-cached tiny models: built once per test session, never downloaded."""

import random

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
