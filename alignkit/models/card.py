"""A model card (README.md in the Hub's format) for every model directory a trainer saves.

The card holds what a reader of a Hub page needs: what the model was aligned to, the command and
the resolved config, the data files with their sha256 fingerprints, the base model, the final
metrics and the alignkit version. `huggingface_hub.ModelCard.load(path)` parses it.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import yaml

COMMAND: list[str] | None = None
"""The command line that started this process (set by `alignkit.cli.main`; None from the Python API)."""

DATA_KEYS = ("data", "eval_data", "teacher", "reward", "ref_model")


def aligned_to(name: str, cfg) -> str:
    """One sentence: what the training signal of trainer `name` was."""
    data = getattr(cfg, "data", "")
    family = name.split("-round")[0]
    if family in ("grpo", "rloo", "ppo", "bon", "iterative-dpo"):
        weights = getattr(cfg, "reward_weights", []) or [1.0] * len(cfg.reward)
        rewards = ", ".join(f"`{r}` (weight {w:g})" for r, w in zip(cfg.reward, weights))
        return f"The reward {rewards} on the prompts in `{data}`, with a KL penalty of beta {getattr(cfg, 'beta', 0)}."
    if family in ("dpo", "kto"):
        what = "preference pairs" if family == "dpo" else "thumbs-up / thumbs-down labels"
        return f"The {what} in `{data}` (beta {cfg.beta}), no reward model."
    if family == "rm":
        return f"A reward model: it scores responses by the preferences in `{data}`."
    if family == "distill":
        return f"The token distributions of the teacher `{cfg.teacher}`, on `{data}` and on its own samples."
    if family == "sft":
        return f"The demonstrations in `{data}` (supervised fine-tuning)."
    if family == "pretrain":
        return f"Not aligned: next-token prediction on the text in `{data}`."
    return f"`{data}` ({name})."


def data_files(cfg) -> list[tuple[str, str, str]]:
    """(key, path, sha256) of each local file among the data-like keys (a Hub name or folder: no hash)."""
    from alignkit.train.loop import file_sha256

    rows = []
    for key in DATA_KEYS:
        value = getattr(cfg, key, None)
        for spec in value if isinstance(value, list) else str(value or "").split(","):
            spec = spec.strip()
            if not spec:
                continue
            path = Path(spec)
            rows.append((key, spec, file_sha256(path) if path.is_file() else "(not a file: a Hub name, folder "
                                                                              "or callable)"))
    return rows


def model_card(name: str, cfg, config: dict, eval_metrics: dict, initial_metrics: dict) -> str:
    """The card's text: YAML metadata (library, tags, base model) then the sections."""
    import alignkit

    base = getattr(cfg, "model", "")
    meta = {"library_name": "transformers", "tags": ["alignkit", name.split("-round")[0]]}
    if base and not Path(base).exists():  # a Hub id: the Hub links it; a local folder means nothing there
        meta["base_model"] = base
    command = shlex.join(COMMAND) if COMMAND else f"alignkit.train (Python API), trainer {name}"
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {Path(cfg.output_dir).name}", "",
        f"Trained with [alignkit](https://pypi.org/project/alignkit/) {getattr(alignkit, '__version__', '')}"
        f" (`{name}`) from `{base}`.", "",
        "## What it was aligned to", "", aligned_to(name, cfg), "",
        "## Command", "", "```", command, "```", "",
        "## Data", "", "| key | source | sha256 |", "| --- | --- | --- |",
        *[f"| {k} | `{p}` | {h} |" for k, p, h in data_files(cfg)], "",
        "## Final metrics", "",
    ]
    if eval_metrics:
        lines += ["| held-out metric | before | after |", "| --- | --- | --- |"]
        lines += [f"| {k} | {initial_metrics.get(k, float('nan')):.4g} | {v:.4g} |" for k, v in sorted(eval_metrics.items())]
    else:
        lines.append("No held-out evaluation (set `eval_data` or `eval_fraction`).")
    lines += ["", "## Config", "", "```yaml", yaml.safe_dump(json.loads(json.dumps(config, default=str)),
                                                             sort_keys=False).strip(), "```", "",
              "Load it with `transformers.AutoModelForCausalLM.from_pretrained` (a reward model: "
              "`AutoModelForSequenceClassification`).", ""]
    return "\n".join(lines)


def write_model_card(path: Path, name: str, cfg, config: dict, eval_metrics: dict, initial_metrics: dict) -> Path:
    """Write README.md into the model directory `path`; returns its path."""
    out = Path(path) / "README.md"
    out.write_text(model_card(name, cfg, config, eval_metrics, initial_metrics))
    return out
