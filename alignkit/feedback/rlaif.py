"""RLAIF: an AI judge labels responses and writes the files the trainers read.

    alignkit label-ai --judge runs/rm --data candidates.jsonl --format dpo --output pairs.jsonl
    alignkit label-ai --judge openai-chat:MODEL@http://127.0.0.1:8000/v1 --model runs/demo/sft \\
        --data prompts.jsonl --num_samples 4 --format ranking --output ranked.jsonl

Candidates are ranking records (`prompt`, `responses`), or with `model` set, `num_samples`
completions of each prompt of `data` sampled by alignkit's sampler. Formats, as the
simulated annotators and the app write them:
- dpo: consecutive responses (0 vs 1, 2 vs 3, ...) as `prompt`/`chosen`/`rejected`; the
  chosen one is the more likely winner, p = P(chosen better) with both orders averaged;
  a pair whose confidence max(p, 1 - p) is not above `min_confidence` is a tie, counted
  and not written;
- ranking: all K responses ordered by their expected wins sum_j P(i > j) over the
  K(K-1)/2 comparisons;
- kto: each response scored, label = score above `kto_threshold` (default: the median).
Each row carries `judge` and its `confidence` (or `score`); an answer the judge could not
give (NaN) masks its row, counted. Empty responses are skipped and counted (no trainer
takes an empty completion). With `gold` (a reward spec) the summary gives the share
of written pairs that the gold reward orders the same way; with `human` (a preference
file) the agreement on the pairs both labelled.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from alignkit.feedback.judges import PAIRWISE_TEMPLATE, SCORE_TEMPLATE


@dataclass
class LabelAIConfig:
    """Label candidate responses with an AI judge (RLAIF) into dpo / ranking / kto files."""

    judge: str = ""
    """The judge: a reward-model folder, lm:PATH, openai[-chat]:MODEL@URL, module:function (a scorer)
    or compare:module:function (a comparator)."""
    data: str = ""
    """Ranking records (prompt, responses), or prompts when `model` samples the candidates."""
    output: str = ""
    """The file written (.jsonl)."""
    format: Literal["dpo", "ranking", "kto"] = "dpo"
    """dpo (and rm): preference pairs; ranking: K responses best first; kto: thumbs."""
    model: str = ""
    """Sample the candidates from this model (empty: `data` holds them)."""
    num_samples: int = 2
    """Completions sampled per prompt when `model` is set."""
    max_new_tokens: int = 32
    """Longest sampled completion."""
    temperature: float = 1.0
    """Sampling temperature."""
    seed: int = 0
    """Seed of the sampled candidates."""
    min_confidence: float = 0.5
    """dpo: a pair is written only when max(p, 1 - p) is above this (0.5: only exact ties dropped)."""
    kto_threshold: float = float("nan")
    """kto: thumbs up above this score (nan: the median score of the responses)."""
    gold: str = ""
    """A reward spec (folder or module:function) to measure the labels' agreement with."""
    human: str = ""
    """A preference file (prompt, chosen, rejected) to measure agreement with on shared pairs."""
    cache: str = ""
    """Judgement cache file (empty: OUTPUT.judge-cache.jsonl); the same question is never asked twice."""
    pairwise_template: str = PAIRWISE_TEMPLATE
    """Prompt of an LM / endpoint judge for a pair: {prompt}, {a}, {b}; the answer is A or B."""
    score_template: str = SCORE_TEMPLATE
    """Prompt of an LM / endpoint judge for one response: {prompt}, {response}; the answer is 1..10."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the endpoint's key (never a config value)."""
    concurrency: int = 8
    """Endpoint requests in flight at once."""
    timeout: float = 60.0
    """Seconds an endpoint request may take before it is retried."""
    max_retries: int = 3
    """Retries of a failed endpoint request (429, 5xx, timeout), with exponential backoff."""

    def validate(self) -> None:
        from alignkit.config import ConfigError

        if self.model and self.num_samples < 2 and self.format != "kto":
            raise ConfigError(f"num_samples must be >= 2 to compare responses, got {self.num_samples}")
        if not 0.5 <= self.min_confidence < 1:
            raise ConfigError(f"min_confidence must be in [0.5, 1), got {self.min_confidence}")
        if self.concurrency < 1 or self.timeout <= 0 or self.max_retries < 0:
            raise ConfigError("concurrency must be >= 1, timeout > 0 and max_retries >= 0")


