"""A KL-regularised problem small enough to solve exactly, on a real `transformers` LM.

    python examples/exact_optimum.py      # every trainer against the exact optimum

Prompts x in {p0, p1}; responses y are 1..L tokens over {a, b, c, d} followed by EOS
(L = 3: 84 responses per prompt, all enumerable). The objective

    max_pi  E_x E_{y~pi(.|x)} [r(x, y)] - beta KL(pi(.|x) || pi_ref(.|x))

has the closed-form optimum (the lemma the DPO derivation starts from)

    pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x),

so a trainer's final policy can be scored exactly: log pi(y|x) of every response in one
batched forward, then the total-variation distance to pi*, E[r] and KL(pi || pi_ref).
pi_ref is a tiny Llama fitted (full batch, exact cross-entropy) to a known non-uniform
distribution q, so pi_ref != uniform and pi* != argmax r.

A sampled completion can leave the set S of enumerated responses (a special token, or
no EOS within L + 1 tokens). pi* puts no mass there (the reward there is `OUTSIDE_REWARD`,
far below every r on S); `tv` counts the outside as one atom and `outside_mass` reports it.
Shapes: probabilities and log-probs are [P, Y] (prompt, response), P = 2, Y = 84.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

PROMPTS = ["p0", "p1"]
TOKENS = ["a", "b", "c", "d"]
MAX_TOKENS = 3
TARGET = {"p0": "a", "p1": "b"}
"""r(x, y) = the number of times y contains x's target token (0..3)."""
OUTSIDE_REWARD = -3.0
"""Reward of a completion outside S (empty, too long, or not made of TOKENS)."""
LENGTH_PROBS = [0.5, 0.3, 0.2]
TOKEN_PROBS = {"p0": [0.1, 0.2, 0.3, 0.4], "p1": [0.4, 0.3, 0.2, 0.1]}
"""q(y|x) = LENGTH_PROBS[|y| - 1] * prod_t TOKEN_PROBS[x][y_t]: what pi_ref is fitted to."""


def all_responses(tokens: list[str] = TOKENS, max_tokens: int = MAX_TOKENS) -> list[tuple[str, ...]]:
    """Every response of 1..max_tokens tokens, shortest first: sum_k |tokens|^k of them."""
    return [y for k in range(1, max_tokens + 1) for y in itertools.product(tokens, repeat=k)]


def reward(prompts: list[str], completions: list[str], **_) -> list[float]:
    """r(x, y): count of x's target token in y; `OUTSIDE_REWARD` for y outside S.

    The alignkit reward interface (`alignkit.rl.exact:reward` in a config); completions are
    decoded text, tokens separated by spaces.
    """
    out = []
    for x, text in zip(prompts, completions):
        y = text.split()
        ok = 1 <= len(y) <= MAX_TOKENS and all(t in TOKENS for t in y)
        out.append(float(y.count(TARGET[x.strip()])) if ok else OUTSIDE_REWARD)
    return out


def reward_matrix(responses: list[tuple[str, ...]]) -> torch.Tensor:
    """r [P, Y] over PROMPTS x responses."""
    return torch.tensor([reward([x] * len(responses), [" ".join(y) for y in responses]) for x in PROMPTS])


def target_probs(responses: list[tuple[str, ...]]) -> torch.Tensor:
    """q [P, Y]: the known distribution pi_ref is fitted to (sums to 1 per prompt)."""
    index = {t: i for i, t in enumerate(TOKENS)}
    rows = []
    for x in PROMPTS:
        rows.append([LENGTH_PROBS[len(y) - 1] * torch.tensor([TOKEN_PROBS[x][index[t]] for t in y]).prod().item()
                     for y in responses])
    return torch.tensor(rows)


