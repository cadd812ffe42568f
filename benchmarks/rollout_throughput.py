"""Rollout throughput: alignkit's KV-cached `sample` vs transformers' `model.generate`.

    .venv/bin/python benchmarks/rollout_throughput.py             # prints a JSON report
    .venv/bin/python benchmarks/rollout_throughput.py --sizes tiny --repeats 1 --inner 1
    .venv/bin/python benchmarks/rollout_throughput.py --cases prefill --group_prompts 4   # shared prefill only

Both get the same randomly initialised Llama (`tiny`: hidden 128, 4 layers, vocab 1024,
~1.2M parameters; `20m`: hidden 512, 6 layers, intermediate 2048, ~25.7M) and the same left-padded batch of
prompts of varying length, and generate `max_new_tokens` tokens per prompt, sampled at
temperature 1.0 (no top-k / top-p) and greedily. Generated tokens are counted per row up
to and including the first EOS (all of them when there is none).

So that both sides generate exactly the same number of tokens, the EOS id handed to both
is `vocab_size`: one past the output head, an id the model can never produce. Both still
run their per-step EOS check, and neither stops early; every row is `max_new_tokens` long
(checked). Each library runs in a fresh subprocess, alternating alignkit / transformers,
`repeats` rounds of (1 untimed warm-up + `inner` timed calls per mode); the figure is the
median over all timed calls (`best_s`, the fastest call, is less sensitive to other jobs on
the machine). Children run torch on `--threads` threads, 1 by default: on this shared
2-core machine 2 threads collapsed 45x under other people's load (see common.run_child). Only the generation call is timed (the prompts are already
tokenised). alignkit's `sample` also returns the sampled tokens' log-probs (one log-softmax
over the vocabulary per step), which `generate` does not compute: that is part of its cost.

The `prefill` case (`--cases prefill`) is GRPO's rollout: G = `--group` completions of each
of `--group_prompts` long prompts (`--prompt_tokens` tokens of real movie-review text from
alignkit/tasks/sentiment.py, no padding), `--group_max_new_tokens` new tokens each, sampled at
temperature 1 from one generator per completion (`completion_generators`). Three ways, one
after the other in each child process: `sample(num_samples=G)` on the distinct prompts (one
prefill per prompt, its KV cache repeated G times), `sample` on the prompts repeated G times
(what the trainers did before: G prefills per prompt) and `model.generate(num_return_sequences=G)`
(which repeats the prompts too). The first two must sample the same completions (checked:
same ids, log-probs within 1e-5). Reported in completions per second. Each child first runs
a small untimed warm-up call of each (one prompt, 4 tokens), not a full-size one.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, build_tiny, run_child  # noqa: E402

GROUP_WAYS = ("shared_prefill", "repeated_prompts", "transformers_generate")

SIZES = {"tiny": {"hidden_size": 128, "num_layers": 4, "num_heads": 4},
         "20m": {"hidden_size": 512, "num_layers": 6, "num_heads": 8}}
MODES = {"sample": 1.0, "greedy": 0.0}


def make_prompts(n: int, seed: int = 0) -> list[str]:
    """Arithmetic questions with 1 to 12 terms: prompts from ~10 to ~70 tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        terms = [str(rng.randint(0, 999)) for _ in range(rng.randint(1, 12))]
        out.append(f"Question: what is the sum of {', then '.join(terms)}? Think it through.\nAnswer:")
    return out


def long_prompts(tokenizer, n: int, tokens: int, seed: int = 0) -> list[list[int]]:
    """`n` prompts of exactly `tokens` token ids each: movie-review snippets (alignkit.tasks.sentiment),
    shuffled with `seed` and joined with spaces until the prompt is long enough, then cut to `tokens`."""
    sys.path.insert(0, str(ROOT))
    from alignkit.tasks import sentiment

    texts = [s["text"] for s in sentiment.snippets()]
    random.Random(seed).shuffle(texts)
    out, pool = [], iter(texts)
    for _ in range(n):
        ids: list[int] = []
        while len(ids) < tokens:
            ids += tokenizer((" " if ids else "") + next(pool), add_special_tokens=False)["input_ids"]
        out.append(ids[:tokens])
    return out


def build_fixture(work: Path, sizes: list[str], n_prompts: int, group_prompts: int = 0,
                  prompt_tokens: int = 0) -> dict:
    corpus = make_prompts(2000, seed=1) + [f" The answer is {i}." for i in range(2000)]
    tokenizer, params = None, {}
    for size in sizes:
        # 512 positions: the prefill case runs to 256 + 128 (RoPE: no parameter depends on it).
        tokenizer, params[size] = build_tiny(work / size, corpus, tokenizer=tokenizer, max_position_embeddings=512,
                                             **SIZES[size])
    (work / "prompts.json").write_text(json.dumps(make_prompts(n_prompts)))
    if group_prompts:
        (work / "long_prompts.json").write_text(json.dumps(long_prompts(tokenizer, group_prompts, prompt_tokens)))
    return params


