"""GRPO completions/s per training step and peak memory, alignkit vs TRL, side by side.

    .venv/bin/python benchmarks/grpo_step.py                 # prints a JSON report
    .venv/bin/python benchmarks/grpo_step.py --steps 4 --repeats 1 [--size medium] [--lora_r 8]

Both libraries get the same tiny Llama directory (`--size` small: hidden 128, 4 layers,
vocab 1024, 1.18M parameters; medium: hidden 512, 5 layers, 21.5M; randomly initialised,
see common.SIZES) and tokenizer, the same prompts, group size G = 8, completions of
at most 64 tokens sampled at temperature 1.0 (no top-k / top-p), the same completions per
step, learning rate (constant, no warm-up), beta (k3 KL to the frozen initial model),
clip epsilon, gradient clipping, step count and the same Python reward, `digit_share`
(the share of digit characters in the completion). Each runs in a fresh subprocess,
alternating alignkit / TRL; TRL 1.16 is installed with `pip --target` into benchmarks/.trl,
never into the project environment.

One step is the same thing on both sides: generate `batch_size` completions
(batch_size / G prompts), score them, one forward of the reference, ONE optimiser step,
one pass over the batch. alignkit: `batch_size` completions per micro-batch, grad_accum 1.
TRL: per_device_train_batch_size = batch_size, gradient_accumulation_steps = 1,
steps_per_generation = 1 (so generation_batch_size = batch_size), num_iterations = 1 (so
TRL skips its old-log-prob pass: pi_old = pi, as in alignkit). Loss: per-sequence mean,
then mean over sequences (alignkit loss_level "sequence" = TRL loss_type "grpo"); rewards
scaled by the group std on both sides. TRL's CPU training: use_cpu, fp32, no gradient
checkpointing (its GRPO default is on).

With `--lora_r r` both train LoRA adapters of rank r (alpha 2r, no dropout, every linear
layer but the output head: peft's "all-linear") on the frozen model, and both take the
reference from the same model with the adapters disabled, so neither holds a second copy.

Timed: alignkit `TrainResult.train_seconds` (generation + scoring + reference + update of
every step) vs TRL `trainer.train()` (the same, plus its dataloader set-up); `job_*` is from
the start of the run, libraries already imported, to the saved model. Each side draws its
own prompts for each step from the same prompt set (different orders). The reward function
counts the completions it scores in each child, so the run fails unless both sides scored
exactly steps x batch_size. Children run torch on `--threads` threads, 1 by default (on
this shared 2-core machine 2 threads collapsed 45x under other people's load, see
common.run_child). Rewards are logged every step; the report gives the mean training
reward of the first and last `window` steps (quality parity: both should move alike).
`run_case` is run.py's `grpo` case; `train_tokens` (for MFU) is completions x (the prompt
set's mean prompt tokens + that side's mean logged completion length).

`--prompt_tokens N` is the long-prompt case of reasoning RL: each prompt is N tokens of real
movie-review text (alignkit/tasks/sentiment.py's snippets, joined and cut to N tokens, then
the question) instead of a short arithmetic question, the model fixture's positions widened to
fit. `--share_prompt off` runs alignkit with a row per completion (its default is one row per
group, the prompt computed once) so that both of alignkit's layouts can be set against TRL.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (MODEL_CLOCK, ROOT, SIZES, TRL_DIR, TRL_VERSION, add_case_arguments, alternate,  # noqa: E402
                    build_tiny, child_main, ensure_trl, preimport, side_by_side, summarise, token_lengths,
                    write_jsonl)

REWARD_SPEC = "grpo_step:digit_share"  # importable: benchmarks/ is on sys.path in the child
SCORED = {"calls": 0, "completions": 0}


def digit_share(prompts, completions, **kwargs) -> list[float]:
    """Share of the completion's characters that are digits (0 for an empty completion)."""
    SCORED["calls"] += 1
    SCORED["completions"] += len(completions)
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def build_fixture(work: Path, n_prompts: int, size: str = "small", seed: int = 0, prompt_tokens: int = 0,
                  max_new_tokens: int = 64) -> dict:
    """A tiny Llama of `size` and arithmetic prompts (prompts.jsonl); also ppo_step.py's fixture.
    With `prompt_tokens`, each prompt leads with that many tokens of review text (see the module
    docstring). Returns the parameter count and the mean prompt length in tokens (with BOS)."""
    rng = random.Random(seed)

    def prompt():
        terms = [str(rng.randint(0, 999)) for _ in range(rng.randint(2, 5))]
        return f"Question: what is {' plus '.join(terms)}? Answer with digits.\nAnswer:"

    prompts = [prompt() for _ in range(n_prompts)]
    corpus = prompts + [f" The answer is {rng.randint(0, 4000)}." for _ in range(2000)]
    if not prompt_tokens:
        _, params = build_tiny(work / "model", corpus, **SIZES[size])
    else:
        sys.path.insert(0, str(ROOT))
        from alignkit.tasks import sentiment

        texts = [s["text"] for s in sentiment.snippets()]
        tokenizer, params = build_tiny(work / "model", corpus + texts[:2000], **SIZES[size],
                                       max_position_embeddings=prompt_tokens + max_new_tokens + 64)
        rng.shuffle(texts)
        pool, long = iter(texts * 10), []
        for question in prompts:
            ids: list[int] = []
            while len(ids) < prompt_tokens:
                ids += tokenizer(" " + next(pool), add_special_tokens=False)["input_ids"]
            long.append(tokenizer.decode(ids[:prompt_tokens]) + "\n" + question)
        prompts = long
    write_jsonl(work / "prompts.jsonl", [{"prompt": p} for p in prompts])
    # a prompt's tokens: BOS + prompt (token_lengths also counts the EOS of an empty completion)
    mean_prompt = statistics.fmean(token_lengths(work / "model", prompts, [""] * len(prompts))) - 1
    return {"params": params, "mean_prompt_tokens": mean_prompt}


