import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.models.forward import forward_logprobs, position_ids_from_mask

ROWS = [[1, 40, 41, 42, 43, 44, 45], [1, 50, 51], [1, 60, 61, 62, 63]]


def _padded(rows, side, pad_id=0):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask


def test_position_ids_from_mask_by_hand():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_logprobs_equal_rows_alone(tiny_model_dir, side):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids, mask = _padded(ROWS, side)
    with torch.no_grad():
        batch_lp, _ = forward_logprobs(model, ids, mask)
        for i, row in enumerate(ROWS):
            alone, _ = forward_logprobs(model, torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long))
            n = len(row) - 1
            got = batch_lp[i, -n:] if side == "left" else batch_lp[i, :n]
            torch.testing.assert_close(got, alone[0], atol=1e-5, rtol=0)


def test_temperature_divides_logits(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids, mask = _padded(ROWS[:1], "right")
    with torch.no_grad():
        _, logits = forward_logprobs(model, ids, mask)
        lp_t, logits_t = forward_logprobs(model, ids, mask, temperature=0.5)
    torch.testing.assert_close(logits_t, logits / 0.5)
    expected = torch.log_softmax(logits / 0.5, -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(lp_t, expected, atol=1e-5, rtol=0)


def test_tiny_model_dir_loads_in_plain_transformers(tiny_model_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.pad_token_id == 0 and tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert tok("What is 1+2?")["input_ids"][0] == tok.bos_token_id
    assert model.config.vocab_size == len(tiny_tokenizer)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


def test_packed_row_logprobs_equal_examples_alone(tiny_model_dir):
    """Position ids restarting at 0 give a block-diagonal mask: nothing attends across examples."""
    from alignkit.data import pack_examples, pad_batch

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    examples = [{"id": i, "input_ids": r, "loss_mask": [1] * len(r)} for i, r in enumerate(ROWS)]
    packed = pack_examples(examples, max_length=12)  # 7 + 5 in one row, 3 in another
    assert [row["example_ids"] for row in packed] == [[0, 2], [1]]
    batch = pad_batch(packed, 0)
    with torch.no_grad():
        lp, _ = forward_logprobs(model, batch["input_ids"], batch["attention_mask"], position_ids=batch["position_ids"])
        for row, (start, i) in [(0, (0, 0)), (0, (7, 2)), (1, (0, 1))]:
            alone, _ = forward_logprobs(model, torch.tensor([ROWS[i]]), torch.ones(1, len(ROWS[i]), dtype=torch.long))
            n = len(ROWS[i]) - 1
            torch.testing.assert_close(lp[row, start : start + n], alone[0], atol=1e-5, rtol=0)


def test_sequence_logprobs_on_response_columns_equal_full_sum(tiny_model_dir):
    from alignkit.data import pad_batch
    from alignkit.models.forward import sequence_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows = [{"input_ids": r, "loss_mask": [0] * (len(r) // 2) + [1] * (len(r) - len(r) // 2)} for r in ROWS]
    batch = pad_batch(rows, 0)
    with torch.no_grad():
        full, _ = forward_logprobs(model, batch["input_ids"], batch["attention_mask"])
        expected = (full * batch["loss_mask"][:, 1:]).sum(-1)
        got, counts = sequence_logprobs(model, batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert counts.tolist() == [4, 2, 3]


def test_shared_prompt_mask_by_hand():
    from alignkit.models.forward import shared_prompt_mask

    # pad, prompt, prompt, chosen, chosen, rejected
    allowed = shared_prompt_mask(torch.tensor([[-1, 0, 0, 1, 1, 2]]))
    assert allowed.shape == (1, 1, 6, 6)
    assert allowed[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],  # a pad sees only itself
        [0, 1, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0],
        [0, 1, 1, 1, 0, 0],  # chosen: the prompt and earlier chosen
        [0, 1, 1, 1, 1, 0],
        [0, 1, 1, 0, 0, 1],  # rejected: the prompt and itself, never chosen
    ]


PAIRS = [  # prompts of different lengths; the last is cut by truncation (max_length 24)
    {"prompt": "What is 1+2?", "chosen": " The answer is 3.", "rejected": " It is 12 or so"},
    {"prompt": "What is 10+7? Think first.", "chosen": " 17.", "rejected": " The answer is 107, I think, or 71."},
    {"prompt": "What is 3+4? " * 6, "chosen": " The answer is 7.", "rejected": " 34"},
]


def _pair_examples(tokenizer):
    from alignkit.data import tokenize_responses

    examples, report = tokenize_responses(PAIRS, tokenizer, max_length=24)
    assert report.prompt_truncated >= 1
    return examples


def _rows(examples, side):
    from alignkit.data import pad_batch

    rows = [{"input_ids": s, "loss_mask": m} for ex in examples for s, m in zip(ex["sequences"], ex["loss_masks"])]
    return pad_batch(rows, 0, side=side)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_logprobs_equal_separate_rows(tiny_model_dir, tiny_tokenizer, attn):
    """[prompt | chosen | rejected] in one row = chosen and rejected as rows of their own, with left or
    right padding: same log-probs (1e-5), same token counts, same gradients."""
    from alignkit.data import pad_groups
    from alignkit.data.tokenize import pad_shared_prompt
    from alignkit.models.forward import sequence_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a random model is near uniform: perturb it so that context matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    examples = _pair_examples(tiny_tokenizer)
    shared = pad_shared_prompt(examples, 0)
    assert shared["input_ids"].shape[0] == len(examples)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 2.0])  # a loss that touches every sequence differently
    results = []
    for batch in (shared, pad_groups(examples, 0), _rows(examples, "left")):
        model.zero_grad()
        logps, counts = sequence_logprobs(model, batch)
        (weights * logps).sum().backward()
        results.append((logps.detach(), counts, torch.cat([p.grad.flatten() for p in model.parameters()])))
    (lp, n, grad), others = results[0], results[1:]
    for lp_o, n_o, grad_o in others:
        torch.testing.assert_close(lp, lp_o, atol=1e-5, rtol=0)
        assert n.tolist() == n_o.tolist()
        torch.testing.assert_close(grad, grad_o, atol=1e-5 * max(1.0, float(grad_o.abs().max())), rtol=0)


def test_shared_prompt_first_rejected_token_is_predicted_by_the_prompt(tiny_model_dir, tiny_tokenizer):
    """Each response's log-prob equals that of prompt + response run alone, token by token."""
    from alignkit.data.tokenize import pad_shared_prompt
    from alignkit.models.forward import sequence_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    examples = _pair_examples(tiny_tokenizer)
    with torch.no_grad():
        got, _ = sequence_logprobs(model, pad_shared_prompt(examples, 0))
        alone = []
        for ex in examples:
            for s, m in zip(ex["sequences"], ex["loss_masks"]):
                lp, _ = forward_logprobs(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))
                alone.append(float((lp[0] * torch.tensor(m[1:])).sum()))
    torch.testing.assert_close(got, torch.tensor(alone), atol=1e-5, rtol=0)


def test_pads_inside_a_row_are_masked_out(tiny_model_dir):
    """A row with pads in its middle scores its real tokens as the row without them does.

    Left or right padding cannot pin the attention mask: position ids that restart or stall
    at the pads make transformers (5.x) treat them as separate packed sequences even with no
    mask. Here the positions run 0 1 2 2 2 3 4 5 6, so only the mask hides the two pads from
    the tokens after them (without it, those tokens see the pads and not the prefix).
    """
    from alignkit.models.forward import sequence_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a random model is near uniform: perturb it so that context matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    row = ROWS[0]  # [1, 40, 41, 42, 43, 44, 45]
    ids = torch.tensor([row[:3] + [0, 0] + row[3:], row + [0, 0]])  # middle-padded; right-padded
    mask = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 1, 1], [1] * 7 + [0, 0]])
    with torch.no_grad():
        alone, _ = forward_logprobs(model, torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long))
        lp, _ = forward_logprobs(model, ids, mask)
        # Targets 40, 41 and 43, 44, 45; 42 is predicted by a pad column, so it has no counterpart.
        torch.testing.assert_close(lp[0, [0, 1, 5, 6, 7]], alone[0, [0, 1, 3, 4, 5]], atol=1e-5, rtol=0)
        # sequence_logprobs runs the head on response columns only (`logits_to_keep`): the same holds.
        loss_mask = torch.tensor([[0] * 6 + [1] * 3, [0] * 4 + [1] * 3 + [0, 0]])  # 43, 44, 45 in both rows
        got, counts = sequence_logprobs(model, {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask})
    expected = alone[0, 3:].sum()
    torch.testing.assert_close(got, expected.repeat(2), atol=1e-5, rtol=0)
    assert counts.tolist() == [3, 3]