def child(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT))
    from alignkit.rollout.sampler import sample

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = json.loads(Path(args.prompts_path).read_text())
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    eos = model.config.vocab_size  # never produced: no row stops early, on either side
    pad = tokenizer.pad_token_id

    def run_alignkit(temperature: float, seed: int) -> int:
        r = sample(model, ids, mask, max_new_tokens=args.max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                   temperature=temperature, generator=torch.Generator().manual_seed(seed))
        return int(r.completion_mask.sum())

    def run_hf(temperature: float, seed: int) -> int:
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                                 do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                                 top_k=None, top_p=None, pad_token_id=pad, eos_token_id=eos)
        completion = out[:, ids.shape[1]:]
        is_eos = completion == eos
        ended = is_eos.any(1)
        lengths = torch.where(ended, is_eos.int().argmax(1) + 1, completion.shape[1])
        return int(lengths.sum())

    fn = run_alignkit if args.child == "alignkit" else run_hf
    times = {m: [] for m in MODES}
    tokens = {}
    for mode, temperature in MODES.items():  # warm-up
        tokens[mode] = fn(temperature, seed=0)
    for i in range(args.inner):
        for mode, temperature in MODES.items():
            start = time.perf_counter()
            n = fn(temperature, seed=i + 1)
            times[mode].append(time.perf_counter() - start)
            if n != tokens[mode]:
                raise RuntimeError(f"{args.child} {mode}: {n} tokens, the warm-up generated {tokens[mode]}")
    return {"times": times, "tokens": tokens, "prompt_width": ids.shape[1], "threads": torch.get_num_threads()}


def group_child(args) -> dict:
    """The prefill case in one process: each way `inner` times (after a small warm-up of each),
    interleaved, and whether the shared and repeated prefills sampled the same completions."""
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT))
    from alignkit.rollout.sampler import completion_generators, sample

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ids = torch.tensor(json.loads(Path(args.prompts_path).read_text()))
    mask = torch.ones_like(ids)
    g, eos, pad = args.group, model.config.vocab_size, model.config.pad_token_id  # eos never produced

    def run(way: str, ids, mask, max_new_tokens: int, seed: int):
        gens = completion_generators(seed, range(len(ids)), g)
        kw = {"max_new_tokens": max_new_tokens, "eos_token_id": eos, "pad_token_id": pad, "temperature": 1.0}
        if way == "shared_prefill":
            return sample(model, ids, mask, num_samples=g, generator=gens, **kw)
        if way == "repeated_prompts":
            return sample(model, ids.repeat_interleave(g, 0), mask.repeat_interleave(g, 0), generator=gens, **kw)
        torch.manual_seed(seed)
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
                                  num_return_sequences=g, temperature=1.0, top_k=None, top_p=None,
                                  pad_token_id=pad, eos_token_id=eos)

    for way in GROUP_WAYS:  # warm-up: a small call, not a full one
        run(way, ids[:1], mask[:1], 4, seed=0)
    times = {w: [] for w in GROUP_WAYS}
    completions, max_diff, same = len(ids) * g, 0.0, True
    for i in range(args.inner):
        out = {}
        for way in GROUP_WAYS:
            start = time.perf_counter()
            out[way] = run(way, ids, mask, args.max_new_tokens, seed=i + 1)
            times[way].append(time.perf_counter() - start)
        a, b = out["shared_prefill"], out["repeated_prompts"]
        same = same and torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.prompt_ids, b.prompt_ids)
        max_diff = max(max_diff, float((a.logprobs - b.logprobs).abs().max()))
        if not a.shared_prefill or a.completion_mask.sum() != completions * args.max_new_tokens:
            raise RuntimeError("the shared-prefill path did not share, or stopped early")
        if out["transformers_generate"].shape != (completions, ids.shape[1] + args.max_new_tokens):
            raise RuntimeError(f"generate returned {tuple(out['transformers_generate'].shape)}")
    if not same or max_diff > 1e-5:
        raise RuntimeError(f"shared and repeated prefill sampled different completions (max |dlogp| {max_diff})")
    return {"times": times, "completions": completions, "prompt_width": ids.shape[1],
            "max_abs_logprob_diff": max_diff, "same_completions": same, "threads": torch.get_num_threads()}