def candidates(cfg: LabelAIConfig) -> list[dict]:
    """[{prompt, responses}]: the ranking records of `data`, or `num_samples` samples of each prompt."""
    from alignkit.data import load_records

    if not cfg.model:
        return [{"prompt": r["prompt"], "responses": list(r["responses"])} for r in load_records(cfg.data, "ranking")]
    return sample_candidates(cfg.model, load_records(cfg.data, "prompts"), cfg.num_samples,
                             max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed)


def sample_candidates(model_path: str, records: list[dict], n: int, *, max_new_tokens: int, temperature: float,
                      seed: int) -> list[dict]:
    """[{prompt, responses}]: `n` completions of each prompt record sampled from a local model;
    `prompt` is the record's own (a string or a message list), as the trainers read it."""
    from alignkit.data import tokenize_prompts
    from alignkit.models.load import load_causal_lm, load_tokenizer
    from alignkit.rollout.best_of_n import sample_and_score

    model, tokenizer = load_causal_lm(model_path).eval(), load_tokenizer(model_path)
    examples, _ = tokenize_prompts(records, tokenizer, max_length=1024)
    s = sample_and_score(model, tokenizer, examples, n, [], [], max_new_tokens=max_new_tokens,
                         temperature=temperature, seed=seed)
    return [{"prompt": r["prompt"], "responses": [s.texts[j] for j in s.group(i)]} for i, r in enumerate(records)]


def drop_empty(rows: list[dict], least: int) -> tuple[list[dict], int]:
    """Rows without their empty responses (the trainers refuse an empty completion), and rows
    left with fewer than `least` responses dropped; returns them and the responses dropped."""
    kept, dropped = [], 0
    for row in rows:
        responses = [r for r in row["responses"] if r.strip()]
        dropped += len(row["responses"]) - len(responses)
        if len(responses) >= least:
            kept.append({**row, "responses": responses})
        else:
            dropped += len(responses)
    return kept, dropped


def label_pairs(judge, rows: list[dict], min_confidence: float) -> tuple[list[dict], dict[str, int]]:
    """Consecutive responses of each row as judged preference pairs; ties and masked answers counted."""
    prompts, a, b = [], [], []
    for row in rows:
        for i in range(0, len(row["responses"]) - 1, 2):
            prompts.append(row["prompt"])
            a.append(row["responses"][i])
            b.append(row["responses"][i + 1])
    probs = judge.compare(prompts, a, b)
    out, counts = [], {"pairs": 0, "ties": 0, "masked": 0}
    for prompt, x, y, p in zip(prompts, a, b, probs):
        if math.isnan(p):
            counts["masked"] += 1
        elif max(p, 1 - p) <= min_confidence:
            counts["ties"] += 1
        else:
            chosen, rejected = (x, y) if p > 0.5 else (y, x)
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "judge": judge.name,
                        "confidence": max(p, 1 - p)})
            counts["pairs"] += 1
    return out, counts


