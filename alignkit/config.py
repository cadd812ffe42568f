"""Typed configs from a YAML file plus `--key value` overrides, parsed by `tyro`.

Every config is a flat dataclass whose fields carry a one-line docstring (that is the
`--help` text). YAML values are turned into the same `--key value` tokens as the
command line and placed first, so tyro checks both the same way and the command
line wins.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


# Keys people bring from transformers / TRL configs, and what alignkit calls them.
FOREIGN_KEYS = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",
    "num_train_epochs": "epochs",
    "gradient_accumulation_steps": "grad_accum",
    "max_seq_length": "max_length",
    "logging_steps": "log_steps",
    "model_name_or_path": "model",
    "lr_scheduler_type": "lr_scheduler",
    "report_to": "logging",
    "max_completion_length": "max_new_tokens",
    "resume_from_checkpoint": "resume",
    "bf16": "precision",
    "fp16": "precision",
    "overwrite_output_dir": "overwrite",
}

last_parsed = None
"""The config `parse_config` built last (the command line reads output_dir / save_steps from it on Ctrl-C)."""


def _unknown_key(key: str, fields: set[str], prefix: str = "") -> str:
    """`unknown key 'KEY' ...` with a pointer: alignkit's name for a TRL key, or the closest field."""
    if FOREIGN_KEYS.get(key) in fields:
        return f"unknown key '{prefix}{key}' (alignkit calls it '{prefix}{FOREIGN_KEYS[key]}')"
    hint = difflib.get_close_matches(key, fields, n=1)
    return f"unknown key '{prefix}{key}'" + (f" (did you mean '{prefix}{hint[0]}'?)" if hint else "")


def _check_cli_keys(cls, argv: list[str]) -> None:
    """One line for an unknown `--key` before tyro sees it (tyro's own report is a boxed page)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    flags = {f"no_{f.name}" for f in dataclasses.fields(cls)}
    for i, token in enumerate(argv):
        if not token.startswith("--") or token == "--":
            continue
        key = token.split("=", 1)[0][2:].replace("-", "_")
        if key in fields:
            values = [token.split("=", 1)[1]] if "=" in token else []
            for value in argv[i + 1:] if not values else []:
                if value.startswith("--"):
                    break
                values.append(value)
            _check_values(cls, key, values, f"--{key}")
            continue
        if key in flags or key in ("help", "config"):
            continue
        raise ConfigError(_unknown_key(key, fields, "--"))


def _yaml_args(cls, path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a YAML config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config file ({e})") from None
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if root is None:
        return []
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{path}:{root.start_mark.line + 1}: the config must be a mapping of key: value")
    fields = {f.name for f in dataclasses.fields(cls)}
    args: list[str] = []
    for key_node, value_node in root.value:
        key, line = key_node.value, key_node.start_mark.line + 1
        if key not in fields:
            raise ConfigError(f"{path}:{line}: {_unknown_key(key, fields)}")
        try:  # the safe loader: a !!python/... tag is an error and runs nothing
            value = yaml.safe_load(yaml.serialize(value_node))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}:{line}: key '{key}': {str(e).splitlines()[0]}") from None
        if isinstance(value, dict):
            raise ConfigError(f"{path}:{line}: key '{key}': nested mappings are not supported")
        if isinstance(value, bool):  # booleans are flags: --packing / --no-packing
            args.append(f"--{key}" if value else f"--no-{key}")
            continue
        values = value if isinstance(value, list) else [value]
        values = ["None" if v is None else str(v) for v in values]
        _check_values(cls, key, values, f"{path}:{line}: key '{key}'")
        args += [f"--{key}", *values]
    return args


def _value_problem(annotation, value: str) -> str | None:
    """Why `value` (a command-line token) is not a valid `annotation`, or None."""
    if typing.get_origin(annotation) is Literal:
        choices = [str(c) for c in typing.get_args(annotation)]
        return None if value in choices else f"expected one of {', '.join(choices)}, got {value!r}"
    for kind, word in ((int, "an integer"), (float, "a number")):
        if annotation is kind:
            try:
                kind(value)
            except ValueError:
                return f"expected {word}, got {value!r}"
    return None


def _check_values(cls, key: str, values: list[str], where: str) -> None:
    """One line for a value tyro would reject with its boxed page (`--batch_size abc`)."""
    annotation = typing.get_type_hints(cls).get(key)
    if annotation is None or annotation is bool:
        return
    if typing.get_origin(annotation) is list:
        annotation = typing.get_args(annotation)[0]
    elif len(values) != 1:
        raise ConfigError(f"{where}: takes one value, got {len(values)}")
    for value in values:
        problem = _value_problem(annotation, value)
        if problem:
            raise ConfigError(f"{where}: {problem}")


def parse_config(cls: type[T], argv: list[str], prog: str | None = None) -> T:
    """Build `cls` from `--config FILE.yaml` (optional) and `--key value` overrides.

    Unknown keys fail in one line before tyro parses, and the built config's
    `validate()` (when it has one) runs after: tyro would wrap an error raised in
    `__post_init__` in its own multi-line report.
    """
    import tyro

    global last_parsed
    argv = list(argv)
    yaml_args: list[str] = []
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a YAML file path")
        yaml_args = _yaml_args(cls, Path(argv[i + 1]))
        del argv[i : i + 2]
    _check_cli_keys(cls, argv)
    description = (f"{cls.__doc__}\n\n--config FILE.yaml: read keys from a YAML file first "
                   "(`key: value` per line); `--key value` on the command line wins.")
    # use_underscores: --help shows --max_steps, as the README and YAML files write it (--max-steps still parses)
    cfg = tyro.cli(cls, args=yaml_args + argv, prog=prog, description=description, use_underscores=True)
    if hasattr(cfg, "validate"):
        cfg.validate()
    last_parsed = cfg
    return cfg


def require(cfg, *keys: str) -> None:
    """A ConfigError naming every key in `keys` left empty, before anything is loaded."""
    missing = [k for k in keys if not getattr(cfg, k)]
    if missing:
        names = ", ".join(missing)
        example = " ".join(f"--{k} ..." for k in missing)
        raise ConfigError(f"missing required key{'s' if len(missing) > 1 else ''} {names} "
                          f"(give {example}, or set {'them' if len(missing) > 1 else 'it'} in --config run.yaml)")
