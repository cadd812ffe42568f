"""PPO completions/s per step and peak memory, alignkit vs TRL (which has no PPO trainer in 1.16).

    .venv/bin/python benchmarks/ppo_step.py                  # prints a JSON report
    .venv/bin/python benchmarks/ppo_step.py --steps 2 --repeats 1 [--size medium]

The fixture is grpo_step.py's: a tiny Llama (`--size` small: hidden 128, 4 layers, vocab
1024, 1.18M parameters; medium: hidden 512, 5 layers, 21.5M; randomly initialised), its
arithmetic prompts and the Python reward `grpo_step:digit_share` (the share of digit
characters in the completion). One step: sample one completion of at most 64 tokens
(temperature 1.0, no top-k / top-p) for each of `batch_size` prompts, score them, the no-grad
passes (policy log-probs, critic values, reference), GAE, then `ppo_epochs` passes over
minibatches of `minibatch` completions (one optimiser step each) of the clipped surrogate plus
0.1 x the clipped value loss. The critic is initialised from the policy (the reward is a
callable, not a model); beta 0.05 fixed; lr constant; fp32; seed 0.

Timed: alignkit's step loop, from the creation of ppo.run's progress bar (its own clock
starts there) to the call that saves the final model, i.e. every step's generation, scoring,
no-grad passes and updates; `job_*` runs from the start of the run, libraries already
imported, to the saved model. Quality: the mean training reward of the first and last
`window` steps. The reward function counts the completions it scores, so the run fails unless
steps x batch_size were scored. `train_tokens` (for MFU) is completions x (the prompt set's mean
prompt tokens + the mean logged completion length): 6 N T counts one forward + backward of the
policy per completion, not the critic, the extra PPO epochs, the no-grad passes or generation.

TRL: 1.16.0 has no PPO trainer (it was removed from `trl` and is not in `trl.experimental`);
its child tries the imports and reports the exact ImportErrors, and the case records
`"trl": null` with that reason. `run_case` is run.py's `ppo` case.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (MODEL_CLOCK, ROOT, TRL_DIR, TRL_VERSION, add_case_arguments, alternate, child_main,  # noqa: E402
                    ensure_trl, preimport, side_by_side)
from grpo_step import REWARD_SPEC, build_fixture, rollout_summary  # noqa: E402


def child_alignkit(work: Path, args) -> dict:
    sys.path.insert(0, str(ROOT))
    import importlib

    import tqdm.auto
    from transformers.utils import logging as hf_logging

    from alignkit.train import ppo

    preimport("alignkit.models.reward", "alignkit.rollout.rewards", "alignkit.rollout.sampler")
    hf_logging.disable_progress_bar()
    marks = {}
    real_tqdm, real_save = tqdm.auto.tqdm, ppo.save_model

    def timed_bar(*a, **k):  # ppo.run creates its bar right before the step loop, next to its own clock
        if k.get("desc") != "ppo":
            return real_tqdm(*a, **k)
        marks["loop_start"] = time.perf_counter()
        return real_tqdm(*a, **{**k, "disable": True})

    def timed_save(*a, **k):  # ... and saves the final model right after it
        marks["loop_end"] = time.perf_counter()
        return real_save(*a, **k)

    tqdm.auto.tqdm, ppo.save_model = timed_bar, timed_save
    start = time.perf_counter()
    with MODEL_CLOCK.counting():
        history = ppo.run(ppo.PPOConfig(
            model=str(work / "model"), data=str(work / "prompts.jsonl"), output_dir=str(work / "out-alignkit"), overwrite=True,
            max_steps=args.steps, rollout_batch_size=args.batch_size, batch_size=args.minibatch, ppo_epochs=args.ppo_epochs,
            max_new_tokens=args.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, reward=[REWARD_SPEC], lr=args.lr,
            beta=0.05, target_kl=0.0, gamma=1.0, lam=0.95, clip_eps=0.2, vf_clip=0.2, vf_coef=0.1, weight_decay=0.0,
            max_grad_norm=1.0, log_steps=1, seed=0, precision="no",
        )).history
    job_s = time.perf_counter() - start
    if set(marks) != {"loop_start", "loop_end"}:
        raise RuntimeError(f"the step-loop clock missed its marks ({sorted(marks)}): ppo.run no longer creates a "
                           "tqdm bar with desc='ppo' before its loop or calls save_model after it; update timed_bar / timed_save")
    scored = importlib.import_module("grpo_step").SCORED  # the module alignkit imported the reward from
    return {"job_s": job_s, "train_s": marks["loop_end"] - marks["loop_start"], "scored": scored,
            "rewards": [h["train/reward"] for h in history],
            "completion_length": [h["train/completion_length"] for h in history]}


def child_trl(work: Path, args) -> dict:
    sys.path.insert(0, str(TRL_DIR))
    import importlib

    import trl

    errors = []
    for module, name in (("trl", "PPOTrainer"), ("trl.experimental.ppo", "PPOTrainer")):
        try:
            getattr(importlib.import_module(module), name)
            return {"unavailable": f"found {module}.{name}, but this benchmark has no TRL PPO side written for it"}
        except (ImportError, AttributeError) as e:
            errors.append(f"{module}.{name}: {type(e).__name__}: {e}")
    return {"unavailable": f"TRL {trl.__version__} has no PPO trainer: " + "; ".join(errors)}


def run_case(work: Path, size: str = "small", steps: int = 10, batch_size: int = 64, minibatch: int = 16,
             ppo_epochs: int = 4, max_new_tokens: int = 64, lr: float = 5e-4, window: int = 5, repeats: int = 2,
             threads: int = 1) -> dict:
    """One PPO comparison in `work` (its fixture built there first)."""
    ensure_trl()
    completions = steps * batch_size
    window = max(1, min(window, steps // 2))
    fixture = build_fixture(work, n_prompts=max(completions, 256), size=size)
    argv = ["--work", str(work), "--steps", str(steps), "--batch_size", str(batch_size), "--minibatch", str(minibatch),
            "--ppo_epochs", str(ppo_epochs), "--max_new_tokens", str(max_new_tokens), "--lr", str(lr),
            "--threads", str(threads)]
    runs = alternate(__file__, argv, repeats, threads)

    def summary(lib: str, rs: list[dict]) -> dict:
        return rollout_summary(lib, rs, completions, steps, window, fixture["mean_prompt_tokens"])

    case = {"case": "ppo", "size": size, "params": fixture["params"], "unit": "completions/s",
            "rate_key": "completions_per_s", "steps": steps, "completions_per_step": batch_size, "minibatch": minibatch,
            "ppo_epochs": ppo_epochs, "max_new_tokens": max_new_tokens, "lr": lr, "beta": 0.05, "temperature": 1.0,
            "reward": "digit_share", "reward_window": window}
    return side_by_side(case, runs, "completions_per_s", summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=64, help="completions (= prompts) per PPO step")
    parser.add_argument("--minibatch", type=int, default=16, help="completions per optimiser step")
    parser.add_argument("--ppo_epochs", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    add_case_arguments(parser)
    parser.add_argument("--window", type=int, default=5, help="steps averaged for the first / last reward")
    args = parser.parse_args()

    if args.child:
        child_main(args, {"alignkit": child_alignkit, "trl": child_trl})
        return

    with tempfile.TemporaryDirectory(prefix="alignkit-ppo-") as tmp:
        case = run_case(Path(tmp), args.size, args.steps, args.batch_size, args.minibatch, args.ppo_epochs,
                        args.max_new_tokens, args.lr, args.window, args.repeats, args.threads)
    print(json.dumps({"benchmark": "ppo_step", "trl_version": TRL_VERSION, **case}, indent=1))


if __name__ == "__main__":
    main()
