"""Direct Preference Optimization (Rafailov et al. 2023) and the preference-loss family.

    alignkit dpo --model runs/demo/sft --data prefs.jsonl --beta 0.1 --max_steps 200
    alignkit dpo --config dpo.yaml --loss_type ipo
    alignkit dpo --config dpo.yaml --loss_type simpo --beta 2.0 --simpo_gamma 1.0   # no reference model
    alignkit dpo --config dpo.yaml --loss_type sigmoid sft --loss_weights 1.0 0.2  # a mixture (MPO)

With h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)], the default loss
is -log sigmoid(beta h); `loss_type` picks any of alignkit/losses/preference.py's registry
(TRL's names), and a loss without a reference (simpo, cpo, orpo, sft) loads none. Chosen and rejected responses go
through ONE forward pass, by default as one row per pair, [prompt | chosen | rejected],
with a mask that hides chosen from rejected: the prompt is computed once (`share_prompt`;
the reference uses the same layout). The reference is `ref_model` (default: the starting
`model`) or, with LoRA, the policy with its adapters disabled; `precompute_ref` computes
its log-probs once before training, so only the policy stays in memory (on a run that
is not resumed, the policy before its first update gives them: no copy is ever loaded).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields

import torch

from alignkit.config import require
from alignkit.losses.preference import PREFERENCE_LOSSES, PairLogps, check_loss_types, needs_reference, preference_loss
from alignkit.models.forward import sequence_logprobs
from alignkit.train.common import load_train_eval, print_summary, say
from alignkit.train.loop import TrainConfig, TrainResult, load_trainable_model, make_accelerator, resolve_resume, train
from alignkit.train.reference import make_reference, precompute_reference, reference_sequence_logprobs


@dataclass
class PreferenceLossKeys:
    """The keys of the preference-loss family (alignkit/losses/preference.py), shared by dpo and iterative-dpo."""

    beta: float = 0.1
    """Strength of the implicit KL constraint to the reference (larger = closer to it); ORPO's lambda."""
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    """Loss(es) by TRL's names: sigmoid (DPO), hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot,
    aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm; no reference: simpo, cpo, orpo, sft. Several: a mixture."""
    loss_weights: list[float] = field(default_factory=list)
    """Weight of each `loss_type` in a mixture (empty: 1 each), as MPO."""
    label_smoothing: float = 0.0
    """Assumed fraction of flipped labels: conservative DPO (sigmoid, sigmoid_norm, aot*), robust DPO, EXO's eps."""
    rpo_alpha: float = 0.0
    """Weight of the NLL of the chosen response (per token) added to the loss: RPO (0: none)."""
    discopop_tau: float = 0.05
    """DiscoPOP's temperature of the log-ratio modulation."""
    simpo_gamma: float = 0.5
    """SimPO's target margin gamma on the length-normalised log-probs."""
    cpo_alpha: float = 1.0
    """CPO's weight of the behaviour-cloning NLL on the chosen response."""

    def __post_init__(self):
        if isinstance(self.loss_type, str):  # `loss_type: ipo` in YAML or from Python: one loss
            self.loss_type = [self.loss_type]

    def check_loss_keys(self) -> None:
        """A ConfigError for an unknown loss name, and for a loss option that no chosen loss reads."""
        from alignkit.config import ConfigError

        try:
            specs = check_loss_types(self.loss_type, self.loss_weights)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        read = {o for s in specs for o in s.options}
        defaults = {f.name: f.default for f in fields(PreferenceLossKeys) if f.name in (
            "label_smoothing", "discopop_tau", "simpo_gamma", "cpo_alpha")}
        for key, default in defaults.items():
            if getattr(self, key) != default and key not in read:
                users = [n for n, s in PREFERENCE_LOSSES.items() if key in s.options]
                raise ConfigError(f"{key}={getattr(self, key)} is read by no loss in loss_type {self.loss_type}; "
                                  f"it applies to {', '.join(users)}")


@dataclass
class DPOConfig(PreferenceLossKeys, TrainConfig):
    """Preference optimisation on prompt/chosen/rejected data, no reward model."""

    lr: float = 1e-5
    """Peak learning rate (AdamW)."""
    ref_model: str = ""
    """Reference model (empty: the starting `model`; with LoRA, the policy with adapters disabled)."""
    precompute_ref: bool = False
    """Compute reference log-probs once before training, then free the reference model."""
    share_prompt: bool = True
    """One row per pair, [prompt | chosen | rejected]: the prompt goes through the model once."""

    def validate(self) -> None:
        from alignkit.config import ConfigError

        super().validate()
        self.check_loss_keys()
        if not needs_reference(self.loss_type) and (self.ref_model or self.precompute_ref):
            raise ConfigError(f"loss_type {self.loss_type} uses no reference model: ref_model / precompute_ref "
                              "would do nothing")


