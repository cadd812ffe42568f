"""Who answers prompts in the app: a local checkpoint (alignkit's own sampler) or an OpenAI-compatible endpoint.

    sft=runs/demo/sft                                  a save_pretrained directory (or a Hub id)
    served=openai:MODEL@http://127.0.0.1:8000/v1       the completions API of any OpenAI-compatible
                                                       server: transformers serve, vLLM, llama.cpp
    hosted=openai-chat:MODEL@https://api.example/v1    the chat completions API (one user message)

The endpoint's key comes from the environment (`api_key_env`, default OPENAI_API_KEY),
never from a config file. A server without authentication gets the placeholder "none".
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field


@dataclass
class Contestant:
    name: str
    spec: str
    max_new_tokens: int = 64
    temperature: float = 1.0
    api_key_env: str = "OPENAI_API_KEY"
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _loaded: tuple | None = field(default=None, repr=False)

    @property
    def is_endpoint(self) -> bool:
        return self.spec.startswith(("openai:", "openai-chat:"))

    def _endpoint(self) -> tuple[str, str, str]:
        api, _, rest = self.spec.partition(":")
        model, at, base_url = rest.rpartition("@")
        if not at or not model or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"contestant {self.name}: {self.spec!r} is not {api}:MODEL@http(s)://HOST/v1")
        return api, model, base_url

    def generate(self, prompts: list[str], seed: int = 0) -> list[str]:
        """One completion per prompt."""
        return self._generate_endpoint(prompts) if self.is_endpoint else self._generate_local(prompts, seed)

    def _generate_endpoint(self, prompts: list[str]) -> list[str]:
        import openai

        api, model, base_url = self._endpoint()
        client = openai.OpenAI(base_url=base_url, api_key=os.environ.get(self.api_key_env) or "none", timeout=120,
                               max_retries=2)
        out = []
        for prompt in prompts:
            if api == "openai-chat":
                r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=self.max_new_tokens, temperature=self.temperature)
                out.append(r.choices[0].message.content or "")
            else:
                r = client.completions.create(model=model, prompt=prompt, max_tokens=self.max_new_tokens,
                                              temperature=self.temperature)
                out.append(r.choices[0].text)
        return out

    def _load(self):
        if self._loaded is None:
            from alignkit.models.load import load_causal_lm, load_tokenizer

            self._loaded = (load_causal_lm(self.spec).eval(), load_tokenizer(self.spec))
        return self._loaded

    def load(self) -> None:
        """Load a checkpoint now (the server does, before it answers), not at its first battle."""
        if not self.is_endpoint:
            with self._lock:
                self._load()

    def _generate_local(self, prompts: list[str], seed: int) -> list[str]:
        from alignkit.data import tokenize_prompts
        from alignkit.rollout.best_of_n import sample_and_score

        with self._lock:  # one model in memory per contestant; one generation on it at a time
            model, tokenizer = self._load()
            examples, _ = tokenize_prompts([{"prompt": p} for p in prompts], tokenizer, max_length=2**62)
            samples = sample_and_score(model, tokenizer, examples, 1, [], [], max_new_tokens=self.max_new_tokens,
                                       temperature=self.temperature, seed=seed)
            return samples.texts


def parse_contestants(specs: list[str], **options) -> dict[str, Contestant]:
    """`name=spec` strings (a bare path is named by its folder) as contestants, in order."""
    from pathlib import Path

    out: dict[str, Contestant] = {}
    for spec in specs:
        name, sep, target = spec.partition("=")
        if not sep:
            name, target = Path(spec).name, spec
        if not name or name in out:
            raise ValueError(f"contestant {spec!r}: every contestant needs its own name (name=path)")
        out[name] = Contestant(name, target, **options)
        if out[name].is_endpoint:
            out[name]._endpoint()  # a malformed spec fails at start, not at the first battle
    return out
