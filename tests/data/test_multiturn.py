"""SFT on conversations: the loss on every assistant turn (`assistant_only_loss`) and the
`chat_template` key. Expected loss tokens are written out by hand, as the tiny tokenizer
splits them."""

from __future__ import annotations

import copy
import json
import math

import pytest
import transformers

from alignkit.config import ConfigError
from alignkit.data import DataError, load_records, pack_examples, tokenize_sft
from alignkit.data.chat import (
    BUNDLED_CHAT_TEMPLATES,
    CHATML_CHAT_TEMPLATE,
    PLAIN_CHAT_TEMPLATE_BOS,
    assistant_spans,
    attach_chat_template,
    load_chat_template,
)


def m(role: str, content: str) -> dict:
    return {"role": role, "content": content}


THREE_TURNS = [
    m("system", "Answer with a number."),
    m("user", "What is 2+3?"), m("assistant", "The answer is 5."),
    m("user", "And 1+1?"), m("assistant", "The answer is 2."),
    m("user", "What is 4+4?"), m("assistant", "The answer is 8."),
]
WITH_TOOL = [
    m("system", "Use the calculator."),
    m("user", "What is 12+30?"), m("assistant", "calc(12+30)"), m("tool", "42"), m("assistant", "The answer is 42."),
    m("user", "And 2+2?"), m("assistant", "The answer is 4."),
]
# system/user/assistant/tool, each its own way; an assistant turn ends with EOS and a newline
TOOL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m.role == 'tool' %}<tool>{{ m.content }}</tool>\n"
    "{% elif m.role == 'assistant' %}[A] {{ m.content }}{{ eos_token }}\n"
    "{% else %}[{{ m.role | upper }}] {{ m.content }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}[A]{% endif %}"
)
IM_END = ["<", "|", "i", "m", "_", "e", "n", "d", "|", ">", "Ċ"]  # "<|im_end|>\n": plain text to this tokenizer


def with_template(tokenizer, template: str):
    tokenizer = copy.deepcopy(tokenizer)  # the session fixture is shared: never mutate it
    tokenizer.chat_template = template
    return tokenizer


def loss_runs(example: dict, tokenizer) -> list[list[str]]:
    """The token strings of each run of consecutive loss tokens."""
    runs, previous = [], 0
    for token, bit in zip(example["input_ids"], example["loss_mask"]):
        if bit and not previous:
            runs.append([])
        if bit:
            runs[-1].append(tokenizer.convert_ids_to_tokens(token))
        previous = bit
    return runs


def one(records, tokenizer, **kw):
    (example,), report = tokenize_sft(records, tokenizer, kw.pop("max_length", 4096), **kw)
    return example, report


def test_plain_template_every_assistant_turn(tiny_tokenizer):
    example, _ = one([{"messages": THREE_TURNS}], tiny_tokenizer, assistant_only_loss=True)
    assert loss_runs(example, tiny_tokenizer) == [
        ["ĠThe", "Ġanswer", "Ġis", "Ġ5", "."],
        ["ĠThe", "Ġanswer", "Ġis", "Ġ2", "."],
        ["ĠThe", "Ġanswer", "Ġis", "Ġ8", ".", "</s>"],
    ]
    # the ids are the whole conversation's: nothing is left out or added but BOS and EOS
    text = ("System: Answer with a number.\nUser: What is 2+3?\nAssistant: The answer is 5.\nUser: And 1+1?\n"
            "Assistant: The answer is 2.\nUser: What is 4+4?\nAssistant: The answer is 8.")
    assert tiny_tokenizer.decode(example["input_ids"]) == "<s>" + text + "</s>"
    # off (the default of tokenize_sft): the last turn only, as before
    last_only, _ = one([{"messages": THREE_TURNS}], tiny_tokenizer)
    assert loss_runs(last_only, tiny_tokenizer) == [["ĠThe", "Ġanswer", "Ġis", "Ġ8", ".", "</s>"]]
    assert last_only["input_ids"] == example["input_ids"]


