"""Data: loading and checking records (file:line errors), mixtures of sources, chat templates, tokenisation with
loss masks."""

from alignkit.data.chat import render_prompt, split_prompt_completion
from alignkit.data.formats import DataError, identical_pairs, load_records
from alignkit.data.mixture import mix, split_sources
from alignkit.data.tokenize import (
    TruncationReport,
    pack_examples,
    pad_batch,
    pad_groups,
    tokenize_prompts,
    tokenize_responses,
    tokenize_sft,
    tokenize_text,
)

__all__ = [
    "DataError",
    "load_records",
    "identical_pairs",
    "mix",
    "split_sources",
    "split_prompt_completion",
    "render_prompt",
    "tokenize_sft",
    "tokenize_text",
    "pad_batch",
    "pack_examples",
    "pad_groups",
    "tokenize_responses",
    "tokenize_prompts",
    "TruncationReport",
]
