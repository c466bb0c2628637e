"""JSON that is safe both ways: what retina writes never holds NaN/Infinity, what it reads is bounded.

* :func:`clean_json` / :func:`dumps`: every document retina prints or writes goes through here, so a
  non-finite number becomes ``null`` (strict JSON readers, e.g. JavaScript's, refuse ``NaN``).
* :func:`loads_bounded`: parse a hand-editable file (a package descriptor) refusing ``NaN`` /
  ``Infinity`` literals (Python's json accepts them by default), nesting deeper than ``max_depth``
  and documents larger than ``max_bytes``, with a one-line ValueError instead of a RecursionError.

numpy-free: numpy scalars are recognised by their ``item`` method.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 32


def clean_json(value: Any, digits: int | None = None) -> Any:
    """JSON-safe copy: NaN/inf -> None, numpy scalars -> Python; ``digits`` rounds floats to that many
    significant digits (stable text, as evaluation results use)."""
    if isinstance(value, dict):
        return {str(k): clean_json(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v, digits) for v in value]
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return float(f"{value:.{digits}g}") if digits else value
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, str | bytes):
        return clean_json(value.item(), digits)  # numpy scalars
    return value


def dumps(payload: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`clean_json` (payload) with ``allow_nan=False``: never writes NaN."""
    return json.dumps(clean_json(payload), allow_nan=False, **kwargs)


def short_repr(value: Any, limit: int = 40) -> str:
    """``repr`` of a (possibly huge or odd) value cut to ``limit`` characters, for one-line errors."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"is not valid JSON ({name}: numbers must be finite)")


def _bracket_depth(text: str) -> int:
    """Deepest ``[``/``{`` nesting outside strings: checked before parsing, which would recurse."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def loads_bounded(data: bytes, max_bytes: int, max_depth: int = MAX_DEPTH, constants: bool = False) -> Any:
    """Parse UTF-8 JSON ``data``; ValueError (one line, "is ...") when it is too large, too deeply
    nested, holds NaN/Infinity literals or is not valid JSON.

    ``constants``: parse NaN/Infinity literals to floats instead, for a caller that checks each
    number against its field (and so names the field, see :func:`non_finite_paths`)."""
    if len(data) > max_bytes:
        raise ValueError(f"is {len(data)} bytes, more than the {max_bytes} allowed")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    depth = _bracket_depth(text)
    if depth > max_depth:
        raise ValueError(f"is nested {depth} levels deep (at most {max_depth})")
    try:
        return json.loads(text, parse_constant=None if constants else _refuse_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise ValueError(f"is nested too deeply (at most {max_depth} levels)") from None


def non_finite_paths(value: Any, path: str = "") -> list[tuple[str, float]]:
    """(dotted path, value) of every NaN/Infinity in a document, e.g. ``("heads.tn.threshold", nan)``;
    list items are ``files[0]``."""
    found, stack = [], [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            found.append((where, item))
        elif isinstance(item, dict):
            stack.extend((v, f"{where}.{k}" if where else str(k)) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(item))
    return sorted(found, key=lambda pair: pair[0])
