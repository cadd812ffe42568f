"""A campaign's items from its config: responses sampled once from checkpoints, or read from a file.

    # campaign.yaml
    name: sft-vs-dpo
    kind: pairwise               # pairwise | rank | thumbs
    prompts: runs/demo/data/prompts_eval.jsonl
    models: [sft=runs/demo/sft, dpo=runs/demo/dpo]
    num_prompts: 50
    overlap: 2
    guidelines: guidelines.md
    annotators: [alice, bob]

With `models`, every model answers every prompt `samples_per_model` times (alignkit's own
sampler, seeded): a pairwise item needs 2 responses, a rank item K, and thumbs makes one
item per response. With `responses`, a file gives them: ranking records (`prompt`,
`responses`, optional `models` naming each) or, for thumbs, `prompt` / `completion`
(optional `model`). Bad rows are reported by file, line and field before anything is stored.
"""

from __future__ import annotations

from pathlib import Path

from alignkit.app.config import CampaignConfig
from alignkit.app.service import NewItem
from alignkit.data import DataError, load_records


def _guidelines(text: str) -> str:
    if text.endswith(".md") and "\n" not in text:
        path = Path(text)
        if not path.is_file():
            raise DataError(text, None, "guidelines file not found")
        return path.read_text(encoding="utf-8")
    return text


def _from_file(cfg: CampaignConfig) -> list[NewItem]:
    if cfg.kind == "thumbs":
        records = load_records(cfg.responses, "sft")
        for r in records:
            if not isinstance(r["completion"], str):
                raise DataError(r["_where"], "completion", "must be a string in a campaign")
        records = records[:cfg.num_prompts or None]
        return [NewItem(r["prompt"], [(r["completion"], r.get("model"))]) for r in records]
    records = load_records(cfg.responses, "ranking")
    want = 2 if cfg.kind == "pairwise" else len(records[0]["responses"])
    items = []
    for r in records[:cfg.num_prompts or None]:
        if len(r["responses"]) != want:
            raise DataError(r["_where"], "responses", f"a {cfg.kind} campaign needs {want} responses per row, "
                                                      f"got {len(r['responses'])}")
        if r.get("models") and r.get("scores") is not None:  # load_records sorted responses by score, not models
            raise DataError(r["_where"], "models", "give responses in order without `scores` when naming models")
        models = r.get("models") or [None] * want
        if not isinstance(models, list) or len(models) != want or not all(m is None or isinstance(m, str) for m in models):
            raise DataError(r["_where"], "models", f"must be a list of {want} model names, one per response")
        if not all(isinstance(x, str) for x in r["responses"]) or not isinstance(r["prompt"], str):
            raise DataError(r["_where"], "responses", "must be strings in a campaign")
        items.append(NewItem(r["prompt"], list(zip(r["responses"], models))))
    return items


def _from_models(cfg: CampaignConfig) -> list[NewItem]:
    from alignkit.app.contestants import parse_contestants

    records = load_records(cfg.prompts, "prompts")[:cfg.num_prompts or None]
    prompts = [r["prompt"] for r in records]
    if not all(isinstance(p, str) for p in prompts):
        raise DataError(cfg.prompts, "prompt", "a campaign's prompts must be strings")
    answers: list[list[tuple[str, str]]] = [[] for _ in prompts]
    contestants = parse_contestants(cfg.models, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    for name, contestant in contestants.items():
        for k in range(cfg.samples_per_model):
            for i, text in enumerate(contestant.generate(prompts, seed=cfg.seed + k)):
                answers[i].append((text, name))
    if cfg.kind == "thumbs":
        return [NewItem(p, [a]) for p, group in zip(prompts, answers) for a in group]
    return [NewItem(p, group) for p, group in zip(prompts, answers)]


def build_items(cfg: CampaignConfig) -> tuple[list[NewItem], dict, str]:
    """(items, source description, guidelines text) for a campaign config."""
    if bool(cfg.responses) == bool(cfg.models):
        raise ValueError(f"campaign {cfg.name!r}: set exactly one of `responses` (a file) and `models` (checkpoints)")
    if cfg.models and not cfg.prompts:
        raise ValueError(f"campaign {cfg.name!r}: `models` needs `prompts`")
    if cfg.samples_per_model < 1:
        raise ValueError(f"campaign {cfg.name!r}: samples_per_model must be at least 1")
    items = _from_models(cfg) if cfg.models else _from_file(cfg)
    source = ({"models": cfg.models, "prompts": cfg.prompts, "samples_per_model": cfg.samples_per_model,
               "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "seed": cfg.seed}
              if cfg.models else {"responses": cfg.responses})
    return items, source, _guidelines(cfg.guidelines)
