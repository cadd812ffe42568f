"""Peak memory and time of one SFT step and one DPO step at a 128k vocabulary: the chunked head
(alignkit's default there), the full logits, transformers' own loss, and TRL's and alignkit's trainers.

    .venv/bin/python benchmarks/chunked_head.py                 # prints one JSON line per case
    .venv/bin/python benchmarks/chunked_head.py --batch 2 --length 512

A random Llama (hidden 256, 2 layers, 4 heads, vocabulary 128,256 as Llama 3's, untied head),
float32, on CPU. One optimiser-free step: forward, loss, backward, each case in a fresh
interpreter (one at a time) whose peak resident memory (ru_maxrss) is read after the step; the
model and the batch alone (`baseline`, a forward under no_grad that keeps no logits beyond one
token) are measured the same way and reported beside it. Cases:

- `sft chunked` / `sft full`: alignkit's `lm_step` (next-token loss on every token) with
  `chunked_head` on / off: the head in chunks of 2^24 logits, or the [B, T, V] logits in full.
- `sft transformers`: `model(input_ids, labels=...).loss`, transformers' ForCausalLMLoss: the
  full logits upcast to float32 and cross-entropy (what a plain transformers training loop pays).
- `dpo chunked` / `dpo full`: alignkit's `sequence_logprobs` of a [prompt | chosen | rejected]
  row per pair (`pad_shared_prompt`), prompt 512 and each response 256 tokens, the DPO sigmoid
  loss against constant reference log-probs (as with `precompute_ref`).
- `dpo trl-style`: chosen and rejected as two rows of 768 tokens each (the concatenated forward
  of DPO implementations), full logits, log-softmax gathered at the labels.
- `sft trl` / `dpo trl`: TRL 1.16's own SFTTrainer and DPOTrainer (installed privately, see
  benchmarks/common.py), one `train()` step of the same batch (text of a word-level tokenizer whose
  words are the token ids, so the rows have exactly these lengths), DPO with
  `precompute_ref_log_probs` as alignkit's `dpo` cases. TRL 1.16 patches a fused LM head that
  computes log-probs in chunks (`add_fused_lm_head`): this is TRL's real peak, its data
  collation and optimiser included.
- `sft alignkit` / `dpo alignkit`: alignkit's own `sft` and `dpo` trainers (`precompute_ref`), one
  optimiser step on the same text, its defaults (`chunked_head auto` chunks here), AdamW included:
  the trainer-to-trainer comparison with the two TRL cases.
- `sft checkpointed`: `sft chunked` with the model's gradient checkpointing on (alignkit's
  `gradient_checkpointing` key), for its memory against its time (`--layers` sets the depth).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = ["baseline", "sft chunked", "sft full", "sft transformers", "sft trl", "sft alignkit", "dpo chunked",
         "dpo full", "dpo trl-style", "dpo trl", "dpo alignkit"]
# `--cases "sft chunked" "sft checkpointed" --layers 8`: gradient_checkpointing's effect on the same step


def child(case: str, batch: int, length: int, vocab: int, layers: int = 2) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignkit.models import forward

    torch.manual_seed(0)
    torch.set_num_threads(2)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    ids = torch.randint(3, vocab, (batch, length))
    attn = torch.ones_like(ids)
    if case.endswith(" trl"):
        return trl_child(case, model, batch, length, vocab)
    if case.endswith(" alignkit"):
        return alignkit_child(case, model, batch, length, vocab)
    start = time.perf_counter()
    if case == "baseline":
        with torch.no_grad():
            model(input_ids=ids, attention_mask=attn, logits_to_keep=1)
    elif case.startswith("sft"):
        from alignkit.train.common import lm_step

        if case == "sft transformers":
            loss = model(input_ids=ids, attention_mask=attn, labels=ids).loss
        else:
            if case == "sft checkpointed":
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.train()
            forward.CHUNKED_HEAD = "off" if case == "sft full" else "on"
            loss_sum, _ = lm_step(model, {"input_ids": ids, "attention_mask": attn, "loss_mask": attn})
            loss = loss_sum / (batch * (length - 1))
        loss.backward()
    else:
        import torch.nn.functional as F

        prompt, response = length // 2, length // 4
        if case == "dpo trl-style":
            rows = torch.randint(3, vocab, (2 * batch, prompt + response))
            logits = model(input_ids=rows, attention_mask=torch.ones_like(rows)).logits[:, prompt - 1:-1]
            logps = torch.log_softmax(logits.float(), -1).gather(-1, rows[:, prompt:, None])[..., 0].sum(-1)
        else:
            from alignkit.data.tokenize import pad_shared_prompt
            from alignkit.models.forward import sequence_logprobs

            forward.CHUNKED_HEAD = "on" if case == "dpo chunked" else "off"
            examples = []
            for b in range(batch):
                p = torch.randint(3, vocab, (prompt,)).tolist()
                seqs = [p + torch.randint(3, vocab, (response,)).tolist() for _ in range(2)]
                examples.append({"id": b, "sequences": seqs, "loss_masks": [[0] * prompt + [1] * response] * 2})
            logps, _ = sequence_logprobs(model, pad_shared_prompt(examples, 0))
        loss = -F.logsigmoid(0.1 * (logps[0::2] - logps[1::2])).mean()
        loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"case": case, "batch": batch, "length": length, "vocab": vocab, "peak_bytes": peak,
            "seconds": round(seconds, 2), "logits_bytes_fp32": batch * length * vocab * 4}


def word_tokenizer(vocab: int):
    """A word-level tokenizer whose word `w{i}` is token i (0 pad, 1 <s>, 2 </s>): text of known ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    raw = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def random_words(n: int, vocab: int) -> str:
    """`n` random words of `word_tokenizer(vocab)`: text that tokenizes to exactly n ids."""
    import torch

    return " ".join(f"w{int(i)}" for i in torch.randint(3, vocab, (n,)))


