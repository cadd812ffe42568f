"""compile: the training passes through torch.compile (TorchInductor), the same run within float tolerance."""

import pytest
import torch
from safetensors.torch import load_file

from alignkit.train import sft
from tests import helpers


@pytest.mark.slow
def test_compiled_training_equals_eager(tiny_model_dir, tmp_path, one_thread):
    """3 SFT steps at lr 1e-2 with `compile` on and off: Dynamo captured graphs (the compiled path ran),
    the logged losses agree to 1e-5 and the weights to 1e-5 (fused kernels sum in another order)."""
    import torch._dynamo

    data = helpers.sft_file(tmp_path / "s.jsonl", 16)
    weights, losses = {}, {}
    torch._dynamo.reset()
    for on in (False, True):
        before = sum(torch._dynamo.utils.counters["stats"].values())
        r = sft.run(sft.SFTConfig(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / str(on)),
                                  max_steps=3, batch_size=4, lr=1e-2, log_steps=1, max_length=64, compile=on))
        captured = sum(torch._dynamo.utils.counters["stats"].values()) - before
        assert (captured > 0) is on, captured
        weights[on] = load_file(tmp_path / str(on) / "model.safetensors")
        losses[on] = [h["train/loss"] for h in r.history if "train/loss" in h]
    torch._dynamo.reset()
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    moved = max(float((weights[False][k] - load_file(tiny_model_dir / "model.safetensors")[k]).abs().max())
                for k in weights[False])
    diff = max(float((weights[True][k] - weights[False][k]).abs().max()) for k in weights[True])
    print(f"compile: 3 SFT steps, max |dw| compiled vs eager = {diff:.3g} (the run moved weights by {moved:.3g})")
    assert moved > 1e-3 and diff < 1e-5