def build_tokenizer():
    """A word-level tokenizer: <pad>=0, <s>=1, </s>=2, the prompts, then TOKENS; BOS prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from alignkit.models.tiny import BOS, EOS, PAD

    vocab = {t: i for i, t in enumerate([PAD, BOS, EOS, *PROMPTS, *TOKENS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def sequence_batch(tokenizer, responses: list[tuple[str, ...]]) -> dict:
    """Every (prompt, response) as one right-padded row [BOS, x, y_1..y_k, EOS], prompt-major.

    Returns input_ids, attention_mask [P*Y, T] and response_mask [P*Y, T-1] (1 on the
    targets y_1..y_k, EOS, aligned with forward_logprobs' output).
    """
    rows, masks = [], []
    for x in PROMPTS:
        prompt = tokenizer(x)["input_ids"]
        for y in responses:
            ids = tokenizer.convert_tokens_to_ids(list(y)) + [tokenizer.eos_token_id]
            rows.append(prompt + ids)
            masks.append([0] * (len(prompt) - 1) + [1] * len(ids))
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    response_mask = torch.tensor([m + [0] * (width - 1 - len(m)) for m in masks])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def response_logprobs(model, batch: dict) -> torch.Tensor:
    """log pi(y|x) = sum_t log pi(y_t | x, y_<t), EOS included, of every row: [P, Y] (one forward)."""
    from alignkit.models.forward import token_stats

    logprobs = token_stats(model, batch["input_ids"], batch["attention_mask"]).logprobs
    return (logprobs * batch["response_mask"]).sum(-1).view(len(PROMPTS), -1)


def optimal_policy(ref_logprobs: torch.Tensor, r: torch.Tensor, beta: float) -> torch.Tensor:
    """pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x) over S: [P, Y] -> [P, Y], rows sum to 1."""
    return torch.softmax(ref_logprobs + r / beta, dim=-1)


def outside_mass(p: torch.Tensor) -> torch.Tensor:
    """1 - sum_y p(y|x): the mass a policy puts outside S, [P, Y] -> [P]."""
    return (1 - p.sum(-1)).clamp(min=0)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    """TV = mean_x 1/2 (sum_{y in S} |p - q| + |p(outside) - q(outside)|), outside S as one atom."""
    return float(0.5 * ((p - q).abs().sum(-1) + (outside_mass(p) - outside_mass(q)).abs()).mean())


def kl_divergence(logp: torch.Tensor, ref_logp: torch.Tensor) -> float:
    """KL(pi || pi_ref) = mean_x sum_{y in S} pi(y|x) (log pi(y|x) - log pi_ref(y|x))."""
    return float((logp.exp() * (logp - ref_logp)).sum(-1).mean())


def expected_reward(p: torch.Tensor, r: torch.Tensor) -> float:
    """E_x E_{y~pi} r(x, y) = mean_x sum_{y in S} pi(y|x) r(x, y) (outside S: OUTSIDE_REWARD)."""
    return float(((p * r).sum(-1) + outside_mass(p) * OUTSIDE_REWARD).mean())


def objective(logp: torch.Tensor, ref_logp: torch.Tensor, r: torch.Tensor, beta: float) -> float:
    """J(pi) = E[r] - beta KL(pi || pi_ref), the quantity pi* maximises."""
    return expected_reward(logp.exp(), r) - beta * kl_divergence(logp, ref_logp)


def fit(model, batch: dict, target: torch.Tensor, steps: int = 300, lr: float = 1e-2) -> float:
    """Fit `model` to q by full-batch Adam on the exact cross-entropy -mean_x sum_y q log pi.

    Returns the final KL(q || pi). Every response is in the batch, so no sampling noise.
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = -(target * response_logprobs(model, batch)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach() + (target * target.log()).sum(-1).mean())