def trl_child(case: str, model, batch: int, length: int, vocab: int) -> dict:
    """One optimiser step of TRL's own trainer on `batch` rows of `length` tokens (EOS included)."""
    import tempfile

    from datasets import Dataset

    from common import TRL_DIR, ensure_trl

    ensure_trl()
    sys.path.insert(0, str(TRL_DIR))
    tokenizer = word_tokenizer(vocab)
    words = lambda n: random_words(n, vocab)  # noqa: E731
    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=1, report_to=[],
                  save_strategy="no", logging_steps=1, use_cpu=True, dataloader_num_workers=0, learning_rate=1e-5)
    start = time.perf_counter()
    if case == "sft trl":
        from trl import SFTConfig, SFTTrainer

        data = Dataset.from_list([{"text": words(length - 1)} for _ in range(batch)])  # + EOS = length
        trainer = SFTTrainer(model=model, args=SFTConfig(max_length=length, packing=False, **common),
                             train_dataset=data, processing_class=tokenizer)
    else:
        from trl import DPOConfig, DPOTrainer

        prompt, response = length // 2, length // 4
        data = Dataset.from_list([{"prompt": words(prompt), "chosen": " " + words(response - 1),
                                   "rejected": " " + words(response - 1)} for _ in range(batch)])
        trainer = DPOTrainer(model=model, args=DPOConfig(max_length=prompt + response, precompute_ref_log_probs=True,
                                                         beta=0.1, **common),
                             train_dataset=data, processing_class=tokenizer)
    row_tokens = len(next(iter(trainer.train_dataset))["input_ids" if case == "sft trl" else "prompt_ids"])
    trainer.train()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"case": case, "batch": batch, "length": length, "vocab": vocab, "peak_bytes": peak,
            "seconds": round(seconds, 2), "first_row_tokens": row_tokens, "trl": __import__("trl").__version__}


def alignkit_child(case: str, model, batch: int, length: int, vocab: int) -> dict:
    """One optimiser step of alignkit's own trainer on the rows `trl_child` builds (same lengths)."""
    import tempfile

    from alignkit.train import dpo, sft

    work = Path(tempfile.mkdtemp())
    model.save_pretrained(work / "model")
    word_tokenizer(vocab).save_pretrained(work / "model")
    words = lambda n: random_words(n, vocab)  # noqa: E731
    prompt, response = (1, length - 2) if case == "sft alignkit" else (length // 2, length // 4 - 1)  # + EOS
    rows = [{"prompt": words(prompt), "completion": " " + words(response), "chosen": " " + words(response),
             "rejected": " " + words(response)} for _ in range(batch)]
    (work / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = dict(model=str(work / "model"), data=str(work / "data.jsonl"), output_dir=str(work / "out"),
                  max_steps=1, batch_size=batch, max_length=length, lr=1e-5, log_steps=1)
    start = time.perf_counter()
    if case == "sft alignkit":
        sft.run(sft.SFTConfig(**common))
    else:
        dpo.run(dpo.DPOConfig(**common, precompute_ref=True, beta=0.1))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"case": case, "batch": batch, "length": length, "vocab": vocab, "peak_bytes": peak,
            "seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--cases", nargs="*", default=CASES)
    parser.add_argument("--child", default="")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.length, args.vocab, args.layers)))
        return
    results = {}
    for case in args.cases:
        proc = subprocess.run([sys.executable, __file__, "--child", case, "--batch", str(args.batch), "--length",
                               str(args.length), "--vocab", str(args.vocab), "--layers", str(args.layers)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(json.dumps({"case": case, "error": proc.stderr[-800:]}), flush=True)
            continue
        results[case] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(results[case]), flush=True)
    base = results.get("baseline", {}).get("peak_bytes", 0)
    summary = {}
    for kind in ("sft", "dpo"):
        ours = results.get(f"{kind} chunked")
        full = results.get(f"{kind} full")
        peer = results.get(f"{kind} transformers") or results.get(f"{kind} trl-style")
        if ours and full and peer:
            summary[kind] = {
                "peak_above_baseline_chunked_vs_peer": round((ours["peak_bytes"] - base) / (peer["peak_bytes"] - base), 3),
                "peak_chunked_vs_peer": round(ours["peak_bytes"] / peer["peak_bytes"], 3),
                "speed_chunked_vs_full": round(full["seconds"] / ours["seconds"], 3),
            }
        trainer, own = results.get(f"{kind} trl"), results.get(f"{kind} alignkit")
        if ours and trainer:  # TRL's time includes its trainer's setup and optimiser step: no speed ratio
            summary.setdefault(kind, {})["peak_chunked_vs_trl_trainer"] = round(ours["peak_bytes"] / trainer["peak_bytes"], 3)
        if own and trainer:  # trainer against trainer: setup, data, AdamW step and save on both sides
            summary.setdefault(kind, {})["peak_alignkit_trainer_vs_trl_trainer"] = round(
                own["peak_bytes"] / trainer["peak_bytes"], 3)
            summary[kind]["time_trl_vs_alignkit_trainer"] = round(trainer["seconds"] / own["seconds"], 3)
    print(json.dumps({"summary": summary}))


if __name__ == "__main__":
    main()
