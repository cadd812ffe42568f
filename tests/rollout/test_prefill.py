"""`sample(num_samples=n)`: one prefill per distinct prompt, then its KV cache repeated to n rows.

It must give exactly the rollout of repeating the prompts n times first (same generators, same
tokens, log-probs within 1e-5), while the prefill forward sees M rows instead of M * n.
"""

import inspect
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

from alignkit.models.tiny import build_tiny_llama
from alignkit.rollout.sampler import (completion_generators, expand_cache, preallocated_cache, sample,
                                      shared_prefill_cache)

PAD, EOS = 0, 2
# Four lengths: left padding differs in every row.
PROMPTS = ["What is 1+2?", "What", "What is 41+7? The answer", "What is 3"]
MODES = {"greedy": {"temperature": 0.0}, "t1": {"temperature": 1.0},
         "top_k_top_p": {"temperature": 1.0, "top_k": 20, "top_p": 0.9}}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    enc = tiny_tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    assert len(set(enc["attention_mask"].sum(1).tolist())) == len(PROMPTS)
    return enc["input_ids"], enc["attention_mask"]


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def untied_llama(tiny_tokenizer):
    """Untied output head: greedy continuations vary from step to step."""
    return build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=4, tie_word_embeddings=False).eval()


@pytest.fixture(scope="module")
def gpt2(tiny_tokenizer):
    """Absolute position embeddings: a wrongly expanded position would change the logits."""
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=128,
                        bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def mistral(tiny_tokenizer):
    """A sliding window of 4, shorter than every prompt but one: transformers' sliding-window
    cache layers (not the buffer-backed ones) are expanded."""
    config = MistralConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return MistralForCausalLM(config).eval()


class PrefillRows:
    """The batch size of every forward that feeds more than one position (the prefill) and of
    every other one (a decode step), counted by a forward pre-hook."""

    def __init__(self, model):
        self.prefill, self.decode = [], []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = kwargs["input_ids"]
        (self.prefill if ids.shape[1] > 1 else self.decode).append(ids.shape[0])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _pair(model, prompts, n, seed=0, max_new_tokens=12, **kw):
    """(shared prefill, repeated prompts, prefill rows of each), from the same per-row generators."""
    ids, mask = prompts
    m = len(ids)
    kw = {"max_new_tokens": max_new_tokens, "eos_token_id": EOS, "pad_token_id": PAD, **kw}
    with PrefillRows(model) as shared_rows:
        shared = sample(model, ids, mask, num_samples=n, generator=completion_generators(seed, range(m), n), **kw)
    with PrefillRows(model) as repeated_rows:
        repeated = sample(model, ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0),
                          generator=completion_generators(seed, range(m), n), **kw)
    return shared, repeated, shared_rows, repeated_rows


def _assert_same(shared, repeated):
    for field in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "ended"):
        assert torch.equal(getattr(shared, field), getattr(repeated, field)), field
    torch.testing.assert_close(shared.logprobs, repeated.logprobs, atol=1e-5, rtol=0)
    return float((shared.logprobs - repeated.logprobs).abs().max())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [1, 2, 8])
@pytest.mark.parametrize("name", ["llama", "untied_llama", "gpt2", "mistral"])
def test_shared_prefill_equals_repeated_prompts(request, prompts, name, n, mode):
    model = request.getfixturevalue(name)
    m = len(PROMPTS)
    shared, repeated, shared_rows, repeated_rows = _pair(model, prompts, n, **MODES[mode])
    _assert_same(shared, repeated)
    assert shared.completion_ids.shape[0] == m * n and shared.completion_mask.any()
    assert shared.shared_prefill == (n > 1) and not repeated.shared_prefill
    # One prefill forward on the M distinct prompts instead of on M * n rows; decode steps on M * n.
    assert shared_rows.prefill == [m if n > 1 else m * n] and repeated_rows.prefill == [m * n]
    assert set(shared_rows.decode) == set(repeated_rows.decode) == {m * n}
    assert len(shared_rows.decode) == len(repeated_rows.decode) == shared.completion_ids.shape[1] - 1


def test_rows_end_at_eos_the_same_way(untied_llama, prompts):
    """Rows that end early (an EOS among the likely tokens) end at the same step in both paths."""
    ids, _ = prompts
    greedy = sample(untied_llama, *prompts, max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD, temperature=0.0)
    stop = int(greedy.completion_ids[0, 3])  # a token the first prompt emits: some of its samples stop on it
    shared, repeated, _, _ = _pair(untied_llama, prompts, 8, temperature=1.0, eos_token_id=[EOS, stop])
    _assert_same(shared, repeated)
    assert shared.ended.any() and not shared.ended.all()
    assert (shared.completion_mask.sum(1) < shared.completion_ids.shape[1]).any()


