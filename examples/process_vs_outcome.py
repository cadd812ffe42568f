"""Outcome vs process supervision on multi-step arithmetic, over seeds: the arithmetic_steps demo once per seed,
then one table.

    python examples/process_vs_outcome.py --seeds 0 1 2 --output_dir runs/process_vs_outcome [--quick]

Per seed (`alignkit demo --task arithmetic_steps --seed S`): the SFT policy's solutions train an outcome verifier
(ORM) and a process verifier (PRM) on the same samples; search picks from the same N samples with each; PPO and
GRPO train for the same steps on the outcome alone or with the PRM's step rewards. Printed (and written to
summary.json): the verifiers' held-out accuracies, exact match of each search method at each N, each policy's
exact match on held-out questions, and for the process runs the first step at which the mean training reward of
the last 3 logged steps reached the outcome run's final one (the same mean; None: never). A finished seed is read back, not rerun.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.mean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def rewards(folder: Path) -> list[tuple[int, float]]:
    """(step, training reward) of each logged step of an online run."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["train/reward"]) for r in rows if "train/reward" in r]


def steps_to_reach(curve: list[tuple[int, float]], target: float, window: int = 3) -> int | None:
    """The step at which the mean of the last `window` logged rewards first reaches `target` (None: never)."""
    for i in range(window, len(curve) + 1):
        if statistics.mean(r for _, r in curve[i - window : i]) >= target:
            return curve[i - 1][0]
    return None


def seed_summary(root: Path) -> dict:
    stages = {name: json.loads((root / name / "stage.json").read_text())
              for name in ("solutions", "prm", "orm") if (root / name / "stage.json").exists()}
    search = json.loads((root / "search" / "search.json").read_text())
    policies = json.loads((root / "eval" / "eval.json").read_text())["models"]
    out = {"solutions": stages.get("solutions", {}), "prm": stages.get("prm", {}), "orm": stages.get("orm", {}),
           "search": {f"{r['method']}@{r['n']}": r["exact_match"] for r in search},
           "exact_match": {name: m["gold"] for name, m in policies.items()}, "reach": {}}
    for method in ("ppo", "grpo"):
        outcome, process = rewards(root / method), rewards(root / f"{method}-process")
        target = statistics.mean(r for _, r in outcome[-3:])
        out["reach"][method] = {"outcome_final": target, "outcome_steps": outcome[-1][0],
                                "process_steps_to_reach": steps_to_reach(process, target)}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output_dir", default="runs/process_vs_outcome")
    parser.add_argument("--quick", action="store_true", help="the quick demo's sizes")
    args = parser.parse_args(argv)

    from alignkit.pipeline import DemoConfig, run_demo

    per_seed = {}
    for seed in args.seeds:
        folder = Path(args.output_dir) / f"seed{seed}"
        run_demo(DemoConfig(task="arithmetic_steps", seed=seed, quick=args.quick, output_dir=str(folder)))
        per_seed[seed] = seed_summary(folder)
    seeds = list(per_seed.values())
    lines = [f"\n== outcome vs process supervision, seeds {args.seeds} (mean ± sd) ==",
             "verifiers on held-out SFT solutions (step labels for the PRM, outcome for the ORM):"]
    for name in ("prm", "orm"):
        lines.append(f"  {name}: accuracy {mean_sd([s[name].get('accuracy') for s in seeds])}, first-error accuracy "
                     f"{mean_sd([s[name].get('first_error_accuracy') for s in seeds])}")
    lines.append("search from SFT, exact match of the pick:")
    for key in seeds[0]["search"]:
        lines.append(f"  {key:<14} {mean_sd([s['search'].get(key) for s in seeds])}")
    lines.append("policies, exact match on held-out questions:")
    for key in seeds[0]["exact_match"]:
        lines.append(f"  {key:<14} {mean_sd([s['exact_match'].get(key) for s in seeds])}")
    for method in ("ppo", "grpo"):
        reach = [s["reach"][method] for s in seeds]
        lines.append(f"{method}: outcome run's final training reward {mean_sd([r['outcome_final'] for r in reach])} "
                     f"(mean of its last 3 logged steps, of {reach[0]['outcome_steps']}); the process run reached it at steps "
                     f"{[r['process_steps_to_reach'] for r in reach]}")
    print("\n".join(lines))
    summary = {"seeds": per_seed}
    (Path(args.output_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