@dataclass
class Problem:
    """The saved reference model, its data files and the exact quantities of the problem."""

    ref_dir: Path
    prompts_file: Path
    responses: list[tuple[str, ...]]
    batch: dict
    r: torch.Tensor
    ref_logprobs: torch.Tensor

    def pi_star(self, beta: float) -> torch.Tensor:
        return optimal_policy(self.ref_logprobs, self.r, beta)

    def evaluate(self, model, beta: float) -> dict[str, float]:
        """TV to pi*, E[r], KL(pi || pi_ref), J, the outside mass and the TV within S of `model` (a model or a directory)."""
        if isinstance(model, (str, Path)):
            from alignkit.models.load import load_causal_lm
            model = load_causal_lm(str(model))
        with torch.no_grad():
            logp = response_logprobs(model.eval(), self.batch)
        p = logp.exp()
        # tv_in_s: TV of pi renormalised on S, blind to mass that left S (DPO's loss cannot see it)
        return {"tv": total_variation(p, self.pi_star(beta)), "reward": expected_reward(p, self.r),
                "tv_in_s": total_variation(p / p.sum(-1, keepdim=True), self.pi_star(beta)),
                "kl": kl_divergence(logp, self.ref_logprobs), "objective": objective(logp, self.ref_logprobs, self.r, beta),
                "outside": float(outside_mass(p).mean())}

    def optimum(self, beta: float) -> dict[str, float]:
        """The same numbers for pi* itself (TV 0)."""
        p = self.pi_star(beta)
        return {"tv": 0.0, "reward": expected_reward(p, self.r), "kl": kl_divergence(p.log(), self.ref_logprobs),
                "objective": objective(p.log(), self.ref_logprobs, self.r, beta), "outside": 0.0, "tv_in_s": 0.0}

    def preference_pairs(self, n: int, seed: int = 0, label_noise: float = 0.0) -> list[dict]:
        """n pairs: x uniform, y1, y2 ~ pi_ref(.|x) (on S), chosen by Bradley-Terry P(y1 > y2) = sigmoid(r1 - r2);
        then each label flipped with probability `label_noise` (annotators who err)."""
        g = torch.Generator().manual_seed(seed)
        p = self.ref_logprobs.exp()
        p = p / p.sum(-1, keepdim=True)
        xs = torch.randint(len(PROMPTS), (n,), generator=g)
        y = torch.multinomial(p[xs], 2, replacement=True, generator=g)
        r1, r2 = self.r[xs, y[:, 0]], self.r[xs, y[:, 1]]
        first = torch.rand(n, generator=g) < torch.sigmoid(r1 - r2)
        if label_noise:
            first ^= torch.rand(n, generator=g) < label_noise
        pairs = []
        for i in range(n):
            w, l = (y[i, 0], y[i, 1]) if first[i] else (y[i, 1], y[i, 0])
            pairs.append({"prompt": PROMPTS[xs[i]], "chosen": " ".join(self.responses[w]),
                          "rejected": " ".join(self.responses[l])})
        return pairs


def make_problem(directory: str | Path, steps: int = 300, seed: int = 0) -> Problem:
    """Build the tokenizer, fit the tiny Llama to q (pi_ref), save it and a prompts file under `directory`."""
    from alignkit.models.tiny import build_tiny_llama, save_tiny

    directory = Path(directory)
    tokenizer = build_tokenizer()
    model = build_tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=16,
                             seed=seed)
    responses = all_responses()
    batch = sequence_batch(tokenizer, responses)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fit(model, batch, target_probs(responses), steps=steps)
    ref_dir = save_tiny(model, tokenizer, directory / "ref")
    prompts_file = directory / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": x}) + "\n" for x in PROMPTS))
    with torch.no_grad():
        ref_logprobs = response_logprobs(model.eval(), batch)
    return Problem(ref_dir, prompts_file, responses, batch, reward_matrix(responses), ref_logprobs)


ONLINE = {  # every online run: both prompts in each step, completions of at most MAX_TOKENS + EOS
    "max_new_tokens": MAX_TOKENS + 1, "temperature": 1.0, "eval_fraction": 0.0, "log_steps": 1000,
    "reward": ["alignkit.rl.exact:reward"], "precision": "no", "max_grad_norm": 0.0,
}


