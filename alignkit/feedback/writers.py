"""Writers: models that continue conversations (a critic and reviser, a Self-Instruct teacher).

    writer = load_writer("openai-chat:Qwen/Qwen3-8B@http://127.0.0.1:8000/v1")
    writer.write([[{"role": "user", "content": "Name a colour."}]])    # -> ["Teal."]

A spec names the writer:

    openai-chat:MODEL@http://HOST/v1    an OpenAI-compatible chat endpoint (endpoint.py)
    lm:PATH, or a model folder           a local causal LM sampled through its chat template
    module:function                      a Python function f(conversations) -> list[str]

A conversation is a list of {"role", "content"} messages ending with the user's; the writer
returns the assistant's next message for each. A Python writer is how a task scripts what a
tiny model cannot do (alignkit.tasks.sentiment_feedback: a critic and reviser). Writers
sample (`temperature`); nothing is cached, since two samples of one question should differ.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from alignkit.feedback.endpoint import Endpoint, FeedbackError


class Writer:
    def __init__(self, name: str):
        self.name = name
        self.stats: dict[str, float] = {"calls": 0, "failures": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def write(self, conversations: list[list[dict]]) -> list[str]:
        raise NotImplementedError

    def report(self) -> str:
        s = self.stats
        endpoint = self.endpoint.report() if hasattr(self, "endpoint") else ""
        return f"writer {self.name}: {int(s['calls'])} calls, {int(s['failures'])} failed{endpoint}"


class EndpointWriter(Writer):
    """An OpenAI-compatible chat endpoint; one request per conversation, `concurrency` in flight."""

    def __init__(self, spec: str, max_new_tokens: int = 256, temperature: float = 1.0, seed: int = 0,
                 api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8, timeout: float = 60.0, max_retries: int = 3,
                 role: str = "writer"):
        super().__init__(spec)
        self.endpoint = Endpoint(spec, self.stats, role, api_key_env, concurrency, timeout, max_retries)
        if not self.endpoint.chat:
            raise FeedbackError(f"{role} {spec!r}: a writer continues conversations; use openai-chat:MODEL@URL")
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed

    def write(self, conversations):
        def one(messages):
            r = self.endpoint.request(messages=messages, max_tokens=self.max_new_tokens, temperature=self.temperature)
            return r.choices[0].message.content or ""

        return self.endpoint.map(one, conversations)


class LocalWriter(Writer):
    """A local causal LM: each conversation rendered with the tokenizer's chat template (the
    generation prompt added) and sampled by alignkit's sampler."""

    def __init__(self, path: str, max_new_tokens: int = 256, temperature: float = 1.0, seed: int = 0,
                 max_length: int = 1024, device=None):
        from alignkit.models.load import load_causal_lm, load_tokenizer

        super().__init__(f"lm:{path}")
        self.model = load_causal_lm(path).eval().to(device or "cpu")
        self.tokenizer = load_tokenizer(path)
        self.max_new_tokens, self.temperature, self.seed, self.max_length = max_new_tokens, temperature, seed, max_length

    def write(self, conversations):
        from alignkit.data import tokenize_prompts
        from alignkit.rollout.best_of_n import sample_and_score

        examples, _ = tokenize_prompts([{"prompt": c} for c in conversations], self.tokenizer, self.max_length)
        # each call draws afresh: the sampler seeds a completion by (seed, row, k), rows restart at 0 per call
        seed = self.seed * 1_000_003 + int(self.stats["calls"])
        s = sample_and_score(self.model, self.tokenizer, examples, 1, [], [], max_new_tokens=self.max_new_tokens,
                             temperature=self.temperature, seed=seed)
        self.stats["calls"] += 1
        return s.texts


class CallableWriter(Writer):
    """A Python function f(conversations) -> list[str], one reply per conversation."""

    def __init__(self, spec: str):
        super().__init__(spec)
        module, _, attr = spec.partition(":")
        try:
            self.fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise FeedbackError(f"writer {spec!r}: cannot import it ({e})") from None

    def write(self, conversations):
        replies = self.fn(conversations)
        self.stats["calls"] += 1
        if not isinstance(replies, list) or len(replies) != len(conversations) or not all(
                isinstance(r, str) for r in replies):
            raise FeedbackError(f"writer {self.name} must return a list of {len(conversations)} strings, "
                                f"got {type(replies).__name__} of {len(replies) if hasattr(replies, '__len__') else '?'}")
        return replies


def load_writer(spec: str, *, max_new_tokens: int = 256, temperature: float = 1.0, seed: int = 0,
                role: str = "writer", **endpoint_options) -> Writer:
    """The writer a spec names (see the module docstring); `endpoint_options` (api_key_env,
    concurrency, timeout, max_retries) go to an endpoint writer."""
    if spec.startswith(("openai:", "openai-chat:")):
        return EndpointWriter(spec, max_new_tokens, temperature, seed, role=role, **endpoint_options)
    if spec.startswith("lm:") or Path(spec).is_dir():
        return LocalWriter(spec.removeprefix("lm:"), max_new_tokens, temperature, seed)
    if ":" in spec:
        return CallableWriter(spec)
    raise FeedbackError(f"{role} {spec!r}: not openai-chat:MODEL@URL, lm:PATH, a model folder or module:function")