def reward_curve(rewards: list[float], window: int) -> dict:
    return {"first": statistics.fmean(rewards[:window]), "last": statistics.fmean(rewards[-window:])}


def rollout_summary(lib: str, rs: list[dict], completions: int, steps: int, window: int,
                    mean_prompt_tokens: float) -> dict:
    """One library's runs of an online case (GRPO, PPO): completions/s, the reward and length
    curves, and the training tokens for MFU. Fails unless every run scored exactly `completions`
    completions over `steps` logged steps."""
    for r in rs:
        if r["scored"]["completions"] != completions or len(r["rewards"]) != steps:
            raise RuntimeError(f"{lib}: scored {r['scored']} over {len(r['rewards'])} logged steps; "
                               f"expected {completions} completions over {steps} steps")
    length = statistics.fmean(statistics.fmean(r["completion_length"]) for r in rs)
    return {
        **summarise(rs, completions, "completions_per_s"),
        "quality": {"reward": {k: round(v, 4) for k, v in reward_curve(rs[-1]["rewards"], window).items()}},
        "completion_length": {k: round(v, 2) for k, v in reward_curve(rs[-1]["completion_length"], window).items()},
        "train_tokens": completions * (mean_prompt_tokens + length),
    }


def child_alignkit(work: Path, args) -> dict:
    sys.path.insert(0, str(ROOT))
    import importlib

    from transformers.utils import logging as hf_logging

    from alignkit.train import grpo

    preimport("alignkit.rollout.rewards", "alignkit.rollout.sampler")  # before the clock, as TRL's are in child_trl

    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    with MODEL_CLOCK.counting():
        result = grpo.run(grpo.GRPOConfig(
            model=str(work / "model"), data=str(work / "prompts.jsonl"), eval_fraction=0.0,
            output_dir=str(work / "out-alignkit"), overwrite=True, max_steps=args.steps, batch_size=args.batch_size, grad_accum=1,
            num_generations=args.num_generations, max_new_tokens=args.max_new_tokens, temperature=1.0,
            reward=[REWARD_SPEC], lr=args.lr, beta=args.beta, clip_eps=0.2, loss_level="sequence", scale_rewards=True,
            lr_scheduler="constant", warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0, log_steps=1, seed=0, precision="no",
            lora_r=args.lora_r, lora_alpha=2.0 * args.lora_r, share_prompt=args.share_prompt == "on",
            max_length=4096,
        ))
    job_s = time.perf_counter() - start
    steps = [h for h in result.history if "train/reward" in h]
    scored = importlib.import_module("grpo_step").SCORED  # the module alignkit imported the reward from
    return {"job_s": job_s, "train_s": result.train_seconds, "scored": scored,
            "rewards": [h["train/reward"] for h in steps],
            "completion_length": [h["train/completion_length"] for h in steps]}


