"""alignkit's trainers against the exact optimum of a KL-regularised problem (issue 8).

    python examples/exact_optimum.py            # ~3 min on 1 CPU thread
    python examples/exact_optimum.py --quick    # beta 1.0 only, no DPO data sweep
    python examples/exact_optimum.py --losses   # the preference-loss family at beta 1.0, 4000 pairs each
    python examples/exact_optimum.py --grpo-options   # GRPO's options at beta 1.0, each from the exact recipe

A tiny Llama over prompts {p0, p1} and responses of 1..3 tokens from {a, b, c, d} + EOS
(84 per prompt) is fitted to a known distribution: that is pi_ref. With r(x, y) the count
of x's target token, max E[r] - beta KL(pi || pi_ref) is solved by
pi* ∝ pi_ref exp(r / beta) (alignkit/rl/exact.py). Each trainer runs through its own
config (reward `alignkit.rl.exact:reward`), and its final policy is scored exactly:
TV to pi*, E[r], KL(pi || pi_ref), the mass outside S (responses the problem does not
have: pi* puts none there), the TV of pi renormalised on S, and for DPO the correlation
(over all 168 sequences) of its implicit reward beta log(pi / pi_ref) with r after
removing each prompt's mean. `s` is each run's wall time.
"""

import argparse
import contextlib
import io
import os
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from alignkit.models.load import load_causal_lm  # noqa: E402
from alignkit.rl import exact  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--losses", action="store_true", help="the preference-loss family only")
    parser.add_argument("--grpo-options", action="store_true", help="GRPO's options only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    directory = tempfile.mkdtemp(prefix="exact-optimum-")
    problem = exact.make_problem(directory)
    if args.losses:
        return loss_family(problem, directory)
    if args.grpo_options:
        return grpo_options(problem, directory)
    runs = [("rloo", {}), ("grpo", {}), ("ppo", {}), ("grpo_default", {}), ("dpo", {"pairs": 4000})]
    print(f"{'method':<32} {'beta':>5} {'TV to pi*':>9} {'E[r]':>7} {'KL':>7} {'outside S':>9} {'TV in S':>7} {'corr':>6} {'s':>5}")
    for beta in [1.0] if args.quick else [0.1, 1.0]:
        extra = [] if args.quick or beta != 0.1 else [("dpo", {"pairs": 1000}), ("dpo", {"pairs": 16000})]
        line("pi* (closed form)", beta, problem.optimum(beta), None, 0.0)
        line("pi_ref", beta, problem.evaluate(problem.ref_dir, beta), None, 0.0)
        for method, overrides in runs + extra:
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # trainer logs
                out = exact.train(method, problem, beta, f"{directory}/{method}-{beta}-{overrides.get('pairs', 'default')}", **dict(overrides))
            seconds = time.perf_counter() - start
            corr = exact.implicit_reward_correlation(load_causal_lm(str(out)), problem, beta) if method == "dpo" else None
            line(LABELS[method] if "pairs" not in overrides else f"{LABELS[method]}, {overrides['pairs']} pairs",
                 beta, problem.evaluate(out, beta), corr, seconds)


def loss_family(problem, directory: str, beta: float = 1.0) -> None:
    """Every loss of alignkit/losses/preference.py on the same 4000 pairs from pi_ref, with its
    default options (robust: a label noise of 0.1 assumed on clean labels)."""
    from alignkit.losses.preference import PREFERENCE_LOSSES

    print(f"{'loss_type':<32} {'beta':>5} {'TV to pi*':>9} {'E[r]':>7} {'KL':>7} {'outside S':>9} {'TV in S':>7} {'corr':>6} {'s':>5}")
    line("pi* (closed form)", beta, problem.optimum(beta), None, 0.0)
    variants = [(name, {}) for name in PREFERENCE_LOSSES] + [("robust", {"label_smoothing": 0.1})]
    for name, options in variants:
        start = time.perf_counter()
        out = f"{directory}/loss-{name}-{options.get('label_smoothing', 0)}"
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            exact.train("dpo", problem, beta, out, loss_type=[name], **options)
        corr = exact.implicit_reward_correlation(load_causal_lm(out), problem, beta)
        label = name + (f", eps {options['label_smoothing']}" if options else "")
        line(label, beta, problem.evaluate(out, beta), corr, time.perf_counter() - start)


def grpo_options(problem, directory: str, beta: float = 1.0) -> None:
    """GRPO with k1 in the reward, no std scaling, token-level loss (the recipe that reaches pi*),
    then one option changed at a time."""
    variants = [
        ("recipe (loss_level token)", {}),
        ("loss_level sequence (grpo)", {"loss_level": "sequence"}),
        ("loss_level bnpo", {"loss_level": "bnpo"}),
        ("loss_level dr_grpo", {"loss_level": "dr_grpo"}),
        ("num_iterations 2", {"num_iterations": 2}),
        ("num_iterations 2, clip_eps_high 0.28", {"num_iterations": 2, "clip_eps_high": 0.28}),
        ("num_iterations 2, GSPO sequence ratio", {"num_iterations": 2, "importance_sampling_level": "sequence"}),
        ("mask_truncated_completions", {"mask_truncated_completions": True, "max_new_tokens": 3}),
        ("max_new_tokens 3, not masked", {"max_new_tokens": 3}),
        ("entropy_coef 0.1", {"entropy_coef": 0.1}),
    ]
    print(f"{'grpo option':<40} {'beta':>5} {'TV to pi*':>9} {'E[r]':>7} {'KL':>7} {'outside S':>9} {'TV in S':>7} {'s':>5}")
    for label, keys in variants:
        start = time.perf_counter()
        out = f"{directory}/grpo-{len(label)}-{abs(hash(label))}"
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            exact.train("grpo", problem, beta, out, **keys)
        m = problem.evaluate(out, beta)
        print(f"{label:<40} {beta:>5} {m['tv']:>9.3f} {m['reward']:>7.3f} {m['kl']:>7.3f} {m['outside']:>9.4f} "
              f"{m['tv_in_s']:>7.3f} {time.perf_counter() - start:>5.0f}", flush=True)


LABELS = {"rloo": "RLOO defaults (k1 in reward)", "grpo": "GRPO, k1 in reward, no std", "ppo": "PPO, k1 per token in reward",
          "grpo_default": "GRPO defaults (k3 loss, std)", "dpo": "DPO"}


def line(name, beta, m, corr, seconds) -> None:
    c = f"{corr:6.3f}" if corr is not None else f"{'':6}"
    print(f"{name:<32} {beta:>5} {m['tv']:>9.3f} {m['reward']:>7.3f} {m['kl']:>7.3f} {m['outside']:>9.4f} {m['tv_in_s']:>7.3f} {c} "
          f"{seconds:>5.0f}", flush=True)


if __name__ == "__main__":
    main()
