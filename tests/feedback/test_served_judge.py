"""An alignkit checkpoint behind `transformers serve` (the `served` fixture, tests/conftest.py)
answers the official openai client and judges through it."""

import math

import pytest

from alignkit.feedback.judges import load_judge


def test_a_served_checkpoint_answers_the_openai_client_with_its_saved_chat_template(served, tiny_model_dir):
    import openai
    import torch

    from alignkit.data.chat import render_prompt
    from alignkit.models.load import load_causal_lm, load_tokenizer
    from alignkit.rollout.sampler import sample

    messages = [{"role": "user", "content": "What is 2+3?"}]
    client = openai.OpenAI(base_url=served, api_key="none", timeout=60)
    reply = client.chat.completions.create(model=str(tiny_model_dir), messages=messages, max_tokens=4, temperature=0.0)
    served_text = reply.choices[0].message.content
    # alignkit's own rendering of the same conversation, greedy: the same tokens
    tokenizer = load_tokenizer(str(tiny_model_dir))
    ids = torch.tensor([tokenizer(render_prompt(messages, tokenizer))["input_ids"]])
    roll = sample(load_causal_lm(str(tiny_model_dir)).eval(), ids, torch.ones_like(ids), max_new_tokens=4,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, temperature=0.0)
    local_text = tokenizer.decode(roll.completion_ids[0][roll.completion_mask[0].bool()], skip_special_tokens=True)
    assert isinstance(served_text, str) and served_text.strip() == local_text.strip()


def test_the_endpoint_judge_asks_both_orders_once_and_then_answers_from_the_cache(served, tiny_model_dir, tmp_path):
    judge = load_judge(f"openai-chat:{tiny_model_dir}@{served}", str(tmp_path / "cache.jsonl"), timeout=60)
    first = judge.compare(["What is 2+3?"], [" 5"], [" 7"])
    assert judge.stats["calls"] == 2 and judge.stats["failures"] == 0  # both orders asked
    # an answer that is no label (a tiny model's) is masked and counted, never guessed
    assert math.isnan(first[0]) == (judge.stats["unparsed"] > 0)
    again = judge.compare(["What is 2+3?"], [" 5"], [" 7"])
    assert judge.stats["calls"] == 2 and judge.stats["cached"] == 2  # the server saw no second call
    assert again == pytest.approx(first, nan_ok=True)
