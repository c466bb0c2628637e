"""What a task head's prediction means and how far to trust it (`retina predict`, `retina models show`).

Read from the head's entry in retina.json (``heads.<task>``, docs/model-package.md):

* **context**: label meaning, units, threshold, the cross-validated quality (binary: AUROC; regression:
  MAE and R²) from ``metrics.cv``;
* **reliability**: a head whose cross-validated AUROC is below :data:`MIN_AUROC` (R² below
  :data:`MIN_R2`), or that has no cross-validated result, is unreliable, with the reason;
* **plausibility**: a regression value outside ``training_range.low``-``high`` (the training labels'
  range widened by ``training_range.margin``) is implausible; packages exported before the range was
  recorded say so instead;
* **validation**: a head applied to another modality than its ``input_modality`` is "not validated on
  <modality>" unless ``metrics.cv_by_modality.<modality>`` holds a cross-validated result for it.
  `retina probe` writes that result only when the modality swap meets the bar of :func:`swap_verdict`;
  ``metrics.swap.<modality>`` keeps the swap's result and verdict either way.
"""

from __future__ import annotations

import math
from typing import Any

RESEARCH_USE = "Predictions are for research use only, not for diagnosis or treatment decisions."
MIN_AUROC = 0.6  # below it a binary head separates the classes barely better than chance
MIN_R2 = 0.1  # below it a regression head explains almost none of the label's variance
NO_RANGE = "no training range recorded in this package (values are not checked for plausibility)"
# The modality swap (a head applied to the paired embeddings of the other modality) is validated when
# regression: its MAE is at most SWAP_MAX_MAE_RATIO x the MAE on the head's own modality (issue 21's
# target) and its R² at least MIN_R2 (so "validated" never marks a head worse than the label mean);
# binary: its AUROC is at least MIN_AUROC and at most SWAP_MAX_AUROC_DROP below the own modality's.
SWAP_MAX_MAE_RATIO = 1.5
SWAP_MAX_AUROC_DROP = 0.05
_BAR_EPS = 1e-9  # a bar met exactly is met (0.80 - 0.75 is 0.05000000000000004 in floats)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def cv_quality(head: dict[str, Any], metrics: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The cross-validated quality (binary: auroc; regression: mae, r2; plus folds), None without one."""
    cv = (metrics if metrics is not None else (head.get("metrics") or {})).get("cv")
    if not isinstance(cv, dict):
        return None
    keys = ("mae", "r2") if head.get("kind") == "regression" else ("auroc",)
    quality = {k: _number(cv.get(k)) for k in keys}
    if all(v is None for v in quality.values()):
        return None
    if cv.get("folds") is not None:
        quality["folds"] = cv.get("folds")
    return quality


def reliability(head: dict[str, Any]) -> tuple[bool, str]:
    """(reliable, reason): the reason names the number and the bar, or that there is none."""
    quality = cv_quality(head)
    if quality is None:
        return False, "no cross-validated result in the package"
    if head.get("kind") == "regression":
        r2 = quality.get("r2")
        if r2 is None:
            return False, "cross-validated R² is undefined"
        if r2 < MIN_R2:
            return False, f"cross-validated R² {r2:.2f} is below {MIN_R2}"
        return True, f"cross-validated R² {r2:.2f} >= {MIN_R2}"
    auroc = quality["auroc"]
    if auroc < MIN_AUROC:
        return False, f"cross-validated AUROC {auroc:.2f} is below {MIN_AUROC}"
    return True, f"cross-validated AUROC {auroc:.2f} >= {MIN_AUROC}"


def quality_text(head: dict[str, Any]) -> str:
    """'cv MAE 12.3 µm, R² 0.45 (5 folds)' / 'cv AUROC 0.81 (5 folds)' / 'no cross-validated result'."""
    quality = cv_quality(head)
    if quality is None:
        return "no cross-validated result"
    folds = f" ({quality['folds']} folds)" if quality.get("folds") is not None else ""
    if head.get("kind") == "regression":
        mae = "-" if quality["mae"] is None else f"{quality['mae']:.1f} {head.get('units') or ''}".rstrip()
        r2 = "-" if quality["r2"] is None else f"{quality['r2']:.2f}"
        return f"cv MAE {mae}, R² {r2}{folds}"
    return f"cv AUROC {quality['auroc']:.2f}{folds}"


def reliability_text(head: dict[str, Any]) -> str:
    reliable, reason = reliability(head)
    return f"reliable ({reason})" if reliable else f"UNRELIABLE: {reason}"


def _fmt(value: float) -> str:
    return f"{value:.1f}"


def range_text(head: dict[str, Any]) -> str | None:
    """'180.0 to 620.0 µm (±10 %)', None when the head records no training range."""
    rng = head.get("training_range")
    if not isinstance(rng, dict):
        return None
    units = f" {head['units']}" if head.get("units") else ""
    return f"{_fmt(rng['min'])} to {_fmt(rng['max'])}{units} (±{rng['margin'] * 100:g} %)"


def plausibility(head: dict[str, Any], value: float) -> tuple[bool | None, str]:
    """(plausible, note) for a regression value: None and a note when no range is recorded."""
    rng = head.get("training_range")
    if not isinstance(rng, dict):
        return None, NO_RANGE
    if math.isfinite(value) and rng["low"] <= value <= rng["high"]:
        return True, ""
    return False, f"outside the training range {range_text(head)}"


