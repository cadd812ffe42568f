"""A campaign's judgements as training files, streamed from the database.

    alignkit export --database sqlite:///runs/app/app.db --campaign sft-vs-dpo --format dpo --output pairs.jsonl
    alignkit dpo --model runs/demo/sft --data pairs.jsonl          # trains on it unchanged

Each judgement is one annotator's decision; with overlap > 1 an item gives one row per
annotator, as each is a draw from the population of labellers.

    dpo, rm    pairwise A / B  -> one {prompt, chosen, rejected}
               rank of K       -> the K(K-1)/2 pairs (i before j in the ranking: i chosen)
               tie, both_bad   -> counted, not exported (no preference to learn)
    kto        thumbs up/down  -> {prompt, completion, label: true/false}
    ranking    rank of K       -> {prompt, responses: best first}; pairwise A / B -> 2 responses

Every row also carries `campaign`, `annotator` (the user id), `item_id` and `judgement_id`
(and `models` where known): extra fields the trainers ignore. The summary counts every
judgement by what became of it; nothing is dropped without a count.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from alignkit.app.db import Campaign, Item, Judgement, Response

FORMATS = ("dpo", "rm", "kto", "ranking")
# Which judgements each format takes; the others are counted as "not this format".
TAKES = {"dpo": {"pairwise", "rank"}, "rm": {"pairwise", "rank"}, "kto": {"thumbs"}, "ranking": {"pairwise", "rank"}}


def rows(session: Session, campaign_name: str, fmt: str, counts: Counter | None = None) -> Iterator[dict]:
    """Training rows of one campaign, in judgement order; `counts` collects what each judgement became."""
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r} is not one of {', '.join(FORMATS)}")
    campaign = session.scalar(select(Campaign).where(Campaign.name == campaign_name))
    if campaign is None:
        names = ", ".join(session.scalars(select(Campaign.name))) or "none"
        raise ValueError(f"no campaign named {campaign_name!r} (campaigns: {names})")
    counts = Counter() if counts is None else counts
    query = (select(Judgement, Item.prompt).join(Item, Item.id == Judgement.item_id)
             .where(Judgement.campaign_id == campaign.id).order_by(Judgement.id))
    texts: dict[int, tuple[str, str | None]] = {}
    for j, prompt in session.execute(query.execution_options(yield_per=500)):
        counts["judgements"] += 1
        if campaign.kind not in TAKES[fmt]:
            counts[f"skipped: {campaign.kind} judgements are not {fmt} data"] += 1
            continue
        missing = [i for i in j.shown if i not in texts]
        if missing:
            for rid, text, model in session.execute(select(Response.id, Response.text, Response.model)
                                                    .where(Response.id.in_(missing))):
                texts[rid] = (text, model)
        meta = {"campaign": campaign.name, "annotator": j.user_id, "item_id": j.item_id, "judgement_id": j.id}
        if campaign.kind == "thumbs":
            text, model = texts[j.shown[0]]
            counts[f"thumbs {j.choice}"] += 1
            yield {"prompt": prompt, "completion": text, "label": j.choice == "up", **meta, "model": model}
            continue
        if j.ranking is None:  # tie or both bad
            counts[f"{j.choice}: counted, not exported"] += 1
            continue
        ranked = [texts[i] for i in j.ranking]
        if fmt == "ranking":
            counts["rankings"] += 1
            yield {"prompt": prompt, "responses": [t for t, _ in ranked], **meta, "models": [m for _, m in ranked]}
            continue
        counts["decisive judgements"] += 1
        for a in range(len(ranked)):
            for b in range(a + 1, len(ranked)):
                counts["pairs"] += 1
                yield {"prompt": prompt, "chosen": ranked[a][0], "rejected": ranked[b][0], **meta,
                       "chosen_model": ranked[a][1], "rejected_model": ranked[b][1]}


def export(database: str, campaign: str, fmt: str, output: str) -> Counter:
    """Write the rows to `output` (JSONL, renamed into place when complete); returns the counts."""
    from alignkit.app.db import make_engine

    if not output:
        raise ValueError("export: set --output FILE")
    engine = make_engine(database)
    counts: Counter = Counter()
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with Session(engine) as session, tmp.open("w", encoding="utf-8") as f:
            for row in rows(session, campaign, fmt, counts):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                counts["rows written"] += 1
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        engine.dispose()
    return counts


def main(argv: list[str] | None = None) -> Counter:
    from alignkit.app.config import ExportConfig
    from alignkit.config import ConfigError, parse_config

    cfg = parse_config(ExportConfig, sys.argv[1:] if argv is None else argv, prog="alignkit export")
    if not cfg.database or not cfg.campaign:
        raise ConfigError("export: set --database URL and --campaign NAME")
    try:
        counts = export(cfg.database, cfg.campaign, cfg.format, cfg.output)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(f"exported {counts['rows written']} {cfg.format} rows of campaign {cfg.campaign!r} to {cfg.output}")
    for key, value in sorted(counts.items()):
        if key != "rows written":
            print(f"  {key}: {value}")
    return counts
