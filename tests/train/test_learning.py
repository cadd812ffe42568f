"""End to end: pretraining learns the corpus, SFT teaches the answer format."""

from alignkit.pipeline import DemoConfig, run_demo


def test_quick_demo_pretrains_and_teaches_the_format(tmp_path):
    summary = run_demo(DemoConfig(output_dir=str(tmp_path / "demo"), quick=True))
    import json

    logs = [json.loads(line) for line in (tmp_path / "demo/base/metrics.jsonl").read_text().splitlines()]
    evals = [h["eval/loss"] for h in logs if "eval/loss" in h]
    assert evals[-1] <= 0.5 * evals[0], f"held-out loss {evals[0]:.3f} -> {evals[-1]:.3f}"
    assert summary["sft_format"]["follows_format"] >= 0.9
    assert summary["sft_format"]["ends_with_eos"] >= 0.9  # EOS was learned (pad is a separate token)
    assert summary["base_format"]["follows_format"] < 0.5  # the format came from SFT, not pretraining
