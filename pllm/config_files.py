"""Job configs as files: a YAML path or the name of a built-in config in `pllm/configs/`, plus
`section.field=value` overrides. Shared by `pllm train`, `python -m pllm.pipelines.train_job` and
`pllm cluster submit`, so each fails the same way, naming the file and the field, before anything starts."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from .config import JobConfig

DEFAULT_CONFIG = "tiny"  # the CPU demo


class ConfigFileError(ValueError):
    """The job config is missing, unreadable or invalid; the message names the file and the field."""


def builtin_configs() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("pllm.configs").iterdir()
                  if p.name.endswith(".yaml"))


def resolve_config_path(config: str | None) -> Path:
    """A YAML path, or the name of a built-in config (`tiny` -> pllm/configs/tiny.yaml); None: the demo's."""
    name = config or DEFAULT_CONFIG
    path = Path(name).expanduser()
    if path.is_file():
        return path.resolve()
    builtin = resources.files("pllm.configs").joinpath(f"{name.removesuffix('.yaml')}.yaml")
    if "/" not in name and builtin.is_file():
        return Path(str(builtin)).resolve()
    raise ConfigFileError(f"config {name!r}: no such file, and not a built-in config "
                          f"(built-in: {', '.join(builtin_configs())})")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`section.field=value` overrides, values parsed as YAML (numbers, booleans and lists work)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigFileError(f"--set expects section.field=value, got {item!r}")
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigFileError(f"--set {item!r}: {p} is not a section")
        node[leaf] = yaml.safe_load(value)
    return data


def load_job_config(config: str | Path | None, overrides: list[str] = ()) -> JobConfig:
    """Read and validate a job config (path or built-in name; None: the demo's) with its overrides."""
    path = resolve_config_path(str(config) if config is not None else None)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    try:
        return JobConfig.from_dict(apply_overrides(data, list(overrides)))
    except ValueError as exc:  # pydantic's ValidationError names each bad field as section.field
        suffix = f" with --set {' '.join(overrides)}" if overrides else ""
        raise ConfigFileError(f"{path}{suffix}: {field_errors(exc)}") from exc


def field_errors(exc: ValueError) -> str:
    """pydantic's errors as one line, each naming its field: "training.batch_size: Input should be a
    valid integer (got 'abc')"; other errors as they are."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']} (got {e['input']!r})"
                     for e in errors())
