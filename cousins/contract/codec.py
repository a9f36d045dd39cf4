"""How a typed record becomes JSON and back: the codec every JSON file of a run goes through.

The records themselves are declared in `records.py` (manifest.json and the stages' `_SUCCESS`
markers) and `summary.py` (summary.json); this module owns turning them into plain JSON data
(`encode`) and reading a file's parsed JSON back into its record (`decode`), checked all the way
down: a mismatch is a RecordError that names the first key that is missing, unknown or of the
wrong type ("manifest.row_counts.tiny-teacher.rows: expected int, got str"). A field declared
with `optional()` is left out of the JSON while it is None, so files written before it existed
decode, and a record encodes back to exactly the JSON it was read from.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from typing import Any, Union


class RecordError(ValueError):
    """A JSON document that does not match its declared record."""


def optional(default: Any = None):
    """A field that may be absent from the JSON (and is omitted while None)."""
    return field(default=default, metadata={"omit_none": True})


# --- encode / decode -------------------------------------------------------------------------------

def encode(obj: Any) -> Any:
    """A record (or a container of records) as plain JSON data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if value is None and f.metadata.get("omit_none"):
                continue
            out[f.name] = encode(value)
        return out
    if isinstance(obj, dict):
        return {str(k): encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):  # numpy scalars
        return obj.item()
    return obj


def decode(cls: Any, data: Any, where: str = "") -> Any:
    """`data` (parsed JSON) as an instance of `cls`, checked all the way down."""
    where = where or getattr(cls, "__name__", "value").lower()
    return _decode(cls, data, where)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _decode(tp: Any, data: Any, where: str) -> Any:
    if tp is Any:
        return data
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if data is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _decode(arg, data, where)
            except RecordError as e:
                errors.append(str(e))
        raise RecordError(errors[0] if len(errors) == 1 else f"{where}: {data!r:.60} matches none of {args}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise RecordError(f"{where}: expected an object, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise RecordError(f"{where}: unknown keys {unknown}")
        hints, values = _hints(tp), {}
        for name, f in fields.items():
            if name in data:
                values[name] = _decode(hints[name], data[name], f"{where}.{name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecordError(f"{where}: missing key {name!r}")
        return tp(**values)
    if origin is list:
        if not isinstance(data, list):
            raise RecordError(f"{where}: expected a list, got {type(data).__name__}")
        (item,) = typing.get_args(tp)
        return [_decode(item, v, f"{where}[{i}]") for i, v in enumerate(data)]
    if origin is dict:
        if not isinstance(data, dict):
            raise RecordError(f"{where}: expected an object, got {type(data).__name__}")
        _, item = typing.get_args(tp)
        return {k: _decode(item, v, f"{where}.{k}") for k, v in data.items()}
    if tp is float:
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return data  # JSON writes 1.0 as 1.0 but a whole float may come back as an int
        raise RecordError(f"{where}: expected a number, got {type(data).__name__}")
    if tp in (int, str, bool):
        if isinstance(data, tp) and not (tp is int and isinstance(data, bool)):
            return data
        raise RecordError(f"{where}: expected {tp.__name__}, got {type(data).__name__}")
    raise TypeError(f"{where}: cannot decode into {tp!r}")  # a declaration this module does not support
