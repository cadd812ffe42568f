from __future__ import annotations

import copy

import pytest
import torch

from alignkit.data import DataError, TruncationReport, load_records, pad_batch, tokenize_sft, tokenize_text

BOS, EOS, PAD = 1, 2, 0
PROMPT = "What is 12+30? Think step by step and then write the answer."
COMPLETION = " The answer is 42."


def ids(tokenizer, text, special=False):
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def completion_part(example):
    return [t for t, m in zip(example["input_ids"], example["loss_mask"]) if m]


def test_loss_mask_is_exactly_completion_and_eos(tiny_tokenizer):
    records = load_records([{"prompt": PROMPT, "completion": COMPLETION}], "sft")
    (example,), report = tokenize_sft(records, tiny_tokenizer, max_length=256)
    assert example["id"] == 0
    assert example["input_ids"] == ids(tiny_tokenizer, PROMPT, True) + ids(tiny_tokenizer, COMPLETION) + [EOS]
    assert example["input_ids"].count(BOS) == 1 and example["input_ids"][0] == BOS
    assert tiny_tokenizer.decode(completion_part(example)) == COMPLETION + "</s>"
    prompt_part = [t for t, m in zip(example["input_ids"], example["loss_mask"]) if not m]
    assert tiny_tokenizer.decode(prompt_part) == "<s>" + PROMPT
    assert report == TruncationReport(examples=1)


def test_eos_not_doubled_and_bos_not_doubled(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    # A Llama-2-style template that writes BOS itself and ends the answer with EOS.
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]"
        "{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"
    )
    record = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": " 4"}]}
    (example,), _ = tokenize_sft([record], tokenizer, max_length=64)
    assert example["input_ids"].count(BOS) == 1 and example["input_ids"][0] == BOS
    assert example["input_ids"].count(EOS) == 1 and example["input_ids"][-1] == EOS
    assert tokenizer.decode(completion_part(example)) == " 4</s>"


def test_prompt_left_truncated_keeps_bos_and_completion(tiny_tokenizer):
    prompt_ids = ids(tiny_tokenizer, PROMPT, True)
    completion_ids = ids(tiny_tokenizer, COMPLETION) + [EOS]
    max_length = len(completion_ids) + 5
    records = [{"prompt": PROMPT, "completion": COMPLETION}, {"prompt": "1+1?", "completion": " 2"}]
    examples, report = tokenize_sft(records, tiny_tokenizer, max_length=max_length)
    first = examples[0]
    assert len(first["input_ids"]) == max_length
    assert first["input_ids"] == [BOS] + prompt_ids[-4:] + completion_ids  # oldest prompt tokens gone
    assert first["loss_mask"] == [0] * 5 + [1] * len(completion_ids)
    assert examples[1]["id"] == 1 and len(examples[1]["input_ids"]) < max_length
    assert report == TruncationReport(examples=2, prompt_truncated=1, completion_truncated=0,
                                      tokens_dropped=len(prompt_ids) - 5, rows_truncated=1)
    report.check_not_all_truncated("data.jsonl", max_length)  # one of two rows whole: trains


def test_long_completion_right_truncated_without_eos(tiny_tokenizer):
    completion = " 1+1=2, 2+2=4, 3+3=6, 4+4=8, 5+5=10, 6+6=12."
    completion_ids = ids(tiny_tokenizer, completion)
    prompt_ids = ids(tiny_tokenizer, "Count:", True)
    max_length = 8
    (example,), report = tokenize_sft([{"prompt": "Count:", "completion": completion}], tiny_tokenizer, max_length)
    assert example["input_ids"] == [BOS] + completion_ids[:7]  # prompt down to BOS, no EOS: it was cut off
    assert example["loss_mask"] == [0] + [1] * 7
    dropped = (len(prompt_ids) - 1) + (len(completion_ids) + 1 - 7)
    assert report == TruncationReport(examples=1, prompt_truncated=1, completion_truncated=1, tokens_dropped=dropped,
                                      rows_truncated=1)
    with pytest.raises(DataError, match=r"data.jsonl: every one of the 1 sft examples is longer than max_length=8"):
        report.check_not_all_truncated("data.jsonl", max_length)


def test_report_string_and_sum():
    report = TruncationReport(examples=1000, prompt_truncated=12, completion_truncated=1, tokens_dropped=340)
    assert str(report) == "sft data: 1,000 examples, 12 prompts left-truncated, 1 completion truncated (340 tokens dropped)"
    total = report + TruncationReport(examples=5, prompt_truncated=1, completion_truncated=2, tokens_dropped=1)
    assert total == TruncationReport(examples=1005, prompt_truncated=13, completion_truncated=3, tokens_dropped=341)
    assert str(TruncationReport(examples=3, completion_truncated=1, tokens_dropped=1, kind="text")) == (
        "text data: 3 examples, 1 document truncated (1 token dropped)")


