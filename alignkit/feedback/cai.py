"""Constitutional AI (Bai et al. 2022): a model critiques and revises its own answers against
written principles, learns from the revisions (SL stage), then from AI preference labels
judged against the same principles (RL stage).

    alignkit cai --model runs/sft --data prompts.jsonl --writer openai-chat:MODEL@http://127.0.0.1:8000/v1

Stages, each a folder of `output_dir`, skipped when finished (as the demo's):

    revise  `num_samples` responses of `model` per prompt of `data`; then `rounds` times: draw a
            principle, ask the writer for a critique (its critique_request), then a revision
            (its revision_request), all in one growing conversation
                user: PROMPT                 assistant: RESPONSE
                user: CRITIQUE_REQUEST       assistant: CRITIQUE
                user: REVISION_REQUEST       assistant: REVISION      (then the next round)
            -> revise/revisions.jsonl, SFT rows {prompt, completion = the last revision,
               principle and round behind it, original, revisions: [{round, principle,
               critique, revision}]}
    sl      SFT of `model` on the revisions: the SL-CAI model
    label   two samples of the SL-CAI model per prompt of `rl_data`; a principle drawn per
            pair; the judge asked its `preference` question (both orders averaged, as
            `alignkit label-ai`) -> label/preferences.jsonl {prompt, chosen, rejected,
            judge, confidence, principle}
    rl      DPO of the SL-CAI model on those labels (rl: dpo), or a reward model for PPO /
            GRPO (rl: rm)

The principles file (YAML) holds `principles:`, a list of {name, critique_request,
revision_request, preference}; alignkit/feedback/constitution.yaml is the default. The
writer (writers.py) is an endpoint, a local model or a Python function; by default the model
critiques and revises itself. The trainers' keys are set with `overrides` (sl.lr=1e-4,
rl.beta=0.1, ...), checked before anything runs.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

DEFAULT_PRINCIPLES = str(Path(__file__).with_name("constitution.yaml"))
PREFERENCE_TEMPLATE = (
    "Consider a conversation between a person and an assistant.\n\nPerson: {prompt}\n\n{principle}\n\n"
    "Options:\n(A) {a}\n(B) {b}\n\nAnswer with one letter, A or B. The answer is:"
)
STAGES = ("revise", "sl", "label", "rl")


@dataclass
class CAIConfig:
    """Constitutional AI: critique and revise against principles, SFT on the revisions, then AI preferences and DPO / RM."""

    model: str = ""
    """The policy whose responses are critiqued and revised; the SL stage fine-tunes it."""
    data: str = ""
    """Prompts of the revise stage."""
    output_dir: str = "runs/cai"
    """Run directory: revise/, sl/ (the SL-CAI model), label/, rl/ (the RL-CAI model or reward model)."""
    principles: str = DEFAULT_PRINCIPLES
    """The constitution: a YAML file of principles, each with critique_request, revision_request and preference."""
    writer: str = ""
    """Critic and reviser: openai-chat:MODEL@URL, lm:PATH or module:function (empty: the model itself)."""
    judge: str = ""
    """Feedback model of the RL stage, a judge spec as in label-ai (empty: the writer's endpoint, else lm:OUTPUT_DIR/sl)."""
    rounds: int = 1
    """Critique-revision rounds per response, each against a freshly drawn principle."""
    num_samples: int = 1
    """Responses sampled per prompt to critique and revise."""
    rl_data: str = ""
    """Prompts of the RL stage (empty: data)."""
    rl: Literal["dpo", "rm"] = "dpo"
    """The RL stage's learner: DPO on the AI preferences, or a Bradley-Terry reward model."""
    stages: list[str] = field(default_factory=list)
    """Run only these stages (revise, sl, label, rl; their inputs must exist); empty = all."""
    overrides: list[str] = field(default_factory=list)
    """The trainers' keys, as sl.key=value (SFT) and rl.key=value (DPO or reward model)."""
    max_new_tokens: int = 64
    """Longest sampled response of the policy."""
    writer_max_new_tokens: int = 256
    """Longest critique or revision of an endpoint or local writer."""
    temperature: float = 1.0
    """Sampling temperature of the policy and of an endpoint or local writer."""
    seed: int = 0
    """Seed of the samples, the principles drawn and the trainers."""
    gold: str = ""
    """A reward spec (module:function or folder) to report the revisions' gain and the labels' agreement with."""
    min_confidence: float = 0.5
    """label: a pair is written only when max(p, 1 - p) is above this (0.5: only exact ties dropped)."""
    preference_template: str = PREFERENCE_TEMPLATE
    """The judge's prompt in the RL stage: {prompt}, {principle} (its preference question), {a}, {b}."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the endpoints' key (never a config value)."""
    concurrency: int = 8
    """Endpoint requests in flight at once."""
    timeout: float = 120.0
    """Seconds an endpoint request may take before it is retried."""
    max_retries: int = 3
    """Retries of a failed endpoint request (429, 5xx, timeout), with exponential backoff."""

    def validate(self) -> None:
        from alignkit.config import ConfigError

        if self.rounds < 1 or self.num_samples < 1:
            raise ConfigError(f"rounds and num_samples must be >= 1, got {self.rounds} and {self.num_samples}")
        unknown = set(self.stages) - set(STAGES)
        if unknown:
            raise ConfigError(f"unknown stage(s) {sorted(unknown)}; stages: {', '.join(STAGES)}")
        for name in ("{prompt}", "{principle}", "{a}", "{b}"):
            if name not in self.preference_template:
                raise ConfigError(f"preference_template must contain {name}")
        if not 0.5 <= self.min_confidence < 1:
            raise ConfigError(f"min_confidence must be in [0.5, 1), got {self.min_confidence}")


@dataclass
class Principle:
    name: str
    critique_request: str
    revision_request: str
    preference: str


def load_principles(path: str) -> list[Principle]:
    """The principles of a YAML constitution; a missing field is an error naming the file, line and field."""
    import yaml

    from alignkit.config import ConfigError

    try:
        root = yaml.compose(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the principles file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    items = next((v for k, v in (root.value if isinstance(root, yaml.MappingNode) else []) if k.value == "principles"), None)
    if not isinstance(items, yaml.SequenceNode) or not items.value:
        raise ConfigError(f"{path}: expected `principles:` with a list of principles")
    out = []
    for node in items.value:
        line = node.start_mark.line + 1
        entry = yaml.safe_load(yaml.serialize(node))
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}:{line}: a principle is a mapping of name, critique_request, revision_request, preference")
        for key in ("name", "critique_request", "revision_request", "preference"):
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                raise ConfigError(f"{path}:{line}: principle {entry.get('name', len(out) + 1)!r}: field '{key}' "
                                  "is missing or not text")
        unknown = set(entry) - {"name", "critique_request", "revision_request", "preference"}
        if unknown:
            raise ConfigError(f"{path}:{line}: principle {entry['name']!r}: unknown field(s) {sorted(unknown)}")
        out.append(Principle(**entry))
    return out


def conversation(prompt: str | list[dict], response: str) -> list[dict]:
    """A prompt (text or messages) and the assistant's response, as chat messages."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return messages + [{"role": "assistant", "content": response}]


def critique_and_revise(writer, rows: list[dict], principles: list[Principle], rounds: int,
                        rng: random.Random, chunk: int = 64) -> tuple[list[dict], dict[str, int]]:
    """Every response of `rows` ({prompt, responses}) critiqued and revised `rounds` times in one
    conversation; returns the SFT rows of the last revisions and the counts. A response whose
    critique or revision comes back empty is dropped (counted)."""
    from alignkit.progress import progress

    items = [(row["prompt"], resp) for row in rows for resp in row["responses"]]
    convs = [conversation(p, r) for p, r in items]
    history: list[list[dict]] = [[] for _ in items]
    alive = list(range(len(items)))
    empty = 0
    bar = progress(total=2 * rounds * len(items), desc="critique and revise", unit="turn")
    for round_ in range(1, rounds + 1):
        drawn = {i: rng.choice(principles) for i in alive}
        for i in alive:
            convs[i] = convs[i] + [{"role": "user", "content": drawn[i].critique_request}]
        for turn in ("critique", "revision"):
            replies = {}
            for start in range(0, len(alive), chunk):
                ids = alive[start : start + chunk]
                replies.update(zip(ids, writer.write([convs[i] for i in ids])))
                bar.update(len(ids))
            for i in alive:
                if turn == "critique":
                    convs[i] = convs[i] + [{"role": "assistant", "content": replies[i]},
                                           {"role": "user", "content": drawn[i].revision_request}]
                else:
                    convs[i] = convs[i] + [{"role": "assistant", "content": replies[i]}]
                    history[i].append({"round": round_, "principle": drawn[i].name,
                                       "critique": convs[i][-3]["content"], "revision": replies[i]})
            dead = {i for i in alive if not replies[i].strip()}
            empty += len(dead)
            bar.total -= len(dead) * ((turn == "critique") + 2 * (rounds - round_))  # the turns they will not take
            bar.refresh()
            alive = [i for i in alive if i not in dead]
    bar.close()
    out = [{"prompt": items[i][0], "completion": history[i][-1]["revision"], "principle": history[i][-1]["principle"],
            "round": rounds, "original": items[i][1], "revisions": history[i]} for i in alive]
    changed = sum(r["completion"] != r["original"] for r in out)
    return out, {"responses": len(items), "revised": len(out), "changed": changed, "unchanged": len(out) - changed,
                 "empty_dropped": empty}


def preference_template(template: str, principle: Principle) -> str:
    """The judge's template for one principle: its preference question in place of {principle}."""
    return template.replace("{principle}", principle.preference.replace("{", "{{").replace("}", "}}"))


def label_with_principles(judge, rows: list[dict], principles: list[Principle], template: str,
                          min_confidence: float, rng: random.Random) -> tuple[list[dict], dict]:
    """Pairs of each row judged against a principle drawn per row, as `label-ai` labels pairs."""
    from alignkit.feedback.rlaif import label_pairs

    drawn = [rng.choice(principles) for _ in rows]
    out, counts = [], {"pairs": 0, "ties": 0, "masked": 0}
    for principle in principles:
        group = [row for row, p in zip(rows, drawn) if p is principle]
        if not group:
            continue
        pairs, c = label_pairs(judge.with_pairwise_template(preference_template(template, principle)), group,
                               min_confidence)
        out += [{**pair, "principle": principle.name} for pair in pairs]
        counts = {k: counts[k] + c[k] for k in counts}
    return out, counts


def _gold_mean(gold: str, prompts: list, completions: list[str]) -> float:
    from alignkit.rollout.rewards import load_reward_fn

    scores = load_reward_fn(gold)(prompts, completions)
    return sum(scores) / max(len(scores), 1)


def _writer(cfg: CAIConfig):
    from alignkit.feedback.writers import load_writer

    return load_writer(cfg.writer or f"lm:{cfg.model}", max_new_tokens=cfg.writer_max_new_tokens,
                       temperature=cfg.temperature, seed=cfg.seed, api_key_env=cfg.api_key_env,
                       concurrency=cfg.concurrency, timeout=cfg.timeout, max_retries=cfg.max_retries)


def _judge_spec(cfg: CAIConfig, sl_model: Path) -> str:
    if cfg.judge:
        return cfg.judge
    return cfg.writer if cfg.writer.startswith("openai-chat:") else f"lm:{sl_model}"


def run(cfg: CAIConfig) -> dict:
    from alignkit.config import require
    from alignkit.data import load_records
    from alignkit.feedback.judges import load_judge
    from alignkit.feedback.rlaif import drop_empty, gold_agreement, sample_candidates
    from alignkit.pipeline import Recipe, Stage, write_jsonl
    from alignkit.train import dpo, reward, sft

    require(cfg, "model", "data")
    cfg.validate()
    principles = load_principles(cfg.principles)
    root = Path(cfg.output_dir)
    sample = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)

    def revise(folder: Path) -> dict:
        records = load_records(cfg.data, "prompts")
        rows, empty = drop_empty(sample_candidates(cfg.model, records, cfg.num_samples, seed=cfg.seed, **sample), 1)
        writer = _writer(cfg)
        out, counts = critique_and_revise(writer, rows, principles, cfg.rounds, random.Random(cfg.seed))
        write_jsonl(folder / "revisions.jsonl", out)
        summary = {**counts, "empty_responses_skipped": empty, "principles": len(principles)}
        if cfg.gold and out:
            prompts = [r["prompt"] for r in out]
            summary["gold_original"] = _gold_mean(cfg.gold, prompts, [r["original"] for r in out])
            summary["gold_revised"] = _gold_mean(cfg.gold, prompts, [r["completion"] for r in out])
        print(writer.report(), flush=True)
        print("revise: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items())
              + f" -> {folder / 'revisions.jsonl'}", flush=True)
        return summary

    def label(folder: Path) -> dict:
        records = load_records(cfg.rl_data or cfg.data, "prompts")
        rows, empty = drop_empty(sample_candidates(str(root / "sl"), records, 2, seed=cfg.seed + 1, **sample), 2)
        judge = load_judge(_judge_spec(cfg, root / "sl"), str(folder / "judge-cache.jsonl"),
                           api_key_env=cfg.api_key_env, concurrency=cfg.concurrency, timeout=cfg.timeout,
                           max_retries=cfg.max_retries)
        pairs, counts = label_with_principles(judge, rows, principles, cfg.preference_template, cfg.min_confidence,
                                              random.Random(cfg.seed + 1))
        write_jsonl(folder / "preferences.jsonl", pairs)
        summary = {**counts, "empty_responses_skipped": empty, "judge": judge.name}
        if judge.reads_pairs:  # a scorer has no order to flip
            summary["flip_rate"] = judge.stats["flip_rate"]
        if cfg.gold and pairs:
            summary["gold_agreement"] = gold_agreement(cfg.gold, pairs)
        print(judge.report(), flush=True)
        print(f"label: {counts['pairs']} pairs ({counts['ties']} ties, {counts['masked']} masked, {empty} empty "
              f"responses skipped)" + (f", gold agreement {summary['gold_agreement']:.3f}" if "gold_agreement" in summary
                                       else "") + f" -> {folder / 'preferences.jsonl'}", flush=True)
        return summary

    rl_config = dpo.DPOConfig if cfg.rl == "dpo" else reward.RewardConfig
    recipe = Recipe(cfg, [
        Stage("revise", "responses critiqued and revised against the principles", run=revise),
        Stage("sl", "SFT on the revisions (SL-CAI)", sft.SFTConfig,
              dict(model=cfg.model, data=str(root / "revise" / "revisions.jsonl")),
              lambda r: {"steps": r.steps, "final_loss": r.history[-1].get("train/loss") if r.history else None}),
        Stage("label", "AI preferences between two SL-CAI samples, judged against a principle", run=label),
        Stage("rl", f"{'DPO' if cfg.rl == 'dpo' else 'a reward model'} on the AI preferences (RL-CAI)", rl_config,
              dict(model=str(root / "sl"), data=str(root / "label" / "preferences.jsonl")),
              lambda r: {"steps": r.steps, **{k: v for k, v in r.eval_metrics.items() if isinstance(v, float)}}),
    ], prog="cai")
    for i, stage in enumerate(recipe.stages, 1):
        recipe.run(i, stage)
    print(f"cai: SL-CAI model {root / 'sl'}, RL-CAI {'model' if cfg.rl == 'dpo' else 'reward model'} {root / 'rl'}",
          flush=True)
    return recipe.summaries


def main(argv: list[str] | None = None) -> dict:
    from alignkit.config import parse_config

    return run(parse_config(CAIConfig, sys.argv[1:] if argv is None else argv, prog="alignkit cai"))
