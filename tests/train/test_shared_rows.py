"""GRPO / RLOO on one row per group, [prompt | c1 | ... | cG]: the same log-probs, loss and gradients
as a row per completion."""

import pytest
import torch

from alignkit.train import grpo
from tests.train.test_grpo import _cfg


def _prepared(tiny_model_dir, tmp_path, share: bool, **keys):
    from alignkit.data import tokenize_prompts
    from alignkit.models.load import load_causal_lm, load_tokenizer
    from alignkit.rollout.rewards import load_reward_fn
    from alignkit.train.loop import make_accelerator
    from alignkit.train.reference import make_reference

    cfg = _cfg(tiny_model_dir, "", tmp_path, share_prompt=share, **keys)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    policy = load_causal_lm(str(tiny_model_dir))
    with torch.no_grad():  # a policy away from its reference, so that ratios and KL are not trivial
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    reference = make_reference(str(tiny_model_dir), "", False, "cpu") if cfg.beta > 0 else None
    rollouts = grpo.Rollouts(cfg, tokenizer, [load_reward_fn("tests.helpers:digit_fraction")], [1.0], reference,
                             make_accelerator(cfg, "grpo"))
    # prompts of different lengths: left padding in the rows, and in the shared rows' prompt block
    records = [{"prompt": "What is 1+2?"}, {"prompt": "What is 13+24? Tell me the answer, please."},
               {"prompt": "Sum: 3+4"}]
    examples, _ = tokenize_prompts(records, tokenizer, 64)
    ((batch,), *_) = rollouts(policy, [{**grpo.collate_prompts(examples, tokenizer.pad_token_id), "weight": 1.0}],
                              step=0).updates
    return cfg, policy, batch


@pytest.mark.parametrize("g", [2, 8])
@pytest.mark.parametrize("keys", [{}, {"advantage": "rloo", "loss_level": "token", "kl_in_reward": True},
                                  {"entropy_coef": 0.1, "num_iterations": 2, "clip_eps": 0.1}],
                         ids=["grpo", "rloo", "entropy_mu2"])
def test_shared_rows_equal_a_row_per_completion(tiny_model_dir, tmp_path, one_thread, g, keys):
    # max_new_tokens 5: most completions are cut at the limit (truncation), some end early
    keys = {"num_generations": g, "batch_size": 3 * g, "beta": 0.1, "max_new_tokens": 5, "temperature": 1.0, **keys}
    results = []
    for share in (True, False):
        cfg, policy, batch = _prepared(tiny_model_dir, tmp_path / str(share), share, **keys)
        assert ("shared" in batch) == share
        loss, metrics = grpo.make_policy_step(cfg)(policy, batch)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in policy.parameters()])
        results.append((batch, loss.detach(), metrics, grads))
    (shared, loss_s, m_s, g_s), (rows, loss_r, m_r, g_r) = results
    assert torch.equal(shared["completion_ids"] if "completion_ids" in shared else shared["input_ids"][:, -5:],
                       rows["completion_ids"] if "completion_ids" in rows else rows["input_ids"][:, -5:])
    torch.testing.assert_close(shared["ref_logprobs"], rows["ref_logprobs"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_s, loss_r, atol=1e-5, rtol=1e-5)
    for k in ("kl_per_token", "clipfrac"):
        torch.testing.assert_close(m_s[k][0], m_r[k][0], atol=1e-5, rtol=1e-5)
    assert float((g_s - g_r).abs().max()) <= 1e-5 * max(1.0, float(g_r.abs().max()))
    assert not bool(rows["ended"].all())  # some completions were cut at max_new_tokens


def test_shared_rows_layout(tiny_model_dir, tmp_path):
    cfg, _, batch = _prepared(tiny_model_dir, tmp_path, True, num_generations=2, batch_size=6)
    shared = batch["shared"]
    assert shared["input_ids"].shape[0] == 3 and shared["group_sizes"].tolist() == [2, 2, 2]
    # every completion token of the rows appears in the shared rows' response blocks
    assert int(shared["loss_mask"].sum()) == int(batch["completion_mask"].sum())
