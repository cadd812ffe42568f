"""The command line: `alignkit COMMAND --config run.yaml [--key value ...]`."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "pretrain": ("alignkit.train.pretrain", "causal LM pretraining on raw text, with packing"),
    "sft": ("alignkit.train.sft", "supervised fine-tuning, loss on responses only"),
    "rm": ("alignkit.train.reward", "Bradley-Terry reward model on preference or ranking data"),
    "dpo": ("alignkit.train.dpo", "direct preference optimisation (DPO, IPO, conservative DPO)"),
    "kto": ("alignkit.train.kto", "Kahneman-Tversky optimisation on thumbs-up / thumbs-down data"),
    "ppo": ("alignkit.train.ppo", "PPO with a critic and a per-token KL penalty to the reference"),
    "grpo": ("alignkit.train.grpo", "GRPO: G samples per prompt, group-normalised advantages, KL to the reference"),
    "rloo": ("alignkit.train.grpo:main_rloo", "REINFORCE with a leave-one-out baseline"),
    "bon": ("alignkit.train.bon", "rejection sampling (iterative SFT): N samples, keep the best, fine-tune, repeat"),
    "eval": ("alignkit.evaluate.policies", "policies side by side: gold/proxy reward, KL, win rate, diversity, Elo/BT arena"),
    "rl": ("alignkit.rl.cli", "RL from first principles: the cat gridworld, exact planning, Q-learning to PPO"),
    "demo": ("alignkit.pipeline", "the built-in recipe end to end on a CPU"),
    "app": ("alignkit.app.server", "web app: labelling campaigns, a blind arena, leaderboard, admin (docs/app.md)"),
    "export": ("alignkit.app.export", "a campaign's judgements as a dpo / rm / kto / ranking training file"),
}
# Commands whose modules need the `app` extra (FastAPI, SQLAlchemy, ...).
NEEDS_APP_EXTRA = {"app", "export"}

USAGE = "usage: alignkit COMMAND [--config run.yaml] [--key value ...]\n\ncommands:\n" + "\n".join(
    f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()
) + "\n\n`alignkit COMMAND --help` lists every key of that command."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] not in COMMANDS:
        print(f"alignkit: unknown command '{argv[0]}'\n\n{USAGE}", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    from alignkit.config import ConfigError
    from alignkit.data import DataError
    from alignkit.train.loop import TrainingError

    hf_logging.disable_progress_bar()  # per-file load/save bars; alignkit draws one bar per run

    module, _, function = COMMANDS[argv[0]][0].partition(":")
    try:
        loaded = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if argv[0] not in NEEDS_APP_EXTRA:
            raise
        print(f"alignkit {argv[0]}: needs the app extra ({e.name} is missing): pip install 'alignkit[app]'",
              file=sys.stderr)
        return 1
    try:
        getattr(loaded, function or "main")(argv[1:])
    except (ConfigError, DataError, TrainingError) as e:
        print(f"alignkit {argv[0]}: error: {e}", file=sys.stderr)
        return 1
    finally:
        end_process_group()
    return 0


def end_process_group() -> None:
    """Tear down torch.distributed before the interpreter exits: a gloo group left alive aborts
    each process at exit ("terminate called without an active exception", exit -6)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
