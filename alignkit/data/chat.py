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

Every assistant turn of a conversation: `assistant_spans(record, tokenizer)` gives its whole
rendering and the character spans of its assistant messages, found by rendering it prefix by
prefix (see there); `tokenize_sft(..., assistant_only_loss=True)` turns them into a loss mask.

Bundled templates, by name (`alignkit sft --chat_template chatml`; see `load_chat_template`):
"plain" (the format above) and "chatml" (`<|im_start|>{role}\\n{content}<|im_end|>\\n` for
every message, whatever its role: system, user, assistant, tool; the generation prompt is
`<|im_start|>assistant\\n`).
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
# ChatML as OpenAI specified it and Hugging Face's chat-template docs write it: every role (tool
# included) renders the same way, so the text says which role spoke.
CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BUNDLED_CHAT_TEMPLATES = {"plain": PLAIN_CHAT_TEMPLATE, "chatml": CHATML_CHAT_TEMPLATE}


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


def load_chat_template(name_or_path: str) -> str:
    """The Jinja text of a bundled template ("plain", "chatml": `BUNDLED_CHAT_TEMPLATES`), or of
    the file at `name_or_path` as it is (a bundled name wins over a file of that name).

    A ConfigError listing the bundled names when it is neither, or the file cannot be read.
    """
    from pathlib import Path

    from alignkit.config import ConfigError

    if name_or_path in BUNDLED_CHAT_TEMPLATES:
        return BUNDLED_CHAT_TEMPLATES[name_or_path]
    path = Path(name_or_path).expanduser()
    names = ", ".join(BUNDLED_CHAT_TEMPLATES)
    if not path.is_file():
        why = "is a directory" if path.is_dir() else "no such file"
        raise ConfigError(f"chat_template {name_or_path!r}: not a bundled template ({names}) and {why} "
                          "(give a bundled name or the path of a .jinja file)")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"chat_template {name_or_path}: cannot read the file ({e})") from None


def attach_chat_template(tokenizer: Any, template: str, source: str = "") -> Any:
    """Give `tokenizer` the chat template `template` (from `load_chat_template`); returns it.

    A bundled template is led by `{{ bos_token }}` when the tokenizer adds BOS with its special
    tokens (as `plain_chat_template` does), so `apply_chat_template(tokenize=True)` gives the
    ids alignkit trains on; a file's template is used as it is. The next `save_pretrained` writes
    it (chat_template.jinja). A ConfigError naming `source` when the template is not valid Jinja.
    """
    from jinja2 import TemplateSyntaxError

    from alignkit.config import ConfigError

    if template in BUNDLED_CHAT_TEMPLATES.values() and _adds_bos(tokenizer):
        template = "{{ bos_token }}" + template
    tokenizer.chat_template = template
    try:  # transformers compiles the template on first use: a syntax error shows here, not mid-data
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    except TemplateSyntaxError as e:
        raise ConfigError(f"chat_template {source or '<text>'}: not a valid Jinja template: line {e.lineno}: "
                          f"{e.message}") from None
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


def is_conversation(record: dict) -> bool:
    """Whether an sft record is a message list: `messages`, or `prompt` and `completion` lists."""
    if record.get("messages") is not None:
        return True
    return isinstance(record.get("prompt"), list) and isinstance(record.get("completion"), list)


def _mismatch(a: str, b: str) -> str:
    """Where two renderings part: the character index and the text around it in each."""
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"they differ at character {i}: {a[max(0, i - 40):i + 20]!r} vs {b[max(0, i - 40):i + 20]!r}"


def _span_problem(text: str, before: str, through: str, previous_end: int) -> str | None:
    """Why text[len(before):len(through)] is not an assistant message's exact span, or None."""
    if not text.startswith(before):
        return ("the conversation before it, rendered with add_generation_prompt=True, is not a prefix of the "
                f"whole conversation's rendering ({_mismatch(before, text)})")
    if not text.startswith(through):
        return ("the conversation up to it, rendered alone, is not a prefix of the whole conversation's rendering "
                f"({_mismatch(through, text)})")
    if len(through) < len(before):
        return (f"the generation prompt {before[-40:]!r} is not how the template starts the message "
                f"({through[-40:]!r})")
    if len(before) < previous_end:
        return "its rendering starts inside the previous assistant message's"
    return None


def assistant_spans(record: dict, tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """(text, spans) of a message-list sft record (see `is_conversation`): `text` is the whole
    conversation rendered (chat template, or the plain one; `tokenizer` may be None), `spans`
    the [start, end) character ranges of `text` the loss covers, one per assistant message, in order.

    With R(m, g) the rendering of messages m with add_generation_prompt=g, assistant message k
    spans text[len(R(messages[:k], True)) : len(R(messages[:k+1], False))]: what a model writes
    when asked to continue messages[:k], that is the message's content and the end-of-turn text
    the template writes with it (ChatML's "<|im_end|>\\n", a Llama-2 template's EOS), never the
    generation prompt before it ("Assistant:", "<|im_start|>assistant\\n"). It is
    `split_prompt_completion`'s cut, made at every assistant message. The plain template writes
    no end of turn: a middle message's span is " {content}" and the newline after it is context.
    The messages covered are every assistant message of `messages`, and of `prompt` + `completion`
    lists those of the completion (the prompt is context, as TRL's completion_only_loss makes it).

    Raises ValueError naming the message when a prefix rendering is not a prefix of `text`: a
    template that rewrites earlier turns once later ones follow (Qwen3's drops their reasoning)
    or whose generation prompt is not how it starts an assistant message. The span could then
    not be cut out exactly, and a guess would train on text the template never writes.
    """
    if record.get("messages") is not None:
        messages, first = record["messages"], 0
    elif is_conversation(record):
        messages, first = record["prompt"] + record["completion"], len(record["prompt"])
    else:
        raise ValueError("assistant spans need messages: 'messages', or 'prompt' and 'completion' message lists")
    text = _render(messages, tokenizer, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for k in range(first, len(messages)):
        if messages[k]["role"] != "assistant":
            continue
        before = _render(messages[:k], tokenizer, add_generation_prompt=True)
        through = _render(messages[: k + 1], tokenizer, add_generation_prompt=False)
        problem = _span_problem(text, before, through, spans[-1][1] if spans else 0)
        if problem:
            fallback = ("; with assistant_only_loss off only the last assistant message is trained on"
                        if k < len(messages) - 1 else "")
            raise ValueError(f"the chat template does not render assistant message {k} (counting from 0) as a "
                             f"span of the conversation: {problem}{fallback}")
        spans.append((len(before), len(through)))
    return text, spans
