from __future__ import annotations

import copy

import pytest

from alignkit.data import render_prompt, split_prompt_completion

TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.fixture(scope="module")
def templated(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)  # the session fixture is shared: never mutate it
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def test_strings_unchanged(tiny_tokenizer, templated):
    record = {"prompt": "What is 2+2?", "completion": " 4"}
    assert split_prompt_completion(record, tiny_tokenizer) == ("What is 2+2?", " 4")
    assert split_prompt_completion(record, templated) == ("What is 2+2?", " 4")  # strings never get a template
    assert render_prompt("What is", templated) == "What is"


def test_plain_template_literal(tiny_tokenizer):
    assert tiny_tokenizer.chat_template is None
    prompt, completion = split_prompt_completion({"messages": CONVERSATION}, tiny_tokenizer)
    assert prompt == "System: Be brief.\nUser: Hi\nAssistant: Hello\nUser: 2+2?\nAssistant:"
    assert completion == " 4"
    assert render_prompt(CONVERSATION[:2], tiny_tokenizer) == "System: Be brief.\nUser: Hi\nAssistant:"
    assert render_prompt([{"role": "tool", "content": "42"}], None) == "Tool: 42\nAssistant:"


def test_plain_template_prompt_completion_lists(tiny_tokenizer):
    record = {"prompt": CONVERSATION[:2], "completion": [CONVERSATION[2]]}
    assert split_prompt_completion(record, tiny_tokenizer) == ("System: Be brief.\nUser: Hi\nAssistant:", " Hello")


def test_chat_template(templated):
    prompt, completion = split_prompt_completion({"messages": CONVERSATION}, templated)
    assert prompt == "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>Hello\n<|user|>2+2?\n<|assistant|>"
    assert completion == "4\n"
    assert render_prompt(CONVERSATION[:2], templated) == "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>"


def test_template_whose_prompt_is_not_a_prefix_raises(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = "{% if add_generation_prompt %}GEN {% endif %}" + TEMPLATE
    with pytest.raises(ValueError, match="not a prefix"):
        split_prompt_completion({"messages": CONVERSATION}, tokenizer)


def test_mixed_prompt_completion_forms_raise(tiny_tokenizer):
    with pytest.raises(ValueError, match="both"):
        split_prompt_completion({"prompt": "Q", "completion": [CONVERSATION[2]]}, tiny_tokenizer)


def test_rendering_k_turns_is_a_token_prefix_of_k_plus_1(tiny_tokenizer):
    """Multi-turn data and generation see the same tokens for the shared history (plain template;
    a chat template where this fails is refused by split_prompt_completion with a clear error)."""
    from alignkit.data.chat import _render

    conversation = [
        {"role": "system", "content": "Answer with a number."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+5?"},
        {"role": "assistant", "content": "8"},
    ]
    for k in range(1, len(conversation)):
        shorter = tiny_tokenizer(_render(conversation[:k], None, False), add_special_tokens=True)["input_ids"]
        longer = tiny_tokenizer(_render(conversation[: k + 1], None, False), add_special_tokens=True)["input_ids"]
        assert longer[: len(shorter)] == shorter, k
        assert shorter.count(tiny_tokenizer.bos_token_id) == 1
