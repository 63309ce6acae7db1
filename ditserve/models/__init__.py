"""DiT model families, one file each (flux.py, ...). Nothing is imported here so that loading one family never
pulls in another; what every family's config shares is below."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

from ditserve.errors import ConfigError

C = TypeVar("C")


def config_from_diffusers(cls: type[C], d: dict[str, Any], class_name: str) -> C:
    """A family's config dataclass `cls` from the config.json dict of diffusers' `class_name`. Keys starting with
    "_" (class name, versions) are ignored; any other key the dataclass does not know raises ConfigError (a config
    written by a newer diffusers may mean an architecture change we must not silently ignore)."""
    known = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in d.items() if not k.startswith("_")}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConfigError(f"unsupported {class_name} config keys {unknown}; supported: {sorted(known)}")
    return cls(**kwargs)
