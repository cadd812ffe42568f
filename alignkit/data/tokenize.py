"""Token ids and loss masks, with every truncation counted.

    examples, report = tokenize_sft(records, tokenizer, max_length=512)
    print(report)   # sft data: 1,000 examples, 12 prompts left-truncated, 1 completion truncated (340 tokens dropped)
    batch = pad_batch(examples[:8], tokenizer.pad_token_id)

An example is `{"id": int, "input_ids": list[int], "loss_mask": list[int]}`; the loss
mask is 1 where the token is trained on (the completion and its EOS for SFT, every
token for pretraining text).

SFT: prompt and completion are tokenized separately and concatenated, so the boundary
is exact (no token straddles it). The prompt gets the tokenizer's special tokens (BOS
for Llama-style tokenizers) unless its text already starts with the BOS text, as a
chat-template rendering may; the completion gets none, and EOS is appended unless it
already ends with EOS. Too long: the prompt is left-truncated first (its oldest tokens
go, a leading BOS stays), then the completion is right-truncated (losing its EOS: a
cut-off completion is not an ending).

SFT with a loss on every assistant turn (`tokenize_sft(..., assistant_only_loss=True)`, a
conversation): the whole rendering is tokenized in one piece and the mask comes from the
assistant messages' character spans (`chat.assistant_spans`) through the tokens' offsets;
the "prompt" truncated first is everything before the last assistant message.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from alignkit.data.chat import assistant_spans, is_conversation, render_prompt, split_prompt_completion
from alignkit.data.formats import DataError


@dataclass
class TruncationReport:
    """What tokenisation cut. For text data, `completion_truncated` counts truncated documents."""

    examples: int = 0
    prompt_truncated: int = 0
    completion_truncated: int = 0
    tokens_dropped: int = 0
    rows_truncated: int = 0  # examples that lost any token
    kind: str = "sft"

    def __str__(self) -> str:
        def n(count: int, word: str) -> str:
            return f"{count:,} {word}{'' if count == 1 else 's'}"

        dropped = f"({n(self.tokens_dropped, 'token')} dropped)"
        if self.kind == "text":
            return f"text data: {n(self.examples, 'example')}, {n(self.completion_truncated, 'document')} truncated {dropped}"
        return (
            f"{self.kind} data: {n(self.examples, 'example')}, {n(self.prompt_truncated, 'prompt')} left-truncated, "
            f"{n(self.completion_truncated, 'completion')} truncated {dropped}"
        )

    def __add__(self, other: TruncationReport) -> TruncationReport:
        counts = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self) if f.name != "kind"}
        return TruncationReport(**counts, kind=self.kind)

    def check_not_all_truncated(self, source: str, max_length: int) -> None:
        """A DataError when every example lost tokens: nothing whole would be trained on."""
        if self.examples > 0 and self.rows_truncated == self.examples:
            raise DataError(str(source), None, (
                f"every one of the {self.examples:,} {self.kind} examples is longer than max_length={max_length} "
                f"and was truncated ({self.tokens_dropped:,} tokens dropped); raise max_length"))


def _batch_ids(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id: a model cannot learn to stop without one")
    return tokenizer.eos_token_id


def _prompt_ids(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """Prompts with special tokens, except those whose text already starts with BOS."""
    bos = tokenizer.bos_token
    has_bos = [bool(bos) and p.startswith(bos) for p in prompts]
    with_special = iter(_batch_ids(tokenizer, [p for p, b in zip(prompts, has_bos) if not b], True))
    without = iter(_batch_ids(tokenizer, [p for p, b in zip(prompts, has_bos) if b], False))
    return [next(without) if b else next(with_special) for b in has_bos]


def prompt_length(loss_mask: list[int]) -> int:
    """Tokens before the first loss token: the prompt of a [prompt | completion] row (all of it
    when nothing is trained on)."""
    return loss_mask.index(1) if 1 in loss_mask else len(loss_mask)


def _too_long(record: dict, n: int, max_length: int) -> DataError:
    return DataError(record.get("_where", "<record>"), "prompt",
                     f"{n} tokens exceed max_length={max_length} (truncation: left would drop the oldest prompt tokens)")


def _rendered(records: list[dict], render) -> list:
    """render(record) of each record; a ValueError (a template that cannot be cut) becomes a
    DataError naming the record's file:line."""
    out = []
    for record in records:
        try:
            out.append(render(record))
        except ValueError as e:
            raise DataError(record.get("_where", "<record>"), None, str(e)) from None
    return out


