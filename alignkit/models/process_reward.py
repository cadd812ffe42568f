"""Process reward models (PRMs): a causal LM backbone with a scalar head read at the end of each step.

    prm = ProcessRewardModel.load("runs/prm")
    prm.step_scores(["Question: What is 3+4-2?\\nAnswer:"], [[" 3+4=7", " 7-2=5", " so 5"]])  # [[0.98, 0.97, 0.99]]
    prm.score(prompts, completions)   # a reward function: the steps' scores aggregated (min by default)

The input is [prompt | step_1 + sep | ... | step_K + sep], each piece tokenized on its own
(`data.tokenize_steps`); p_k = sigmoid(w^T h_k) at the last token of piece k is P(step k is correct),
so a step's score never depends on the steps after it. A checkpoint is a plain
`AutoModelForTokenClassification` directory (num_labels=1) whose config.json also holds
`step_separator`: a completion's steps are `completion.split(step_separator)`.
"""

from __future__ import annotations

import math

import torch

from alignkit.models.forward import position_ids_from_mask

AGGREGATES = ("min", "prod", "last", "mean")


def load_prm_backbone(path: str, dtype: str = "float32"):
    """`AutoModelForTokenClassification.from_pretrained(path, num_labels=1)`: a causal LM checkpoint gets a
    fresh scalar head, applied at every position."""
    from transformers import AutoModelForTokenClassification

    from alignkit.models.reward import load_with_scalar_head

    return load_with_scalar_head(AutoModelForTokenClassification, path, dtype)


def is_process_reward_model(path: str) -> bool:
    """Whether a model folder holds a PRM (`alignkit prm` writes `step_separator` into its config.json)."""
    import json
    from pathlib import Path

    config = Path(path) / "config.json"
    return config.is_file() and "step_separator" in json.loads(config.read_text())


def step_logits(model, batch: dict) -> torch.Tensor:
    """z_k = w^T h at each step's last token (`batch["loss_mask"]` == 1, as `data.pad_steps` marks them).

    Shapes: a [B, T] batch -> [S] float32, the steps of row 0 in order, then row 1's, ... Left or right
    padding give the same values: positions come from the attention mask."""
    mask = batch["attention_mask"]
    out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids_from_mask(mask),
                use_cache=False)
    return out.logits[..., 0][batch["loss_mask"].bool()].float()


def step_end_columns(token_texts: list[str], separator: str) -> list[int]:
    """The column of each step's last token in a completion given as its tokens' texts, for the steps
    `ProcessRewardModel.split` finds in their concatenation: the token holding each separator's last
    character, and the last token for a step after the last separator (an EOS, whose text is empty,
    when the completion ended)."""
    import bisect
    from itertools import accumulate

    text = "".join(token_texts)
    ends = list(accumulate(len(t) for t in token_texts))  # character end of each token
    columns, start = [], text.find(separator)
    while start >= 0:
        columns.append(bisect.bisect_right(ends, start + len(separator) - 1))
        start = text.find(separator, start + len(separator))
    if token_texts and text.split(separator)[-1].strip():
        columns.append(len(token_texts) - 1)
    return columns


def aggregate_steps(scores: list[float], how: str = "min") -> float:
    """One score for a solution from its steps' p_k: min_k p_k (the weakest step, Wang et al. 2024),
    prod_k p_k (P(every step correct), Lightman et al. 2023), p_K (the last) or the mean; 0.0 for no steps."""
    if how not in AGGREGATES:
        raise ValueError(f"aggregate {how!r} is not one of {', '.join(AGGREGATES)}")
    if not scores:
        return 0.0
    if how == "min":
        return min(scores)
    if how == "prod":
        return math.prod(scores)
    if how == "last":
        return scores[-1]
    return sum(scores) / len(scores)


class ProcessRewardModel:
    """A trained PRM: per-step scores, and a reward function `score(prompts, completions)` that aggregates them."""

    def __init__(self, model, tokenizer, separator: str = "\n", max_length: int = 1024, aggregate: str = "min"):
        aggregate_steps([], aggregate)  # a bad name fails here, not at the first score
        self.model, self.tokenizer = model.eval(), tokenizer
        self.separator, self.max_length, self.aggregate = separator, max_length, aggregate

    @classmethod
    def load(cls, path: str, device=None, dtype: str = "float32", **kw) -> ProcessRewardModel:
        from alignkit.models.load import load_tokenizer

        model = load_prm_backbone(path, dtype)
        separator = getattr(model.config, "step_separator", "\n")
        return cls(model.to(device) if device is not None else model, load_tokenizer(path), separator, **kw)

    def split(self, completion: str) -> list[str]:
        """A completion's steps: its pieces between separators; a trailing separator ends the last step."""
        pieces = completion.split(self.separator)
        if pieces and not pieces[-1].strip():
            pieces.pop()
        return pieces

    @torch.no_grad()
    def step_scores(self, prompts: list, steps: list[list[str]], batch_size: int = 32) -> list[list[float]]:
        """p_k of every step of every (prompt, steps); a solution without steps gets []. Steps cut by
        max_length get no score (the list is shorter)."""
        from alignkit.data.tokenize import pad_steps, tokenize_steps

        rows = [i for i, s in enumerate(steps) if s]
        records = [{"prompt": prompts[i], "steps": steps[i], "labels": [0.0] * len(steps[i]), "_where": f"<score>:{i}"}
                   for i in rows]
        examples, _ = tokenize_steps(records, self.tokenizer, self.max_length, self.separator)
        device = next(self.model.parameters()).device
        out: list[list[float]] = [[] for _ in steps]
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = {k: v.to(device) for k, v in pad_steps(chunk, self.tokenizer.pad_token_id).items()}
            p = torch.sigmoid(step_logits(self.model, batch)).tolist()
            for ex in chunk:
                n = len(ex["step_labels"])
                out[rows[ex["id"]]], p = p[:n], p[n:]
        return out

    def completion_step_scores(self, prompts: list, token_texts: list[list[str]]) -> list[list[tuple[int, float]]]:
        """(column, p_k) of each step of each completion, the completions given as the texts of their tokens
        (the policy's tokens, decoded one by one): where a trainer places each step's reward."""
        scores = self.step_scores(prompts, [self.split("".join(t)) for t in token_texts])
        return [list(zip(step_end_columns(t, self.separator), s)) for t, s in zip(token_texts, scores)]

    def score(self, prompts: list, completions: list, batch_size: int = 32, **fields) -> list[float]:
        """The reward of each completion: its steps' scores aggregated (`aggregate`)."""
        per_step = self.step_scores(prompts, [self.split(c) for c in completions], batch_size)
        return [aggregate_steps(s, self.aggregate) for s in per_step]

    __call__ = score  # a reward function, e.g. for `best_of_n`
