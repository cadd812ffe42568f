"""The preference-loss family: one registry of pairwise losses on sequence log-probs.

Every loss reads a `PairLogps`: the summed response log-probs [B] of the chosen (y_w) and
rejected (y_l) completions under the policy (and, for the losses with a reference, under
pi_ref), and their token counts. With

    a = log pi(y_w) - log pi_ref(y_w)      b = log pi(y_l) - log pi_ref(y_l)      h = a - b

a loss returns per-pair losses [B]. `preference_loss` looks names up in PREFERENCE_LOSSES
(an unknown name is an error listing the valid ones), mixes several with weights (MPO),
adds RPO's NLL term on the chosen response, and returns the implicit-reward metrics.

A new loss is a function `f(p: PairLogps, beta, **options) -> losses [B]` plus an entry in
PREFERENCE_LOSSES saying whether it needs a reference, which options it reads and what it
optimises (docs/rl.md's exact-optimum table measures the ones that target pi*).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class PairLogps:
    """Summed response log-probs [B] of each pair, their response token counts [B], and the
    reference's log-probs (None for the reference-free losses)."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None

    def __post_init__(self):
        tensors = [t for t in (self.chosen, self.rejected, self.chosen_tokens, self.rejected_tokens,
                               self.ref_chosen, self.ref_rejected) if t is not None]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:  # [B] against [B, 1] would broadcast to [B, B]
            raise ValueError(f"log-prob tensors must share one shape [B], got {sorted(shapes)}")

    def ratios(self) -> tuple[Tensor, Tensor]:
        """(a, b): the log-ratios to the reference of chosen and rejected."""
        if self.ref_chosen is None or self.ref_rejected is None:
            raise ValueError("this loss needs the reference's log-probs")
        return self.chosen - self.ref_chosen, self.rejected - self.ref_rejected

    def mean_logps(self) -> tuple[Tensor, Tensor]:
        """Log-probs per response token (length-normalised): log pi(y) / |y|."""
        return self.chosen / self.chosen_tokens.clamp(min=1), self.rejected / self.rejected_tokens.clamp(min=1)

    def chosen_nll(self) -> Tensor:
        """-log pi(y_w) / |y_w|: the SFT loss on the chosen response, per token."""
        return -self.mean_logps()[0]


def _smoothed_sigmoid(z: Tensor, label_smoothing: float) -> Tensor:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z), 0 <= eps < 1/2."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    losses = -(1.0 - label_smoothing) * F.logsigmoid(z)
    return losses - label_smoothing * F.logsigmoid(-z) if label_smoothing else losses