def matmul_gflops(seconds: float = 1.0, n: int = 1024) -> float:
    """fp32 matmul throughput of this machine right now (the compute-bound reference)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--sizes", default="tiny,20m", help="comma-separated, of: " + ", ".join(SIZES))
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds, a fresh process each")
    parser.add_argument("--inner", type=int, default=1, help="timed calls per mode in each process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child (0: torch's default)")
    parser.add_argument("--cases", default="throughput,prefill",
                        help="comma-separated, of: throughput (sample vs generate), "
                             "prefill (shared prefill, G completions per prompt)")
    parser.add_argument("--group", type=int, default=8, help="prefill case: completions per prompt (G)")
    parser.add_argument("--group_prompts", type=int, default=8, help="prefill case: distinct prompts")
    parser.add_argument("--prompt_tokens", type=int, default=256, help="prefill case: tokens per prompt")
    parser.add_argument("--group_max_new_tokens", type=int, default=128,
                        help="prefill case: new tokens per completion")
    parser.add_argument("--child", choices=["alignkit", "transformers", "group"])
    parser.add_argument("--model")
    parser.add_argument("--prompts_file", dest="prompts_path")
    args = parser.parse_args()

    if args.child:
        out = group_child(args) if args.child == "group" else child(args)
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))
        return

    sizes, cases = args.sizes.split(","), args.cases.split(",")
    report = {"benchmark": "rollout_throughput", "cases": {},
              "eos": "vocab_size (never produced): every row generates max_new_tokens on both sides"}
    if "throughput" in cases:
        report.update(prompts=args.prompts, max_new_tokens=args.max_new_tokens)
    if "prefill" in cases:
        report["prefill"] = {"group": args.group, "prompts": args.group_prompts, "prompt_tokens": args.prompt_tokens,
                             "max_new_tokens": args.group_max_new_tokens,
                             "text": "alignkit.tasks.sentiment snippets, joined and cut to prompt_tokens"}
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    report["matmul_gflops_fp32"] = round(matmul_gflops(), 1)  # on the children's thread count
    with tempfile.TemporaryDirectory(prefix="alignkit-rollout-") as tmp:
        work = Path(tmp)
        params = build_fixture(work, sizes, args.prompts, args.group_prompts if "prefill" in cases else 0,
                               args.prompt_tokens)
        for size in sizes if "prefill" in cases else []:
            rs = [run_child(__file__, [
                "--child", "group", "--model", str(work / size), "--prompts_file", str(work / "long_prompts.json"),
                "--max_new_tokens", str(args.group_max_new_tokens), "--inner", str(args.inner),
                "--group", str(args.group), "--threads", str(args.threads)], "group", threads=args.threads)
                for _ in range(args.repeats)]
            case = {"params": params[size], "prompt_width": rs[0]["prompt_width"],
                    "completions_per_call": rs[0]["completions"],
                    "same_completions": all(r["same_completions"] for r in rs),
                    "max_abs_logprob_diff": max(r["max_abs_logprob_diff"] for r in rs)}
            for way in GROUP_WAYS:
                times = [t for r in rs for t in r["times"][way]]
                seconds = statistics.median(times)
                case[way] = {"completions_per_s": round(rs[0]["completions"] / seconds, 2),
                             "median_s": round(seconds, 3), "best_s": round(min(times), 3)}
            for way in GROUP_WAYS[1:]:
                case[f"speedup_vs_{way}"] = round(case[way]["median_s"] / case["shared_prefill"]["median_s"], 3)
            case["peak_rss_mb"] = round(max(r["peak_rss_mb"] for r in rs), 1)
            report["cases"][f"{size}/prefill_g{args.group}"] = case
            report["threads"] = rs[0]["threads"]
        for size in sizes if "throughput" in cases else []:
            runs = {"alignkit": [], "transformers": []}
            for _ in range(args.repeats):
                for lib in runs:  # alternate, so drift in machine load hits both
                    runs[lib].append(run_child(__file__, [
                        "--child", lib, "--model", str(work / size), "--prompts_file", str(work / "prompts.json"),
                        "--max_new_tokens", str(args.max_new_tokens), "--inner", str(args.inner),
                        "--threads", str(args.threads)], lib, threads=args.threads))
            for mode in MODES:
                case = {"params": params[size], "prompt_width": runs["alignkit"][0]["prompt_width"]}
                for lib, rs in runs.items():
                    tokens = rs[0]["tokens"][mode]
                    if any(r["tokens"][mode] != tokens for r in rs):
                        raise RuntimeError(f"{lib} {size} {mode}: token counts differ between runs")
                    times = [t for r in rs for t in r["times"][mode]]
                    seconds = statistics.median(times)
                    case[lib] = {"tokens_per_call": tokens, "median_s": round(seconds, 4), "best_s": round(min(times), 4),
                                 "tokens_per_s": round(tokens / seconds, 1),
                                 "gflops_2N": round(2 * params[size] * tokens / seconds / 1e9, 2),
                                 "peak_rss_mb": round(max(r["peak_rss_mb"] for r in rs), 1)}
                if case["alignkit"]["tokens_per_call"] != case["transformers"]["tokens_per_call"]:
                    raise RuntimeError(f"{size} {mode}: the two sides generated different token counts")
                case["speedup"] = round(case["alignkit"]["tokens_per_s"] / case["transformers"]["tokens_per_s"], 3)
                case["speedup_best"] = round(case["transformers"]["best_s"] / case["alignkit"]["best_s"], 3)
                report["cases"][f"{size}/{mode}"] = case
            report["threads"] = runs["alignkit"][0]["threads"]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