def label_rankings(judge, rows: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """Each row's responses ordered by expected wins over the K(K-1)/2 debiased comparisons."""
    prompts, a, b, where = [], [], [], []
    for r, row in enumerate(rows):
        k = len(row["responses"])
        for i in range(k):
            for j in range(i + 1, k):
                prompts.append(row["prompt"])
                a.append(row["responses"][i])
                b.append(row["responses"][j])
                where.append((r, i, j))
    probs = judge.compare(prompts, a, b)
    wins = [[0.0] * len(row["responses"]) for row in rows]
    masked = {r for (r, _, _), p in zip(where, probs) if math.isnan(p)}
    for (r, i, j), p in zip(where, probs):
        if r not in masked:
            wins[r][i] += p
            wins[r][j] += 1 - p
    out = []
    for r, row in enumerate(rows):
        if r in masked:
            continue
        order = sorted(range(len(row["responses"])), key=lambda i: -wins[r][i])
        out.append({"prompt": row["prompt"], "responses": [row["responses"][i] for i in order], "judge": judge.name,
                    "expected_wins": [wins[r][i] for i in order]})
    return out, {"rankings": len(out), "masked": len(masked)}


def label_thumbs(judge, rows: list[dict], threshold: float) -> tuple[list[dict], dict[str, float]]:
    """Each response scored; thumbs up above `threshold` (nan: the median score)."""
    prompts = [row["prompt"] for row in rows for _ in row["responses"]]
    responses = [resp for row in rows for resp in row["responses"]]
    scores = judge.score(prompts, responses)
    kept = sorted(s for s in scores if not math.isnan(s))
    if math.isnan(threshold) and kept:
        mid = len(kept) // 2
        threshold = kept[mid] if len(kept) % 2 else (kept[mid - 1] + kept[mid]) / 2
    out = [{"prompt": p, "completion": c, "label": s > threshold, "judge": judge.name, "score": s}
           for p, c, s in zip(prompts, responses, scores) if not math.isnan(s)]
    return out, {"thumbs": len(out), "up": sum(r["label"] for r in out), "masked": len(scores) - len(out),
                 "threshold": threshold}


def gold_agreement(gold_spec: str, pairs: list[dict]) -> float:
    """Share of pairs the gold reward orders as the judge did (gold ties count half)."""
    from alignkit.rollout.rewards import load_reward_fn

    fn = load_reward_fn(gold_spec)
    prompts = [p["prompt"] for p in pairs]
    chosen, rejected = fn(prompts, [p["chosen"] for p in pairs]), fn(prompts, [p["rejected"] for p in pairs])
    return sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected)) / max(len(pairs), 1)


def human_agreement(human_file: str, pairs: list[dict]) -> tuple[float, int]:
    """(share agreeing, pairs compared) over the pairs both labelled, matched by prompt and the unordered pair."""
    from alignkit.data import load_records

    human = {(r["prompt"], frozenset((r["chosen"], r["rejected"]))): r["chosen"]
             for r in load_records(human_file, "preference")}
    shared = [(p, human[key]) for p in pairs if (key := (p["prompt"], frozenset((p["chosen"], p["rejected"])))) in human]
    return sum(p["chosen"] == h for p, h in shared) / max(len(shared), 1), len(shared)


def run(cfg: LabelAIConfig) -> dict:
    from alignkit.config import require
    from alignkit.feedback.judges import load_judge

    require(cfg, "judge", "data", "output")
    cfg.validate()
    out = Path(cfg.output)
    judge = load_judge(cfg.judge, cfg.cache or str(out.with_name(out.name + ".judge-cache.jsonl")),
                       pairwise_template=cfg.pairwise_template, score_template=cfg.score_template,
                       api_key_env=cfg.api_key_env, concurrency=cfg.concurrency, timeout=cfg.timeout,
                       max_retries=cfg.max_retries)
    rows, empty = drop_empty(candidates(cfg), 1 if cfg.format == "kto" else 2)
    if cfg.format == "dpo":
        records, counts = label_pairs(judge, rows, cfg.min_confidence)
    elif cfg.format == "ranking":
        records, counts = label_rankings(judge, rows)
    else:
        records, counts = label_thumbs(judge, rows, cfg.kto_threshold)
    summary = {"format": cfg.format, "rows": len(rows), **counts, "empty_responses_skipped": empty, "judge": judge.name, **{
        k: judge.stats[k] for k in ("calls", "cached", "unparsed", "failures", "flip_rate")}}
    if cfg.gold and cfg.format == "dpo":
        summary["gold_agreement"] = gold_agreement(cfg.gold, records)
    if cfg.human and cfg.format == "dpo":
        summary["human_agreement"], summary["human_pairs"] = human_agreement(cfg.human, records)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")  # renamed into place when complete
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(out)
    print(judge.report(), flush=True)
    print(f"label-ai: {len(records)} {cfg.format} rows from {len(rows)} prompts -> {out}; "
          + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
                      if k not in ("format", "judge") and v == v), flush=True)  # v != v: NaN (a scorer's flip rate)
    return summary


def main(argv: list[str] | None = None) -> dict:
    from alignkit.config import parse_config

    return run(parse_config(LabelAIConfig, sys.argv[1:] if argv is None else argv, prog="alignkit label-ai"))