def sigmoid_loss(p: PairLogps, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).

    eps = 0: DPO (Rafailov et al. 2023), the Bradley-Terry loss on the implicit rewards
    beta log(pi / pi_ref); its optimum is pi* ∝ pi_ref exp(r / beta). eps > 0: conservative
    DPO (Mitchell 2023), labels taken as flipped with probability eps, h kept finite."""
    a, b = p.ratios()
    return _smoothed_sigmoid(beta * (a - b), label_smoothing)


def sigmoid_norm_loss(p: PairLogps, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """The sigmoid loss on length-normalised log-ratios (Tülu 3's length-normalised DPO):
    h_bar = (log pi(y_w) - log pi_ref(y_w)) / |y_w| - (log pi(y_l) - log pi_ref(y_l)) / |y_l|,
    L = -(1 - eps) log sigmoid(beta h_bar) - eps log sigmoid(-beta h_bar)."""
    a, b = p.ratios()
    return _smoothed_sigmoid(beta * (a / p.chosen_tokens.clamp(min=1) - b / p.rejected_tokens.clamp(min=1)),
                             label_smoothing)


def hinge_loss(p: PairLogps, beta: float) -> Tensor:
    """L = max(0, 1 - beta h)   (SLiC, Zhao et al. 2023): a margin, then no gradient."""
    a, b = p.ratios()
    return torch.relu(1.0 - beta * (a - b))


def ipo_loss(p: PairLogps, beta: float) -> Tensor:
    """L = (h_bar - 1 / (2 beta))^2   (IPO, Azar et al. 2023), on length-normalised log-ratios
    h_bar = a / |y_w| - b / |y_l| (as the paper and TRL): h is regressed onto a finite target
    instead of pushed to infinity, so deterministic preferences do not overfit."""
    if beta <= 0:
        raise ValueError(f"IPO needs beta > 0 (its target is 1 / (2 beta)), got {beta}")
    a, b = p.ratios()
    h = a / p.chosen_tokens.clamp(min=1) - b / p.rejected_tokens.clamp(min=1)
    return (h - 1.0 / (2.0 * beta)) ** 2


def exo_pair_loss(p: PairLogps, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """EXO (Ji et al. 2024), the pairwise form: the reverse KL from the policy's pair
    probability sigmoid(beta h) to the smoothed label (1 - eps, eps),

        L = sigmoid(beta h) (log sigmoid(beta h) - log(1 - eps)) + sigmoid(-beta h) (log sigmoid(-beta h) - log eps)

    with eps = 1e-3 when label_smoothing is 0 (the label must not be exactly 0 or 1)."""
    eps = label_smoothing or 1e-3
    if not 0.0 < eps < 1.0:
        raise ValueError(f"exo_pair needs label_smoothing in [0, 1), got {label_smoothing}")
    a, b = p.ratios()
    z = beta * (a - b)
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - eps)) + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))


def nca_pair_loss(p: PairLogps, beta: float) -> Tensor:
    """NCA (Chen et al. 2024), pairwise: L = -log sigmoid(beta a) - 1/2 log sigmoid(-beta a)
    - 1/2 log sigmoid(-beta b). It scores each response's own log-ratio, not only their
    difference, so the chosen response's likelihood is kept from falling."""
    a, b = p.ratios()
    return -F.logsigmoid(beta * a) - 0.5 * F.logsigmoid(-beta * a) - 0.5 * F.logsigmoid(-beta * b)


def robust_loss(p: PairLogps, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024): with eps the rate at which labels are flipped,

        L = ((1 - eps) (-log sigmoid(beta h)) - eps (-log sigmoid(-beta h))) / (1 - 2 eps),

    an unbiased estimate of the clean-label DPO loss, so its optimum is DPO's. 0 <= eps < 1/2."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust needs label_smoothing in [0, 0.5), got {label_smoothing}")
    a, b = p.ratios()
    z = beta * (a - b)
    return (-(1 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) / (1 - 2 * label_smoothing)


def bco_pair_loss(p: PairLogps, beta: float, bco_delta: float = 0.0) -> Tensor:
    """BCO (Jung et al. 2024) on pairs: each response classified on its own implicit reward,

        L = -log sigmoid(beta a - delta) - log sigmoid(-(beta b - delta)),

    delta the running mean of the implicit rewards beta a, beta b (the trainer keeps it)."""
    a, b = p.ratios()
    return -F.logsigmoid(beta * a - bco_delta) - F.logsigmoid(-(beta * b - bco_delta))


def sppo_hard_loss(p: PairLogps, beta: float) -> Tensor:
    """SPPO with hard labels (Wu et al. 2024): L = (a - 1/(2 beta))^2 + (b + 1/(2 beta))^2,
    each log-ratio regressed onto its own target: chosen up by 1/(2 beta), rejected down."""
    a, b = p.ratios()
    return (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2


def aot_loss(p: PairLogps, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """AOT (Melnyk et al. 2024), paired: the batch's policy margins log pi(y_w) - log pi(y_l)
    and reference margins, each sorted; delta = sorted(policy) - sorted(reference) enters the
    sigmoid loss: -(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta). The
    sorted comparison asks the policy's margins to dominate the reference's in distribution
    (first-order stochastic dominance), not pair by pair."""
    if p.ref_chosen is None or p.ref_rejected is None:
        raise ValueError("aot needs the reference's log-probs")
    policy, _ = torch.sort(p.chosen - p.rejected, dim=0)
    ref, _ = torch.sort(p.ref_chosen - p.ref_rejected, dim=0)
    return _smoothed_sigmoid(beta * (policy - ref), label_smoothing)


def aot_unpaired_loss(p: PairLogps, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """AOT, unpaired: delta = sorted(a) - sorted(b), the chosen log-ratios against the rejected
    ones in distribution (the pairing is not used), in the same smoothed sigmoid loss."""
    a, b = p.ratios()
    return _smoothed_sigmoid(beta * (torch.sort(a, dim=0)[0] - torch.sort(b, dim=0)[0]), label_smoothing)


def apo_zero_loss(p: PairLogps, beta: float) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024): L = (1 - sigmoid(beta a)) + sigmoid(beta b):
    chosen likelihood up and rejected down, each on its own (for chosen better than the model)."""
    a, b = p.ratios()
    return (1 - torch.sigmoid(beta * a)) + torch.sigmoid(beta * b)


def apo_down_loss(p: PairLogps, beta: float) -> Tensor:
    """APO-down: L = sigmoid(beta a) + (1 - sigmoid(beta (a - b))): both likelihoods down,
    rejected more (for chosen responses worse than the model's own)."""
    a, b = p.ratios()
    return torch.sigmoid(beta * a) + (1 - torch.sigmoid(beta * (a - b)))


def discopop_loss(p: PairLogps, beta: float, discopop_tau: float = 0.05) -> Tensor:
    """DiscoPOP (Chan et al. 2024), the log-ratio modulated loss: with z = beta h and
    m = sigmoid(z / tau),  L = (1 - m) (-log sigmoid(z)) + m exp(-z)."""
    a, b = p.ratios()
    z = beta * (a - b)
    m = torch.sigmoid(z / discopop_tau)
    return (1 - m) * -F.logsigmoid(z) + m * torch.exp(-z)


def simpo_loss(p: PairLogps, beta: float, simpo_gamma: float = 0.5) -> Tensor:
    """SimPO (Meng et al. 2024), no reference: L = -log sigmoid(beta (log pi(y_w)/|y_w| -
    log pi(y_l)/|y_l|) - gamma), the length-normalised margin asked to exceed gamma."""
    mean_w, mean_l = p.mean_logps()
    return -F.logsigmoid(beta * (mean_w - mean_l) - simpo_gamma)


def cpo_loss(p: PairLogps, beta: float, cpo_alpha: float = 1.0) -> Tensor:
    """CPO (Xu et al. 2024), no reference: L = -log sigmoid(beta (log pi(y_w) - log pi(y_l)))
    + alpha NLL(y_w), the DPO loss with pi_ref uniform plus behaviour cloning of the chosen."""
    return -F.logsigmoid(beta * (p.chosen - p.rejected)) + cpo_alpha * p.chosen_nll()


def orpo_loss(p: PairLogps, beta: float) -> Tensor:
    """ORPO (Hong et al. 2024), no reference: L = NLL(y_w) - lambda log sigmoid(log odds(y_w)
    - log odds(y_l)), odds(y) = P / (1 - P) with P = exp(log pi(y) / |y|) (the mean per-token
    likelihood) and lambda = beta (TRL's ORPO reads beta as lambda too)."""
    mean_w, mean_l = p.mean_logps()
    # log(1 - e^m) for m < 0, stable: log(-expm1(m))
    log_odds = (mean_w - torch.log(-torch.expm1(mean_w))) - (mean_l - torch.log(-torch.expm1(mean_l)))
    return p.chosen_nll() - beta * F.logsigmoid(log_odds)


def sft_loss_on_chosen(p: PairLogps, beta: float) -> Tensor:
    """L = -log pi(y_w) / |y_w|: supervised fine-tuning on the chosen response (MPO's "sft"
    term; `rpo_alpha` adds it to any loss). beta is unused."""
    return p.chosen_nll()


@dataclass(frozen=True)
class LossSpec:
    fn: Callable[..., Tensor]
    reference: bool
    """Whether the loss reads pi_ref's log-probs (False: no reference model is loaded)."""
    options: tuple[str, ...]
    """The keyword options it reads (a set option no chosen loss reads is refused)."""
    optimum: str
    """What it optimises, against the KL-regularised optimum pi* ∝ pi_ref exp(r / beta)."""


_EPS = ("label_smoothing",)
PREFERENCE_LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(sigmoid_loss, True, _EPS, "pi* under Bradley-Terry preferences (eps > 0: a flattened pi*)"),
    "hinge": LossSpec(hinge_loss, True, (), "a margin beta h >= 1 on each pair; not pi*"),
    "ipo": LossSpec(ipo_loss, True, (), "the IPO optimum: per-token margins at 1/(2 beta), preference probabilities "
                                        "not passed through a log-odds; not pi*"),
    "exo_pair": LossSpec(exo_pair_loss, True, _EPS, "pi* (the reverse KL to it, mode-seeking), in the limit eps -> 0"),
    "nca_pair": LossSpec(nca_pair_loss, True, (), "absolute log-ratios (chosen likelihood held up); not pi*"),
    "robust": LossSpec(robust_loss, True, _EPS, "pi* of the clean preferences when labels flip at rate eps"),
    "bco_pair": LossSpec(bco_pair_loss, True, ("bco_delta",), "a classifier of each response's implicit reward "
                                                             "against a running mean; not pi*"),
    "sppo_hard": LossSpec(sppo_hard_loss, True, (), "each log-ratio at +-1/(2 beta); not pi*"),
    "aot": LossSpec(aot_loss, True, _EPS, "policy margins that dominate the reference's in distribution; not pi*"),
    "aot_unpaired": LossSpec(aot_unpaired_loss, True, _EPS, "chosen log-ratios that dominate rejected ones in "
                                                             "distribution; not pi*"),
    "apo_zero": LossSpec(apo_zero_loss, True, (), "chosen up and rejected down, each bounded; not pi*"),
    "apo_down": LossSpec(apo_down_loss, True, (), "both down, rejected more; not pi*"),
    "discopop": LossSpec(discopop_loss, True, ("discopop_tau",), "a discovered blend of logistic and exponential "
                                                                 "losses on beta h; not pi*"),
    "sigmoid_norm": LossSpec(sigmoid_norm_loss, True, _EPS, "pi* of a per-token reward (length-normalised)"),
    "simpo": LossSpec(simpo_loss, False, ("simpo_gamma",), "no reference: a length-normalised margin > gamma"),
    "cpo": LossSpec(cpo_loss, False, ("cpo_alpha",), "no reference: pi_ref uniform, plus cloning the chosen"),
    "orpo": LossSpec(orpo_loss, False, (), "no reference: SFT on the chosen plus an odds-ratio preference term"),
    "sft": LossSpec(sft_loss_on_chosen, False, (), "no reference: maximum likelihood of the chosen"),
}


def check_loss_types(names: list[str], weights: list[float] | None = None) -> list[LossSpec]:
    """The registry entries of `names`; a ValueError listing the valid names for an unknown one."""
    if not names:
        raise ValueError(f"loss_type is empty; valid names: {', '.join(PREFERENCE_LOSSES)}")
    unknown = [n for n in names if n not in PREFERENCE_LOSSES]
    if unknown:
        raise ValueError(f"unknown loss_type {', '.join(map(repr, unknown))}; valid names: {', '.join(PREFERENCE_LOSSES)}")
    if weights and len(weights) != len(names):
        raise ValueError(f"loss_weights has {len(weights)} values for {len(names)} loss types; give one per loss")
    return [PREFERENCE_LOSSES[n] for n in names]


def needs_reference(names: list[str]) -> bool:
    """Whether any of `names` reads pi_ref (RPO's NLL term does not)."""
    return any(s.reference for s in check_loss_types(names))


def preference_loss(names: list[str], p: PairLogps, beta: float, weights: list[float] | None = None,
                    rpo_alpha: float = 0.0, **options) -> tuple[Tensor, dict[str, Tensor]]:
    """L = sum_i w_i L_i + rpo_alpha NLL(y_w)   (w = 1 each by default; MPO mixes several,
    RPO adds the NLL on the chosen to DPO). Returns per-pair losses [B] and detached metrics [B]:
    rewards/chosen = beta a and rewards/rejected = beta b (beta log pi without a reference),
    their margin and accuracy, logps/chosen and logps/rejected, and loss/<name> for a mixture.
    An option (label_smoothing, discopop_tau, ...) is passed to the losses that read it."""
    specs = check_loss_types(names, weights)
    weights = weights or [1.0] * len(names)
    total = rpo_alpha * p.chosen_nll() if rpo_alpha else 0.0
    metrics = {}
    for name, spec, w in zip(names, specs, weights):
        part = spec.fn(p, beta, **{k: options[k] for k in spec.options if k in options})
        total = total + w * part
        if len(names) > 1:
            metrics[f"loss/{name}"] = part.detach().float()
    chosen = p.chosen - p.ref_chosen if p.ref_chosen is not None else p.chosen
    rejected = p.rejected - p.ref_rejected if p.ref_rejected is not None else p.rejected
    chosen, rejected = (beta * chosen).detach().float(), (beta * rejected).detach().float()
    metrics.update({
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margin": chosen - rejected,
        "rewards/accuracy": (chosen > rejected).float(),
        "logps/chosen": p.chosen.detach().float(),
        "logps/rejected": p.rejected.detach().float(),
    })
    return total, metrics
