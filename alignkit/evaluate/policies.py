"""Did alignment work? Every policy on the same held-out prompts, measured the same way.

    alignkit eval --models base=runs/demo/pretrain sft=runs/demo/sft ppo=runs/demo/ppo \\
        --prompts heldout.jsonl --reward alignkit.tasks.sentiment:gold_reward \\
        --proxy_reward runs/demo/rm --reference sft --text_data heldout_text.jsonl \\
        --output runs/cmp/eval.json --report runs/cmp

Per policy, from `samples_per_prompt` sampled completions of every prompt (one seed for all):

    gold, proxy       mean gold reward (never trained on) and reward-model reward
    kl                sampled KL(pi || pi_ref) = mean over completions of sum_t log pi(y_t|.) - log pi_ref(y_t|.)
                      (nats per completion, the quantity the RLHF objective penalises; kl_per_token beside it)
    win_rate          vs the reference policy's completion of the same prompt, judged by the gold
                      reward: 1 for a win, 1/2 for a tie
    length, ended     mean completion tokens; fraction that emitted EOS
    distinct_1/2      distinct word n-grams / all word n-grams of the completions, pooled (Li et al.
                      2016; words split on whitespace; mode collapse drives it to 0)
    entropy           mean per-token entropy of the policy on its own completions (nats)
    text_nll          per-token negative log-likelihood of held-out pretraining text (alignment tax)

and an arena: every two policies battle on every prompt (the gold reward judges), giving
an online Elo table and a Bradley-Terry leaderboard with bootstrap intervals.

The over-optimisation monitor reads the same numbers against the reference policy:
    collapsed         distinct_2 < flag_distinct_ratio * the reference's (mode collapse)
    unended           ended < flag_ended_ratio * the reference's (completions run to the limit)
    over-optimised    proxy above the reference's while gold is more than flag_gold_drop below
                      it, or, in the policy's training log, gold fell flag_gold_drop below its
                      peak while the proxy rose
Flags ride along in the table, the leaderboard and the report. `kl_budgets` reads the
leaderboard at a KL budget: the best unflagged gold within K nats. With
`reference_best_of_n N`, N samples per prompt from the reference give what the task allows:
best-of-n by the gold reward, n = 1, 2, 4, ..., N, at its KL bound log n - (n-1)/n.

It prints the table, then the report's path (with --report) and the JSON's path.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit.config import require
from alignkit.rollout.best_of_n import best_of_n_kl_bound


@dataclass
class EvalConfig:
    """Evaluate policies side by side on held-out prompts."""

    models: list[str] = field(default_factory=list)
    """Policies as `name=path` (or a path, named by its folder)."""
    prompts: str = ""
    """Prompt records (a file or Hub dataset with a `prompt` field; other fields go to the rewards)."""
    reward: list[str] = field(default_factory=list)
    """Gold reward(s): `module:function` or a reward-model directory; the arena's judge."""
    proxy_reward: str = ""
    """The reward model the policies were trained on (reported next to gold; empty = none)."""
    reference: str = ""
    """Name (from `models`) of the policy that KL and win rate are measured against; default: the first."""
    text_data: str = ""
    """Held-out text records for the alignment tax (empty = skip)."""
    num_prompts: int = 0
    """Use the first N prompts (0 = all)."""
    samples_per_prompt: int = 1
    max_new_tokens: int = 24
    temperature: float = 1.0
    batch_size: int = 64
    """Completions per sampling / scoring batch."""
    elo_k: float = 32.0
    bootstrap_rounds: int = 200
    """Resamples for the Bradley-Terry confidence intervals."""
    samples_shown: int = 5
    """Completions kept per policy in the output, for reading side by side."""
    output: str = "eval.json"
    """Where to write every number, as JSON (empty = don't)."""
    report: str = ""
    """Also write DIR/report.html: the table, reward-vs-KL frontier, arena, samples and, for models whose folder holds a metrics.jsonl, their training curves (other files in DIR are left alone; empty = no report)."""
    seed: int = 0
    reference_best_of_n: int = 0
    """Sample this many completions per prompt from the reference for the frontier's reference curve: best-of-n by the gold reward, n = 1, 2, 4, ... up to it (0 = skip)."""
    kl_budgets: list[float] = field(default_factory=lambda: [3.0, 10.0])
    """Read the leaderboard at these KL budgets: the best unflagged gold within K nats per completion."""
    flag_distinct_ratio: float = 0.8
    """Flag `collapsed`: distinct_2 below this fraction of the reference's."""
    flag_ended_ratio: float = 0.5
    """Flag `unended`: the fraction of completions that end with EOS below this fraction of the reference's."""
    flag_gold_drop: float = 0.05
    """Flag `over-optimised` when gold is this far below the reference's while the proxy is above it, or the training log's gold (smoothed) fell this far below its peak while the proxy rose."""


