"""Reward models: a transformers backbone with a scalar head, read at the last real token.

    rm = RewardModel.load("runs/rm")
    rm.score(["Question: What is 2+2?\\nAnswer:"], [" 4"])   # -> [1.73]

A checkpoint is a plain `AutoModelForSequenceClassification` directory (num_labels=1).
`reward_mean` / `reward_std` in its config.json, when present, normalise scores.
"""

from __future__ import annotations

import torch

from alignkit.models.forward import position_ids_from_mask


def load_reward_backbone(path: str, dtype: str = "float32"):
    """`AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)`: a causal LM
    checkpoint gets a fresh scalar head."""
    from transformers import AutoModelForSequenceClassification

    return load_with_scalar_head(AutoModelForSequenceClassification, path, dtype)


def load_with_scalar_head(auto_class, path: str, dtype: str = "float32"):
    """`auto_class.from_pretrained(path, num_labels=1)` (a sequence- or token-classification class),
    with a pad token id set: a causal LM checkpoint gets a fresh scalar head."""
    from transformers.utils import logging as hf_logging

    from alignkit.models.load import DTYPES, check_model_path, hub_errors

    check_model_path(path)
    if dtype not in DTYPES:
        raise ValueError(f"dtype '{dtype}' is not one of {sorted(DTYPES)}")
    # Loading a causal LM reports its missing `score` head at length; a fresh head is the point here.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with hub_errors(path):
            model = auto_class.from_pretrained(path, num_labels=1, dtype=DTYPES[dtype])
    finally:
        hf_logging.set_verbosity(verbosity)
    if model.config.pad_token_id is None:  # its forward needs one to batch; alignkit's tokenizers pad with EOS
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    return model


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """h [N, T, H]: the backbone's last hidden state (after its final norm), from the model's
    OWN forward, so that a DDP wrapper around it sees the call and averages the gradients
    (a call to the inner backbone would bypass it: every process would train alone)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                output_hidden_states=True)
    return out.hidden_states[-1]


def _score_head(model):
    return getattr(model, "module", model).score


def reward_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """r = w^T h_last: the scalar head on the hidden state of each row's LAST REAL token.

    Shapes: [N, T] -> [N] float32. The last real token comes from the attention mask,
    not from `input_ids != pad_id`, so a tokenizer whose pad is its EOS still reads
    the reward at the EOS that ends the response (left or right padding alike).
    """
    hidden = final_hidden(model, input_ids, attention_mask, position_ids_from_mask(attention_mask))
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = torch.where(attention_mask.bool(), positions, -1).argmax(-1)
    return _score_head(model)(hidden[torch.arange(len(last), device=last.device), last]).squeeze(-1).float()


def shared_prompt_rewards(model, batch: dict) -> torch.Tensor:
    """`reward_forward` of a batch laid out by `pad_shared_prompt`: one row per prompt,
    [prompt | response 1 | ... | response K], each response attending to the prompt and
    itself only. r_bj = w^T h at response j's last real token: the reward of the row
    prompt + response j alone, with the prompt computed once. Returns [R] float32, one per
    response, example by example as the rows of `pad_groups`."""
    from alignkit.models.forward import _model_mask, shared_prompt_mask

    segments = batch["segment_ids"]
    hidden = final_hidden(model, batch["input_ids"], _model_mask(shared_prompt_mask(segments), model), batch["position_ids"])
    responses = torch.arange(1, int(batch["group_sizes"].max()) + 1, device=segments.device)
    columns = torch.arange(segments.shape[1], device=segments.device)
    last = torch.where(segments[:, :, None] == responses, columns[None, :, None], -1).amax(1)  # [B, K]
    present = responses[None, :] <= batch["group_sizes"][:, None]
    rows = torch.arange(len(last), device=last.device)[:, None].expand_as(last)
    return _score_head(model)(hidden[rows[present], last[present]]).squeeze(-1).float()


def batch_rewards(model, batch: dict) -> torch.Tensor:
    """Rewards [R] of a `pad_groups` batch (one row per response) or a `pad_shared_prompt` one."""
    if "segment_ids" in batch:
        return shared_prompt_rewards(model, batch)
    return reward_forward(model, batch["input_ids"], batch["attention_mask"])


class RewardModel:
    """A trained reward model as a reward function `score(prompts, completions) -> list[float]`."""

    def __init__(self, model, tokenizer, max_length: int = 1024, normalize: bool = True):
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, max_length
        cfg = model.config
        self.mean = getattr(cfg, "reward_mean", 0.0) if normalize else 0.0
        self.std = getattr(cfg, "reward_std", 1.0) if normalize else 1.0

    @classmethod
    def load(cls, path: str, device=None, dtype: str = "float32", **kw) -> RewardModel:
        from alignkit.models.load import load_tokenizer

        model = load_reward_backbone(path, dtype)
        return cls(model.to(device) if device is not None else model, load_tokenizer(path), **kw)

    @torch.no_grad()
    def score(self, prompts: list, completions: list, batch_size: int = 32, **fields) -> list[float]:
        """Rewards of each (prompt, completion), tokenised exactly as in training."""
        from alignkit.data import pad_batch, tokenize_sft

        records = [{"prompt": p, "completion": c, "_where": f"<score>:{i}"} for i, (p, c) in enumerate(zip(prompts, completions))]
        examples, _ = tokenize_sft(records, self.tokenizer, self.max_length)
        device = next(self.model.parameters()).device
        out: list[float] = []
        for i in range(0, len(examples), batch_size):
            batch = pad_batch(examples[i : i + batch_size], self.tokenizer.pad_token_id)
            r = reward_forward(self.model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
            out += ((r - self.mean) / self.std).tolist()
        return out


def token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """V(s_t) = w^T h_t at the given positions: the scalar head read at every state.

    Shapes: [N, T] and columns [C] -> [N, C] float32. A value model is a reward-model
    checkpoint (`AutoModelForSequenceClassification`, num_labels=1) whose head is
    applied per position instead of at the last token.
    """
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    return model.score(hidden[:, columns]).squeeze(-1).float()
