"""Load any causal LM and its tokenizer by local path or Hub id, optionally with LoRA."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelNotFoundError(ValueError):
    """A model path or Hub id that names nothing loadable; the message is one line naming it."""


def _looks_local(path: str) -> bool:
    """A string meant as a directory rather than a Hub id ("org/name" or "name")."""
    if path.startswith((".", "/", "~")) or path.endswith(("/", os.sep)):
        return True
    parts = re.split(r"[/\\]", path)
    # A Hub id has at most one slash; a longer path, or one whose first part is here, is local.
    return len(parts) > 2 or (len(parts) > 1 and Path(parts[0]).exists())


def check_model_path(path: str, markers: tuple[str, ...] = ("config.json",)) -> None:
    """Fail in one line, before anything is loaded, on a local path that holds no model.

    A directory must hold one of `markers`. A string that looks like a Hub id and is
    not a local directory is left to the Hub.
    """
    path = str(path)
    local = Path(path).expanduser()
    if local.is_dir():
        if not any((local / m).is_file() for m in markers):
            raise ModelNotFoundError(f"model '{path}': no config.json (not a save_pretrained directory)")
    elif local.exists():
        raise ModelNotFoundError(f"model '{path}': is a file, not a save_pretrained directory")
    elif _looks_local(path):
        raise ModelNotFoundError(f"model '{path}': no such directory")


@contextlib.contextmanager
def hub_errors(path: str):
    """Turn the Hub's multi-paragraph "couldn't connect" / "not a valid model identifier" into one line."""
    try:
        yield
    except OSError as e:
        from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

        cause: BaseException | None = e
        for _ in range(20):  # the chain of causes, bounded in case it loops
            if cause is None:
                break
            if isinstance(cause, LocalEntryNotFoundError):
                why = "HF_HUB_OFFLINE=1 is set" if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else (
                    "no network?")
                raise ModelNotFoundError(
                    f"model '{path}': no such local directory, and the Hub cannot be reached ({why})") from e
            if isinstance(cause, GatedRepoError):  # a subclass of RepositoryNotFoundError
                raise ModelNotFoundError(f"model '{path}': gated on the Hub (accept its terms on the model page, "
                                         "then `hf auth login`)") from e
            if isinstance(cause, RepositoryNotFoundError):
                raise ModelNotFoundError(f"model '{path}': no such local directory and no such Hub model "
                                         "(a private one needs `hf auth login`)") from e
            cause = cause.__cause__ or cause.__context__
        raise


def load_tokenizer(path: str):
    """`AutoTokenizer.from_pretrained(path)`, with a pad token and a chat template guaranteed.

    A tokenizer without a pad token gets EOS as pad. That is safe here because every
    alignkit mask is built from sequence lengths, never from `input_ids != pad_id`, so
    the EOS that ends a completion is still trained on.

    A tokenizer without a chat template (a base model) gets alignkit's PLAIN one
    (`alignkit.data.chat.plain_chat_template`), the format alignkit renders messages in
    anyway, so every `save_pretrained` of it writes the template and other tools render
    the prompts alignkit trained on. A tokenizer with its own template keeps it.
    """
    from transformers import AutoTokenizer

    from alignkit.data.chat import ensure_chat_template

    check_model_path(path, ("config.json", "tokenizer_config.json", "tokenizer.json"))
    with hub_errors(str(path)):
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{path}: tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return ensure_chat_template(tokenizer)