DOCS = ["What is 1+2? The answer is 3.", "What is 5?", "What is 40+9? The answer is 49. Yes, 49."]


def test_packing_keeps_every_token(tiny_tokenizer):
    stream = [t for doc in DOCS for t in ids(tiny_tokenizer, doc, True) + [EOS]]
    examples, report = tokenize_text([{"text": d} for d in DOCS], tiny_tokenizer, max_length=7)
    assert [ex["id"] for ex in examples] == list(range(len(examples)))
    assert all(len(ex["input_ids"]) == 7 for ex in examples[:-1])
    assert 0 < len(examples[-1]["input_ids"]) <= 7
    assert [t for ex in examples for t in ex["input_ids"]] == stream
    assert all(ex["loss_mask"] == [1] * len(ex["input_ids"]) for ex in examples)
    assert len(examples) == -(-len(stream) // 7)
    assert report == TruncationReport(examples=len(examples), kind="text")


def test_no_packing_truncates_and_counts(tiny_tokenizer):
    lengths = [len(ids(tiny_tokenizer, d, True)) + 1 for d in DOCS]
    max_length = 10
    examples, report = tokenize_text(DOCS, tiny_tokenizer, max_length=max_length, packing=False)
    assert [len(ex["input_ids"]) for ex in examples] == [min(n, max_length) for n in lengths]
    assert examples[1]["input_ids"][-1] == EOS  # "What is 5?" fits
    assert report.completion_truncated == sum(n > max_length for n in lengths) == 2
    assert report.tokens_dropped == sum(max(0, n - max_length) for n in lengths)


EXAMPLES = [
    {"id": 7, "input_ids": [1, 5, 6, 2], "loss_mask": [0, 0, 1, 1]},
    {"id": 3, "input_ids": [1, 9], "loss_mask": [0, 1]},
]


def test_pad_batch_right():
    batch = pad_batch(EXAMPLES, pad_token_id=0)
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 5, 6, 2], [1, 9, 0, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    assert torch.equal(batch["loss_mask"], torch.tensor([[0, 0, 1, 1], [0, 1, 0, 0]]))
    assert torch.equal(batch["ids"], torch.tensor([7, 3]))
    assert all(t.dtype == torch.long for t in batch.values())


def test_pad_batch_left():
    batch = pad_batch(EXAMPLES, pad_token_id=99, side="left")
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 5, 6, 2], [99, 99, 1, 9]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]))
    assert torch.equal(batch["loss_mask"], torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]]))


def test_pad_batch_bad_side():
    with pytest.raises(ValueError, match="side"):
        pad_batch(EXAMPLES, 0, side="middle")


def test_pack_examples_by_hand():
    from alignkit.data import pack_examples, pad_batch

    examples = [
        {"id": 0, "input_ids": [1, 5, 6], "loss_mask": [0, 1, 1]},
        {"id": 1, "input_ids": [1, 7, 8, 9, 2], "loss_mask": [0, 0, 1, 1, 1]},
        {"id": 2, "input_ids": [1, 4], "loss_mask": [1, 1]},
    ]
    rows = pack_examples(examples, max_length=7)
    # longest first: [1] fills 5 of 7, then [0] (3) does not fit, [2] (2) does.
    assert [r["example_ids"] for r in rows] == [[1, 2], [0]]
    assert rows[0]["input_ids"] == [1, 7, 8, 9, 2, 1, 4]
    assert rows[0]["position_ids"] == [0, 1, 2, 3, 4, 0, 1]
    assert rows[0]["loss_mask"] == [0, 0, 1, 1, 1, 0, 1]  # an example's first token is never a target
    batch = pad_batch(rows, pad_token_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1], [0, 1, 2, 0, 1, 2, 3]]
    assert batch["loss_mask"][1].tolist() == [0, 1, 1, 0, 0, 0, 0]


def test_chosen_and_rejected_share_the_prompt_ids_under_truncation(tiny_tokenizer):
    from alignkit.data import tokenize_responses

    record = {"prompt": "What is 12+7? " * 6, "chosen": " 19", "rejected": " The answer is 19, I think." * 2, "_where": "<t>:1"}
    [example], report = tokenize_responses([record], tiny_tokenizer, max_length=40)
    (c, r), (cm, rm) = example["sequences"], example["loss_masks"]
    assert c[: cm.index(1)] == r[: rm.index(1)]  # identical prompt ids
    assert c[0] == tiny_tokenizer.bos_token_id and c.count(tiny_tokenizer.bos_token_id) == 1
    assert len(r) <= 40 and report.prompt_truncated >= 1


