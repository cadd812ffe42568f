"""Constitutional AI learns: on three more seeds than the demo's (tests/test_demo.py, seed 0), SFT
on the scripted revisions raises the held-out gold reward over the SFT start. Slow: each seed
pretrains and fine-tunes its own tiny model first (`make test-slow`)."""

import pytest

from alignkit.pipeline import DemoConfig, run_demo
from alignkit.tasks import sentiment

MARGIN = 0.05  # gold (VADER compound, in [-1, 1]); seed 0 moved +0.118 (0.116 -> 0.234) in the demo


def _held_out_gold(model_dir, prompts) -> float:
    from alignkit.data import tokenize_prompts
    from alignkit.models.load import load_causal_lm, load_tokenizer
    from alignkit.rollout.best_of_n import sample_and_score

    model, tokenizer = load_causal_lm(str(model_dir)).eval(), load_tokenizer(str(model_dir))
    examples, _ = tokenize_prompts(prompts, tokenizer, max_length=64)
    s = sample_and_score(model, tokenizer, examples, 2, [sentiment.gold_reward], [1.0], max_new_tokens=24, seed=7)
    return sum(s.rewards) / len(s.rewards)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sft_on_revisions_raises_the_gold_reward(seed, tmp_path, one_thread):
    out = tmp_path / "demo"
    summary = run_demo(DemoConfig(output_dir=str(out), quick=True, seed=seed, stages=["data", "pretrain", "sft", "cai"]))
    prompts = sentiment.prompts(256, seed=100, held_out=True)
    before, after = _held_out_gold(out / "sft", prompts), _held_out_gold(out / "cai" / "sl", prompts)
    print(f"seed {seed}: gold sft {before:+.3f} -> SL-CAI {after:+.3f}; revisions "
          f"{summary['stages']['cai']['gold_original']:+.3f} -> {summary['stages']['cai']['gold_revised']:+.3f}")
    assert after > before + MARGIN, (seed, before, after)
