"""Turn a record into prompt text and completion text.

    prompt, completion = split_prompt_completion(record, tokenizer)
    text = render_prompt([{"role": "user", "content": "Hi"}], tokenizer)

Strings are used as they are (TRL's convention: prompt + completion is a plain
concatenation, no template). Message lists are rendered with the tokenizer's chat
template when it has one (`tokenizer.chat_template`); the prompt is every message but
the completion rendered with `add_generation_prompt=True`, the completion is the rest
of the full rendering, so prompt + completion is exactly the full conversation.

Without a chat template (a freshly pretrained base model) the PLAIN template is used:

    System: {content}
    User: {content}
    Assistant: {content}
    Assistant: {content}          <- the completion: prompt ends "Assistant:",
                                     completion is " {content}" (no trailing newline)

that is, each message renders as "{Role}: {content}\\n" with the role capitalised
(System, User, Assistant, Tool); the generation prompt is "Assistant:"; and the final
assistant message renders as " {content}" after that generation prompt. Example:

    [user "2+2?", assistant "4"]  ->  prompt "User: 2+2?\\nAssistant:", completion " 4"

The same format as a Jinja2 chat template, `PLAIN_CHAT_TEMPLATE`, travels with every
tokenizer alignkit loads or saves (`load_tokenizer`, `save_tiny`), so other tools
(`apply_chat_template`, `transformers serve`, vLLM) render alignkit's prompts token for
token: `plain_chat_template(tokenizer)` leads it with `{{ bos_token }}` when the tokenizer
adds BOS itself (as alignkit tokenizes prompts with the tokenizer's special tokens, while
`apply_chat_template(tokenize=True)` adds none). `_render_plain` stays the reference: a
tokenizer that carries one of these two templates is rendered by it, so the text alignkit
produces is the same with the template attached as without.
"""

from __future__ import annotations

from typing import Any

GENERATION_PROMPT = "Assistant:"

# The PLAIN format as a Hugging Face chat template (variables `messages`, `add_generation_prompt`).
# Written without literal newlines (transformers renders with trim_blocks/lstrip_blocks): the
# Jinja string literal '\n' (a backslash and an n in the template text) is the one newline each
# message ends with. Pinned equal to `_render_plain` by tests/data/test_chat_template.py.
PLAIN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "{%- if not (loop.last and message['role'] == 'assistant' and not add_generation_prompt) %}{{ '\\n' }}{% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}Assistant:{% endif -%}"
)
# The template for tokenizers that add BOS with their special tokens (Llama's, alignkit's tiny one).
PLAIN_CHAT_TEMPLATE_BOS = "{{ bos_token }}" + PLAIN_CHAT_TEMPLATE


def _render_plain(messages: list[dict], add_generation_prompt: bool) -> str:
    parts = [f"{m['role'].capitalize()}: {m['content']}\n" for m in messages]
    if add_generation_prompt:
        return "".join(parts) + GENERATION_PROMPT
    if messages and messages[-1]["role"] == "assistant":
        parts[-1] = parts[-1][:-1]  # the final assistant message is the completion: no newline after it
    return "".join(parts)


def _adds_bos(tokenizer: Any) -> bool:
    """Whether tokenizing with special tokens puts BOS in front (Llama-style), which
    `apply_chat_template(tokenize=True)` does not do: the template must then write it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return tokenizer("a", add_special_tokens=True)["input_ids"] == [bos, *plain]


def plain_chat_template(tokenizer: Any) -> str:
    """The PLAIN chat template for `tokenizer`: rendered by `apply_chat_template` (text, or
    ids with its default `add_special_tokens=False`), it gives the ids alignkit tokenizes
    the same messages into (the prompt with the tokenizer's special tokens)."""
    return PLAIN_CHAT_TEMPLATE_BOS if _adds_bos(tokenizer) else PLAIN_CHAT_TEMPLATE


def ensure_chat_template(tokenizer: Any) -> Any:
    """Give `tokenizer` the PLAIN chat template unless it has a chat template of its own
    (left untouched); returns it. A later `save_pretrained` then writes the template."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = plain_chat_template(tokenizer)
    return tokenizer


def _render(messages: list[dict], tokenizer: Any, add_generation_prompt: bool) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if template and template not in (PLAIN_CHAT_TEMPLATE, PLAIN_CHAT_TEMPLATE_BOS):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    return _render_plain(messages, add_generation_prompt)


def render_prompt(prompt: str | list[dict], tokenizer: Any) -> str:
    """The text a model continues: a string as it is, a message list rendered with the
    generation prompt (chat template, or the plain template ending "Assistant:").

    `tokenizer` may be None (plain template).
    """
    if isinstance(prompt, str):
        return prompt
    return _render(prompt, tokenizer, add_generation_prompt=True)


def split_prompt_completion(record: dict, tokenizer: Any) -> tuple[str, str]:
    """(prompt text, completion text) of an sft-shaped record.

    The record holds `messages` (the last message is the completion), or `prompt` and
    `completion`, both strings (returned unchanged) or both message lists. For a
    preference pair, call it with `{"prompt": prompt, "completion": chosen}`.
    Raises ValueError when the chat template's prompt rendering is not a prefix of the
    full rendering (the completion could not be cut out exactly).
    """
    if record.get("messages") is not None:
        messages = record["messages"]
        prompt_messages = messages[:-1]
    else:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return prompt, completion
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            raise ValueError("'prompt' and 'completion' must both be strings or both be message lists")
        prompt_messages, messages = prompt, prompt + completion
    prompt_text = _render(prompt_messages, tokenizer, add_generation_prompt=True)
    full_text = _render(messages, tokenizer, add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise ValueError(
            "the chat template's rendering of the prompt (with add_generation_prompt=True) is not a "
            f"prefix of the whole conversation's rendering, so the completion cannot be cut out: "
            f"prompt {prompt_text[-80:]!r}, conversation {full_text[:len(prompt_text) + 40][-120:]!r}"
        )
    return prompt_text, full_text[len(prompt_text):]
