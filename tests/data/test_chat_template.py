"""The PLAIN chat template: what other tools render through a saved tokenizer is what alignkit
renders, text and token ids, and attaching it changes nothing alignkit itself produces."""

from __future__ import annotations

import copy
import json

import pytest
import transformers

from alignkit.data import render_prompt, split_prompt_completion, tokenize_prompts, tokenize_sft
from alignkit.data.chat import (
    PLAIN_CHAT_TEMPLATE,
    PLAIN_CHAT_TEMPLATE_BOS,
    _render_plain,
    ensure_chat_template,
    plain_chat_template,
)
from alignkit.models.load import load_tokenizer


def m(role: str, content: str) -> dict:
    return {"role": role, "content": content}


CONVERSATIONS = {
    "user": [m("user", "What is 2+2?")],
    "system_user": [m("system", "Be brief."), m("user", "Hi")],
    "multi_turn": [m("user", "Hi"), m("assistant", "Hello"), m("user", "2+2?")],
    "tool": [m("user", "Weather?"), m("assistant", "call weather()"), m("tool", "sunny, 21C"), m("user", "So?")],
    "empty_content": [m("system", ""), m("user", "")],
    "newlines": [m("user", "line 1\nline 2\n\n"), m("assistant", "\n"), m("user", "\nlast")],
    "jinja_special": [m("system", "{{ messages }} {% if x %}{% endif %}"),
                      m("user", "{%- for m in messages -%}{{ m }}{# c #} '\\n' }} %}")],
    "unicode_and_special_token_text": [m("user", "héllo 🙂 <s> </s> <pad> Assistant: User:")],
}
COMPLETIONS = {
    "plain": "4",
    "empty": "",
    "newlines": "a\n\nb\n",
    "jinja_special": "{{ bos_token }}{% generation %}",
    "leading_space": "  x",
}
# every conversation, then every conversation with a final assistant message (the completion)
TABLE = {**CONVERSATIONS, **{f"{name}+{c}": conv + [m("assistant", text)]
                             for name, conv in CONVERSATIONS.items() for c, text in COMPLETIONS.items()}}
# the same, as records alignkit trains on: the final assistant message is the completion
SFT_TABLE = {name: conv for name, conv in TABLE.items() if conv[-1]["role"] == "assistant"}


def without_bos(tokenizer):
    """`tokenizer` adding no BOS with its special tokens (GPT-2 style)."""
    from tokenizers import processors

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    assert tokenizer("a", add_special_tokens=True)["input_ids"] == tokenizer("a", add_special_tokens=False)["input_ids"]
    return tokenizer


@pytest.fixture(scope="module", params=["bos", "no_bos"])
def templated(request, tiny_tokenizer):
    """The tiny tokenizer (adds BOS, like Llama's) or a BOS-less variant, with the PLAIN template."""
    tokenizer = copy.deepcopy(tiny_tokenizer)  # the session fixture is shared: never mutate it
    if request.param == "no_bos":
        tokenizer = without_bos(tokenizer)
    return ensure_chat_template(tokenizer)


def template_ids(tokenizer, messages, add_generation_prompt):
    """`apply_chat_template(tokenize=True)`'s ids (transformers 5 returns a BatchEncoding)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out


def test_template_choice(tiny_tokenizer):
    assert plain_chat_template(tiny_tokenizer) == PLAIN_CHAT_TEMPLATE_BOS == "{{ bos_token }}" + PLAIN_CHAT_TEMPLATE
    assert plain_chat_template(without_bos(tiny_tokenizer)) == PLAIN_CHAT_TEMPLATE
    assert tiny_tokenizer.chat_template is None  # train_tokenizer's object is untouched (tests/data/test_chat.py)


@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["gen", "nogen"])
@pytest.mark.parametrize("name", TABLE)
def test_template_renders_the_plain_format(templated, name, add_generation_prompt):
    """Text: the template is `_render_plain` (after BOS, for a tokenizer that adds BOS).
    Ids: apply_chat_template(tokenize=True) gives what alignkit's tokenizer call gives."""
    conversation = TABLE[name]
    spec = _render_plain(conversation, add_generation_prompt)
    bos = templated.bos_token if templated.chat_template == PLAIN_CHAT_TEMPLATE_BOS else ""
    text = templated.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text == bos + spec
    alignkit_ids = templated(spec, add_special_tokens=True)["input_ids"]
    assert template_ids(templated, conversation, add_generation_prompt) == alignkit_ids


@pytest.mark.parametrize("name", SFT_TABLE)
def test_template_ids_are_alignkits_training_ids(templated, name):
    """Prompt ids, and prompt + completion ids (EOS aside), of alignkit's tokenisation equal the
    template's generation-prompt rendering and whole-conversation rendering."""
    conversation = SFT_TABLE[name]
    prompt, completion = split_prompt_completion({"messages": conversation}, templated)
    assert (prompt, completion) == (_render_plain(conversation[:-1], True), " " + conversation[-1]["content"])
    (example,), _ = tokenize_sft([{"messages": conversation}], templated, max_length=4096)
    ids, n_prompt = example["input_ids"], example["loss_mask"].index(1)
    assert ids[-1] == templated.eos_token_id
    assert ids[:n_prompt] == template_ids(templated, conversation[:-1], True)
    assert ids[:-1] == template_ids(templated, conversation, False)
    (generation,), _ = tokenize_prompts([{"prompt": conversation[:-1]}], templated, max_length=4096)
    assert generation["input_ids"] == ids[:n_prompt]