def train(method: str, problem: Problem, beta: float, output_dir: str | Path, **overrides):
    """Run alignkit's own trainer `method` through its normal run() config; returns the output directory.

    rloo          RLOOConfig with its defaults: KL (k1) in the reward, token-level loss
    grpo          GRPOConfig with kl_in_reward, no std scaling, token-level loss
    grpo_default  GRPOConfig's own KL placement and scaling: k3 in the loss, std scaling
    ppo           PPOConfig: per-token k1 in the reward, GAE, a critic
    dpo           DPOConfig on `pairs` Bradley-Terry pairs from pi_ref (an override, default 4000; `label_noise`
                  flips that fraction of labels); any
                  `loss_type` of the preference-loss family (a reference-free one computes no reference)
    """
    from alignkit.losses.preference import needs_reference
    from alignkit.train import dpo, grpo, ppo

    output_dir = Path(output_dir)
    common = {"model": str(problem.ref_dir), "output_dir": str(output_dir), "beta": beta}
    if method in ("rloo", "grpo", "grpo_default"):
        keys = {**ONLINE, **common, "data": str(problem.prompts_file), "num_generations": 16, "batch_size": 32,
                "lr": 2e-3, "max_steps": 300, "loss_level": "token"}
        if method == "rloo":  # RLOO's own defaults: k1 in the reward, token-level loss
            cls, keys = grpo.RLOOConfig, {k: v for k, v in keys.items() if k != "loss_level"}
        elif method == "grpo":
            cls, keys = grpo.GRPOConfig, {**keys, "kl_in_reward": True, "scale_rewards": False}
        else:
            cls = grpo.GRPOConfig
        grpo.run(cls(**{**keys, **overrides}))
    elif method == "ppo":
        # lam = 1: the advantage is the return minus V, unbiased whatever the critic has learned
        keys = {**ONLINE, **common, "data": str(problem.prompts_file), "rollout_batch_size": 64, "batch_size": 64,
                "ppo_epochs": 1, "lr": 1e-3, "lam": 1.0, "max_steps": 300}
        # ppo samples `rollout_batch_size` prompts per step: repeat the two prompts
        data = output_dir.parent / f"{output_dir.name}-prompts.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        cfg = ppo.PPOConfig(**{**keys, "data": str(data), **overrides})
        data.write_text(problem.prompts_file.read_text() * (cfg.rollout_batch_size // len(PROMPTS)))
        ppo.run(cfg)
    elif method == "dpo":
        n, noise = overrides.pop("pairs", 4000), overrides.pop("label_noise", 0.0)
        data = output_dir.parent / f"{output_dir.name}-pairs.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(json.dumps(p) + "\n" for p in problem.preference_pairs(n, label_noise=noise)))
        keys = {**common, "data": str(data), "batch_size": 64, "lr": 1e-3, "epochs": 3.0, "precision": "no",
                "log_steps": 1000, "max_grad_norm": 0.0}
        cfg = dpo.DPOConfig(**{**keys, **overrides})
        cfg.precompute_ref = needs_reference(cfg.loss_type)
        dpo.run(cfg)
    else:
        raise ValueError(f"unknown method {method!r}: rloo, grpo, grpo_default, ppo, dpo")
    return output_dir


def implicit_reward_correlation(model, problem: Problem, beta: float) -> float:
    """corr over all (x, y) of beta log(pi / pi_ref) and r, each centred per prompt (removes beta log Z(x))."""
    with torch.no_grad():
        implicit = beta * (response_logprobs(model.eval(), problem.batch) - problem.ref_logprobs)
    a = implicit - implicit.mean(-1, keepdim=True)
    b = problem.r - problem.r.mean(-1, keepdim=True)
    return float((a * b).sum() / (a.norm() * b.norm()))