def test_truncation_error_policy_names_the_row(tiny_tokenizer):
    import pytest

    from alignkit.data import DataError, tokenize_sft

    records = [{"prompt": "What is 1+2?", "completion": " 3", "_where": "sft.jsonl:1"},
               {"prompt": "What is 12+7? " * 10, "completion": " 19", "_where": "sft.jsonl:2"}]
    with pytest.raises(DataError, match=r"sft.jsonl:2: field 'prompt': \d+ tokens exceed max_length=20"):
        tokenize_sft(records, tiny_tokenizer, 20, truncation="error")
    examples, report = tokenize_sft(records, tiny_tokenizer, 20, truncation="left")
    assert report.prompt_truncated == 1 and len(examples[1]["input_ids"]) == 20


def test_no_row_is_dropped_even_at_the_smallest_max_length(tiny_tokenizer):
    from alignkit.data import tokenize_sft

    records = [{"prompt": "What is 12+7?", "completion": " The answer is 19.", "_where": f"sft.jsonl:{i}"} for i in (1, 2)]
    examples, report = tokenize_sft(records, tiny_tokenizer, 2)
    assert [ex["loss_mask"] for ex in examples] == [[0, 1], [0, 1]]  # BOS + one completion token each
    assert report.prompt_truncated == 2 and report.completion_truncated == 2


def test_eos_stays_in_the_loss_when_pad_is_eos(tiny_tokenizer):
    import copy

    from alignkit.data import pad_batch, tokenize_sft

    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = tok.eos_token  # as load_tokenizer does for tokenizers without a pad token
    [ex], _ = tokenize_sft([{"prompt": "What is 1+2?", "completion": " 3", "_where": "<t>:1"}], tok, 32)
    assert ex["input_ids"][-1] == tok.eos_token_id and ex["loss_mask"][-1] == 1
    batch = pad_batch([ex, {"id": 1, "input_ids": ex["input_ids"] + [5, 6], "loss_mask": ex["loss_mask"] + [1, 1]}],
                      tok.pad_token_id)
    assert batch["loss_mask"][0, len(ex["input_ids"]) - 1] == 1  # the EOS target survives padding with EOS
    assert batch["loss_mask"][0, len(ex["input_ids"]):].sum() == 0  # the pads after it do not count


def test_pad_shared_prompt_by_hand():
    from alignkit.data.tokenize import pad_shared_prompt

    examples = [  # prompt [1, 5], chosen [6, 7], rejected [8]; prompt [1, 5, 5], chosen [9], rejected [3, 4, 2]
        {"id": 4, "sequences": [[1, 5, 6, 7], [1, 5, 8]], "loss_masks": [[0, 0, 1, 1], [0, 0, 1]],
         "ref_logps": [-1.0, -2.0]},
        {"id": 9, "sequences": [[1, 5, 5, 9], [1, 5, 5, 3, 4, 2]], "loss_masks": [[0, 0, 0, 1], [0, 0, 0, 1, 1, 1]],
         "ref_logps": [-3.0, -4.0]},
    ]
    b = pad_shared_prompt(examples, PAD)
    # columns: prompt 0-2 (left-padded) | chosen 3-4 | rejected 5-7
    assert b["input_ids"].tolist() == [[0, 1, 5, 6, 7, 8, 0, 0], [1, 5, 5, 9, 0, 3, 4, 2]]
    assert b["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 1, 1, 1]]
    assert b["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 0, 1, 1, 1]]
    assert b["position_ids"].tolist() == [[0, 0, 1, 2, 3, 2, 0, 0], [0, 1, 2, 3, 0, 3, 4, 5]]
    assert b["segment_ids"].tolist() == [[-1, 0, 0, 1, 1, 2, -1, -1], [0, 0, 0, 1, -1, 2, 2, 2]]
    # the first rejected token (column 5) is predicted by the last prompt column (2), not by chosen
    assert b["sources"].tolist() == [[-1, 0, 1, 2, 3, 2, 5, 6]] * 2
    assert b["ids"].tolist() == [4, 9] and b["group_sizes"].tolist() == [2, 2]
    assert b["ref_logps"].tolist() == [-1.0, -2.0, -3.0, -4.0]


def test_pad_shared_prompt_empty_prompt_and_different_prompts():
    from alignkit.data.tokenize import pad_shared_prompt

    # no prompt: nothing predicts the first token of a response, so it is not in the loss (as in pad_groups)
    b = pad_shared_prompt([{"id": 0, "sequences": [[6, 7], [8]], "loss_masks": [[1, 1], [1]]}], PAD)
    assert b["input_ids"].tolist() == [[6, 7, 8]] and b["loss_mask"].tolist() == [[0, 1, 0]]
    assert b["sources"].tolist() == [[-1, 0, -1]]
    with pytest.raises(ValueError, match="do not share one prompt"):
        pad_shared_prompt([{"id": 3, "sequences": [[1, 5, 6], [1, 4, 6]], "loss_masks": [[0, 0, 1], [0, 0, 1]]}], PAD)
