import json
import re

import pytest
import torch

from alignkit.evaluate.policies import EvalConfig, completion_logprobs, distinct_n, evaluate, main, win_rate


@pytest.fixture(scope="module")
def changed_model_dir(tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    """The tiny model with noise on its output layer, saved beside a short training log (metrics.jsonl)."""
    from alignkit.models.load import load_causal_lm

    folder = tmp_path_factory.mktemp("changed") / "model"
    changed = load_causal_lm(str(tiny_model_dir))
    with torch.no_grad():
        noise = torch.randn(changed.lm_head.weight.shape, generator=torch.Generator().manual_seed(0))
        changed.lm_head.weight.add_(noise, alpha=0.5)
    changed.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 4.0 / s}) + "\n"
                                                  for s in range(5, 30, 5)))
    return folder


def _prompts(path, n: int):
    path.write_text("".join(json.dumps({"prompt": f"What is {i}+{i}?"}) + "\n" for i in range(n)))
    return path


def test_distinct_n_and_win_rate_by_hand():
    seqs = [[1, 2, 3], [1, 2, 4]]
    assert distinct_n(seqs, 1) == 4 / 6  # {1,2,3,4} of 6 unigrams
    assert distinct_n(seqs, 2) == 3 / 4  # (1,2) twice, (2,3), (2,4)
    assert distinct_n([[5]], 2) == 0.0
    assert win_rate([1.0, 0.5, 0.0], [0.0, 0.5, 1.0]) == 0.5  # win + tie + loss = 1.5 of 3
    with pytest.raises(ValueError):
        win_rate([1.0], [])


def test_completion_logprobs_match_the_sampler(tiny_model_dir, tiny_tokenizer, one_thread):
    from alignkit.data import pad_batch, tokenize_prompts
    from alignkit.models.load import load_causal_lm
    from alignkit.rollout.sampler import sample

    model = load_causal_lm(str(tiny_model_dir)).eval()
    examples, _ = tokenize_prompts([{"prompt": "What is 1+2?"}, {"prompt": "What is 30+4? The"}], tiny_tokenizer, 64)
    batch = pad_batch(examples, tiny_tokenizer.pad_token_id, side="left")
    r = sample(model, batch["input_ids"].repeat_interleave(2, 0), batch["attention_mask"].repeat_interleave(2, 0),
               max_new_tokens=6, eos_token_id=2, pad_token_id=0, temperature=0.7,
               generator=torch.Generator().manual_seed(0))
    ids = [row[m.bool()].tolist() for row, m in zip(r.completion_ids, r.completion_mask)]
    logp, entropy = completion_logprobs(model, examples, ids, 2, 0, batch_size=3, temperature=0.7)
    assert logp == pytest.approx(r.logprobs.sum(-1).tolist(), abs=1e-4)
    assert all(e > 0 for e in entropy)


def test_evaluate_reference_against_itself_and_a_changed_policy(tiny_model_dir, changed_model_dir, tmp_path,
                                                                one_thread):
    prompts = _prompts(tmp_path / "prompts.jsonl", 8)
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"What is {i}+1? The answer is {i + 1}."}) + "\n" for i in range(8)))
    cfg = EvalConfig(models=[f"ref={tiny_model_dir}", f"same={tiny_model_dir}", f"changed={changed_model_dir}"],
                     prompts=str(prompts), reward=["alignkit.tasks.sentiment:gold_reward"],
                     proxy_reward="alignkit.tasks.sentiment:gold_reward", text_data=str(text),
                     samples_per_prompt=2, max_new_tokens=6, bootstrap_rounds=10, output=str(tmp_path / "eval.json"))
    result = evaluate(cfg)
    m = result["models"]
    assert m["same"]["kl"] == pytest.approx(0.0, abs=1e-5) and m["same"]["win_rate"] == 0.5
    assert m["same"]["gold"] == m["ref"]["gold"] == m["ref"]["proxy"]
    assert m["changed"]["kl"] != 0.0 and abs(m["changed"]["kl"]) < 1e3
    assert m["changed"]["text_nll"] != pytest.approx(m["ref"]["text_nll"])
    assert all(0 <= m[k]["distinct_2"] <= 1 and m[k]["length"] > 0 for k in m)
    assert len(result["leaderboard"]) == 3 and len(result["samples"]) == 5
    assert json.loads((tmp_path / "eval.json").read_text())["reference"] == "ref"


def distinct_characters(prompts: list, completions: list[str], **_) -> list[float]:
    """A gold reward that tells the two tiny models apart (the noised one repeats itself)."""
    return [len(set(c)) / 10 for c in completions]


def _row(page: str, first_cells: str) -> list[str]:
    """The cells after `first_cells` of the first table row that starts with them."""
    match = re.search(f"<tr>{re.escape(first_cells)}(.*?)</tr>", page)
    assert match, first_cells
    return re.findall("<td>(.*?)</td>", match.group(1))


def test_eval_report_shows_each_policy_and_the_numbers_of_eval_json(tiny_model_dir, changed_model_dir, tmp_path,
                                                                    capsys, one_thread):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    main(["--models", f"sft={tiny_model_dir}", f"tuned={changed_model_dir}",
          "--prompts", str(_prompts(tmp_path / "prompts.jsonl", 6)), "--reward", "tests.evaluate.test_policies:distinct_characters",
          "--max_new_tokens", "6", "--bootstrap_rounds", "10", "--output", str(out / "eval.json"), "--report", str(out)])
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-2:] == [f"report: {out / 'report.html'}", f"results: {out / 'eval.json'}"]
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "notes.txt", "report.html"]
    assert (out / "notes.txt").read_text() == "the user's own file"

    result = json.loads((out / "eval.json").read_text())
    page = (out / "report.html").read_text()
    specs = [("gold", "+.3f"), ("kl", ".2f"), ("kl_per_token", ".3f"), ("win_rate", ".2f"), ("length", ".1f"),
             ("ended", ".2f"), ("distinct_1", ".2f"), ("distinct_2", ".2f"), ("entropy", ".2f")]
    for name in ("sft", "tuned"):
        m = result["models"][name]
        flags = [", ".join(m["flags"])] if any(x["flags"] for x in result["models"].values()) else []
        assert _row(page, f"<td>{name}</td>") == [format(m[key], spec) for key, spec in specs] + flags, name
    assert result["models"]["sft"]["gold"] != result["models"]["tuned"]["gold"]  # the numbers tell them apart
    for rank, r in enumerate(result["leaderboard"], 1):
        assert _row(page, f"<td>{rank}</td><td>{r['model']}</td>")[:1] == [f"{r['bt']:.0f}"]
    assert "kl: sampled KL to sft" in page and "Samples side by side" in page
    # the frontier, the leaderboard, and tuned's training loss (sft's folder has no metrics.jsonl)
    assert page.count("data:image/png;base64,") == 3 and "alt='training_loss'" in page and "alt='online'" not in page
