"""Judges: position debiasing, label reading, the cache, and HTTP failures against a stub
OpenAI-compatible server on 127.0.0.1."""

import http.server
import json
import math
import threading
import time

import pytest

from alignkit.feedback.endpoint import FeedbackError
from alignkit.feedback.judges import (debias, label_distribution, load_judge, strict_label)
from tests.helpers import free_port


def always_a(prompts, a, b):
    """A comparator that always prefers whatever is shown first."""
    return [1.0] * len(prompts)


def longer(prompts, responses, **_):
    return [float(len(r)) for r in responses]


def test_debias_hand_values():
    # p1 = P(a | a first), p2 = P(b | b first): p = (p1 + 1 - p2) / 2
    probs, flip = debias([1.0, 0.9, 0.2, float("nan")], [1.0, 0.3, 0.6, 0.5])
    assert probs[:3] == pytest.approx([0.5, 0.8, 0.3]) and math.isnan(probs[3])
    # decisions: (a, b): pair 0 flips (A first both times), pair 1 agrees (a), pair 2 agrees (b)
    assert flip == pytest.approx(1 / 3)


def test_a_judge_that_always_picks_the_first_position_is_reported_and_neutralised():
    judge = load_judge("compare:tests.feedback.test_judges:always_a")
    probs = judge.compare(["p"] * 4, ["x", "y", "z", "w"], ["1", "2", "3", "4"])
    assert probs == [0.5] * 4 and judge.stats["flip_rate"] == 1.0
    assert "flip rate 1.000" in judge.report()


def test_a_scorer_compares_by_bradley_terry_without_position_bias():
    judge = load_judge("tests.feedback.test_judges:longer")
    (p,) = judge.compare(["p"], ["abc"], ["a"])
    assert p == pytest.approx(1 / (1 + math.exp(-2)))  # sigmoid(3 - 1)


def test_labels_are_read_not_guessed():
    assert label_distribution({"A": math.log(0.3), "B": math.log(0.1), "C": 0.0}, ("A", "B")) == pytest.approx([0.75, 0.25])
    assert label_distribution({"x": 0.0}, ("A", "B")) is None
    assert label_distribution({"A": -1.0}, ("A", "B")) == [1.0, 0.0]
    assert strict_label(" B.\n", ("A", "B")) == "B"
    assert strict_label("B is better", ("A", "B")) is None and strict_label("", ("A", "B")) is None


def test_judgements_are_cached_by_content_across_runs(tmp_path):
    cache = tmp_path / "cache.jsonl"
    judge = load_judge("compare:tests.feedback.test_judges:always_a", str(cache))
    judge.compare(["p", "q"], ["x", "y"], ["1", "2"])
    assert judge.stats["calls"] == 2 and judge.stats["cached"] == 0  # one call per order
    judge.compare(["p", "q"], ["x", "y"], ["1", "2"])
    assert judge.stats["calls"] == 2 and judge.stats["cached"] == 4
    again = load_judge("compare:tests.feedback.test_judges:always_a", str(cache))
    again.compare(["q"], ["y"], ["2"])
    assert again.stats["calls"] == 0 and again.stats["cached"] == 2
    again.compare(["q"], ["y"], ["3"])  # another question: asked
    assert again.stats["calls"] == 2


class _Stub(http.server.ThreadingHTTPServer):
    """Answers /v1/chat/completions from a script: a list of (status, body or None = hang)."""

    def __init__(self, script):
        super().__init__(("127.0.0.1", free_port()), _Handler)
        self.script, self.requests = list(script), []


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802 - the http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        status, answer = self.server.script.pop(0) if len(self.server.script) > 1 else self.server.script[0]
        if answer is None:  # never answers within the client's timeout
            time.sleep(3)
            return
        payload = json.dumps(answer if status != 200 else _completion(answer)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if status == 429:
            self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(payload)


def _completion(answer):
    text, logprobs = answer if isinstance(answer, tuple) else (answer, None)
    choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
    if logprobs:
        choice["logprobs"] = {"content": [{"token": text, "logprob": max(logprobs.values()), "bytes": None,
                                           "top_logprobs": [{"token": t, "logprob": lp, "bytes": None}
                                                            for t, lp in logprobs.items()]}]}
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [choice],
            "usage": {"prompt_tokens": 11, "completion_tokens": 1, "total_tokens": 12}}


