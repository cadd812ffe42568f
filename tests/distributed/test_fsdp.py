"""Sharded training (`distributed fsdp`: PyTorch's FSDP2 over gloo on CPUs) trains as one unsharded
process does on the same global batch, really shards, and resumes from its sharded checkpoints on
the same or another process count.

Each trainer runs once on 1 process (batch 2b, the plain path) and once on 2 sharded processes
(batch b); a run prints what each process holds, and its checkpoint's DCP folder holds one file per
process. A DDP fallback prints no such line and writes every weight into rank 0's file: both fail.
"""

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignkit.train.sharding import SHARDED_DIR, decoder_layer_types, gathered, is_sharded
from tests.helpers import free_port, max_abs_diff, torchrun

TOL = 1e-5
# Adam divides each gradient by its own RMS: a near-zero gradient summed in another order moves a
# weight by a visible fraction of lr. Pretraining's packed blocks (measured: DDP on 2 processes 2.9e-5
# from 1 process, FSDP 6.7e-8 from DDP) and bon's two fine-tuning steps (test_ddp) show it at lr 1e-2;
# 1e-4 is 1% of one step, far below a wrong split's ~lr.
TOLS = {"pretrain": 1e-4, "bon": 1e-4}
COMMON = dict(lr=1e-2, log_steps=1, max_length=64, seed=3, save_steps=1)


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdpdata")
    return {
        "sft": _jsonl(root / "sft.jsonl", [{"prompt": f"What is {a}+{a % 5}?" + " Think." * (a % 3),
                                            "completion": f" The answer is {a + a % 5}." + " Yes." * (a % 4)}
                                           for a in range(17)]),
        "prefs": _jsonl(root / "prefs.jsonl", [{"prompt": f"What is {a}+{a % 4}?", "chosen": f" The answer is {a + a % 4}.",
                                                "rejected": f" It is {a * 3 + 1}" + " or so" * (a % 3)} for a in range(11)]),
        "unpaired": _jsonl(root / "kto.jsonl", [{"prompt": f"What is {a}+1?", "completion": f" {a + 1 if a % 2 else a}",
                                                 "label": a % 2 == 1} for a in range(12)]),
        "text": _jsonl(root / "text.jsonl", [{"text": f"The sum of {a} and {a % 7} is {a + a % 7}."} for a in range(40)]),
        "prompts": _jsonl(root / "prompts.jsonl", [{"prompt": f"What is {a}+{a % 5}?"} for a in range(13)]),
    }


# trainer: (data key, arguments, 1-process overrides, 2-process overrides): the same global batch
TRAINERS = {
    "sft": ("sft", dict(grad_accum=2, epochs=1), dict(batch_size=4), dict(batch_size=2)),
    "pretrain": ("text", dict(grad_accum=1, max_steps=3, max_length=16, eval_fraction=0.2, eval_steps=2),
                 dict(batch_size=4), dict(batch_size=2)),
    "dpo": ("prefs", dict(grad_accum=2, max_steps=3, beta=0.5), dict(batch_size=2), dict(batch_size=1)),
    "kto": ("unpaired", dict(grad_accum=1, max_steps=3), dict(batch_size=4), dict(batch_size=2)),
    # a batch of 2 pads shared-prompt rows otherwise than 2 of 1 (3e-5 at lr 1e-2): accumulate instead
    "rm": ("prefs", dict(batch_size=1, max_steps=3), dict(grad_accum=4), dict(grad_accum=2)),
    "grpo": ("prompts", dict(reward="tests.helpers:digit_fraction", num_generations=4, max_steps=3, max_new_tokens=6,
                             eval_fraction=0.0, beta=0.04), dict(batch_size=8), dict(batch_size=4)),
    # rollout_batch_size counts a step's prompts over all processes; batch_size is a minibatch of them
    "ppo": ("prompts", dict(reward="tests.helpers:digit_fraction", max_steps=3, rollout_batch_size=8, batch_size=4,
                            ppo_epochs=2, max_new_tokens=5, lr=5e-3, beta=0.05), {}, {}),
    "bon": ("prompts", dict(reward="tests.helpers:digit_fraction", num_samples=4, max_new_tokens=6, require_eos=False,
                            epochs=1, eval_fraction=0.0, generation_batch_size=8), dict(batch_size=4), dict(batch_size=2)),
}


def _one_process(trainer: str, args: dict) -> None:
    """`python -m alignkit <trainer>` on one process: the plain path, no process group."""
    torchrun(trainer, args, launcher=[sys.executable])


def _args(trainer: str, model, data: dict, processes: int, **extra) -> dict:
    key, args, one, two = TRAINERS[trainer]
    return {"model": model, "data": data[key], **COMMON, **args, **(one if processes == 1 else two), **extra}


def _moved(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa.keys() & wb.keys())


def assert_sharded(stdout: str, checkpoint: Path) -> None:
    """Each of the 2 processes holds about half of the model's elements, and wrote about half of the
    checkpoint's bytes."""
    held = re.findall(r"process (\d) of 2 holds ([\d,]+) of ([\d,]+) parameter elements", stdout)
    assert sorted(r for r, _, _ in held) == ["0", "1"], stdout[-2000:]
    for _, local, whole in held:
        assert abs(int(local.replace(",", "")) / int(whole.replace(",", "")) - 0.5) < 0.05, held
    files = sorted((checkpoint / SHARDED_DIR).glob("*.distcp"))
    sizes = [f.stat().st_size for f in files]
    assert len(files) == 2 and min(sizes) > 0.35 * sum(sizes), dict(zip(files, sizes))