def validation(head: dict[str, Any], modality: str | None) -> tuple[bool, str]:
    """(validated, note) for applying the head to items of ``modality``."""
    fitted_on = head.get("input_modality", "oct")
    if modality is None or modality == fitted_on:
        return True, ""
    swapped = ((head.get("metrics") or {}).get("cv_by_modality") or {}).get(modality)
    if isinstance(swapped, dict) and cv_quality(head, {"cv": swapped}) is not None:
        return True, ""
    return False, f"not validated on {modality} (the head was fitted on {fitted_on} embeddings)"


def swap_bar(kind: str, fitted_on: str, applied_to: str) -> str:
    """The swap's bar in words (recorded as ``criterion``; shown by `predict` from these constants)."""
    if kind == "regression":
        return (f"MAE on {applied_to} <= {SWAP_MAX_MAE_RATIO:g} x MAE on {fitted_on} "
                f"and R² on {applied_to} >= {MIN_R2:g}")
    return (f"AUROC on {applied_to} >= {MIN_AUROC:g} and at most {SWAP_MAX_AUROC_DROP:g} below "
            f"the AUROC on {fitted_on}")


def swap_verdict(kind: str, own: dict[str, Any], other: dict[str, Any], fitted_on: str,
                 applied_to: str) -> dict[str, Any]:
    """The bar for a head fitted on ``fitted_on`` applied to ``applied_to``: ``own`` and ``other`` are the
    cross-validated metrics on the same folds. Returns the comparison, ``criterion`` (the bar in words)
    and ``validated``."""
    if kind == "regression":
        own_mae, mae, r2 = _number(own.get("mae")), _number(other.get("mae")), _number(other.get("r2"))
        ratio = None
        if own_mae is not None and mae is not None:
            ratio = mae / own_mae if own_mae > 0 else (1.0 if mae == 0 else math.inf)
        ok = ratio is not None and ratio <= SWAP_MAX_MAE_RATIO + _BAR_EPS and r2 is not None and r2 >= MIN_R2
        return {
            "own_mae": own_mae,
            "ratio": ratio,
            "criterion": swap_bar(kind, fitted_on, applied_to),
            "validated": bool(ok),
        }
    own_auroc, auroc = _number(own.get("auroc")), _number(other.get("auroc"))
    drop = None if own_auroc is None or auroc is None else own_auroc - auroc
    ok = drop is not None and auroc >= MIN_AUROC and drop <= SWAP_MAX_AUROC_DROP + _BAR_EPS
    return {
        "own_auroc": own_auroc,
        "auroc_drop": drop,
        "criterion": swap_bar(kind, fitted_on, applied_to),
        "validated": bool(ok),
    }


def swap_text(head: dict[str, Any], modality: str | None) -> str | None:
    """The recorded swap check on ``modality`` in words ('cv MAE 95.0 µm, R² 0.30 (5 folds), 1.58x the
    MAE on oct; bar: ...'), None when the head records none (or ``modality`` is its own)."""
    if modality is None or modality == head.get("input_modality", "oct"):
        return None
    swap = ((head.get("metrics") or {}).get("swap") or {}).get(modality)
    if not isinstance(swap, dict) or cv_quality(head, {"cv": swap}) is None:
        return None
    fitted_on = head.get("input_modality", "oct")
    text = quality_text({**head, "metrics": {"cv": swap}})
    if head.get("kind") == "regression" and _number(swap.get("ratio")) is not None:
        text += f", {swap['ratio']:.2f}x the MAE on {fitted_on}"
    elif head.get("kind") != "regression" and _number(swap.get("auroc_drop")) is not None:
        drop = swap["auroc_drop"]
        text += f", {abs(drop):.2f} {'below' if drop >= 0 else 'above'} the AUROC on {fitted_on}"
    return f"{text}; bar: {swap_bar(head.get('kind', ''), fitted_on, modality)}"


def _swap_quality(head: dict[str, Any], modality: str | None) -> dict[str, Any] | None:
    """The recorded cross-validated quality on ``modality`` for a head fitted on another one, if any."""
    if modality is None or modality == head.get("input_modality", "oct"):
        return None
    swapped = ((head.get("metrics") or {}).get("cv_by_modality") or {}).get(modality)
    return cv_quality(head, {"cv": swapped}) if isinstance(swapped, dict) else None


def record_context(head: dict[str, Any], record: dict[str, Any], modality: str | None) -> dict[str, Any]:
    """Per-record fields: ``plausible`` (regression only), ``validated`` and ``note`` ('; '-joined)."""
    notes = []
    extra: dict[str, Any] = {}
    if "value" in record:  # regression
        extra["plausible"], note = plausibility(head, float(record["value"]))
        notes.append(note)
    extra["validated"], note = validation(head, modality)
    notes.append(note)
    extra["note"] = "; ".join(n for n in notes if n)
    return extra


def head_summary(task: str, head: dict[str, Any], modality: str | None = None) -> dict[str, Any]:
    """The JSON ``head`` object of `retina predict`: what the head predicts and how far to trust it."""
    reliable, reason = reliability(head)
    validated, _note = validation(head, modality)
    return {
        "task": task,
        "kind": head.get("kind"),
        "input_modality": head.get("input_modality", "oct"),
        "applied_to": modality or head.get("input_modality", "oct"),
        "validated": validated,
        # a head applied to another modality: its recorded cross-validated result there, if any
        "cv_applied": _swap_quality(head, modality),
        # the recorded swap check on that modality in words (met or missed), None without one
        "swap_check": swap_text(head, modality),
        "units": head.get("units"),
        "label_meaning": head.get("label_meaning"),
        "threshold": head.get("threshold"),
        "cv": cv_quality(head),
        "reliable": reliable,
        "reason": reason,
        "training_range": head.get("training_range"),
        "research_use": RESEARCH_USE,
    }