def load_causal_lm(path: str, dtype: str = "float32", device: str | torch.device | None = None):
    """`AutoModelForCausalLM.from_pretrained` with a dtype name ("auto", "float32", "bfloat16", "float16").

    Training keeps float32 master weights by default; mixed precision comes from the
    accelerator's autocast, not from the stored dtype.
    """
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype '{dtype}' is not one of {sorted(DTYPES)}")
    check_model_path(path)
    with hub_errors(str(path)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    return model.to(device) if device is not None else model


_REGEX_CHARS = set("*+?[](){}|^$\\")


def lora_targets(target_modules: str | list[str]) -> str | list[str]:
    """The `lora_target_modules` key as peft's `target_modules`: one entry that is "all-linear" or
    a regex (it holds one of * + ? [ ] ( ) { } | ^ $ \\) stays a string, matched in full against
    module names; otherwise a list of names, each matching a module of that name or dotted suffix."""
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    if len(target_modules) == 1 and (target_modules[0] == "all-linear" or _REGEX_CHARS & set(target_modules[0])):
        return target_modules[0]
    return list(target_modules)


def _unmatched_targets(model, targets: str | list[str]) -> list[str]:
    """The entries of `targets` (as `lora_targets` returns them) that name no module of `model`."""
    if targets == "all-linear":
        return []
    names = [name for name, _ in model.named_modules() if name]
    if isinstance(targets, str):
        return [] if any(re.fullmatch(targets, n) for n in names) else [targets]
    return [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]


def _module_examples(model, limit: int = 12) -> str:
    """A few distinct layer names of `model` (the last part of each leaf module's name), for error messages."""
    seen = dict.fromkeys(name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                         if name and not any(True for _ in m.children()))
    return ", ".join(list(seen)[:limit])


def apply_lora(model, r: int, alpha: float | None = None, dropout: float = 0.0,
               target_modules: str | list[str] = "all-linear", use_rslora: bool = False, use_dora: bool = False,
               task_type: str = "CAUSAL_LM"):
    """Wrap `model` with LoRA adapters of rank `r`: W x + (alpha / r) B A dropout(x), with
    alpha / sqrt(r) under `use_rslora`, and alpha defaulting to 2r.

    `target_modules` follows `lora_targets`; an entry that names no module of `model` is a
    ConfigError listing some that exist. `use_dora` learns a magnitude per output feature
    beside the low-rank direction (DoRA). task_type "SEQ_CLS" (a reward model) or "TOKEN_CLS" (a
    process reward model) also trains the classification head (`score`) in full, as peft's `modules_to_save`.

    With LoRA the reference model is this same model with its adapters disabled
    (`with model.disable_adapter(): ...`), so no second copy is held in memory.
    """
    from peft import LoraConfig, get_peft_model

    from alignkit.config import ConfigError

    targets = lora_targets(target_modules)
    unmatched = _unmatched_targets(model, targets)
    if unmatched:
        raise ConfigError(f"lora_target_modules: {', '.join(map(repr, unmatched))} matches no module of the model "
                          f"(its layers include: {_module_examples(model)})")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha if alpha is not None else 2 * r,
        lora_dropout=dropout,
        target_modules=targets,
        use_rslora=use_rslora,
        use_dora=use_dora,
        task_type=task_type,
        # a classification head is trained in full (modules_to_save): "all-linear" must not also wrap it, as it
        # would the token-classification head of a process reward model
        exclude_modules=["score"] if task_type in ("SEQ_CLS", "TOKEN_CLS") else None,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # e.g. a target that is a layer type LoRA cannot wrap (a norm)
        raise ConfigError(f"lora_target_modules {target_modules}: {str(e).splitlines()[0]} "
                          f"(the model's layers include: {_module_examples(model)})") from e


def save_weights(model, path: Path, state_dict: dict | None = None) -> None:
    """`model.save_pretrained(path)`, loadable by plain transformers. With LoRA: the merged
    model at `path` and the adapter alone in `path/adapter` (what resume loads). `state_dict`
    replaces the model's own (a sharded model's gathered weights)."""
    if hasattr(model, "peft_config"):
        model.save_pretrained(Path(path) / "adapter")
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    if state_dict is not None:  # gathered copies share no storage: drop tied duplicates (lm_head = embeddings)
        tied = set(dict(model.named_parameters(remove_duplicate=False))) - set(dict(model.named_parameters()))
        state_dict = {k: v for k, v in state_dict.items() if k not in tied}
    model.save_pretrained(path, **({} if state_dict is None else {"state_dict": state_dict}))
    name = type(model).__name__
    if name.startswith("FSDP") and getattr(model.config, "architectures", None) == [name]:
        model.config.architectures = [name[len("FSDP"):]]  # FSDP2's class FSDP<Model>: the model's own name
        model.config.save_pretrained(path)
