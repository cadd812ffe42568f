import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from alignkit.models.forward import forward_logprobs
from alignkit.models.tiny import build_tiny_llama
from alignkit.rollout.sampler import Rollout, draw_inverse_cdf, draw_per_row, filter_logits, preallocated_cache, sample

PAD, EOS = 0, 2
PROMPTS = ["What is 1+2?", "What", "What is 41+7? The answer", "What is 3"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    enc = tiny_tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    lengths = enc["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == len(PROMPTS), "prompts must have different lengths"
    return enc["input_ids"], enc["attention_mask"]


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    """The shared tiny Llama (tied embeddings: greedy decoding tends to repeat a token)."""
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def untied_llama(tiny_tokenizer):
    """Untied output head: greedy continuations vary from step to step."""
    return build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=4,
                            tie_word_embeddings=False).eval()


@pytest.fixture(scope="module")
def gpt2(tiny_tokenizer):
    """Absolute position embeddings: any position shift changes the logits (RoPE forgives a uniform one)."""
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=128,
                        bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GPT2LMHeadModel(config).eval()


def _model(request, name):
    return request.getfixturevalue(name)


def _run(model, prompts, **kw):
    kw = {"max_new_tokens": 10, "eos_token_id": EOS, "pad_token_id": PAD, **kw}
    return sample(model, *prompts, **kw)


def _learner_logprobs(model, rollout: Rollout, temperature: float):
    """forward_logprobs is [N, P+C-1], column j scoring token j+1: the completion is its last C columns."""
    with torch.no_grad():
        lp, _ = forward_logprobs(model, rollout.input_ids, rollout.attention_mask, temperature=temperature)
    return lp[:, rollout.prompt_ids.shape[1] - 1 :]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_sampler_logprobs_equal_learner_recompute(request, prompts, name):
    model = _model(request, name)
    rollout = _run(model, prompts, temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert rollout.completion_ids.shape == rollout.logprobs.shape == (len(PROMPTS), 10)
    assert rollout.logprobs.dtype == torch.float32
    learner = _learner_logprobs(model, rollout, temperature=0.7)
    mask = rollout.completion_mask.bool()
    assert mask.any()
    torch.testing.assert_close(rollout.logprobs[mask], learner[mask], atol=1e-5, rtol=0)
    assert (rollout.logprobs[~mask] == 0).all()


@pytest.mark.parametrize("name", ["untied_llama", "gpt2"])
def test_greedy_equals_generate(request, prompts, name):
    model = _model(request, name)
    ids, mask = prompts
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10,
                                  pad_token_id=PAD, eos_token_id=EOS)[:, ids.shape[1] :]
    rollout = _run(model, prompts, temperature=0.0)
    assert rollout.completion_ids.tolist() == expected.tolist()
    # Greedy log-probs are those of softmax(logits), temperature 1.
    learner = _learner_logprobs(model, rollout, temperature=1.0)
    torch.testing.assert_close(rollout.logprobs, learner * rollout.completion_mask, atol=1e-5, rtol=0)


def test_same_seed_same_rollout_different_seed_differs(llama, prompts):
    a, b, c = (_run(llama, prompts, temperature=1.0, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8))
    for field in ("completion_ids", "completion_mask", "logprobs", "ended"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.completion_ids, c.completion_ids)


def test_one_generator_per_row_makes_a_row_independent_of_its_batch(untied_llama, prompts):
    """Row i drawn from generator i alone: sampled with the others or on its own, the same completion."""
    ids, mask = prompts
    gens = lambda rows: [torch.Generator().manual_seed(100 + r) for r in rows]  # noqa: E731
    together = _run(untied_llama, prompts, temperature=1.0, generator=gens(range(len(ids))))
    for r in range(len(ids)):
        keep = mask[r].bool()
        alone = _run(untied_llama, (ids[r : r + 1, keep], mask[r : r + 1, keep]), temperature=1.0, generator=gens([r]))
        n = int(alone.completion_mask.sum())
        assert torch.equal(alone.completion_ids[0, :n], together.completion_ids[r, :n]), r
        torch.testing.assert_close(alone.logprobs[0, :n], together.logprobs[r, :n], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="generators for"):
        _run(untied_llama, prompts, generator=gens([0]))


def test_draw_per_row_follows_each_rows_probabilities():
    """20000 draws per row: frequencies within 0.015 of p, zero-probability tokens never drawn."""
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 1.0, 0.0], [0.1, 0.6, 0.0, 0.3]])
    gens = [torch.Generator().manual_seed(r) for r in range(3)]
    draws = torch.stack([draw_per_row(probs, gens) for _ in range(20000)])  # [20000, 3]
    for r in range(3):
        freq = torch.bincount(draws[:, r], minlength=4).float() / len(draws)
        assert float((freq - probs[r]).abs().max()) < 0.015, (r, freq)
        assert int(((probs[r] == 0)[draws[:, r]]).sum()) == 0