def test_template_with_tool_role(tiny_tokenizer):
    """Each assistant turn's content and the end of turn the template writes ("</s>\\n") are in the
    loss; system, user, tool messages and the generation prompt "[A]" are not; EOS is not doubled."""
    tokenizer = with_template(tiny_tokenizer, TOOL_TEMPLATE)
    example, _ = one([{"messages": WITH_TOOL}], tokenizer, assistant_only_loss=True)
    assert loss_runs(example, tokenizer) == [
        ["Ġ", "c", "a", "l", "c", "(", "12", "+", "30", ")", "</s>", "Ċ"],
        ["ĠThe", "Ġanswer", "Ġis", "Ġ42", ".", "</s>", "Ċ"],
        ["ĠThe", "Ġanswer", "Ġis", "Ġ4", ".", "</s>", "Ċ"],
    ]
    assert example["input_ids"].count(tokenizer.bos_token_id) == 1  # the template's, not a second one
    assert example["input_ids"][-2:] == [tokenizer.eos_token_id, tokenizer("\n", add_special_tokens=False)["input_ids"][0]]
    text, spans = assistant_spans({"messages": WITH_TOOL}, tokenizer)
    assert [text[a:b] for a, b in spans] == [" calc(12+30)</s>\n", " The answer is 42.</s>\n", " The answer is 4.</s>\n"]


def test_chatml_template(tiny_tokenizer):
    tokenizer = attach_chat_template(copy.deepcopy(tiny_tokenizer), load_chat_template("chatml"), "chatml")
    assert tokenizer.chat_template == "{{ bos_token }}" + CHATML_CHAT_TEMPLATE  # the tiny tokenizer adds BOS
    text, spans = assistant_spans({"messages": WITH_TOOL}, tokenizer)
    assert text.startswith("<s><|im_start|>system\nUse the calculator.<|im_end|>\n<|im_start|>user\n")
    assert "<|im_start|>tool\n42<|im_end|>\n" in text
    assert [text[a:b] for a, b in spans] == ["calc(12+30)<|im_end|>\n", "The answer is 42.<|im_end|>\n",
                                             "The answer is 4.<|im_end|>\n"]
    example, _ = one([{"messages": WITH_TOOL}], tokenizer, assistant_only_loss=True)
    assert loss_runs(example, tokenizer) == [
        ["c", "a", "l", "c", "(", "12", "+", "30", ")", *IM_END],
        ["Th", "e", "Ġanswer", "Ġis", "Ġ42", ".", *IM_END],
        ["Th", "e", "Ġanswer", "Ġis", "Ġ4", ".", *IM_END, "</s>"],
    ]


@pytest.mark.parametrize("on", [True, False], ids=["every_turn", "last_turn"])
def test_three_turns_give_three_spans_or_one(tiny_tokenizer, on):
    for tokenizer in (tiny_tokenizer, with_template(tiny_tokenizer, TOOL_TEMPLATE)):
        example, _ = one([{"messages": THREE_TURNS}], tokenizer, assistant_only_loss=on)
        assert len(loss_runs(example, tokenizer)) == (3 if on else 1)


def test_prompt_completion_lists_train_the_completions_assistant_messages(tiny_tokenizer):
    """As TRL's completion_only_loss with assistant_only_loss: the prompt's assistant turn is
    context, and so is a tool message inside the completion."""
    record = {"prompt": [WITH_TOOL[0], *THREE_TURNS[1:3], WITH_TOOL[1]], "completion": WITH_TOOL[2:5]}
    tokenizer = with_template(tiny_tokenizer, TOOL_TEMPLATE)
    example, _ = one([record], tokenizer, assistant_only_loss=True)
    assert loss_runs(example, tokenizer) == [
        ["Ġ", "c", "a", "l", "c", "(", "12", "+", "30", ")", "</s>", "Ċ"],
        ["ĠThe", "Ġanswer", "Ġis", "Ġ42", ".", "</s>", "Ċ"],
    ]
    whole_completion, _ = one([record], tokenizer)  # off: the completion's every message, as before
    assert loss_runs(whole_completion, tokenizer) == [
        ["Ġ", "c", "a", "l", "c", "(", "12", "+", "30", ")", "</s>", "Ċ",
         "<", "t", "o", "o", "l", ">", "4", "2", "<", "/", "t", "o", "o", "l", ">", "Ċ",
         "[", "A", "]", "ĠThe", "Ġanswer", "Ġis", "Ġ42", ".", "</s>", "Ċ"],
    ]
    assert whole_completion["input_ids"] == example["input_ids"]


