"""The command line: `alignkit COMMAND --config run.yaml [--key value ...]`."""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "pretrain": ("alignkit.train.pretrain", "causal LM pretraining on raw text, with packing"),
    "sft": ("alignkit.train.sft", "supervised fine-tuning, loss on responses only"),
    "rm": ("alignkit.train.reward", "Bradley-Terry reward model on preference or ranking data"),
    "prm": ("alignkit.train.prm", "process reward model: a score per reasoning step, read at each step's separator"),
    "dpo": ("alignkit.train.dpo", "direct preference optimisation and the preference-loss family (IPO, SimPO, ORPO, ...)"),
    "kto": ("alignkit.train.kto", "Kahneman-Tversky optimisation on thumbs-up / thumbs-down data"),
    "ppo": ("alignkit.train.ppo", "PPO with a critic and a per-token KL penalty to the reference"),
    "grpo": ("alignkit.train.grpo", "GRPO: G samples per prompt, group-normalised advantages, KL to the reference"),
    "rloo": ("alignkit.train.grpo:main_rloo", "REINFORCE with a leave-one-out baseline"),
    "bon": ("alignkit.train.bon", "rejection sampling (iterative SFT): N samples, keep the best, fine-tune, repeat"),
    "iterative-dpo": ("alignkit.train.iterative_dpo", "iterative DPO: pairs sampled from the current policy, labelled by a reward, DPO, repeat"),
    "distill": ("alignkit.train.distill", "on-policy distillation: a student learns a teacher's token distributions"),
    "eval": ("alignkit.evaluate.policies", "policies side by side: gold/proxy reward, KL, win rate, diversity, Elo/BT arena"),
    "rl": ("alignkit.rl.cli", "RL from first principles: the cat gridworld, exact planning, Q-learning to PPO"),
    "demo": ("alignkit.pipeline", "the built-in recipe end to end on a CPU"),
    "app": ("alignkit.app.server", "web app: labelling campaigns, a blind arena, leaderboard, admin (docs/app.md)"),
    "export": ("alignkit.app.export", "a campaign's judgements as a dpo / rm / kto / ranking training file"),
    "label-ai": ("alignkit.feedback.rlaif", "RLAIF: an AI judge labels responses into dpo / ranking / kto files"),
    "cai": ("alignkit.feedback.cai", "Constitutional AI: critique and revise against principles, SFT, AI preferences, DPO"),
    "self-instruct": ("alignkit.feedback.self_instruct", "Self-Instruct: a teacher model writes instruction data (Alpaca rows) from seed tasks"),
}
# Commands whose modules need the `app` extra (FastAPI, SQLAlchemy, ...).
NEEDS_APP_EXTRA = {"app", "export"}

USAGE = "usage: alignkit COMMAND [--config run.yaml] [--key value ...]\n\ncommands:\n" + "\n".join(
    f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()
) + "\n\n`alignkit COMMAND --help` lists every key of that command."


def _one_line(command: str, e: BaseException) -> str:
    """`e`'s message on one line, without a repeated `COMMAND: ` prefix."""
    if isinstance(e, OSError) and e.strerror and e.filename:
        message = f"{e.filename}: {e.strerror}"
    elif len(getattr(e, "errors", ())) > 1 or "\nthese rows look like" in str(e):
        message = str(e)  # a DataError's block: one bad row per line, then the hint
    else:
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return message.removeprefix(f"{command}: ") or type(e).__name__


def _raised_by_alignkit(e: BaseException) -> bool:
    """Whether `e` was raised by alignkit's own code (its checks), not by a library it calls."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith("alignkit")


def _interrupted(command: str) -> str:
    from alignkit import config

    cfg = config.last_parsed
    line = f"alignkit {command}: interrupted"
    if getattr(cfg, "output_dir", "") and getattr(cfg, "save_steps", 0):
        line += f"; --resume auto continues from the latest checkpoint in {cfg.output_dir}"
    return line


def main(argv: list[str] | None = None) -> int:
    """Run `alignkit COMMAND ...`; every user mistake ends in one `error:` line and a non-zero code.

    ALIGNKIT_DEBUG=1 re-raises instead, with the traceback.
    """
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        from alignkit import __version__

        print(f"alignkit {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"alignkit: unknown command '{argv[0]}'\n\n{USAGE}", file=sys.stderr)
        return 2
    command = argv[0]
    from alignkit.models import card

    card.COMMAND = ["alignkit", *argv]  # the model cards record how each model was made
    debug = os.environ.get("ALIGNKIT_DEBUG", "") not in ("", "0")
    module, _, function = COMMANDS[command][0].partition(":")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-file load/save bars; alignkit draws one bar per run
        try:
            loaded = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if command not in NEEDS_APP_EXTRA:
                raise
            print(f"alignkit {command}: needs the app extra ({e.name} is missing): pip install 'alignkit[app]'",
                  file=sys.stderr)
            return 1
        getattr(loaded, function or "main")(argv[1:])
        meet_processes()
    except KeyboardInterrupt:
        close_bars()
        if debug:
            raise
        print(_interrupted(command), file=sys.stderr)
        return 130
    except Exception as e:
        close_bars()
        if debug:
            raise
        from alignkit.config import ConfigError
        from alignkit.data import DataError
        from alignkit.feedback.endpoint import FeedbackError
        from alignkit.models.load import ModelNotFoundError
        from alignkit.rollout.rewards import RewardError
        from alignkit.train.loop import TrainingError

        known = (ConfigError, DataError, TrainingError, RewardError, ModelNotFoundError, FeedbackError, OSError)
        if isinstance(e, known) or (isinstance(e, ValueError) and _raised_by_alignkit(e)):
            print(f"alignkit {command}: error: {_one_line(command, e)}", file=sys.stderr)
        else:
            print(f"alignkit {command}: error: {type(e).__name__}: {_one_line(command, e)} "
                  "(ALIGNKIT_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    finally:
        end_process_group()
    return 0


def close_bars() -> None:
    if "alignkit.progress" in sys.modules:
        sys.modules["alignkit.progress"].close_all()


def meet_processes() -> None:
    """After a run that ended well on every process: wait for the others before the teardown, so that
    none destroys its group while a peer still works (the main process writing its summary). One
    process of a sharded run aborted at exit once on CI (-6, not reproduced in 16 runs here). Not
    after an error: the others may never come."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def end_process_group() -> None:
    """Tear down torch.distributed before the interpreter exits: a gloo group left alive aborts
    each process at exit ("terminate called without an active exception", exit -6)."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # a sharded model's FSDP state and device mesh hold the groups and their finished works: freed
        # now, not during the interpreter's finalisation, where gloo's threads would abort the process
        gc.collect()
        dist.destroy_process_group()