@pytest.mark.parametrize("name", TABLE)
def test_attaching_the_template_changes_nothing_alignkit_renders(tiny_tokenizer, name):
    templated = ensure_chat_template(copy.deepcopy(tiny_tokenizer))
    conversation = TABLE[name]
    assert render_prompt(conversation, templated) == render_prompt(conversation, tiny_tokenizer)
    if conversation[-1]["role"] == "assistant":
        record = {"messages": conversation}
        assert split_prompt_completion(record, templated) == split_prompt_completion(record, tiny_tokenizer)
        assert tokenize_sft([record], templated, 4096)[0] == tokenize_sft([record], tiny_tokenizer, 4096)[0]


def test_template_equals_spec_on_random_conversations(tiny_tokenizer):
    """Many seeded random conversations, both tokenizers, with and without generation prompt."""
    import random

    rng = random.Random(0)
    alphabet = ["a", "Z", " ", "\n", "{", "}", "%", "#", "-", "'", '"', "\\", "é", "<s>", "{{", "{%", "2+2"]
    tokenizers = [ensure_chat_template(copy.deepcopy(tiny_tokenizer)),
                  ensure_chat_template(without_bos(tiny_tokenizer))]
    for _ in range(150):
        conversation = [m(rng.choice(["system", "user", "assistant", "tool"]),
                          "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8))))
                        for _ in range(rng.randint(1, 5))]
        for tokenizer in tokenizers:
            bos = tokenizer.bos_token if tokenizer.chat_template == PLAIN_CHAT_TEMPLATE_BOS else ""
            for gen in (True, False):
                text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=gen)
                assert text == bos + _render_plain(conversation, gen), conversation


def saved_template(directory) -> str | None:
    """The chat template a save_pretrained directory holds (chat_template.jinja, or the legacy config key)."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    return json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")


def check_plain_transformers_renders_like_alignkit(directory, alignkit_tokenizer):
    """AutoTokenizer (no alignkit) on `directory` gives alignkit's prompt/completion ids and text."""
    plain = transformers.AutoTokenizer.from_pretrained(directory)
    assert plain.chat_template == PLAIN_CHAT_TEMPLATE_BOS
    for name, conversation in SFT_TABLE.items():
        prompt, completion = split_prompt_completion({"messages": conversation}, alignkit_tokenizer)
        (example,), _ = tokenize_sft([{"messages": conversation}], alignkit_tokenizer, max_length=4096)
        ids, n_prompt = example["input_ids"], example["loss_mask"].index(1)
        rendered_prompt = plain.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
        assert rendered_prompt == "<s>" + prompt, name
        assert plain.apply_chat_template(conversation, tokenize=False) == "<s>" + prompt + completion, name
        assert template_ids(plain, conversation[:-1], True) == ids[:n_prompt], name
        assert template_ids(plain, conversation, False) + [plain.eos_token_id] == ids, name


def test_save_tiny_writes_the_template(tiny_tokenizer, tiny_model_dir):
    assert saved_template(tiny_model_dir) == PLAIN_CHAT_TEMPLATE_BOS
    assert tiny_tokenizer.chat_template is None  # save_tiny saved a copy
    check_plain_transformers_renders_like_alignkit(tiny_model_dir, load_tokenizer(str(tiny_model_dir)))


def test_loaded_tokenizer_saves_the_template(tiny_tokenizer, tiny_model_dir, tmp_path):
    """A base tokenizer saved without a template (as from the Hub) gets the PLAIN one from
    load_tokenizer, and its next save_pretrained (what every trainer does) writes it."""
    base = tmp_path / "base"
    tiny_tokenizer.save_pretrained(base)  # a plain save: no template
    assert saved_template(base) is None
    tokenizer = load_tokenizer(str(base))
    assert tokenizer.chat_template == PLAIN_CHAT_TEMPLATE_BOS
    tokenizer.save_pretrained(tmp_path / "saved")
    assert saved_template(tmp_path / "saved") == PLAIN_CHAT_TEMPLATE_BOS
    check_plain_transformers_renders_like_alignkit(tmp_path / "saved", tokenizer)
    # and what was saved loads back as the same template, so alignkit keeps rendering it as PLAIN
    again = load_tokenizer(str(tmp_path / "saved"))
    assert again.chat_template == PLAIN_CHAT_TEMPLATE_BOS
    record = {"messages": SFT_TABLE["multi_turn+plain"]}
    assert tokenize_sft([record], again, 4096)[0] == tokenize_sft([record], tiny_tokenizer, 4096)[0]


def test_own_template_is_kept(tiny_tokenizer, tmp_path):
    own = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
           "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = own
    tokenizer.save_pretrained(tmp_path / "chat")
    loaded = load_tokenizer(str(tmp_path / "chat"))
    assert loaded.chat_template == own
    assert render_prompt([m("user", "Hi")], loaded) == "<|user|>Hi\n<|assistant|>"
    loaded.save_pretrained(tmp_path / "again")
    assert saved_template(tmp_path / "again") == own
    assert ensure_chat_template(loaded) is loaded and loaded.chat_template == own