def child_trl(work: Path, args) -> dict:
    sys.path.insert(0, str(TRL_DIR))
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    import grpo_step  # the same module object as for alignkit, so the counter is read the same way

    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    data = load_dataset("json", data_files={"train": str(work / "prompts.jsonl")})["train"]
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    config = GRPOConfig(
        output_dir=str(work / "out-trl"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        num_generations=args.num_generations, max_completion_length=args.max_new_tokens, temperature=1.0,
        top_k=0, top_p=1.0, learning_rate=args.lr, beta=args.beta, epsilon=0.2, loss_type="grpo",
        scale_rewards="group", lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
        gradient_checkpointing=False, disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    assert config.generation_batch_size == args.batch_size and config.steps_per_generation == 1
    peft_config = None
    if args.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=grpo_step.digit_share, args=config, train_dataset=data,
                          processing_class=tokenizer, peft_config=peft_config)
    train_start = time.perf_counter()
    with MODEL_CLOCK.counting():
        trainer.train()
    train_s = time.perf_counter() - train_start
    trainer.save_model(str(work / "out-trl"))
    job_s = time.perf_counter() - start
    steps = [h for h in trainer.state.log_history if "reward" in h]
    return {"job_s": job_s, "train_s": train_s, "scored": grpo_step.SCORED,
            "rewards": [h["reward"] for h in steps],
            "completion_length": [h["completions/mean_length"] for h in steps],
            "optimizer_steps": trainer.state.global_step}


def run_case(work: Path, size: str = "small", steps: int = 30, batch_size: int = 64, num_generations: int = 8,
             max_new_tokens: int = 64, lr: float = 5e-4, beta: float = 0.04, window: int = 5, repeats: int = 2,
             threads: int = 1, lora_r: int = 0, prompt_tokens: int = 0, share_prompt: str = "on") -> dict:
    """One GRPO comparison in `work` (its fixture built there first); lora_r > 0 trains LoRA adapters."""
    if batch_size % num_generations:
        raise ValueError("batch_size counts completions and must be a multiple of num_generations")
    ensure_trl()
    completions = steps * batch_size
    window = max(1, min(window, steps // 2))
    fixture = build_fixture(work, n_prompts=max(completions // num_generations, 256), size=size,
                            prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens)
    argv = ["--work", str(work), "--steps", str(steps), "--batch_size", str(batch_size),
            "--num_generations", str(num_generations), "--max_new_tokens", str(max_new_tokens),
            "--lr", str(lr), "--beta", str(beta), "--threads", str(threads), "--lora_r", str(lora_r),
            "--share_prompt", share_prompt]
    runs = alternate(__file__, argv, repeats, threads)

    def summary(lib: str, rs: list[dict]) -> dict:
        return {**rollout_summary(lib, rs, completions, steps, window, fixture["mean_prompt_tokens"]),
                "reward_calls": rs[-1]["scored"]["calls"]}

    case = {"case": "grpo_lora" if lora_r else "grpo", "size": size, "lora_r": lora_r, "params": fixture["params"], "unit": "completions/s",
            "rate_key": "completions_per_s", "steps": steps, "completions_per_step": batch_size,
            "num_generations": num_generations, "prompts_per_step": batch_size // num_generations,
            "max_new_tokens": max_new_tokens, "prompt_tokens": prompt_tokens or round(fixture["mean_prompt_tokens"], 1),
            "alignkit_share_prompt": share_prompt, "lr": lr, "beta": beta, "temperature": 1.0, "reward": "digit_share",
            "reward_window": window, "threads": runs["alignkit"][0]["threads"]}
    return side_by_side(case, runs, "completions_per_s", summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=64, help="completions per optimiser step")
    parser.add_argument("--num_generations", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--lora_r", type=int, default=0, help="LoRA rank on both sides (0: full fine-tuning)")
    parser.add_argument("--prompt_tokens", type=int, default=0, help="long prompts of N tokens of review text (0: short)")
    parser.add_argument("--share_prompt", choices=["on", "off"], default="on", help="alignkit's layout")
    add_case_arguments(parser)
    parser.add_argument("--window", type=int, default=5, help="steps averaged for the first / last reward")
    args = parser.parse_args()

    if args.child:
        child_main(args, {"alignkit": child_alignkit, "trl": child_trl})
        return

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.batch_size % args.num_generations:
        parser.error("batch_size counts completions and must be a multiple of num_generations")
    with tempfile.TemporaryDirectory(prefix="alignkit-grpo-") as tmp:
        case = run_case(Path(tmp), args.size, args.steps, args.batch_size, args.num_generations, args.max_new_tokens,
                        args.lr, args.beta, args.window, args.repeats, args.threads, args.lora_r, args.prompt_tokens,
                        args.share_prompt)
    print(json.dumps({"benchmark": "grpo_step", "trl_version": TRL_VERSION, **case}, indent=1))


if __name__ == "__main__":
    main()