def _ends_with_eos(ids: list[int], text: str, tokenizer: Any, eos: int) -> bool:
    """Whether a completion already ends with EOS (its last id, or the EOS text a template wrote):
    otherwise EOS is appended."""
    return bool(ids and ids[-1] == eos) or bool(tokenizer.eos_token and text.rstrip().endswith(tokenizer.eos_token))


def _split_rows(records: list[dict], tokenizer: Any) -> list[tuple[list[int], list[int], int]]:
    """(ids, loss_mask, cut) of each record as [prompt | completion + EOS] (see the module
    docstring), cut = the prompt's length; nothing truncated yet."""
    eos = _eos_id(tokenizer)
    pairs = _rendered(records, lambda r: split_prompt_completion(r, tokenizer))
    prompts, completions = [p for p, _ in pairs], [c for _, c in pairs]
    rows = []
    for p, c, text in zip(_prompt_ids(tokenizer, prompts), _batch_ids(tokenizer, completions, False), completions):
        c = c if _ends_with_eos(c, text, tokenizer, eos) else c + [eos]
        rows.append((p + c, [0] * len(p) + [1] * len(c), len(p)))
    return rows


def _ids_and_offsets(tokenizer: Any, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, character offsets) of each text, with special tokens unless it starts with the BOS
    text (the rule of `_prompt_ids`). Needs a fast tokenizer (offsets come from `tokenizers`)."""
    bos = tokenizer.bos_token
    out: list = [None] * len(texts)
    for special in (True, False):
        index = [i for i, t in enumerate(texts) if (bool(bos) and t.startswith(bos)) != special]
        if not index:
            continue
        try:
            enc = tokenizer([texts[i] for i in index], add_special_tokens=special, return_offsets_mapping=True)
        except NotImplementedError:  # a slow (pure Python) tokenizer has no offsets
            raise ValueError("a loss on every assistant message needs a fast tokenizer (its character offsets); "
                             "this one is slow: set assistant_only_loss off to train on the last message only") from None
        for i, ids, offsets in zip(index, enc["input_ids"], enc["offset_mapping"]):
            out[i] = (ids, [tuple(o) for o in offsets])
    return out


def span_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose characters [start, end) overlap one of `spans`, else 0.

    A token straddling a span's edge is in (the rule of transformers' assistant-token masks:
    every token from the one holding a span's first character to the one holding its last);
    a token with no characters (BOS or EOS the tokenizer adds, offsets (0, 0)) is out.
    """
    return [int(end > start and any(start < b and end > a for a, b in spans)) for start, end in offsets]


def _conversation_rows(records: list[dict], tokenizer: Any) -> list[tuple[list[int], list[int], int]]:
    """(ids, loss_mask, cut) of each message-list record with every assistant message trained on:
    the whole rendering tokenized in one piece (the ids other tools give the conversation), its
    `assistant_spans` mapped to tokens by their offsets, EOS appended as for a completion; cut =
    the first token of the last span (what is left-truncated first lies before it)."""
    eos = _eos_id(tokenizer)
    rendered = _rendered(records, lambda r: assistant_spans(r, tokenizer))
    texts, spans = [t for t, _ in rendered], [s for _, s in rendered]
    rows = []
    for text, record_spans, (ids, offsets) in zip(texts, spans, _ids_and_offsets(tokenizer, texts)):
        mask = span_mask(offsets, record_spans)
        last = span_mask(offsets, record_spans[-1:])
        cut = last.index(1) if 1 in last else len(ids)
        if not _ends_with_eos(ids, text, tokenizer, eos):
            ids, mask = ids + [eos], mask + [1]
        rows.append((ids, mask, cut))
    return rows


def _truncate(ids: list[int], mask: list[int], cut: int, max_length: int, bos: int | None,
              report: TruncationReport) -> tuple[list[int], list[int]]:
    """`ids` and `mask` cut to `max_length`: the oldest tokens before `cut` go first (a leading
    BOS stays), then the last tokens; counted in `report`."""
    excess = len(ids) - max_length
    if excess <= 0:
        return ids, mask
    report.rows_truncated += 1
    keep = 1 if (cut and bos is not None and ids[0] == bos) else 0  # the leading BOS stays
    drop = min(excess, cut - keep)
    if drop > 0:
        ids, mask = ids[:keep] + ids[keep + drop:], mask[:keep] + mask[keep + drop:]
        report.prompt_truncated += 1
        report.tokens_dropped += drop
    excess -= drop
    if excess > 0:
        ids, mask = ids[: len(ids) - excess], mask[: len(mask) - excess]
        report.completion_truncated += 1
        report.tokens_dropped += excess
    return ids, mask


