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
