"""An OpenAI-compatible endpoint, shared by the judges and the writers.

    openai:MODEL@http://HOST/v1          the completions API
    openai-chat:MODEL@http://HOST/v1     the chat completions API

`transformers serve`, vLLM, llama.cpp's server and hosted APIs all speak it. The official
`openai` client retries 408/409/429/5xx and connection errors with exponential backoff
(`max_retries`) and gives up on a request after `timeout` seconds; `concurrency` requests
are in flight at once. Every answered call adds to `stats` (calls, tokens) and to the
latencies; a request that fails after its retries is counted and raised as a
FeedbackError naming the endpoint. The key comes from the environment (`api_key_env`),
never from a config file.
"""

from __future__ import annotations

import os
import threading
import time


class FeedbackError(RuntimeError):
    """A judge or writer that cannot be built or does not answer (a user error: one line)."""


def parse_endpoint_spec(spec: str, role: str) -> tuple[bool, str, str]:
    """(chat, model, base_url) of openai[-chat]:MODEL@URL."""
    api, _, rest = spec.partition(":")
    model, at, base_url = rest.rpartition("@")
    if api not in ("openai", "openai-chat") or not at or not model or not base_url.startswith(("http://", "https://")):
        raise FeedbackError(f"{role} {spec!r} is not openai:MODEL@http(s)://HOST/v1 or openai-chat:MODEL@...")
    return api == "openai-chat", model, base_url


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Endpoint:
    """One endpoint's client, with the request bookkeeping of its owner (`stats`, a dict with
    calls / failures / prompt_tokens / completion_tokens)."""

    def __init__(self, spec: str, stats: dict, role: str, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
                 timeout: float = 60.0, max_retries: int = 3):
        try:
            import openai
        except ImportError:
            raise FeedbackError(f"{role} {spec!r} needs the openai client: pip install 'alignkit[feedback]'") from None

        self.chat, self.model, self.base_url = parse_endpoint_spec(spec, role)
        self.role = role  # who asks ("judge", "writer"): the errors name it
        self.stats, self.latencies, self.lock = stats, [], threading.Lock()
        self.concurrency, self.timeout, self.max_retries = concurrency, timeout, max_retries
        self.client = openai.OpenAI(base_url=self.base_url, api_key=os.environ.get(api_key_env) or "none",
                                    timeout=timeout, max_retries=max_retries)

    def request(self, **kwargs):
        """One chat completion (`messages=...`) or completion (`prompt=...`) of this endpoint's model."""
        import openai

        start = time.perf_counter()
        api = self.client.chat.completions if self.chat else self.client.completions
        try:
            r = api.create(model=self.model, **kwargs)
        except (openai.APITimeoutError, openai.APIConnectionError) as e:
            self._count("failures")
            raise FeedbackError(f"{self.role} endpoint {self.base_url}: no answer within {self.timeout:g} s after "
                                f"{self.max_retries + 1} tries ({type(e).__name__})") from None
        except openai.APIStatusError as e:
            self._count("failures")
            raise FeedbackError(f"{self.role} endpoint {self.base_url}: HTTP {e.status_code} after {self.max_retries + 1} "
                                f"tries: {str(e)[:200]}") from None
        with self.lock:
            self.stats["calls"] += 1
            self.latencies.append(time.perf_counter() - start)
            if r.usage:
                self.stats["prompt_tokens"] += r.usage.prompt_tokens or 0
                self.stats["completion_tokens"] += r.usage.completion_tokens or 0
        return r

    def map(self, fn, items: list) -> list:
        """fn over items with `concurrency` in flight, results in order."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(fn, items))

    def report(self) -> str:
        s, lat = self.stats, self.latencies
        tokens = f", tokens {int(s['prompt_tokens'])} in / {int(s['completion_tokens'])} out" if s["prompt_tokens"] else ""
        return tokens + (f", latency p50 {percentile(lat, 0.5):.3f} s p95 {percentile(lat, 0.95):.3f} s" if lat else "")

    def _count(self, key: str) -> None:
        with self.lock:
            self.stats[key] += 1