def tokenize_sft(records: list[dict], tokenizer: Any, max_length: int, truncation: str = "left",
                 assistant_only_loss: bool = False) -> tuple[list[dict], TruncationReport]:
    """Tokenize sft records (see `load_records(..., "sft")`) into examples with loss masks.

    Returns (examples, report); example i comes from records[i] and has `id` i,
    len(input_ids) <= max_length, loss_mask 0 on the prompt and 1 on the completion + EOS.

    assistant_only_loss=True, for message-list records (`chat.is_conversation`): loss_mask is 1
    on every assistant message's span (`chat.assistant_spans`: its content and the end-of-turn
    text the template writes with it; of `prompt` + `completion` lists, the completion's
    assistant messages) and on the EOS appended after the last, 0 elsewhere, the tool messages
    between assistant turns included. The ids are the whole rendering tokenized in one piece
    and each token whose characters overlap a span is trained on (`span_mask`); this needs a
    fast tokenizer. "Prompt" is then everything before the last assistant message. String
    records are tokenized as without it.

    An over-long row loses its oldest prompt tokens, then its last completion tokens
    (truncation="left", counted), or is a DataError naming it (truncation="error").
    No row is ever dropped: BOS plus at least one completion token always fit.
    A DataError naming the record when its chat template cannot be cut at the prompt or at
    an assistant message (see `split_prompt_completion`, `assistant_spans`).
    """
    if truncation not in ("left", "error"):
        raise ValueError(f"truncation must be 'left' or 'error', got {truncation!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    by_turn = [assistant_only_loss and is_conversation(r) for r in records]
    turn_rows = iter(_conversation_rows([r for r, t in zip(records, by_turn) if t], tokenizer))
    split_rows = iter(_split_rows([r for r, t in zip(records, by_turn) if not t], tokenizer))

    report = TruncationReport(examples=len(records), kind="sft")
    examples = []
    for i, turns in enumerate(by_turn):
        ids, mask, cut = next(turn_rows) if turns else next(split_rows)
        if len(ids) > max_length and truncation == "error":
            raise _too_long(records[i], len(ids), max_length)
        ids, mask = _truncate(ids, mask, cut, max_length, tokenizer.bos_token_id, report)
        examples.append({"id": i, "input_ids": ids, "loss_mask": mask})
    return examples, report


def tokenize_prompts(records: list[dict], tokenizer: Any, max_length: int,
                     truncation: str = "left") -> tuple[list[dict], TruncationReport]:
    """Prompt records (online RL) into `{"id", "input_ids", "prompt", "fields"}` examples.

    `prompt` is the rendered prompt text; `fields` holds the record's other fields
    (e.g. `answer`) for reward functions. Prompts longer than `max_length` lose their
    oldest tokens (a leading BOS stays), counted in the report.
    """
    texts = [render_prompt(r["prompt"], tokenizer) for r in records]
    report = TruncationReport(examples=len(records), kind="prompt")
    bos = tokenizer.bos_token_id
    examples = []
    for i, (record, text, ids) in enumerate(zip(records, texts, _prompt_ids(tokenizer, texts))):
        if len(ids) > max_length:
            if truncation == "error":
                raise _too_long(record, len(ids), max_length)
            keep = 1 if bos is not None and ids[0] == bos else 0
            report.prompt_truncated += 1
            report.rows_truncated += 1
            report.tokens_dropped += len(ids) - max_length
            ids = ids[:keep] + ids[len(ids) - max_length + keep :]
        extra = {k: v for k, v in record.items() if k not in ("prompt", "_where")}
        examples.append({"id": i, "input_ids": ids, "prompt": text, "fields": extra})
    return examples, report


def tokenize_responses(records: list[dict], tokenizer: Any, max_length: int,
                       truncation: str = "left") -> tuple[list[dict], TruncationReport]:
    """Preference records (`chosen`, `rejected`) or ranking records (`responses`, best first)
    into examples holding the K tokenised responses to one prompt, best first.

    Each response is tokenised exactly like an SFT completion (same template, EOS,
    truncation). An example is `{"id", "sequences": [ids_1..ids_K], "loss_masks": [...],
    "input_ids": ids_1 + ... + ids_K}`; the concatenation only serves the loop's length
    bucketing and data fingerprint. The report counts responses.
    """
    flat, sizes = [], []
    for record in records:
        responses = record["responses"] if "responses" in record else [record["chosen"], record["rejected"]]
        sizes.append(len(responses))
        flat += [{"prompt": record["prompt"], "completion": r, "_where": record.get("_where", "<record>")} for r in responses]
    sequences, report = tokenize_sft(flat, tokenizer, max_length, truncation)
    report.kind = "response"
    examples, start = [], 0
    for i, k in enumerate(sizes):
        group = sequences[start : start + k]
        start += k
        _share_prompt(group, tokenizer.bos_token_id, report)
        examples.append({
            "id": i,
            "sequences": [g["input_ids"] for g in group],
            "loss_masks": [g["loss_mask"] for g in group],
            "input_ids": [t for g in group for t in g["input_ids"]],
        })
    return examples, report


def _share_prompt(group: list[dict], bos: int | None, report: TruncationReport) -> None:
    """Give every response of a prompt the same prompt ids: a longer response may have
    left-truncated the prompt more, and the responses must differ only after the prompt."""
    lengths = [prompt_length(g["loss_mask"]) for g in group]
    shortest = min(lengths)
    for g, n in zip(group, lengths):
        if n == shortest:
            continue
        ids = g["input_ids"]
        keep = 1 if bos is not None and ids and ids[0] == bos else 0
        drop = n - shortest
        g["input_ids"] = ids[:keep] + ids[keep + drop :]
        g["loss_mask"] = g["loss_mask"][:keep] + g["loss_mask"][keep + drop :]
        report.tokens_dropped += drop


def pad_groups(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad every response of every example as one batch, rows grouped by example.

    Rows are ex0's responses (best first), then ex1's, ...; `group_sizes` [B] says how
    many rows each example has, so a model runs ONE forward pass over chosen and
    rejected (or all K ranked) responses. `ids` [B] are the example ids.
    """
    rows = [{"input_ids": s, "loss_mask": m} for ex in examples for s, m in zip(ex["sequences"], ex["loss_masks"])]
    batch = pad_batch(rows, pad_token_id)
    batch["ids"] = torch.tensor([ex["id"] for ex in examples], dtype=torch.long)
    batch["group_sizes"] = torch.tensor([len(ex["sequences"]) for ex in examples], dtype=torch.long)
    for key in ("ref_logps",):
        if key in examples[0]:
            batch[key] = torch.tensor([v for ex in examples for v in ex[key]], dtype=torch.float32)
    return batch


def pad_shared_prompt(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One row per example, [prompt | response 1 | ... | response K]: the prompt is stored once.

    Prompts are left-padded to the longest and response j right-padded to the longest
    response j, so each block starts at the same column in every row. A response's
    `position_ids` continue its prompt's (p, p+1, ...), as if it followed the prompt alone;
    `segment_ids` [B, T] (-1 pad, 0 prompt, j response j) give the attention mask (see
    `alignkit.models.forward.shared_prompt_mask`); `sources` [B, T] is the column whose
    logits predict each column's token: c - 1, except at a response's first token, which
    the last prompt column predicts. With an empty prompt nothing predicts that token, so
    its loss mask is 0, as in the row of `pad_groups`. `attention_mask` is 1 on real tokens;
    `ids`, `group_sizes` and `ref_logps` are as in `pad_groups`, whose rows this replaces.
    The responses of an example must share their prompt ids (`tokenize_responses` ensures it).
    """
    prompts, responses = [], []
    for ex in examples:
        starts = [prompt_length(m) for m in ex["loss_masks"]]
        prompt = ex["sequences"][0][: starts[0]]
        if any(s[:n] != prompt for s, n in zip(ex["sequences"], starts)):
            raise ValueError(f"example {ex.get('id')}: its responses do not share one prompt")
        prompts.append(prompt)
        responses.append([(s[n:], m[n:]) for s, m, n in zip(ex["sequences"], ex["loss_masks"], starts)])
    width_p = max(map(len, prompts))
    widths = [max(len(r[j][0]) for r in responses if j < len(r)) for j in range(max(map(len, responses)))]
    starts = [width_p + sum(widths[:j]) for j in range(len(widths))]
    rows = {k: [] for k in ("input_ids", "attention_mask", "loss_mask", "position_ids", "segment_ids")}
    for prompt, group in zip(prompts, responses):
        p, gap = len(prompt), width_p - len(prompt)
        row = {"input_ids": [pad_token_id] * gap + prompt, "attention_mask": [0] * gap + [1] * p,
               "loss_mask": [0] * width_p, "position_ids": [0] * gap + list(range(p)),
               "segment_ids": [-1] * gap + [0] * p}
        for j, width in enumerate(widths):
            ids, mask = group[j] if j < len(group) else ([], [])
            n, pad = len(ids), width - len(ids)
            mask = ([0] + mask[1:]) if p == 0 and n else mask
            row["input_ids"] += ids + [pad_token_id] * pad
            row["attention_mask"] += [1] * n + [0] * pad
            row["loss_mask"] += mask + [0] * pad
            row["position_ids"] += list(range(p, p + n)) + [0] * pad
            row["segment_ids"] += [j + 1] * n + [-1] * pad
        for k, v in row.items():
            rows[k].append(v)
    batch = {k: torch.tensor(v, dtype=torch.long) for k, v in rows.items()}
    sources = torch.arange(width_p + sum(widths)) - 1
    sources[starts] = width_p - 1
    batch["sources"] = sources.repeat(len(examples), 1)
    batch["ids"] = torch.tensor([ex["id"] for ex in examples], dtype=torch.long)
    batch["group_sizes"] = torch.tensor([len(ex["sequences"]) for ex in examples], dtype=torch.long)
    if "ref_logps" in examples[0]:
        batch["ref_logps"] = torch.tensor([v for ex in examples for v in ex["ref_logps"]], dtype=torch.float32)
    return batch


def tokenize_text(
    records: list[dict | str], tokenizer: Any, max_length: int, packing: bool = True, truncation: str = "left"
) -> tuple[list[dict], TruncationReport]:
    """Pretraining examples: each document is tokenizer(text) (with BOS if the tokenizer adds it) + EOS.

    packing=True: all documents in one stream cut into blocks of exactly max_length; the
    last, shorter block is kept, so every token is used. packing=False: one example per
    document, right-truncated to max_length (counted), or with truncation="error" a
    DataError naming the first document that does not fit. loss_mask is all 1; `id` is
    the block (or document) index. Records are dicts with `text`, or strings.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    eos = _eos_id(tokenizer)
    texts = [r if isinstance(r, str) else r["text"] for r in records]
    documents = [ids + [eos] for ids in _batch_ids(tokenizer, texts, True)]
    report = TruncationReport(kind="text")
    if packing:
        stream = [token for ids in documents for token in ids]
        blocks = [stream[start:start + max_length] for start in range(0, len(stream), max_length)]
    else:
        blocks = []
        for record, ids in zip(records, documents):
            if len(ids) > max_length and truncation == "error":
                where = record.get("_where", "<record>") if isinstance(record, dict) else "<record>"
                raise DataError(where, "text", f"{len(ids)} tokens exceed max_length={max_length} "
                                               "(truncation: left would cut the document's end)")
            if len(ids) > max_length:
                report.completion_truncated += 1
                report.rows_truncated += 1
                report.tokens_dropped += len(ids) - max_length
            blocks.append(ids[:max_length])
    report.examples = len(blocks)
    examples = [{"id": i, "input_ids": ids, "loss_mask": [1] * len(ids)} for i, ids in enumerate(blocks)]
    return examples, report


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """Pack tokenised examples into rows of at most `max_length` tokens (first fit, longest first).

    Examples stay apart inside a row: `position_ids` restart at 0 for each, which
    transformers turns into a block-diagonal causal mask when the model gets no
    attention mask, so no token attends across examples; and each example's first
    token gets loss 0, since nothing in its own block predicts it. Row `id` is the
    row's index; `example_ids` lists what it holds. Examples longer than `max_length`
    must have been truncated before.
    """
    rows: list[dict] = []
    free: list[int] = []
    for ex in sorted(examples, key=lambda e: -len(e["input_ids"])):
        n = len(ex["input_ids"])
        if n > max_length:
            raise ValueError(f"example {ex.get('id')} has {n} tokens, more than max_length={max_length}")
        row = next((i for i, room in enumerate(free) if room >= n), None)
        if row is None:
            rows.append({"id": len(rows), "example_ids": [], "input_ids": [], "loss_mask": [], "position_ids": []})
            free.append(max_length)
            row = len(rows) - 1
        r = rows[row]
        r["example_ids"].append(ex.get("id"))
        r["input_ids"] += ex["input_ids"]
        r["loss_mask"] += [0] + list(ex.get("loss_mask", [1] * n))[1:]
        r["position_ids"] += list(range(n))
        free[row] -= n
    return rows


def tokenize_steps(records: list[dict], tokenizer: Any, max_length: int, separator: str = "\n",
                   truncation: str = "left") -> tuple[list[dict], TruncationReport]:
    """Step-labelled records (`load_records(..., "steps")`) into process-reward examples.

    The row is [prompt | step_1 + separator | ... | step_K + separator]: the prompt with its special
    tokens, then each step and its separator tokenized on its own, so no token straddles a step's
    end and the score of step k, read at the LAST token of its piece (the separator), never sees
    a later step. An example is `{"id", "input_ids", "loss_mask", "step_labels"}`: loss_mask is 1 at
    each step's last token, step_labels the record's labels in order (floats). Too long: the prompt
    is left-truncated first (a leading BOS stays), then whole steps are dropped from the end; the
    report counts prompts and solutions cut and the tokens dropped (a dropped step is not scored),
    or truncation="error" makes it a DataError naming the record.
    """
    if truncation not in ("left", "error"):
        raise ValueError(f"truncation must be 'left' or 'error', got {truncation!r}")
    prompts = [render_prompt(r["prompt"], tokenizer) for r in records]
    pieces = _batch_ids(tokenizer, [step + separator for r in records for step in r["steps"]], False)
    report = TruncationReport(examples=len(records), kind="step")
    examples, start = [], 0
    for i, (record, prompt_ids) in enumerate(zip(records, _prompt_ids(tokenizer, prompts))):
        steps = pieces[start : start + len(record["steps"])]
        start += len(steps)
        if any(not piece for piece in steps):
            raise DataError(record.get("_where", "<record>"), "steps", "a step and its separator tokenize to nothing")
        ids = prompt_ids + [t for piece in steps for t in piece]
        mask = [0] * len(prompt_ids) + [m for piece in steps for m in [0] * (len(piece) - 1) + [1]]
        if len(ids) > max_length and truncation == "error":
            raise _too_long(record, len(ids), max_length)
        ids, mask = _truncate(ids, mask, len(prompt_ids), max_length, tokenizer.bos_token_id, report)
        if sum(mask) == 0:
            raise DataError(record.get("_where", "<record>"), "steps",
                            f"not even the first step fits in max_length={max_length}; raise max_length")
        examples.append({"id": i, "input_ids": ids, "loss_mask": mask, "step_labels": record["labels"][: sum(mask)]})
    return examples, report


def pad_steps(examples: list[dict], pad_token_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """`pad_batch`, plus `step_labels` [B, T] float: each step's label at its last token (0 elsewhere)."""
    batch = pad_batch(examples, pad_token_id, side)
    labels = torch.zeros(batch["loss_mask"].shape, dtype=torch.float32)
    positions = batch["loss_mask"].bool()
    labels[positions] = torch.tensor([x for ex in examples for x in ex["step_labels"]], dtype=torch.float32)
    batch["step_labels"] = labels
    return batch


def pad_batch(examples: list[dict], pad_token_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad examples to the longest one: {input_ids, attention_mask, loss_mask: (B, T), ids: (B,)}.

    Packed rows (with `position_ids`) also get `position_ids` (B, T); their padding
    counts 0, 1, 2, ... as a block of its own.

    Padded positions hold pad_token_id, attention 0 and loss 0. side: "right" (training)
    or "left" (generation: every prompt ends at the last column). An example without
    `loss_mask` is trained on every token; one without `id` gets its position in the batch.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not examples:
        raise ValueError("pad_batch needs at least one example")
    length = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    loss_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        columns = slice(0, n) if side == "right" else slice(length - n, length)
        input_ids[row, columns] = torch.tensor(ex["input_ids"], dtype=torch.long)
        attention_mask[row, columns] = 1
        loss_mask[row, columns] = torch.tensor(ex.get("loss_mask", [1] * n), dtype=torch.long)
    ids = torch.tensor([ex.get("id", row) for row, ex in enumerate(examples)], dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask, "ids": ids}
    if "position_ids" in examples[0]:
        if side != "right":
            raise ValueError("packed rows are padded on the right")
        position_ids = torch.arange(length).repeat(len(examples), 1)
        for row, ex in enumerate(examples):
            n = len(ex["position_ids"])
            position_ids[row, :n] = torch.tensor(ex["position_ids"], dtype=torch.long)
            position_ids[row, n:] = torch.arange(length - n)
        batch["position_ids"] = position_ids
    return batch
