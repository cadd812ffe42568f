"""Bytes of parameters, gradients and AdamW state each process holds: one unsharded process against
`distributed fsdp` (alignkit's FSDP2 sharding, per decoder layer) on N gloo processes, after one SFT-like
step (forward, loss, backward, optimiser step) of a random ~25M-parameter Llama. Prints JSON.

    python benchmarks/fsdp_memory.py [--processes 2] [--hidden 384 --layers 8 --vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch


def tensor_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def one_step(args) -> dict:
    """Runs in each process: build, (shard), one step; this process's bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignkit.train.sharding import shard_model

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         max_position_embeddings=args.tokens, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    if world > 1:
        model = shard_model(model, "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, args.vocab, (args.batch, args.tokens), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    row = {"rank": int(os.environ.get("RANK", "0")), "parameters": n_params,
           "param_bytes": tensor_bytes(model.parameters()),
           "grad_bytes": tensor_bytes(p.grad for p in model.parameters() if p.grad is not None),
           "optimizer_bytes": tensor_bytes(state)}
    row["total_bytes"] = row["param_bytes"] + row["grad_bytes"] + row["optimizer_bytes"]
    if world > 1:
        rows = [None] * world
        torch.distributed.all_gather_object(rows, row)
        torch.distributed.destroy_process_group()
        return {"processes": world, "per_process": rows}
    return {"processes": 1, "per_process": [row]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = one_step(args)
        if os.environ.get("RANK", "0") == "0":
            print("RESULT " + json.dumps(result), flush=True)
        return
    shape = [f"--{k}={getattr(args, k)}" for k in ("hidden", "layers", "vocab", "batch", "tokens")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = []
    for n in (1, args.processes):
        launcher = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
                                                    "--master_port", "29577"]
        out = subprocess.run([*launcher, __file__, "--worker", *shape], env=env, capture_output=True, text=True,
                             check=True).stdout
        runs.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    whole = runs[0]["per_process"][0]["total_bytes"]
    sharded = max(r["total_bytes"] for r in runs[1]["per_process"])
    print(json.dumps({"model_parameters": runs[0]["per_process"][0]["parameters"], "unsharded": runs[0],
                      "fsdp": runs[1], "largest_process_vs_unsharded": round(sharded / whole, 4)}, indent=1))


if __name__ == "__main__":
    main()
