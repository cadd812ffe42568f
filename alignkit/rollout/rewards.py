"""Reward sources behind one interface: `f(prompts, completions, **fields) -> list[float]`.

    reward: runs/rm                               # a reward-model checkpoint (alignkit rm)
    reward: runs/prm                              # a process reward model (alignkit prm): its steps' min score
    reward: alignkit.tasks.arithmetic:exact_match  # a Python callable `module:function`
    reward: [runs/rm, mypkg.rewards:length]        # several, summed with `reward_weights`

Extra fields of a prompt record (e.g. `answer`) reach callables as keyword lists,
one value per completion. A reward that is None, NaN or raises is an error naming
the function and the prompt, unless the caller masks such completions instead.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import torch


class RewardError(RuntimeError):
    pass


def load_reward_fn(spec: str, device=None, dtype: str = "float32") -> Callable:
    """A reward function from a reward-model directory (placed on `device`, stored as
    `dtype`) or a `module:function` name."""
    if Path(spec).is_dir():
        from alignkit.models.process_reward import ProcessRewardModel, is_process_reward_model
        from alignkit.models.reward import RewardModel

        model = (ProcessRewardModel if is_process_reward_model(spec) else RewardModel).load(spec, device=device, dtype=dtype)
        return _named(lambda prompts, completions, **fields: model.score(prompts, completions), spec)
    if ":" not in spec:
        raise RewardError(f"reward '{spec}' is neither a reward-model directory nor a 'module:function' name")
    module_name, _, attr = spec.partition(":")
    _current_directory_last()
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise RewardError(f"reward '{spec}': cannot import it ({e})") from None
    if not callable(fn):
        raise RewardError(f"reward '{spec}' is not callable")
    return _named(fn, spec)


def check_reward_spec(spec: str) -> None:
    """A RewardError naming `spec` if it is neither a model folder nor an importable callable;
    cheap (a `module:function` is imported, a folder only looked at), run before any loading."""
    if Path(spec).is_dir():
        from alignkit.models.load import check_model_path

        check_model_path(spec)
    else:
        load_reward_fn(spec)


def _current_directory_last() -> None:
    """Reward modules may live in the current directory, but a file there must not shadow
    an installed library: the directory goes to the END of sys.path (`python -m` puts it first)."""
    cwd = os.getcwd()
    sys.path[:] = [p for p in sys.path if p not in ("", ".", cwd)] + [cwd]


def _named(fn: Callable, name: str) -> Callable:
    def call(prompts, completions, **fields):
        return fn(prompts, completions, **fields)
    call.reward_name = name
    return call


def penalised_ensemble(values: torch.Tensor, weights: torch.Tensor, penalty: float) -> torch.Tensor:
    """An ensemble's reward, lowered where its members disagree (uncertainty-weighted optimisation,
    Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization"):

        r = sum_k w_k r_k - lambda * sqrt(1/K sum_k (r_k - mean_k r_k)^2)

    values [K, N]: member k's reward of completion n; weights [K]; returns [N]. The spread is
    the members' population standard deviation, unweighted: how much they disagree."""
    return (weights[:, None] * values).sum(0) - penalty * values.std(0, correction=0)


class PenalisedEnsemble:
    """Reward sources (e.g. reward models trained from different seeds) as one source whose
    reward is `penalised_ensemble` of theirs; a member's None / NaN makes the ensemble's NaN."""

    def __init__(self, members: list[Callable], weights: list[float], penalty: float):
        self.members, self.weights, self.penalty = members, torch.tensor(weights, dtype=torch.float64), penalty
        names = [getattr(f, "reward_name", getattr(f, "__name__", repr(f))) for f in members]
        self.reward_name = f"ensemble({', '.join(names)}; -{penalty:g} std)"

    def __call__(self, prompts, completions, **fields) -> list[float]:
        values = [[math.nan if v is None else float(v) for v in f(prompts, completions, **fields)]
                  for f in self.members]
        for f, v in zip(self.members, values):
            if len(v) != len(completions):
                name = getattr(f, "reward_name", repr(f))
                raise RewardError(f"reward '{name}' returned {len(v)} values for {len(completions)} completions")
        return penalised_ensemble(torch.tensor(values, dtype=torch.float64), self.weights, self.penalty).tolist()


def _call(fn: Callable, timeout: float | None, *args, **kwargs):
    if timeout is None:
        return fn(*args, **kwargs)
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(fn, *args, **kwargs).result(timeout=timeout)
    except FutureTimeout:
        raise TimeoutError(f"no result within {timeout:g} s") from None
    finally:
        pool.shutdown(wait=False)  # a stuck call is abandoned, not waited for


def score(reward_fns: list[Callable], weights: list[float], prompts: list, completions: list[str],
          fields: dict[str, list], on_error: str = "raise",
          timeout: float | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """sum_k w_k f_k(prompt, completion) per completion, each completion scored once.

    Returns (rewards [N] float32, valid [N] bool, per-function means). With
    on_error="raise" a None / NaN / exception names the function and the prompt;
    with "mask" that completion is marked invalid (reward 0) and training goes on.
    """
    n = len(completions)
    total = torch.zeros(n, dtype=torch.float32)
    valid = torch.ones(n, dtype=torch.bool)
    means = {}
    for fn, w in zip(reward_fns, weights):
        name = getattr(fn, "reward_name", getattr(fn, "__name__", repr(fn)))
        try:
            values = list(_call(fn, timeout, prompts, completions, **fields))
        except Exception as e:  # noqa: BLE001 - a user's reward function may raise anything
            if on_error == "raise":
                raise RewardError(f"reward '{name}' raised {type(e).__name__}: {e} (first prompt: {prompts[0]!r})") from e
            valid[:] = False
            continue
        if len(values) != n:
            raise RewardError(f"reward '{name}' returned {len(values)} values for {n} completions")
        for i, v in enumerate(values):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok:
                if on_error == "raise":
                    raise RewardError(f"reward '{name}' returned {v!r} for prompt {prompts[i]!r}, "
                                      f"completion {completions[i]!r}; set reward_on_error=mask to skip such completions")
                valid[i] = False
            else:
                total[i] += w * float(v)
        good = [float(v) for v, ok in zip(values, valid.tolist()) if ok]
        means[name] = sum(good) / max(len(good), 1)
    return torch.where(valid, total, torch.zeros_like(total)), valid, means


def score_rollout(rollout, tokenizer, reward_fns: list[Callable], weights: list[float], prompts: list,
                  fields: dict[str, list], n: int = 1, *, on_error: str = "raise", timeout: float | None = None,
                  missing_eos_penalty: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, dict[str, float], list[str]]:
    """Decode a rollout's completions and score them: `score(...)` minus missing_eos_penalty
    for each completion that hit max_new_tokens without EOS.

    `prompts` and `fields` hold one entry per prompt; the rollout holds `n` completions per
    prompt, consecutive. Returns (rewards [N], valid [N], per-function means, texts), on CPU.
    """
    ids = rollout.completion_ids.masked_fill(rollout.completion_mask == 0, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(ids.cpu(), skip_special_tokens=True)
    repeated = [p for p in prompts for _ in range(n)]
    fields = {k: [v for v in values for _ in range(n)] for k, values in fields.items()}
    rewards, valid, per_source = score(reward_fns, weights, repeated, texts, fields, on_error, timeout)
    rewards = rewards - missing_eos_penalty * (~rollout.ended.cpu()).float()
    return rewards, valid, per_source, texts