def make_dpo_step(cfg: PreferenceLossKeys, reference, state: dict | None = None):
    """The loss of one micro-batch of pairs (rows chosen, rejected, chosen, ...). `reference` is
    None for the reference-free losses. `state` holds BCO's running mean of the implicit
    rewards (bco_delta), updated here after each micro-batch and checkpointed by the loop."""
    uses_ref = needs_reference(cfg.loss_type)
    state = state if state is not None else {}

    def dpo_step(model, batch):
        logps, n_tokens = sequence_logprobs(model, batch)
        ref = None
        if uses_ref:
            ref = batch["ref_logps"] if "ref_logps" in batch else reference_sequence_logprobs(reference, model, batch)
        pairs = PairLogps(logps[0::2], logps[1::2], n_tokens[0::2], n_tokens[1::2],
                          ref[0::2] if ref is not None else None, ref[1::2] if ref is not None else None)
        losses, metrics = preference_loss(
            cfg.loss_type, pairs, cfg.beta, cfg.loss_weights, cfg.rpo_alpha, label_smoothing=cfg.label_smoothing,
            discopop_tau=cfg.discopop_tau, simpo_gamma=cfg.simpo_gamma, cpo_alpha=cfg.cpo_alpha,
            bco_delta=state.get("bco_delta", 0.0))
        if "bco_pair" in cfg.loss_type:  # the running mean of every implicit reward seen so far
            rewards = torch.cat([metrics["rewards/chosen"], metrics["rewards/rejected"]])
            n = state.get("bco_count", 0)
            state["bco_delta"] = (state.get("bco_delta", 0.0) * n + float(rewards.sum())) / (n + len(rewards))
            state["bco_count"] = n + len(rewards)
        return losses.sum(), {k: v.sum() for k, v in metrics.items()}
    return dpo_step


def pair_count(batch) -> int:
    return len(batch["ids"])


def run(cfg: DPOConfig) -> TrainResult:
    from alignkit.data import pad_groups, tokenize_responses
    from alignkit.data.tokenize import pad_shared_prompt
    from alignkit.models.load import load_tokenizer

    require(cfg, "model", "data")
    train_records, eval_records = load_train_eval(cfg, "preference")
    resume_from = resolve_resume(cfg)
    tokenizer = load_tokenizer(str(resume_from) if resume_from else cfg.model)
    examples, report = tokenize_responses(train_records, tokenizer, cfg.max_length, cfg.truncation)
    report.check_not_all_truncated(cfg.data, cfg.max_length)
    model = load_trainable_model(cfg, resume_from)
    eval_examples, _ = tokenize_responses(eval_records, tokenizer, cfg.max_length, cfg.truncation)
    pad = pad_shared_prompt if cfg.share_prompt else pad_groups
    collate = lambda b: pad(b, tokenizer.pad_token_id)  # noqa: E731

    accelerator = make_accelerator(cfg, "dpo")
    uses_ref = needs_reference(cfg.loss_type)
    reference = make_reference(cfg.model, cfg.ref_model, cfg.lora_r > 0, accelerator.device, accelerator.autocast,
                               before_first_update=cfg.precompute_ref and resume_from is None) if uses_ref else None
    if cfg.precompute_ref and uses_ref:
        model.to(accelerator.device)
        for part in (examples, eval_examples):  # no gradients kept: 4x the training batch fits
            precompute_reference(reference, model, part, collate, 4 * cfg.batch_size, accelerator.device)
        reference = None  # drops the reference model: only the policy stays in memory
    losses = " + ".join(f"{w:g} {n}" for n, w in zip(cfg.loss_type, cfg.loss_weights or [1.0] * len(cfg.loss_type)))
    losses += f" + {cfg.rpo_alpha:g} nll (RPO)" if cfg.rpo_alpha else ""
    where = ("precomputed" if cfg.precompute_ref else "on the fly") if uses_ref else "none (a reference-free loss)"
    say(f"dpo: {len(examples)} pairs, beta {cfg.beta}, loss {losses}, reference {where}; {report}")
    state = {"bco_delta": 0.0, "bco_count": 0} if "bco_pair" in cfg.loss_type else None
    result = train(cfg, model, tokenizer, examples, make_dpo_step(cfg, reference, state), pair_count, collate,
                   name="dpo", eval_examples=eval_examples, resume_from=resume_from, accelerator=accelerator,
                   state=state)
    print_summary("dpo", result, [str(report)])
    return result


def main(argv: list[str] | None = None) -> TrainResult:
    from alignkit.config import parse_config

    return run(parse_config(DPOConfig, sys.argv[1:] if argv is None else argv, prog="alignkit dpo"))
