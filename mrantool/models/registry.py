"""One registry for the MIL heads: `create_head(name, in_dim, n_classes, **options)`.

Options come from TOML, so names and types are validated against each head's typed `__init__` signature.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Mapping
from typing import Any

from mrantool.errors import ConfigError
from mrantool.models.abmil import ABMIL, GatedABMIL
from mrantool.models.base import MILHead
from mrantool.models.clam import CLAMSB
from mrantool.models.dsmil import DSMIL
from mrantool.models.mran import MRAN, MRANReference
from mrantool.models.pooling import MaxPool, MeanPool
from mrantool.models.transmil import TransMIL

HEADS: dict[str, type[MILHead]] = {
    "mran": MRAN,
    "mran-reference": MRANReference,
    "abmil": ABMIL,
    "gated-abmil": GatedABMIL,
    "clam-sb": CLAMSB,
    "transmil": TransMIL,
    "dsmil": DSMIL,
    "mean": MeanPool,
    "max": MaxPool,
}
_FIXED = ("self", "in_dim", "n_classes")


def list_heads() -> list[str]:
    """Names accepted by `create_head`."""
    return list(HEADS)


def head_options(name: str) -> dict[str, tuple[Any, Any]]:
    """A head's options as {option: (type hint, default)}."""
    cls = _head_class(name)
    hints = typing.get_type_hints(cls.__init__)
    params = inspect.signature(cls.__init__).parameters
    return {key: (hints[key], p.default) for key, p in params.items() if key not in _FIXED}


def create_head(name: str, in_dim: int, n_classes: int, **options: Any) -> MILHead:
    """Build head `name`; unknown names, unknown options and wrongly typed values raise ConfigError."""
    spec = head_options(name)
    for key, value in options.items():
        if key not in spec:
            raise ConfigError(
                f"head {name!r} has no option {key!r}; valid options are {sorted(spec)} (fix the model options "
                "in the config file)."
            )
        hint, _ = spec[key]
        if not _matches(value, hint):
            raise ConfigError(
                f"head {name!r} option {key}={value!r} must be of type {_describe(hint)}; fix it in the config file."
            )
    return _head_class(name)(in_dim, n_classes, **options)


def _head_class(name: str) -> type[MILHead]:
    if name not in HEADS:
        raise ConfigError(f"unknown model {name!r}; valid models are {list(HEADS)} (fix --model or the config).")
    return HEADS[name]


def _matches(value: Any, hint: Any) -> bool:
    """Whether a TOML-style value fits a type hint (bool, int, float, str, None, unions, Mapping[str, X])."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin is not None and isinstance(origin, type) and issubclass(origin, Mapping):
        key_hint, value_hint = typing.get_args(hint)
        return isinstance(value, Mapping) and all(
            _matches(k, key_hint) and _matches(v, value_hint) for k, v in value.items()
        )
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, hint) and not (hint is int and isinstance(value, bool))


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "").replace("collections.abc.", "")
