"""Sharded training with PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`), on CPUs (gloo) and GPUs.

Each decoder layer is one FSDP unit, the rest of the model (embeddings, final norm, head) the root
unit. Every parameter becomes a DTensor sharded on dim 0 over the processes: a process holds about
1/N of each, and so 1/N of the gradients and of AdamW's moments. A unit's weights are all-gathered
just before its forward (and again for its backward) and freed after; the gradients are
reduce-scattered, averaged over the processes as DDP averages them, so the training loop's loss
scaling is the same on both paths.

Generation and evaluation run with every unit gathered once (`gathered`): a process then samples or
evaluates on its own, with no collective per token, so processes whose completions end at different
lengths never wait on each other. That costs one full copy of the weights for the rollout, no more
than DDP holds all the time.

Checkpoints of a sharded run are written by every process through `torch.distributed.checkpoint`
(DCP): each writes its own shards of the weights and optimiser state, and a later run on another
process count loads them resharded."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

SHARDED_DIR = "sharded"
"""A checkpoint's DCP folder: the model's and the optimiser's shards, one file per process."""


def decoder_layer_types(model) -> set[str]:
    """Class names of the model's decoder layers: `_no_split_modules` of every transformers model in it
    (accelerate's transformer wrap policy reads the same attribute)."""
    names: set[str] = set()
    for module in model.modules():
        names |= set(getattr(module, "_no_split_modules", None) or ())
    return names


def shard_model(model, device_type: str, precision: str = "no"):
    """`fully_shard` each decoder layer, then the whole model, over all processes; in place.

    `precision` bf16 / fp16 computes in that dtype (FSDP2's MixedPrecisionPolicy: the gathered
    weights are cast, the sharded master weights and the gradient reduction stay float32)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device_type, (torch.distributed.get_world_size(),))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    kwargs = {"mesh": mesh}
    if dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    layers = decoder_layer_types(model)
    units = [m for m in model.modules() if type(m).__name__ in layers]
    if not units:
        raise ValueError(f"{type(model).__name__}: no decoder layers to shard (its _no_split_modules is empty)")
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    # FSDP2 makes the first module whose forward runs the root; PPO samples with its policy, a
    # submodule, before any forward of the whole: name the root now
    model._get_fsdp_state()._lazy_init()
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local_fraction(model) -> tuple[int, int]:
    """(parameter elements this process holds, elements of the whole model)."""
    local = total = 0
    for p in model.parameters():
        total += p.numel()
        local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return local, total


def _units(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model):
    """Every FSDP unit's full weights held for the block (no-op for an unsharded model): forwards
    inside run without collectives, so each process may run as many as it needs."""
    units = _units(model) if is_sharded(model) else []
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            # FSDP2's defaults: the root keeps its weights (embeddings, head) from the forward to the
            # backward, as a head applied after the model's forward (reward, value) needs them
            unit.set_reshard_after_forward(unit is not model, recurse=False)


@contextlib.contextmanager
def no_gradient_sync(model):
    """A sharded model's backward only accumulates its gradients locally in the block (the micro-batches
    before a step's last), as DDP's `no_sync`; outside it, backward reduce-scatters them."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_tensor(x: torch.Tensor) -> torch.Tensor:
    """A DTensor's global value (a collective), a plain tensor as it is."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU. Sharded: a collective every process must call; the main
    process gets the gathered weights, the others an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (every process holds it) into a sharded model, each process keeping its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def save_sharded(folder: Path, model, optimizer) -> None:
    """The model's and optimiser's state through DCP: every process writes its own shards (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))


def load_sharded(folder: Path, model, optimizer) -> None:
    """Load `save_sharded`'s state into `model` and `optimizer`, resharded to this run's process count
    (a sharded run on another count, or one unsharded process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
