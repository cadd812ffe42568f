"""Typed configs from a YAML file plus `--key value` overrides, parsed by `tyro`.

Every config is a flat dataclass whose fields carry a one-line docstring (that is the
`--help` text). YAML values are turned into the same `--key value` tokens as the
command line and placed first, so tyro checks both the same way and the command
line wins.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def _yaml_args(cls, path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
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
            hint = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"{path}:{line}: unknown key '{key}' for {cls.__name__}{hint}")
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
        args += [f"--{key}", *("None" if v is None else str(v) for v in values)]
    return args


def parse_config(cls: type[T], argv: list[str], prog: str | None = None) -> T:
    """Build `cls` from `--config FILE.yaml` (optional) and `--key value` overrides."""
    import tyro

    argv = list(argv)
    yaml_args: list[str] = []
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a YAML file path")
        yaml_args = _yaml_args(cls, Path(argv[i + 1]))
        del argv[i : i + 2]
    return tyro.cli(
        cls,
        args=yaml_args + argv,
        prog=prog,
        description=cls.__doc__,
    )
