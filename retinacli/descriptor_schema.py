"""Validate a model package descriptor (``retina.json``) against ``retinacli/retina.schema.json``.

A small validator for the JSON Schema subset the descriptor schema uses (type, const, enum,
required, properties, additionalProperties, items, minItems, pattern, minimum, maximum, $ref
into ``$defs``), so the base install needs no extra dependency. Errors name the bad field with
its dotted path, e.g. ``heads.cst.threshold: must be number or null, got 'high'``.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources
from typing import Any

SCHEMA_FILE = "retina.schema.json"
# retina.json layout version (docs/model-package.md): a change that removes a field or changes its
# meaning bumps it; readers accept every version in READABLE_SCHEMA_VERSIONS and refuse newer ones.
SCHEMA_VERSION = 1
READABLE_SCHEMA_VERSIONS = (1,)

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "null": (type(None),),
}


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    """The descriptor JSON Schema shipped inside the retinacli package."""
    text = resources.files("retinacli").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def _is_type(value: Any, name: str) -> bool:
    if name in ("number", "integer") and isinstance(value, bool):
        return False  # JSON booleans are not numbers
    if name == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES[name])


def _where(path: str) -> str:
    return path or "(top level)"


def _validate(value: Any, schema: dict[str, Any], path: str, root: dict[str, Any], errors: list[str]) -> None:
    if "$ref" in schema:
        ref = schema["$ref"]
        if not ref.startswith("#/$defs/"):
            raise ValueError(f"unsupported $ref {ref!r} in the descriptor schema")
        schema = root["$defs"][ref.split("/")[-1]]
    if "const" in schema and value != schema["const"]:
        errors.append(f"{_where(path)}: must be {schema['const']!r}, got {value!r}")
        return
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(repr(v) for v in schema["enum"])
        errors.append(f"{_where(path)}: must be one of {allowed}, got {value!r}")
        return
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, n) for n in names):
            got = type(value).__name__ if value is not None else "null"
            errors.append(f"{_where(path)}: must be {' or '.join(names)}, got {got} {value!r:.40}")
            return
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(f"{_where(path)}: {value!r} does not match the pattern {schema['pattern']}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{_where(path)}: must be >= {schema['minimum']}, got {value}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{_where(path)}: must be <= {schema['maximum']}, got {value}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{_where(path)}: missing required field '{_join(path, key)}'")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, sub in value.items():
            if key in props:
                _validate(sub, props[key], _join(path, key), root, errors)
            elif extra is False:
                errors.append(f"{_where(path)}: unexpected field '{_join(path, key)}'")
            elif isinstance(extra, dict):
                _validate(sub, extra, _join(path, key), root, errors)
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            errors.append(f"{_where(path)}: needs at least {schema['minItems']} item(s), got {len(value)}")
        if "items" in schema:
            for i, item in enumerate(value):
                _validate(item, schema["items"], f"{path}[{i}]", root, errors)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def descriptor_errors(descriptor: Any) -> list[str]:
    """Every schema violation, one readable line each (empty when the descriptor is valid)."""
    schema = load_schema()
    errors: list[str] = []
    version = descriptor.get("schema_version") if isinstance(descriptor, dict) else None
    if version is not None and version not in READABLE_SCHEMA_VERSIONS:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION
        readable = ", ".join(map(str, READABLE_SCHEMA_VERSIONS))
        action = "newer than this retina: upgrade retina" if newer else "re-export the package"
        return [
            f"schema_version: the package has schema version {version!r}, this retina reads schema "
            f"version {readable} ({action})"
        ]
    _validate(descriptor, schema, "", schema, errors)
    return errors


def validate_descriptor(descriptor: Any) -> None:
    """Raise ValueError naming the first bad field (and how many more there are)."""
    errors = descriptor_errors(descriptor)
    if errors:
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ValueError(errors[0] + more)