def test_one_assistant_message_is_the_same_either_way(tiny_tokenizer):
    strings = {"prompt": "What is 2+3?", "completion": " 5"}
    conversations = [{"messages": THREE_TURNS[:3]}, {"messages": WITH_TOOL[:3]},
                     {"prompt": THREE_TURNS[:2], "completion": THREE_TURNS[2:3]}]
    for tokenizer in (tiny_tokenizer, with_template(tiny_tokenizer, TOOL_TEMPLATE),
                      attach_chat_template(copy.deepcopy(tiny_tokenizer), CHATML_CHAT_TEMPLATE)):
        records = [strings, *conversations]
        assert tokenize_sft(records, tokenizer, 4096, assistant_only_loss=True) == tokenize_sft(records, tokenizer, 4096)


def test_truncation_counted_and_mask_kept_aligned(tiny_tokenizer):
    full, _ = one([{"messages": THREE_TURNS}], tiny_tokenizer, assistant_only_loss=True)
    n = len(full["input_ids"])
    example, report = one([{"messages": THREE_TURNS}], tiny_tokenizer, assistant_only_loss=True, max_length=n - 20)
    # the 20 oldest tokens after BOS go, with their mask bits
    assert example["input_ids"] == full["input_ids"][:1] + full["input_ids"][21:]
    assert example["loss_mask"] == full["loss_mask"][:1] + full["loss_mask"][21:]
    assert (report.prompt_truncated, report.completion_truncated, report.tokens_dropped, report.rows_truncated) == (
        1, 0, 20, 1)
    # shorter than the last answer: the history is down to BOS, the answer loses its end (and EOS)
    example, report = one([{"messages": THREE_TURNS}], tiny_tokenizer, assistant_only_loss=True, max_length=4)
    assert loss_runs(example, tiny_tokenizer) == [["ĠThe", "Ġanswer", "Ġis"]]
    assert (report.prompt_truncated, report.completion_truncated, report.tokens_dropped) == (1, 1, n - 4)
    with pytest.raises(DataError, match="exceed max_length=4"):
        one([{"messages": THREE_TURNS}], tiny_tokenizer, assistant_only_loss=True, max_length=4, truncation="error")


def test_packing_keeps_every_turns_mask(tiny_tokenizer):
    records = [{"messages": THREE_TURNS}, {"messages": THREE_TURNS[:3]}, {"prompt": "What is 1+1?", "completion": " 2"}]
    examples, _ = tokenize_sft(records, tiny_tokenizer, 4096, assistant_only_loss=True)
    (row,) = pack_examples(examples, max_length=4096)
    by_id = {ex["id"]: ex for ex in examples}
    start = 0
    for i in row["example_ids"]:
        ex = by_id[i]
        n = len(ex["input_ids"])
        assert row["input_ids"][start:start + n] == ex["input_ids"]
        assert row["loss_mask"][start:start + n] == [0] + ex["loss_mask"][1:]  # packing's own rule for the first
        start += n
    assert sum(row["loss_mask"]) == sum(sum(ex["loss_mask"]) for ex in examples)