def test_draw_inverse_cdf_by_hand():
    """cdf of [0.5, 0, 0.3, 0.2] is [0.5, 0.5, 0.8, 1]: the first token whose cdf exceeds u; the
    zero-probability token 1 is skipped even at u = 0.5 exactly. Unnormalised rows scale u by the total."""
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2]] * 4 + [[0.0, 0.0, 2.0, 0.0]])
    u = torch.tensor([0.0, 0.49, 0.5, 0.85, 0.0])
    assert draw_inverse_cdf(probs, u).tolist() == [0, 0, 2, 3, 2]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_preallocated_cache_matches_the_default_one(request, prompts, name, monkeypatch):
    """The buffer-backed cache is used for these models and changes no sampled token or log-prob."""
    model = _model(request, name)
    assert preallocated_cache(model, 32) is not None
    with_buffers = _run(model, prompts, temperature=1.0, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr("alignkit.rollout.sampler.preallocated_cache", lambda model, capacity: None)
    default = _run(model, prompts, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(with_buffers.completion_ids, default.completion_ids)
    torch.testing.assert_close(with_buffers.logprobs, default.logprobs, atol=1e-6, rtol=0)


def test_sliding_window_models_keep_their_own_cache(tiny_tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    assert preallocated_cache(MistralForCausalLM(config), 32) is None


def _eos_candidate(tokens: list[list[int]]):
    """A (row, step, token): token first appears in `row` at `step` >= 2 and in some other row never."""
    for r, row in enumerate(tokens):
        for t in range(2, len(row) - 2):
            others = [o for o in range(len(tokens)) if o != r and row[t] not in tokens[o]]
            if row[t] not in row[:t] and others:
                return r, t, row[t], others[0]
    raise AssertionError(f"no usable EOS stand-in in {tokens}")


def test_eos_ends_row_pads_after_and_other_rows_run_to_the_limit(untied_llama, prompts):
    reference = _run(untied_llama, prompts, temperature=0.0)
    assert not reference.ended.any() and reference.completion_ids.shape[1] == 10
    row, step, token, other = _eos_candidate(reference.completion_ids.tolist())

    rollout = _run(untied_llama, prompts, temperature=0.0, eos_token_id=[EOS, token])
    assert rollout.ended[row] and not rollout.ended[other]
    assert rollout.completion_ids[row, step] == token
    assert rollout.completion_ids[row, : step + 1].tolist() == reference.completion_ids[row, : step + 1].tolist()
    assert rollout.completion_mask[row].tolist() == [1] * (step + 1) + [0] * (10 - step - 1)
    assert (rollout.completion_ids[row, step + 1 :] == PAD).all()
    assert (rollout.logprobs[row, step + 1 :] == 0).all() and rollout.logprobs[row, step] < 0
    assert rollout.completion_mask[other].all() and rollout.completion_ids.shape[1] == 10
    # The learner's view: the EOS is attended to and scored, the pads after it are not.
    assert rollout.attention_mask[row].sum() == prompts[1][row].sum() + step + 1

    # Alone, the row stops the loop at its EOS: the completion is step + 1 tokens wide.
    alone = _run(untied_llama, (prompts[0][row : row + 1], prompts[1][row : row + 1]), temperature=0.0,
                 eos_token_id=token)
    assert alone.ended.tolist() == [True] and alone.completion_ids.shape == (1, step + 1)
    assert alone.completion_mask.all()


@pytest.mark.parametrize("kw", [{"top_k": 1}, {"top_p": 1e-6}, {"top_k": 5, "top_p": 1e-6}])
def test_top_k_1_and_tiny_top_p_sample_the_greedy_tokens(untied_llama, prompts, kw):
    greedy = _run(untied_llama, prompts, temperature=0.0)
    rollout = _run(untied_llama, prompts, temperature=0.7, generator=torch.Generator().manual_seed(0), **kw)
    assert rollout.completion_ids.tolist() == greedy.completion_ids.tolist()
    # Log-probs come from the untruncated distribution (the truncated one would give log 1 = 0).
    learner = _learner_logprobs(untied_llama, rollout, temperature=0.7)
    torch.testing.assert_close(rollout.logprobs, learner, atol=1e-5, rtol=0)
    assert (rollout.logprobs < -1e-3).all()


def test_filter_logits_by_hand():
    # probs 0.05, 0.5, 0.15, 0.3 in shuffled order: sorted 0.5, 0.3, 0.15, 0.05
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    inf = float("-inf")
    kept = lambda out: (out > inf).int().tolist()[0]  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [0, 1, 0, 1]
    assert kept(filter_logits(logits, top_p=0.75)) == [0, 1, 0, 1]  # 0.5 + 0.3 >= 0.75
    assert kept(filter_logits(logits, top_p=0.85)) == [0, 1, 1, 1]  # 0.5 + 0.3 < 0.85
    assert kept(filter_logits(logits, top_p=0.0)) == [0, 1, 0, 0]  # always at least one
    assert kept(filter_logits(logits, top_k=3, top_p=0.5)) == [0, 1, 0, 0]
    torch.testing.assert_close(filter_logits(logits, top_k=2)[0, 1], torch.tensor(math.log(0.5)))


def test_restores_train_mode_and_rejects_right_padding(llama, prompts):
    llama.train()
    try:
        _run(llama, prompts, max_new_tokens=2, temperature=1.0)
        assert llama.training
    finally:
        llama.eval()
    ids, mask = prompts
    with pytest.raises(ValueError, match="left padded"):
        sample(llama, ids.flip(1), mask.flip(1), max_new_tokens=2, eos_token_id=EOS, pad_token_id=PAD)