@pytest.mark.slow
@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_two_sharded_processes_equal_one_process(trainer, tiny_model_dir, data, tmp_path):
    """The same global batch (1 x 2b against 2 x b, FSDP2 per decoder layer): the weights after the
    run agree to 1e-5 where the run moved them by far more; a short last step (a process with
    fewer micro-batches) and the online trainers' rollouts (weights gathered) included."""
    _one_process(trainer, _args(trainer, tiny_model_dir, data, 1, output_dir=tmp_path / "one"))
    proc = torchrun(trainer, _args(trainer, tiny_model_dir, data, 2, distributed="fsdp",
                                   output_dir=tmp_path / "two"))
    checkpoints = sorted((tmp_path / "two").glob("**/checkpoint-*"))
    assert checkpoints, "no checkpoint written"
    assert_sharded(proc.stdout, checkpoints[-1])
    diff, moved = max_abs_diff(tmp_path / "one", tmp_path / "two"), _moved(tiny_model_dir, tmp_path / "one")
    if trainer == "ppo":  # the critic too
        diff = max(diff, max_abs_diff(tmp_path / "one" / "value", tmp_path / "two" / "value"))
    print(f"{trainer}: 2 sharded processes vs 1: max |dw| = {diff:.3g}; the run moved weights by up to {moved:.3g}")
    assert moved > 1e-3 and diff < TOLS.get(trainer, TOL)
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "two").architectures == AutoConfig.from_pretrained(
        tmp_path / "one").architectures  # the gathered save names the model's class, not FSDP's wrapper


@pytest.fixture(scope="module")
def sharded_sft(tiny_model_dir, data, tmp_path_factory):
    """SFT on 2 sharded processes with a checkpoint after every step, and the unsharded 1-process run."""
    root = tmp_path_factory.mktemp("fsdp_sft")
    _one_process("sft", _args("sft", tiny_model_dir, data, 1, output_dir=root / "one"))
    torchrun("sft", _args("sft", tiny_model_dir, data, 2, distributed="fsdp", output_dir=root / "two"))
    return root


@pytest.mark.slow
def test_sharded_resume_is_bitwise_and_reshards_to_one_process(sharded_sft, tiny_model_dir, data):
    """Killed after checkpoint-1 (modelled by resuming from it): 2 processes continue bitwise; 1 process
    (batch 2b) loads the 2-process shards through DCP's resharding and ends within 1e-6."""
    root = sharded_sft
    assert not (root / "two/checkpoint-1/model.safetensors").exists()  # the weights are in the shards
    torchrun("sft", _args("sft", tiny_model_dir, data, 2, distributed="fsdp", output_dir=root / "two_resumed",
                          resume=root / "two/checkpoint-1"))
    assert max_abs_diff(root / "two", root / "two_resumed") == 0.0
    _one_process("sft", _args("sft", tiny_model_dir, data, 1, distributed="fsdp", output_dir=root / "two_to_one",
                              resume=root / "two/checkpoint-1", allow_resume_mismatch=True))
    diff = max_abs_diff(root / "two", root / "two_to_one")
    print(f"sft resumed on 1 process from a 2-process sharded checkpoint: max |dw| = {diff:.3g}")
    assert diff < 1e-6


@pytest.mark.slow
def test_one_process_checkpoint_resumes_sharded_on_two(sharded_sft, tiny_model_dir, data):
    """1 -> 2: a 1-process run with distributed fsdp writes DCP checkpoints; 2 sharded processes resume one."""
    root = sharded_sft
    _one_process("sft", _args("sft", tiny_model_dir, data, 1, distributed="fsdp", max_steps=1,
                              output_dir=root / "one_fsdp"))
    assert (root / "one_fsdp/checkpoint-1" / SHARDED_DIR).is_dir()
    torchrun("sft", _args("sft", tiny_model_dir, data, 2, distributed="fsdp", output_dir=root / "one_to_two",
                          resume=root / "one_fsdp/checkpoint-1", allow_resume_mismatch=True))
    diff = max_abs_diff(root / "one", root / "one_to_two")
    print(f"sft resumed on 2 sharded processes from a 1-process checkpoint: max |dw| = {diff:.3g}")
    assert diff < 1e-6


@pytest.mark.slow
def test_two_single_process_nodes_equal_one_two_process_node(sharded_sft, tiny_model_dir, data):
    """torchrun --nnodes 2 --nproc_per_node 1, nodes 0 and 1 meeting over a loopback c10d rendezvous,
    trains exactly as one node with 2 processes."""
    port, out = free_port(), sharded_sft / "two_nodes"
    args = _args("sft", tiny_model_dir, data, 2, distributed="fsdp", output_dir=out)
    launchers = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                  "--node_rank", str(rank), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
                  "--rdzv_id", "alignkit-test"] for rank in (0, 1)]
    import threading

    errors: list[BaseException] = []

    def node(launcher):
        try:
            torchrun("sft", args, launcher=launcher)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=node, args=(launcher,)) for launcher in launchers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert max_abs_diff(sharded_sft / "two", out) == 0.0


def test_decoder_layers_are_the_sharding_units(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert decoder_layer_types(model) == {"LlamaDecoderLayer"}
    assert not is_sharded(model)
    with gathered(model) as same:  # an unsharded model: nothing to gather
        assert same is model


def test_fsdp_refuses_lora_and_fp16():
    from alignkit.config import ConfigError
    from alignkit.train.loop import TrainConfig

    with pytest.raises(ConfigError, match="distributed fsdp with lora_r"):
        TrainConfig(distributed="fsdp", lora_r=4).validate()
    with pytest.raises(ConfigError, match="precision fp16"):
        TrainConfig(distributed="fsdp", precision="fp16").validate()
    TrainConfig(distributed="fsdp").validate()
    assert torch.distributed.is_available()