def distinct_n(sequences: list[list], n: int) -> float:
    """|set of n-grams| / |n-grams| over all sequences (0 when there are none)."""
    grams = [tuple(s[i:i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def win_rate(scores: list[float], against: list[float]) -> float:
    """Mean over pairs of 1 (scores[i] > against[i]), 1/2 (tie) or 0."""
    if len(scores) != len(against) or not scores:
        raise ValueError(f"win_rate needs two equal, non-empty lists, got {len(scores)} and {len(against)}")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, against)) / len(scores)


def best_of_n_expected(rewards: list[float], n: int) -> float:
    """The expected best of n draws without replacement from N >= n rewards (unbiased for best-of-n):

        E[max] = sum_{i=n}^{N} C(i-1, n-1) / C(N, n) * r_(i),     r_(1) <= ... <= r_(N)

    (r_(i) is the maximum of C(i-1, n-1) of the C(N, n) subsets of size n)."""
    if not 1 <= n <= len(rewards):
        raise ValueError(f"best-of-{n} needs at least {n} rewards, got {len(rewards)}")
    r, total = sorted(rewards), math.comb(len(rewards), n)
    return sum(math.comb(i - 1, n - 1) * r[i - 1] for i in range(n, len(r) + 1)) / total


def gold_fell_while_proxy_rose(proxy: list[float], gold: list[float], drop: float) -> bool:
    """Over-optimisation in a training log: with both series smoothed by a trailing mean over
    max(1, len/5) points, the last gold is more than `drop` below its peak while the last proxy
    is above the proxy at that peak."""
    if len(proxy) != len(gold) or len(gold) < 2:
        return False
    w = max(1, len(gold) // 5)

    def smooth(xs):
        return [sum(xs[max(0, i - w + 1):i + 1]) / len(xs[max(0, i - w + 1):i + 1]) for i in range(len(xs))]

    p, g = smooth(proxy), smooth(gold)
    peak = max(range(len(g)), key=g.__getitem__)
    return g[-1] < g[peak] - drop and p[-1] > p[peak]


def monitor_flags(m: dict, ref: dict, history: list[dict], cfg: "EvalConfig") -> list[str]:
    """The over-optimisation monitor's flags of a policy's numbers `m` against the reference's (module docstring)."""
    from alignkit.evaluate.report import reward_keys

    flags = []
    if m["distinct_2"] < cfg.flag_distinct_ratio * ref["distinct_2"]:
        flags.append("collapsed")
    if m["ended"] < cfg.flag_ended_ratio * ref["ended"]:
        flags.append("unended")
    proxy_key, gold_key = reward_keys(history)
    logged = [h for h in history if proxy_key in h and gold_key in h] if proxy_key and gold_key else []
    drop = cfg.flag_gold_drop
    if ("proxy" in m and m["proxy"] > ref["proxy"] and m["gold"] < ref["gold"] - drop) or gold_fell_while_proxy_rose(
            [h[proxy_key] for h in logged], [h[gold_key] for h in logged], drop):
        flags.append("over-optimised")
    return flags


def reference_curve(rewards: list[float], n_max: int) -> list[dict]:
    """Best-of-n by gold from the reference's samples (prompt-major, n_max per prompt): for n = 1, 2, 4, ...,
    n_max, the mean over prompts of the expected best and the KL bound."""
    groups = [rewards[i:i + n_max] for i in range(0, len(rewards), n_max)]
    ns = sorted({2 ** k for k in range(n_max.bit_length()) if 2 ** k <= n_max} | {n_max})
    return [{"n": n, "gold": sum(best_of_n_expected(g, n) for g in groups) / len(groups),
             "kl_bound": best_of_n_kl_bound(n)} for n in ns]


def at_kl_budgets(models: dict[str, dict], budgets: list[float], curve: list[dict]) -> list[dict]:
    """Per budget K: the unflagged policy of best gold with kl <= K, the flagged ones that would have beaten it,
    and the reference curve's best gold within K (what best-of-n by gold reaches)."""
    out = []
    for k in budgets:
        within = sorted(((m["gold"], n) for n, m in models.items() if m["kl"] <= k), reverse=True)
        clean = [(g, n) for g, n in within if not models[n]["flags"]]
        best = clean[0] if clean else None
        row = {"kl_budget": k, "model": best[1] if best else None, "gold": best[0] if best else None,
               "kl": models[best[1]]["kl"] if best else None,
               "flagged_above": [n for g, n in within if models[n]["flags"] and (best is None or g > best[0])]}
        reachable = [c for c in curve if c["kl_bound"] <= k]
        if reachable:
            row["reference_best_of_n"] = {"n": reachable[-1]["n"], "gold": reachable[-1]["gold"]}
        out.append(row)
    return out


def _completion_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad: int) -> dict:
    """Prompt + completion rows, right padded, with the loss mask on the completion tokens."""
    from alignkit.data import pad_batch

    rows = [{"input_ids": p + c, "loss_mask": [0] * len(p) + [1] * len(c)} for p, c in zip(prompt_ids, completion_ids)]
    return pad_batch(rows, pad)


@torch.no_grad()
def completion_logprobs(model, prompt_examples: list[dict], completion_ids: list[list[int]], n: int, pad: int,
                        batch_size: int, temperature: float = 1.0) -> tuple[list[float], list[float]]:
    """Per completion: sum_t log pi(y_t | x, y_<t) and sum_t H(pi(. | x, y_<t)), at `temperature`."""
    from alignkit.models.forward import token_stats

    device = next(model.parameters()).device
    logps, entropies = [], []
    for start in range(0, len(completion_ids), batch_size):
        chunk = completion_ids[start:start + batch_size]
        prompt_ids = [prompt_examples[(start + i) // n]["input_ids"] for i in range(len(chunk))]  # prompt-major rows
        batch = _completion_batch(prompt_ids, chunk, pad)
        mask = batch["loss_mask"][:, 1:].to(device).bool()
        stats = token_stats(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), temperature,
                            entropy=True)
        lp, ent = stats.logprobs, stats.entropy
        logps += torch.where(mask, lp, 0).sum(-1).tolist()
        entropies += torch.where(mask, ent, 0).sum(-1).tolist()
    return logps, entropies


@torch.no_grad()
def text_nll(model, tokenizer, records: list[dict], max_length: int = 256, batch_size: int = 32) -> float:
    """Per-token negative log-likelihood of held-out text (documents cut at max_length tokens)."""
    from alignkit.data import pad_batch, tokenize_text
    from alignkit.train.common import lm_count, lm_step

    examples, _ = tokenize_text(records, tokenizer, max_length, packing=False)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = pad_batch(examples[start:start + batch_size], tokenizer.pad_token_id)
        loss_sum, _ = lm_step(model, {k: v.to(device) for k, v in batch.items()})  # pretraining's own loss
        total, count = total + float(loss_sum), count + lm_count(batch)
    return total / max(count, 1)


def _named_models(specs: list[str]) -> dict[str, str]:
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = (name, path) if sep else (Path(spec).name, spec)
        if name in out:
            raise ValueError(f"eval: two models are named {name!r}; name them explicitly as name=path")
        out[name] = path
    return out


def evaluate(cfg: EvalConfig) -> dict:
    """Sample, score and compare every policy in `cfg.models`; write (cfg.output, cfg.report) and return the
    results. Prints nothing but progress: `main` prints the table, the demo its own summary."""
    from alignkit.progress import progress

    from alignkit.data import load_records, tokenize_prompts
    from alignkit.evaluate import arena
    from alignkit.evaluate.report import read_metrics
    from alignkit.models.load import load_causal_lm, load_tokenizer
    from alignkit.rollout.best_of_n import as_reward_fns, sample_and_score
    from alignkit.rollout.rewards import load_reward_fn

    require(cfg, "models", "prompts", "reward")
    models = _named_models(cfg.models)
    reference = cfg.reference or next(iter(models))
    if reference not in models:
        raise ValueError(f"eval: reference {reference!r} is not one of the models ({', '.join(models)})")
    records = load_records(cfg.prompts, "prompts")
    if cfg.num_prompts:
        records = records[:cfg.num_prompts]
    text_records = load_records(cfg.text_data, "text") if cfg.text_data else []
    gold_fns, gold_weights = as_reward_fns(cfg.reward, None)
    proxy_fn = load_reward_fn(cfg.proxy_reward) if cfg.proxy_reward else None
    n = cfg.samples_per_prompt

    ref_model = load_causal_lm(models[reference]).eval()
    per_model, samples = {}, {}
    for name, path in progress(models.items(), desc="eval", unit="policy"):
        model = ref_model if name == reference else load_causal_lm(path).eval()
        tokenizer = load_tokenizer(path)
        prompt_examples, _ = tokenize_prompts(records, tokenizer, max_length=2**62)
        s = sample_and_score(model, tokenizer, prompt_examples, n, gold_fns, gold_weights,
                             max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             batch_size=cfg.batch_size, seed=cfg.seed)
        prompts = [r["prompt"] for r in records for _ in range(n)]
        pad = tokenizer.pad_token_id
        logp, entropy = completion_logprobs(model, prompt_examples, s.completion_ids, n, pad, cfg.batch_size,
                                            cfg.temperature)
        ref_logp, _ = completion_logprobs(ref_model, prompt_examples, s.completion_ids, n, pad, cfg.batch_size,
                                          cfg.temperature)
        lengths = [len(c) for c in s.completion_ids]
        kl = [a - b for a, b in zip(logp, ref_logp)]
        m = {
            "gold": sum(s.rewards) / len(s.rewards),
            "kl": sum(kl) / len(kl),
            "kl_per_token": sum(kl) / max(sum(lengths), 1),
            "length": sum(lengths) / len(lengths),
            "ended": sum(s.ended) / len(s.ended),
            "distinct_1": distinct_n([t.split() for t in s.texts], 1),
            "distinct_2": distinct_n([t.split() for t in s.texts], 2),
            "entropy": sum(entropy) / max(sum(lengths), 1),
        }
        if proxy_fn is not None:
            proxy = proxy_fn(prompts, s.texts)
            m["proxy"] = sum(proxy) / len(proxy)
        if text_records:
            m["text_nll"] = text_nll(model, tokenizer, text_records)
        per_model[name] = m
        samples[name] = {"gold": s.rewards, "texts": s.texts}
        if model is not ref_model:
            del model

    for name in models:
        per_model[name]["win_rate"] = win_rate(samples[name]["gold"], samples[reference]["gold"])
        per_model[name]["flags"] = [] if name == reference else monitor_flags(
            per_model[name], per_model[reference], read_metrics(models[name]), cfg)
    curve = []
    if cfg.reference_best_of_n > 0:  # what the task allows: best-of-n by gold from the reference
        tokenizer = load_tokenizer(models[reference])
        prompt_examples, _ = tokenize_prompts(records, tokenizer, max_length=2**62)
        s = sample_and_score(ref_model, tokenizer, prompt_examples, cfg.reference_best_of_n, gold_fns, gold_weights,
                             max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             batch_size=max(cfg.batch_size, 4 * cfg.reference_best_of_n), seed=cfg.seed)
        curve = reference_curve(s.rewards, cfg.reference_best_of_n)
    names = list(models)
    battles = [(a, b, 1.0 if ga > gb else 0.5 if ga == gb else 0.0)
               for i, a in enumerate(names) for b in names[i + 1:]
               for ga, gb in zip(samples[a]["gold"], samples[b]["gold"])]
    board = arena.leaderboard(battles, k=cfg.elo_k, rounds=cfg.bootstrap_rounds, seed=cfg.seed) if len(names) > 1 else []
    for row in board:
        row["flags"] = per_model[row["model"]]["flags"]
    shown = [{"prompt": prompts_i, **{name: samples[name]["texts"][i * n] for name in names},
              **{f"{name}/gold": samples[name]["gold"][i * n] for name in names}}
             for i, prompts_i in enumerate(r["prompt"] for r in records[:cfg.samples_shown])]
    result = {"reference": reference, "prompts": len(records), "samples_per_prompt": n, "models": per_model,
              "leaderboard": board, "kl_budgets": at_kl_budgets(per_model, cfg.kl_budgets, curve),
              "reference_best_of_n": curve, "samples": shown}
    if cfg.output:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output).write_text(json.dumps(result, indent=1))
    if cfg.report:
        from alignkit.evaluate.report import render_report

        render_report(cfg.report, f"alignkit eval: {', '.join(models)} on {cfg.prompts}", result,
                      {name: read_metrics(path) for name, path in models.items()})
    return result


def format_table(result: dict) -> str:
    """The per-policy numbers and the leaderboard as fixed-width text."""
    cols = [("gold", "{:+.3f}"), ("proxy", "{:+.3f}"), ("kl", "{:.2f}"), ("win_rate", "{:.2f}"),
            ("length", "{:.1f}"), ("ended", "{:.2f}"), ("distinct_2", "{:.2f}"), ("entropy", "{:.2f}"),
            ("text_nll", "{:.3f}")]
    models = result["models"]
    cols = [(c, f) for c, f in cols if any(c in m for m in models.values())]
    width = max(len(n) for n in models) + 2
    lines = ["policy".ljust(width) + "".join(c.rjust(11) for c, _ in cols)]
    flagged = any(m.get("flags") for m in models.values())
    if flagged:
        lines[0] += "  flags"
    for name, m in models.items():
        lines.append(name.ljust(width) + "".join((f.format(m[c]) if c in m else "-").rjust(11) for c, f in cols)
                     + (f"  {','.join(m.get('flags', [])) or '-'}" if flagged else ""))
    lines.append(f"(kl: nats per completion to {result['reference']}; win_rate vs {result['reference']} by gold reward"
                 + ("; flags: the over-optimisation monitor, `alignkit eval --help`)" if flagged else ")"))
    if result["leaderboard"]:
        lines.append("")
        lines.append("rank".ljust(6) + "policy".ljust(width) + "BT rating (95% CI)".rjust(26) + "Elo".rjust(8) + "win".rjust(7))
        for i, r in enumerate(result["leaderboard"], 1):
            ci = f"{r['bt']:.0f} ({r['bt_low']:.0f}-{r['bt_high']:.0f})"
            lines.append(f"{i:<6}" + r["model"].ljust(width) + ci.rjust(26) + f"{r['elo']:.0f}".rjust(8)
                         + f"{r['win_rate']:.2f}".rjust(7) + (f"  {','.join(r['flags'])}" if r.get("flags") else ""))
    budgets = result.get("kl_budgets") or []
    if budgets:
        lines.append("")
        lines.append("at a KL budget (best gold among unflagged policies within K nats"
                     + ("; best-of-n by gold from " + result["reference"] + " at its KL bound" if
                        result.get("reference_best_of_n") else "") + "):")
        for b in budgets:
            best = (f"{b['model']} {b['gold']:+.3f} (kl {b['kl']:.2f})" if b["model"] else "none")
            line = f"  kl <= {b['kl_budget']:g}: {best}"
            if b.get("reference_best_of_n"):
                line += f"   best-of-{b['reference_best_of_n']['n']} by gold: {b['reference_best_of_n']['gold']:+.3f}"
            if b["flagged_above"]:
                line += f"   (flagged, higher gold: {', '.join(b['flagged_above'])})"
            lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from alignkit.config import parse_config

    cfg = parse_config(EvalConfig, sys.argv[1:] if argv is None else argv, prog="alignkit eval")
    result = evaluate(cfg)
    print(format_table(result))
    if cfg.report:
        print(f"report: {Path(cfg.report) / 'report.html'}")
    if cfg.output:
        print(f"results: {cfg.output}", flush=True)
    return result