# renders an assistant turn one way while it is last, another once a user follows (as templates
# that drop earlier reasoning do): the turn cannot be cut out of the whole conversation
REWRITING_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}<|assistant|>(earlier)\n"
    "{% else %}<|{{ m.role }}|>{{ m.content }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_template_that_rewrites_earlier_turns_is_refused_by_file_and_line(tiny_tokenizer, tmp_path):
    path = tmp_path / "chats.jsonl"
    rows = [{"messages": THREE_TURNS[:3]}, {"messages": THREE_TURNS[:3]}, {"messages": THREE_TURNS}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = load_records(str(path), "sft")
    tokenizer = with_template(tiny_tokenizer, REWRITING_TEMPLATE)
    with pytest.raises(DataError, match=rf"^{path}:3: the chat template does not render assistant message 2") as e:
        tokenize_sft(records, tokenizer, 4096, assistant_only_loss=True)
    assert "not a prefix" in str(e.value) and "(earlier)" in str(e.value)
    assert "assistant_only_loss off" in str(e.value)  # the way out: the last turn alone still cuts exactly
    examples, _ = tokenize_sft(records, tokenizer, 4096)
    assert len(examples) == 3


def test_generation_prompt_that_is_not_a_prefix_is_refused(tiny_tokenizer):
    tokenizer = with_template(tiny_tokenizer, "{% if add_generation_prompt %}GEN {% endif %}" + REWRITING_TEMPLATE)
    record = {"messages": THREE_TURNS[:3], "_where": "chats.jsonl:7"}
    with pytest.raises(DataError, match=r"^chats.jsonl:7: .*assistant message 2.*add_generation_prompt=True"):
        tokenize_sft([record], tokenizer, 4096, assistant_only_loss=True)
    with pytest.raises(DataError, match=r"^chats.jsonl:7: .*not a prefix"):  # and as before, with the key off
        tokenize_sft([record], tokenizer, 4096)


def test_load_chat_template(tmp_path, tiny_tokenizer):
    assert set(BUNDLED_CHAT_TEMPLATES) >= {"plain", "chatml"}
    plain = attach_chat_template(copy.deepcopy(tiny_tokenizer), load_chat_template("plain"), "plain")
    assert plain.chat_template == PLAIN_CHAT_TEMPLATE_BOS  # alignkit's own, so rendered by _render_plain
    path = tmp_path / "tool.jinja"
    path.write_text(TOOL_TEMPLATE, encoding="utf-8")
    assert load_chat_template(str(path)) == TOOL_TEMPLATE
    with pytest.raises(ConfigError, match=r"chat_template 'chatlm': not a bundled template \(plain, chatml\)"):
        load_chat_template("chatlm")
    with pytest.raises(ConfigError, match=r"plain, chatml.*no such file"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.content }}", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"chat_template {bad}: not a valid Jinja template: line 1"):
        attach_chat_template(copy.deepcopy(tiny_tokenizer), load_chat_template(str(bad)), str(bad))


@pytest.mark.parametrize("choice", ["chatml", "file"])
def test_sft_trains_on_conversations_and_saves_the_template(choice, tiny_model_dir, tmp_path, one_thread):
    from alignkit.train import sft

    data = tmp_path / "chats.jsonl"
    rows = [{"messages": [m("user", f"What is {a}+1?"), m("assistant", f"The answer is {a + 1}."),
                          m("user", f"And {a}+2?"), m("assistant", f"The answer is {a + 2}.")]} for a in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if choice == "file":
        template = tmp_path / "tool.jinja"
        template.write_text(TOOL_TEMPLATE, encoding="utf-8")
        choice, expected = str(template), TOOL_TEMPLATE
    else:
        expected = "{{ bos_token }}" + CHATML_CHAT_TEMPLATE
    out = tmp_path / "out"
    result = sft.run(sft.SFTConfig(model=str(tiny_model_dir), data=str(data), output_dir=str(out), max_steps=2,
                                   batch_size=4, log_steps=1, chat_template=choice))
    losses = [r["train/loss"] for r in result.history if "train/loss" in r]
    assert result.steps == 2 and len(losses) == 2 and all(math.isfinite(x) for x in losses), result.history
    saved = transformers.AutoTokenizer.from_pretrained(out)
    assert saved.chat_template == expected
    rendered = saved.apply_chat_template(rows[0]["messages"], tokenize=False)
    assert rendered == assistant_spans(rows[0], attach_chat_template(saved, expected))[0]  # what was trained on


def test_sft_bad_chat_template_fails_before_data(tiny_model_dir, tmp_path):
    from alignkit.train import sft

    cfg = sft.SFTConfig(model=str(tiny_model_dir), data=str(tmp_path / "missing.jsonl"),
                        output_dir=str(tmp_path / "out"), chat_template="chatlm")
    with pytest.raises(ConfigError, match=r"not a bundled template \(plain, chatml\)"):
        sft.run(cfg)