def test_one_generator_is_shared_the_same_way(llama, prompts):
    """A single generator draws the same N uniforms per step in both paths."""
    ids, mask = prompts
    kw = {"max_new_tokens": 8, "eos_token_id": EOS, "pad_token_id": PAD, "temperature": 1.0}
    shared = sample(llama, ids, mask, num_samples=4, generator=torch.Generator().manual_seed(5), **kw)
    repeated = sample(llama, ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0),
                      generator=torch.Generator().manual_seed(5), **kw)
    _assert_same(shared, repeated)


def test_samples_of_a_prompt_differ(llama, prompts):
    """The expanded rows are separate: each sample of a prompt draws from its own generator."""
    shared, _, _, _ = _pair(llama, prompts, 8, temperature=1.0)
    groups = shared.completion_ids.view(len(PROMPTS), 8, -1)
    assert all(len({tuple(row.tolist()) for row in g}) > 1 for g in groups)


def test_fallback_repeats_the_prompts(llama, prompts, monkeypatch):
    """No expandable cache: every row is prefilled, the rollout is the same and says so."""
    reference, _, _, _ = _pair(llama, prompts, 4, temperature=1.0)
    monkeypatch.setattr("alignkit.rollout.sampler.shared_prefill_cache", lambda model, capacity: None)
    shared, repeated, shared_rows, _ = _pair(llama, prompts, 4, temperature=1.0)
    _assert_same(shared, repeated)
    _assert_same(shared, reference)
    assert not shared.shared_prefill and shared_rows.prefill == [4 * len(PROMPTS)]


def test_a_cache_the_model_replaced_falls_back_after_the_prefill(llama, prompts, monkeypatch):
    """The model returned a cache `expand_cache` refuses: it is prefilled again on every row."""
    reference, _, _, _ = _pair(llama, prompts, 4, temperature=1.0)
    monkeypatch.setattr("alignkit.rollout.sampler.expand_cache", lambda cache, repeats: False)
    shared, _, shared_rows, _ = _pair(llama, prompts, 4, temperature=1.0)
    _assert_same(shared, reference)
    assert not shared.shared_prefill and shared_rows.prefill == [len(PROMPTS), 4 * len(PROMPTS)]


def test_expand_cache_repeats_rows_prompt_major(llama, mistral, prompts):
    ids, mask = prompts
    for model, cache in ((llama, preallocated_cache(llama, 64)), (mistral, shared_prefill_cache(mistral, 64))):
        assert cache is not None
        kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=True, **{kwarg: cache})
        before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        assert expand_cache(cache, 3)
        for layer, (keys, values) in zip(cache.layers, before):
            assert torch.equal(layer.keys, keys.repeat_interleave(3, 0))
            assert torch.equal(layer.values, values.repeat_interleave(3, 0))
    assert preallocated_cache(mistral, 64) is None  # sliding window: transformers' layers, expanded by it


def test_unknown_caches_are_not_expanded(llama):
    from transformers.cache_utils import DynamicCache, StaticCache

    assert not expand_cache(StaticCache(config=llama.config, max_cache_len=8), 2)
    assert not expand_cache((("keys", "values"),), 2)
    assert expand_cache(DynamicCache(config=llama.config), 2)  # plain DynamicLayers: known


def test_rejects_num_samples_below_one_and_counts_generators_per_row(llama, prompts):
    kw = {"max_new_tokens": 2, "eos_token_id": EOS, "pad_token_id": PAD}
    with pytest.raises(ValueError, match="num_samples"):
        sample(llama, *prompts, num_samples=0, **kw)
    with pytest.raises(ValueError, match="4 generators for 8 rows"):
        sample(llama, *prompts, num_samples=2, generator=completion_generators(0, range(4), 1), **kw)


def test_sample_completions_prefills_each_prompt_once(llama, prompts, tiny_tokenizer):
    from alignkit.train.online import sample_completions

    ids, mask = prompts
    cfg = SimpleNamespace(max_new_tokens=8, top_k=0, top_p=1.0, seed=3)
    batch = {"input_ids": ids, "attention_mask": mask, "ids": torch.tensor([10, 11, 12, 13])}
    with PrefillRows(llama) as rows:
        roll = sample_completions(llama, batch, cfg, tiny_tokenizer, step=2, n=4, temperature=1.0)
    assert rows.prefill == [len(PROMPTS)] and roll.shared_prefill
    repeated = sample(llama, ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0), max_new_tokens=8,
                      eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id,
                      temperature=1.0, generator=completion_generators(3 * 1_000_003 + 2, [10, 11, 12, 13], 4))
    _assert_same(roll, repeated)


def test_sample_and_score_prefills_each_prompt_once(llama, tiny_tokenizer):
    from alignkit.data import tokenize_prompts
    from alignkit.rollout.best_of_n import sample_and_score

    examples, _ = tokenize_prompts([{"prompt": p} for p in PROMPTS], tiny_tokenizer, 64)
    with PrefillRows(llama) as rows:
        s = sample_and_score(llama, tiny_tokenizer, examples, 4, [], [], max_new_tokens=6, batch_size=8, seed=1)
    assert rows.prefill == [2, 2]  # 8 completions per call: 2 prompts, each prefilled once
    assert len(s.completion_ids) == 4 * len(PROMPTS)
