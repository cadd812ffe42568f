"""Judges: AI feedback behind one interface.

    judge = load_judge("openai-chat:Qwen/Qwen3-8B@http://127.0.0.1:8000/v1")
    judge.score(prompts, responses)        # -> list[float], NaN where the answer was unusable
    judge.compare(prompts, a, b)           # -> list[float], P(a better), both orders averaged

A spec names the judge:

    runs/rm                                     a reward-model checkpoint (RewardModel.score)
    lm:runs/sft                                 a local causal LM: next-token probabilities of the labels
    openai:MODEL@http://HOST/v1                 an OpenAI-compatible completions endpoint
    openai-chat:MODEL@http://HOST/v1            ... or its chat completions endpoint
    module:function                             a Python scorer f(prompts, responses) -> scores
    compare:module:function                     a Python comparator f(prompts, a, b) -> P(a better)

Comparison. A scorer compares by Bradley-Terry, P(a > b) = sigmoid(s_a - s_b). A judge that
reads both answers (LM, endpoint, comparator) is asked both ways round, p1 = P(a | a shown
first) and p2 = P(b | b shown first), and answers p = (p1 + 1 - p2) / 2: a judge that always
picks the first position gets p = 1/2. `stats["flip_rate"]` is the share of pairs whose
decision (p > 1/2) changed with the order.

Labels are read, never guessed: an LM judge normalises the probabilities of the label
strings ("A"/"B", or "1".."10") as continuations of the judge prompt; an endpoint's answer is
read from its top logprobs when the server returns them, else parsed strictly (the stripped
answer must be one label). An unusable answer is NaN, counted in `stats["unparsed"]`, and
the caller masks it. Each single-order judgement is cached by a hash of (judge, template,
question): the same question is never asked twice, across runs when `cache_path` is set.
Endpoints get `concurrency` requests in flight, retries with backoff on 429/5xx and
timeouts (the openai client's), and `stats` counts calls, tokens, failures and latency.
The endpoint's key comes from the environment (`api_key_env`), never from a config file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import threading
from pathlib import Path

from alignkit.feedback.endpoint import Endpoint, FeedbackError

PAIRWISE_TEMPLATE = (
    "Which response answers the prompt better? Answer with one letter, A or B.\n\n"
    "Prompt: {prompt}\n\nResponse A: {a}\n\nResponse B: {b}\n\nBetter response:"
)
SCORE_TEMPLATE = (
    "Rate how well the response answers the prompt, from 1 (worst) to 10 (best). Answer with the number only.\n\n"
    "Prompt: {prompt}\n\nResponse: {response}\n\nRating:"
)
PAIRWISE_LABELS = ("A", "B")
SCORE_LABELS = tuple(str(i) for i in range(1, 11))


def debias(p_first: list[float], p_second: list[float]) -> tuple[list[float], float]:
    """Position-debiased P(a better) from both orders, and the flip rate.

    p_first[i] = P(a) with a shown first, p_second[i] = P(b) with b shown first:
    p_i = (p_first[i] + 1 - p_second[i]) / 2. A pair flips when the decision of the two
    orders differs: (p_first > 1/2) != (1 - p_second > 1/2). NaN in either order gives NaN
    and is left out of the rate."""
    out, flips, n = [], 0, 0
    for p1, p2 in zip(p_first, p_second):
        if math.isnan(p1) or math.isnan(p2):
            out.append(float("nan"))
            continue
        out.append((p1 + 1.0 - p2) / 2.0)
        n += 1
        flips += (p1 > 0.5) != (1.0 - p2 > 0.5)
    return out, flips / n if n else float("nan")


def label_distribution(logprobs: dict[str, float], labels: tuple[str, ...]) -> list[float] | None:
    """The labels' probabilities renormalised over the label set, from {label: log p}
    (labels the model gave no probability count 0); None when none of them appears."""
    present = [logprobs.get(label) for label in labels]
    if all(lp is None for lp in present):
        return None
    top = max(lp for lp in present if lp is not None)
    weights = [0.0 if lp is None else math.exp(lp - top) for lp in present]
    total = sum(weights)
    return [w / total for w in weights]


def prompt_text(prompt: str | list[dict]) -> str:
    """A prompt as a judge template shows it: a string as it is, a message list as `role: content` lines."""
    return prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def strict_label(text: str, labels: tuple[str, ...]) -> str | None:
    """The answer when it is exactly one label (surrounding whitespace and one trailing '.' allowed)."""
    answer = text.strip().removesuffix(".").strip()
    return answer if answer in labels else None


class Judge:
    """Scores and compares responses; subclasses implement `_score` and, when they read two
    answers at once, `_compare_one_order`. Both results are cached per item."""

    reads_pairs = False  # True: compare() asks both orders; False: Bradley-Terry on scores

    def __init__(self, name: str, cache_path: str | None = None):
        self.name = name
        self.stats: dict[str, float] = {"calls": 0, "cached": 0, "unparsed": 0, "failures": 0,
                                        "prompt_tokens": 0, "completion_tokens": 0, "flip_rate": float("nan")}
        self._flips = [0, 0]  # pairs whose decision changed with the order, pairs judged both ways
        self._cache: dict[str, float] = {}
        self._lock = threading.Lock()
        self._cache_file = Path(cache_path) if cache_path else None
        if self._cache_file and self._cache_file.exists():
            for line in self._cache_file.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self._cache[row["key"]] = row["value"]

    def identity(self) -> str:
        """What makes two judges give the same answers (the cache key's first part)."""
        return self.name

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self._cached("score", [(p, r) for p, r in zip(prompts, responses)], self._score)

    def compare(self, prompts: list[str], a: list[str], b: list[str]) -> list[float]:
        """P(a better than b) per item: both orders averaged for a judge that reads pairs."""
        if not self.reads_pairs:
            sa, sb = self.score(prompts, a), self.score(prompts, b)
            return [1.0 / (1.0 + math.exp(y - x)) if not (math.isnan(x) or math.isnan(y)) else float("nan")
                    for x, y in zip(sa, sb)]
        first = self._cached("compare", list(zip(prompts, a, b)), self._compare_one_order)
        second = self._cached("compare", list(zip(prompts, b, a)), self._compare_one_order)
        probs, rate = debias(first, second)
        with self._lock:  # the rate over every pair this judge has compared
            judged = sum(not math.isnan(p) for p in probs)
            self._flips[0] += round(rate * judged) if judged else 0
            self._flips[1] += judged
            self.stats["flip_rate"] = self._flips[0] / self._flips[1] if self._flips[1] else float("nan")
        return probs

    def with_pairwise_template(self, template: str) -> "Judge":
        """The same judge (model, client, cache, stats shared) asking pairs with `template`;
        a judge that reads no template (a reward model, a scorer) is returned as it is."""
        if not hasattr(self, "templates"):
            return self
        judge = copy.copy(self)
        judge.templates = (template, self.templates[1])
        return judge

    def report(self) -> str:
        s = self.stats
        flip = f", flip rate {s['flip_rate']:.3f}" if not math.isnan(s["flip_rate"]) else ""
        endpoint = self.endpoint.report() if hasattr(self, "endpoint") else ""
        return (f"judge {self.name}: {int(s['calls'])} calls, {int(s['cached'])} answers from the cache, "
                f"{int(s['unparsed'])} unusable (masked), {int(s['failures'])} failed{endpoint}{flip}")

    def _cached(self, kind: str, items: list[tuple], fn) -> list[float]:
        keys = [hashlib.sha256(json.dumps([self.identity(), kind, *item]).encode()).hexdigest() for item in items]
        with self._lock:
            missing = sorted({k: i for i, k in enumerate(keys) if k not in self._cache}.values())
            self.stats["cached"] += len(items) - len(missing)
        if missing:
            values = fn([items[i] for i in missing])
            with self._lock:
                new = {keys[i]: float(v) for i, v in zip(missing, values)}
                self._cache.update(new)
                if self._cache_file:
                    self._cache_file.parent.mkdir(parents=True, exist_ok=True)
                    with self._cache_file.open("a") as f:
                        f.writelines(json.dumps({"key": k, "value": v}) + "\n" for k, v in new.items())
        return [self._cache[k] for k in keys]

    def _score(self, items: list[tuple[str, str]]) -> list[float]:
        raise FeedbackError(f"judge {self.name} cannot score single responses")

    def _compare_one_order(self, items: list[tuple[str, str, str]]) -> list[float]:
        raise NotImplementedError


class RewardModelJudge(Judge):
    """A Bradley-Terry reward model's score (`alignkit.models.reward.RewardModel`)."""

    def __init__(self, path: str, cache_path: str | None = None, device=None):
        from alignkit.models.reward import RewardModel

        super().__init__(path, cache_path)
        self.model = RewardModel.load(path, device=device)

    def _score(self, items):
        self.stats["calls"] += 1
        return self.model.score([p for p, _ in items], [r for _, r in items])


class CallableJudge(Judge):
    """A Python scorer f(prompts, responses) -> scores, or a comparator f(prompts, a, b) -> P(a better)."""

    def __init__(self, spec: str, cache_path: str | None = None):
        from alignkit.rollout.rewards import load_reward_fn

        super().__init__(spec, cache_path)
        self.reads_pairs = spec.startswith("compare:")
        self.fn = load_reward_fn(spec.removeprefix("compare:"))  # imported and checked as rewards are
        # a comparator takes (prompts, a, b): the function itself, not the reward wrapper's (prompts, completions)
        self.compare_fn = _import(spec.removeprefix("compare:")) if self.reads_pairs else None

    def _score(self, items):
        self.stats["calls"] += 1
        return [float("nan") if v is None else float(v) for v in self.fn([p for p, _ in items], [r for _, r in items])]

    def _compare_one_order(self, items):
        self.stats["calls"] += 1
        return [float(v) for v in self.compare_fn([p for p, _, _ in items], [a for _, a, _ in items],
                                                  [b for _, _, b in items])]


def _import(spec: str):
    import importlib

    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


class LocalLMJudge(Judge):
    """A local causal LM asked with a template; P(label) = its probability as the continuation of
    the judge prompt, renormalised over the labels (multi-token labels: the product of their
    tokens' probabilities). score = the expected label value (labels "1".."10")."""

    reads_pairs = True

    def __init__(self, path: str, cache_path: str | None = None, pairwise_template: str = PAIRWISE_TEMPLATE,
                 score_template: str = SCORE_TEMPLATE, device=None):
        from alignkit.models.load import load_causal_lm, load_tokenizer

        super().__init__(f"lm:{path}", cache_path)
        self.templates = (pairwise_template, score_template)
        self.model = load_causal_lm(path).eval().to(device or "cpu")
        self.tokenizer = load_tokenizer(path)

    def identity(self) -> str:
        return json.dumps([self.name, *self.templates])

    def _label_probs(self, texts: list[str], labels: tuple[str, ...]) -> list[list[float]]:
        import torch

        from alignkit.models.forward import token_stats

        out = []
        for text in texts:
            prefix = self.tokenizer(text)["input_ids"]
            rows = [prefix + self.tokenizer(" " + label, add_special_tokens=False)["input_ids"] for label in labels]
            width = max(map(len, rows))
            ids = torch.tensor([r + [self.tokenizer.pad_token_id] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            with torch.no_grad():
                lp = token_stats(self.model, ids.to(self.model.device), mask.to(self.model.device)).logprobs.cpu()
            label_lp = {label: float(lp[i, len(prefix) - 1 : len(rows[i]) - 1].sum()) for i, label in enumerate(labels)}
            out.append(label_distribution(label_lp, labels))
            self.stats["calls"] += 1
        return out

    def _compare_one_order(self, items):
        texts = [self.templates[0].format(prompt=prompt_text(p), a=a, b=b) for p, a, b in items]
        return [dist[0] for dist in self._label_probs(texts, PAIRWISE_LABELS)]

    def _score(self, items):
        texts = [self.templates[1].format(prompt=prompt_text(p), response=r) for p, r in items]
        return [sum(float(label) * q for label, q in zip(SCORE_LABELS, dist))
                for dist in self._label_probs(texts, SCORE_LABELS)]


class EndpointJudge(Judge):
    """An OpenAI-compatible endpoint (`openai:` completions or `openai-chat:` chat completions),
    one single-token answer per question."""

    reads_pairs = True

    def __init__(self, spec: str, cache_path: str | None = None, pairwise_template: str = PAIRWISE_TEMPLATE,
                 score_template: str = SCORE_TEMPLATE, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 8, timeout: float = 60.0, max_retries: int = 3):
        super().__init__(spec, cache_path)
        self.endpoint = Endpoint(spec, self.stats, "judge", api_key_env, concurrency, timeout, max_retries)
        self.templates = (pairwise_template, score_template)

    def identity(self) -> str:
        return json.dumps([self.name, self.endpoint.chat, *self.templates])

    def _ask(self, text: str, labels: tuple[str, ...]) -> list[float] | None:
        if self.endpoint.chat:
            r = self.endpoint.request(messages=[{"role": "user", "content": text}], max_tokens=2, temperature=0.0,
                                      logprobs=True, top_logprobs=20)
            choice = r.choices[0]
            answer = choice.message.content or ""
            top = choice.logprobs.content[0].top_logprobs if choice.logprobs and choice.logprobs.content else []
            logprobs = {t.token.strip(): t.logprob for t in top}
        else:
            r = self.endpoint.request(prompt=text, max_tokens=2, temperature=0.0, logprobs=20)
            choice = r.choices[0]
            answer = choice.text
            top = choice.logprobs.top_logprobs[0] if choice.logprobs and choice.logprobs.top_logprobs else {}
            logprobs = {t.strip(): lp for t, lp in top.items()}
        dist = label_distribution({k: v for k, v in logprobs.items() if k in labels}, labels) if logprobs else None
        if dist is None:  # no logprobs: the answer itself, read strictly
            label = strict_label(answer, labels)
            dist = None if label is None else [float(label == x) for x in labels]
        if dist is None:
            with self._lock:
                self.stats["unparsed"] += 1
        return dist

    def _ask_all(self, texts: list[str], labels: tuple[str, ...]) -> list[list[float] | None]:
        return self.endpoint.map(lambda t: self._ask(t, labels), texts)

    def _compare_one_order(self, items):
        dists = self._ask_all([self.templates[0].format(prompt=prompt_text(p), a=a, b=b) for p, a, b in items], PAIRWISE_LABELS)
        return [float("nan") if d is None else d[0] for d in dists]

    def _score(self, items):
        dists = self._ask_all([self.templates[1].format(prompt=prompt_text(p), response=r) for p, r in items], SCORE_LABELS)
        return [float("nan") if d is None else sum(float(x) * q for x, q in zip(SCORE_LABELS, d)) for d in dists]


def load_judge(spec: str, cache_path: str | None = None, **options) -> Judge:
    """The judge a spec names (see the module docstring); `options` go to the endpoint / LM judges
    (templates, api_key_env, concurrency, timeout, max_retries)."""
    if spec.startswith(("openai:", "openai-chat:")):
        return EndpointJudge(spec, cache_path, **options)
    if spec.startswith("lm:"):
        keep = {k: v for k, v in options.items() if k in ("pairwise_template", "score_template")}
        return LocalLMJudge(spec[3:], cache_path, **keep)
    if Path(spec).is_dir():
        return RewardModelJudge(spec, cache_path)
    if ":" in spec:
        return CallableJudge(spec, cache_path)
    raise FeedbackError(f"judge {spec!r}: not a reward-model folder, lm:PATH, openai[-chat]:MODEL@URL, "
                     "module:function or compare:module:function")
