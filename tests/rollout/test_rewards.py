import math

import pytest

from alignkit.rollout.rewards import RewardError, load_reward_fn, score


def const(prompts, completions, **_):
    return [1.0 for _ in completions]


def length(prompts, completions, **_):
    return [float(len(c)) for c in completions]


def uses_answer(prompts, completions, answer, **_):
    return [1.0 if c.strip() == str(a) else 0.0 for c, a in zip(completions, answer)]


def flaky(prompts, completions, **_):
    return [None if c == "bad" else (math.nan if c == "nan" else 1.0) for c in completions]


def broken(prompts, completions, **_):
    raise KeyError("missing")


def test_weighted_sum_of_callables_with_fields():
    fns = [load_reward_fn("tests.rollout.test_rewards:const"), load_reward_fn("tests.rollout.test_rewards:length"),
           load_reward_fn("tests.rollout.test_rewards:uses_answer")]
    rewards, valid, means = score(fns, [0.5, 2.0, 10.0], ["p1", "p2"], ["ab", " 7"], {"answer": [3, 7]})
    # 0.5*1 + 2*2 + 10*0 = 4.5 ; 0.5*1 + 2*2 + 10*1 = 14.5
    assert rewards.tolist() == [4.5, 14.5] and valid.all()
    assert means["tests.rollout.test_rewards:length"] == 2.0


def test_bad_values_raise_naming_function_and_prompt_or_are_masked():
    fn = load_reward_fn("tests.rollout.test_rewards:flaky")
    with pytest.raises(RewardError, match=r"flaky' returned None for prompt 'p2'"):
        score([fn], [1.0], ["p1", "p2", "p3"], ["ok", "bad", "nan"], {})
    rewards, valid, _ = score([fn], [1.0], ["p1", "p2", "p3"], ["ok", "bad", "nan"], {}, on_error="mask")
    assert valid.tolist() == [True, False, False] and rewards.tolist() == [1.0, 0.0, 0.0]


def test_raising_function_and_bad_specs():
    with pytest.raises(RewardError, match=r"broken' raised KeyError.*'p1'"):
        score([load_reward_fn("tests.rollout.test_rewards:broken")], [1.0], ["p1"], ["x"], {})
    with pytest.raises(RewardError, match="neither a reward-model directory"):
        load_reward_fn("no_such_thing")
    with pytest.raises(RewardError, match="cannot import"):
        load_reward_fn("tests.rollout.test_rewards:nope")


def slow(prompts, completions, **_):
    import time

    time.sleep(5)
    return [1.0 for _ in completions]


def test_a_reward_call_past_its_timeout_fails_naming_the_function():
    import time

    start = time.perf_counter()
    with pytest.raises(RewardError, match=r"slow' raised TimeoutError: no result within 0.2 s"):
        score([load_reward_fn("tests.rollout.test_rewards:slow")], [1.0], ["p1"], ["x"], {}, timeout=0.2)
    assert time.perf_counter() - start < 2


def test_a_file_in_the_current_directory_cannot_shadow_a_library(tmp_path, monkeypatch):
    import sys

    (tmp_path / "colorsys.py").write_text("raise RuntimeError('shadowed the standard library')\n")
    (tmp_path / "my_rewards.py").write_text(
        "import colorsys\n\ndef hue(prompts, completions, **_):\n    return [colorsys.rgb_to_hsv(1, 0, 0)[0] for _ in completions]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [""] + sys.path)  # what `python -m alignkit` does
    for name in ("colorsys", "my_rewards"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    fn = load_reward_fn("my_rewards:hue")  # the user's module still loads from the current directory...
    assert fn(["p"], ["c"]) == [0.0]  # ...and `import colorsys` got the real library


def test_score_rollout_repeats_prompts_and_fields_and_penalises_missing_eos(tiny_tokenizer):
    from types import SimpleNamespace

    import torch

    from alignkit.rollout.rewards import score_rollout

    words = [tiny_tokenizer(" 7", add_special_tokens=False)["input_ids"], tiny_tokenizer(" 3", add_special_tokens=False)["input_ids"]]
    width = max(map(len, words)) + 1
    ids = torch.full((4, width), 99)  # garbage past each completion's mask: must not be decoded
    mask = torch.zeros(4, width, dtype=torch.long)
    for row, word in enumerate(words * 2):
        ids[row, : len(word)] = torch.tensor(word)
        mask[row, : len(word)] = 1
    rollout = SimpleNamespace(completion_ids=ids, completion_mask=mask, ended=torch.tensor([True, False, True, True]))
    seen = {}

    def reward(prompts, completions, answer):
        seen.update(prompts=prompts, answer=answer, completions=completions)
        return [1.0 if c.strip() == str(a) else 0.0 for c, a in zip(completions, answer)]

    # two prompts x n = 2 completions: [" 7", " 3"] for each; answers 7 and 3
    rewards, valid, means, texts = score_rollout(rollout, tiny_tokenizer, [reward], [1.0], ["p", "q"],
                                                 {"answer": [7, 3]}, 2, missing_eos_penalty=0.5)
    assert seen["prompts"] == ["p", "p", "q", "q"] and seen["answer"] == [7, 7, 3, 3]
    assert [t.strip() for t in texts] == ["7", "3", "7", "3"]
    # p: " 7" right (1), " 3" wrong and no EOS (0 - 0.5); q: " 7" wrong (0), " 3" right (1)
    torch.testing.assert_close(rewards, torch.tensor([1.0, -0.5, 0.0, 1.0]))
    assert valid.all() and means == {"reward": 0.5}
