"""Validate a model package descriptor (``retina.json``) against ``retinacli/retina.schema.json``.

A small validator for the JSON Schema subset the descriptor schema uses (type, const, enum,
required, properties, additionalProperties, items, minItems, pattern, minimum, maximum, maxLength,
maxProperties, propertyNames, $ref into ``$defs``), so the base install needs no extra dependency.
Errors name the bad field with its dotted path, e.g.
``heads.cst.threshold: must be number or null, got 'high'``.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources
from typing import Any

from retinacli.jsonutil import non_finite_paths
from retinacli.jsonutil import short_repr as _r

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
        return False  # 3.0 is not a size or a count: exporters write ints
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
        errors.append(f"{_where(path)}: must be {schema['const']!r}, got {_r(value)}")
        return
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(repr(v) for v in schema["enum"])
        errors.append(f"{_where(path)}: must be one of {allowed}, got {_r(value)}")
        return
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, n) for n in names):
            got = type(value).__name__ if value is not None else "null"
            errors.append(f"{_where(path)}: must be {' or '.join(names)}, got {got} {_r(value)}")
            return
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(f"{_where(path)}: {_r(value)} does not match the pattern {schema['pattern']}")
    if isinstance(value, str) and "maxLength" in schema and len(value) > schema["maxLength"]:
        errors.append(f"{_where(path)}: {len(value)} characters, more than the {schema['maxLength']} allowed")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{_where(path)}: must be >= {schema['minimum']}, got {_r(value)}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{_where(path)}: must be <= {schema['maximum']}, got {_r(value)}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{_where(path)}: missing required field {_r(_join(path, key))}")
        if "maxProperties" in schema and len(value) > schema["maxProperties"]:
            errors.append(f"{_where(path)}: {len(value)} entries, more than the {schema['maxProperties']} "
                          "allowed")
        for key in value:
            if "propertyNames" in schema:
                _validate(key, schema["propertyNames"], f"{_join(path, '(key)')} {_r(key)}", root, errors)
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, sub in value.items():
            if key in props:
                _validate(sub, props[key], _join(path, key), root, errors)
            elif extra is False:
                errors.append(f"{_where(path)}: unexpected field {_r(_join(path, key))}")
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
    if errors or not isinstance(descriptor, dict):
        return errors
    return semantic_errors(descriptor)


# Heads' metrics are informational (a metric can be undefined, e.g. R² of a constant label): a NaN
# there is shown as null, never used. Everywhere else a non-finite number would be silent nonsense.
_INFORMATIONAL = re.compile(r"^heads\.[^.]+\.metrics(\.|\[|$)")


def semantic_errors(descriptor: dict[str, Any]) -> list[str]:
    """What the schema cannot say, for a descriptor that passed it: every number finite, the
    preprocessing spec applicable (retinacli.preprocess.spec_errors), each encoder's declared input
    shape equal to what that spec produces, output shapes (batch, embed_dim), sane embed_dim."""
    from retinacli.preprocess import spec_errors

    errors = [f"{_r(p, 200)[1:-1]}: must be a finite number, got {_r(v)}"
              for p, v in non_finite_paths(descriptor) if not _INFORMATIONAL.match(p)]
    dim = descriptor["embed_dim"]
    spec_problems = [f"preprocessing.{e}" for e in spec_errors(descriptor["preprocessing"])]
    errors += spec_problems
    for modality, entry in descriptor["inputs"].items():
        where = f"inputs.{modality}"
        if entry["modality"] != modality:
            errors.append(f"{where}.modality: must be {modality!r}, got {_r(entry['modality'])}")
        shape = entry["shape"]
        if not isinstance(shape[0], str) or any(not isinstance(d, int) or d < 1 for d in shape[1:]):
            errors.append(f"{where}.shape: must be ['batch', positive integers...], got {_r(shape)}")
        elif not spec_problems:
            expected = _spec_shape(modality, descriptor["preprocessing"])
            if list(shape[1:]) != expected:
                errors.append(f"{where}.shape: {_r(shape)} is not what preprocessing produces "
                              f"(['batch', {', '.join(map(str, expected))}])")
            if entry["channels"] != expected[0]:
                errors.append(f"{where}.channels: must be {expected[0]} (the preprocessing), "
                              f"got {_r(entry['channels'])}")
        out = entry.get("output_shape")
        if out is not None and (len(out) != 2 or not isinstance(out[0], str) or out[1] != dim):
            errors.append(f"{where}.output_shape: must be ['batch', {dim}] (embed_dim), got {_r(out)}")
    for task, head in descriptor["heads"].items():
        if head["task"] != task:
            errors.append(f"heads.{task}.task: must be {task!r} (its key), got {_r(head['task'])}")
        errors += _training_range_errors(task, head)
    errors += _ood_errors(descriptor.get("ood"))
    if descriptor.get("card") is not None:
        errors += _card_text_errors(descriptor["card"])
    return errors


# Line breaks are allowed in card text (a TOML multi-line string); every other C0/C1 control character,
# line/paragraph separators and bidirectional overrides would act on a terminal or hide text.
_CARD_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e"
                           "\u2066-\u2069]")


def _card_text_errors(card: dict[str, Any]) -> list[str]:
    """The card's text (a card that passed the schema): no control characters, required values not
    blank. Lengths and metric counts are bounded by the schema (maxLength, maxProperties)."""
    from retinacli.modelcard import REQUIRED_KEYS

    texts = [(f"card.{k}", v) for k, v in card.items() if isinstance(v, str)]
    validation = card.get("validation")
    if isinstance(validation, dict):
        if isinstance(validation.get("summary"), str):
            texts.append(("card.validation.summary", validation["summary"]))
        texts += [(f"card.validation.metrics (key) {_r(k)}", k) for k in validation.get("metrics") or {}]
    errors = []
    for where, text in texts:
        bad = _CARD_CONTROL.search(text)
        if bad:
            errors.append(f"{where}: holds the control character {_r(bad.group())} at offset {bad.start()}")
    errors += [f"card.{k}: must not be blank" for k in REQUIRED_KEYS if not str(card.get(k, "x")).strip()]
    return errors


def card_errors(card: Any) -> list[str]:
    """Every problem of a model card on its own (schema and text checks), as :func:`descriptor_errors`
    reports them inside a descriptor: ``card.<field>: ...``."""
    schema = load_schema()
    errors: list[str] = []
    _validate(card, schema["properties"]["card"], "card", schema, errors)
    if errors:
        return errors
    errors = [f"{_r(p, 200)[1:-1]}: must be a finite number, got {_r(v)}"
              for p, v in non_finite_paths(card, "card")]
    return errors + _card_text_errors(card)


def _ood_errors(ood: dict[str, Any] | None) -> list[str]:
    """The ``ood`` entry: at least one modality, k no more than the items, quantile keys in [0, 1],
    input statistic ranges with low <= high.
    The centroids' shape (k x embed_dim) is checked against its file when the package is verified
    (retinacli.ood.reference_errors)."""
    if ood is None:
        return []
    if not ood["modalities"]:
        return ["ood.modalities: must name at least one modality"]
    errors = []
    for modality, stats in ood["modalities"].items():
        where = f"ood.modalities.{modality}"
        if stats["k"] > stats["items"]:
            errors.append(f"{where}.k: {stats['k']} centroids from {stats['items']} items")
        for key in stats["held_out_quantiles"]:
            try:
                ok = 0.0 <= float(key) <= 1.0
            except ValueError:
                ok = False
            if not ok:
                errors.append(f"{where}.held_out_quantiles: key {_r(key)} is not a quantile in [0, 1]")
        for name, rng in ((stats.get("inputs") or {}).get("ranges") or {}).items():
            # finiteness is checked above; a reversed range would flag every item
            if all(isinstance(v, int | float) and v == v for v in rng.values()) and rng["low"] > rng["high"]:
                errors.append(f"{where}.inputs.ranges.{name}: low {rng['low']} is above high {rng['high']}")
    return errors


def _training_range_errors(task: str, head: dict[str, Any]) -> list[str]:
    """A regression head's training range: low <= min <= max <= high (finiteness is checked above)."""
    rng = head.get("training_range")
    if rng is None:
        return []
    where = f"heads.{task}.training_range"
    if head["kind"] != "regression":
        return [f"{where}: only regression heads have a training range, {task!r} is {head['kind']}"]
    values = [rng[k] for k in ("low", "min", "max", "high")]
    if not all(isinstance(v, int | float) and v == v and abs(v) != float("inf") for v in values):
        return []  # already reported as not finite
    if not values[0] <= values[1] <= values[2] <= values[3]:
        return [f"{where}: must satisfy low <= min <= max <= high, got low {_r(values[0])}, "
                f"min {_r(values[1])}, max {_r(values[2])}, high {_r(values[3])}"]
    return []


def _spec_shape(modality: str, spec: dict[str, Any]) -> list[int]:
    """The preprocessed item shape (no batch axis) that `spec` produces for `modality`."""
    if modality == "oct":
        o = spec["oct"]
        return [1, o["slices"], o["height"], o["width"]]
    f = spec["fundus"]
    return [f["channels"], f["size"], f["size"]]



def validate_descriptor(descriptor: Any) -> None:
    """Raise ValueError naming the first bad field (and how many more there are)."""
    errors = descriptor_errors(descriptor)
    if errors:
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ValueError(errors[0] + more)
