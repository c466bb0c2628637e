"""Model cards: the optional ``card`` entry of ``retina.json`` (docs/model-package.md "Model card").

A card says what a package may be used for, under which licence, what it was trained on and how it
was validated. ``retina export`` assembles it from its options and/or a card file (:func:`assemble_card`);
``retina models show`` and ``retina info`` display it (:func:`card_fields`). The card is not part of
the model id (retinacli.package.model_ids_for): adding or editing one never invalidates a store.

numpy-free and torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from retinacli.errors import UsageError

# Keys in the order they are shown; the first three are required in a card.
CARD_KEYS = ("licence", "intended_use", "out_of_scope_use", "training_data", "validation", "authors",
             "contact", "limitations")
REQUIRED_KEYS = ("licence", "intended_use", "training_data")
# the export option that sets each key
OPTION_OF = {"licence": "--licence", "intended_use": "--intended-use", "training_data": "--training-data"}
MAX_CARD_FILE_BYTES = 256 * 1024  # a card is a few KB of text
CARD_FILE_SUFFIXES = (".toml", ".json")
NO_CARD = "no model card"


def load_card_file(path: Path) -> dict[str, Any]:
    """Parse a ``.toml`` or ``.json`` card file; UsageError naming the file and the reason."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in CARD_FILE_SUFFIXES:
        raise UsageError(f"{path}: a model card file must be .toml or .json")
    try:
        size = path.stat().st_size
        if size > MAX_CARD_FILE_BYTES:
            raise UsageError(f"{path}: {size} bytes, more than the {MAX_CARD_FILE_BYTES} a card may have")
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the model card ({exc.strerror or exc})") from None
    try:
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(raw.decode("utf-8"))
        else:
            from retinacli.jsonutil import loads_bounded

            data = loads_bounded(raw, MAX_CARD_FILE_BYTES, 8)
    except UnicodeDecodeError:
        raise UsageError(f"{path}: the model card is not UTF-8 text") from None
    except (ValueError, json.JSONDecodeError) as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise UsageError(f"{path}: not a valid model card ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a model card must be a JSON object (or TOML table) of card keys")
    for key in data:
        if key not in CARD_KEYS:
            raise UsageError(f"{path}: unknown model card key {key!r} (known: {', '.join(CARD_KEYS)})")
    return data


def assemble_card(card_file: Path | None = None, licence: str | None = None, intended_use: str | None = None,
                  training_data: str | None = None) -> dict[str, Any] | None:
    """The card for ``retina export``: the file's keys, overridden by the options given; None when
    neither is given. UsageError (before any export work) for a missing required key or a value the
    descriptor would refuse (retinacli.descriptor_schema.card_errors)."""
    from retinacli.descriptor_schema import card_errors

    options = {"licence": licence, "intended_use": intended_use, "training_data": training_data}
    if card_file is None and all(v is None for v in options.values()):
        return None
    card = load_card_file(card_file) if card_file is not None else {}
    card.update({k: v for k, v in options.items() if v is not None})
    source = str(card_file) if card_file is not None else "model card"
    for key in REQUIRED_KEYS:
        if key not in card:
            where = f" or put {key} in the --card file" if card_file is not None else " or --card FILE"
            raise UsageError(f"{source}: {key} is missing (give {OPTION_OF[key]}{where}); "
                             f"a model card needs {', '.join(REQUIRED_KEYS)}")
    errors = card_errors(card)
    if errors:
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise UsageError(f"{source}: {errors[0]}{more}")
    return {k: card[k] for k in CARD_KEYS if k in card}


def _text(value: str) -> str:
    return " ".join(value.split())  # a multi-line card text shows as one wrapped paragraph


def validation_text(descriptor: dict[str, Any]) -> str:
    """The card's validation, or (absent) the heads' cross-validated metrics from the descriptor."""
    from retinacli.headinfo import quality_text

    validation = (descriptor.get("card") or {}).get("validation")
    if isinstance(validation, str):
        return _text(validation)
    if isinstance(validation, dict):
        parts = [_text(validation["summary"])] if validation.get("summary") else []
        parts += [f"{k} {v:g}" for k, v in (validation.get("metrics") or {}).items()]
        return "; ".join(parts)
    heads = descriptor.get("heads") or {}
    if not heads:
        return "not in the card; the package has no task heads"
    return "not in the card; heads: " + "; ".join(f"{t} {quality_text(h)}" for t, h in heads.items())


def card_fields(descriptor: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of the package's card, or one "no model card" row."""
    card = descriptor.get("card")
    if not isinstance(card, dict):
        return [("model card", NO_CARD)]
    rows = []
    for key in CARD_KEYS:
        label = key.replace("_", " ")
        if key == "validation":
            rows.append((label, validation_text(descriptor)))
        elif card.get(key):
            rows.append((label, _text(card[key])))
    return rows