@pytest.fixture
def stub():
    servers = []

    def start(script):
        server = _Stub(script)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server, f"openai-chat:m@http://127.0.0.1:{server.server_address[1]}/v1"

    yield start
    for server in servers:
        server.shutdown()


def test_an_endpoint_that_answers_429_twice_is_retried(stub):
    server, spec = stub([(429, {"error": {"message": "slow down"}})] * 2 + [(200, "7")])
    judge = load_judge(spec, concurrency=1, timeout=5, max_retries=3)
    assert judge.score(["p"], ["r"]) == [7.0]  # no logprobs: the answer read strictly
    assert len(server.requests) == 3 and judge.stats["calls"] == 1 and judge.stats["failures"] == 0


def test_logprobs_are_read_when_the_server_returns_them(stub):
    server, spec = stub([(200, ("A", {"A": math.log(0.6), "B": math.log(0.2), "C": math.log(0.2)}))])
    judge = load_judge(spec, concurrency=2)
    (p,) = judge.compare(["p"], ["x"], ["y"])
    # both orders answer P(first) = 0.6 / 0.8 = 0.75: p = (0.75 + 1 - 0.75) / 2
    assert p == pytest.approx(0.5) and len(server.requests) == 2 and judge.stats["flip_rate"] == 1.0
    assert judge.stats["prompt_tokens"] == 22 and "Response A: x" in server.requests[0]["messages"][0]["content"]


def test_an_unparseable_answer_is_counted_and_masked(stub):
    server, spec = stub([(200, "The first one, clearly")])
    judge = load_judge(spec)
    probs = judge.compare(["p", "q"], ["x", "y"], ["1", "2"])
    assert all(math.isnan(p) for p in probs) and judge.stats["unparsed"] == 4 and judge.stats["calls"] == 4


def test_an_endpoint_that_never_answers_times_out_naming_it(stub):
    server, spec = stub([(200, None)])
    judge = load_judge(spec, timeout=0.5, max_retries=1)
    with pytest.raises(FeedbackError, match=r"judge endpoint http://127\.0\.0\.1:\d+/v1: no answer within 0\.5 s after 2 tries"):
        judge.score(["p"], ["r"])
    assert judge.stats["failures"] == 1


def test_a_local_lm_judge_reads_the_labels_probabilities(tiny_model_dir):
    """lm:PATH: P(A) is the model's probability of " A" after the judge prompt, renormalised
    over " A" / " B", both orders averaged; a score is the expected rating over "1".."10"."""
    import torch

    from alignkit.feedback.judges import PAIRWISE_TEMPLATE
    from alignkit.models.forward import forward_logprobs

    judge = load_judge(f"lm:{tiny_model_dir}")
    (p,) = judge.compare(["What is 2+3?"], [" 5"], [" 7"])

    def p_first(a, b):  # by hand: the two continuations' log-probs, one row each
        tok = judge.tokenizer
        prefix = tok(PAIRWISE_TEMPLATE.format(prompt="What is 2+3?", a=a, b=b))["input_ids"]
        lp = []
        for label in (" A", " B"):
            ids = torch.tensor([prefix + tok(label, add_special_tokens=False)["input_ids"]])
            lp.append(float(forward_logprobs(judge.model, ids, torch.ones_like(ids))[0][0, len(prefix) - 1:].sum()))
        return math.exp(lp[0]) / (math.exp(lp[0]) + math.exp(lp[1]))

    assert p == pytest.approx((p_first(" 5", " 7") + 1 - p_first(" 7", " 5")) / 2, abs=1e-5)
    assert judge.stats["calls"] == 2 and 0 <= judge.stats["flip_rate"] <= 1
    (score,) = judge.score(["What is 2+3?"], [" 5"])
    assert 1.0 <= score <= 10.0
