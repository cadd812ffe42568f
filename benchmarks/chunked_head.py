"""Peak memory and time of one SFT step and one DPO step at a 128k vocabulary: the chunked head
(alignkit's default there), the full logits, and transformers' own loss (what TRL's trainers call).

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
  full logits upcast to float32 and cross-entropy, which TRL's SFTTrainer computes its loss with
  (its compute_loss then also reads the same logits for entropy and token accuracy).
- `dpo chunked` / `dpo full`: alignkit's `sequence_logprobs` of a [prompt | chosen | rejected]
  row per pair (`pad_shared_prompt`), prompt 512 and each response 256 tokens, the DPO sigmoid
  loss against constant reference log-probs (as with `precompute_ref`).
- `dpo trl-style`: chosen and rejected as two rows of 768 tokens each (TRL's concatenated
  forward), full logits, log-softmax gathered at the labels.
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
CASES = ["baseline", "sft chunked", "sft full", "sft transformers", "dpo chunked", "dpo full", "dpo trl-style"]
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
    print(json.dumps({"summary": summary}))


if __name__ == "__main__":
    main()
