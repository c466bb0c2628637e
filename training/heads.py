"""Linear task heads on frozen embeddings: the ONE head-fitting code path.

`retina probe`, `retina export` and the evaluation protocol all call :func:`fit_linear_head`.

The tasks (name, kind, units, label meaning) come from the registry, :mod:`retinacli.tasks`.

* regression tasks (e.g. ``cst``, µm): ridge regression, alpha chosen by sklearn ``RidgeCV``
  (efficient leave-one-out) over a log grid. Output in the task's units. The head records the range
  of the labels it was fitted on and a plausible output range, that range widened by
  ``PLAUSIBLE_MARGIN`` (10 %) of its width on each side: `retina predict` flags values outside it.
* binary tasks (e.g. ``bcva`` / ``tn``): logistic regression with ``class_weight="balanced"`` (the positive
  rate of real cohorts is far from 50 %, and an unweighted fit drifts to the majority class).
  The decision threshold is the one maximising Youden's J (sensitivity + specificity - 1) on
  out-of-fold probabilities of the training data (patient-grouped folds when ``groups`` is
  given), so it is never tuned on the rows it is applied to. With too few labelled rows per class
  for cross-validation it falls back to in-sample probabilities and says so in ``metrics``.

The modality swap: given the paired embeddings of the other modality (``swap_embeddings``), every
out-of-fold head is also applied to those rows of its held-out fold (same folds, same threshold), and
``metrics["swap"][<modality>]`` records the result, the comparison with the own modality and the
verdict of :func:`retinacli.headinfo.swap_verdict`; only a head that meets it gets
``metrics["cv_by_modality"][<modality>]``, which `retina predict` reads as "validated" there.

Features are standardised before fitting and the scaler is folded back into ``weight`` / ``bias``,
so every head is one affine map ``embedding @ weight + bias`` (then a sigmoid for binary heads):
easy to export to ONNX and to apply in numpy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retinacli.fsutil import atomic_write_json
from retinacli.tasks import TASKS

HEADS_FILE = "heads.json"
CHECKPOINT_FILE = "checkpoints/last.pt"  # contract 4: what load_run loads by default
HEADS_SCHEMA_VERSION = 1

RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-3, 4, 15))
LOGISTIC_C = 1.0  # on standardised features; small cohorts need the regularisation
MAX_FOLDS = 5
# A regression output further than this fraction of the training label range outside that range is
# implausible (a linear head extrapolates without limit: an off-distribution input gave CST -301.6 µm).
PLAUSIBLE_MARGIN = 0.10


@dataclass
class LinearHead:
    """``value = embedding @ weight + bias`` (regression) or ``sigmoid(...)`` (binary)."""

    task: str
    kind: str  # "regression" | "binary"
    weight: np.ndarray  # (D,) float64
    bias: float
    threshold: float | None  # binary: probability at or above which the label is 1
    units: str | None
    label_meaning: str
    metrics: dict[str, Any] = field(default_factory=dict)
    n_train: int = 0
    input_modality: str = "oct"  # which encoder's embeddings the head was fitted on
    checkpoint_sha256: str | None = None  # the run checkpoint whose embeddings it was fitted on
    # regression: {"min", "max"} of the training labels, "margin", plausible "low"/"high"; None for binary
    training_range: dict[str, float] | None = None

    @property
    def embed_dim(self) -> int:
        return int(self.weight.shape[0])

    def decision(self, embeddings: np.ndarray) -> np.ndarray:
        """The affine part: (N, D) -> (N,)."""
        x = np.asarray(embeddings, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.embed_dim:
            raise ValueError(f"{self.task} head expects embeddings (N, {self.embed_dim}), got {x.shape}")
        return x @ self.weight + self.bias

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """Value in ``units`` (regression) or probability of label 1 (binary), shape (N,)."""
        z = self.decision(embeddings)
        return _sigmoid(z) if self.kind == "binary" else z

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weight"] = [float(w) for w in self.weight]
        d["bias"] = float(self.bias)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LinearHead:
        return cls(
            task=d["task"],
            kind=d["kind"],
            weight=np.asarray(d["weight"], dtype=np.float64),
            bias=float(d["bias"]),
            threshold=None if d.get("threshold") is None else float(d["threshold"]),
            units=d.get("units"),
            label_meaning=d.get("label_meaning", ""),
            metrics=dict(d.get("metrics") or {}),
            n_train=int(d.get("n_train", 0)),
            input_modality=d.get("input_modality", "oct"),
            checkpoint_sha256=d.get("checkpoint_sha256"),
            training_range=d.get("training_range"),  # absent in heads fitted before it was recorded
        )


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))  # overflow-free


# --- fitting ------------------------------------------------------------------------------------


def fit_linear_head(
    task: str,
    embeddings: np.ndarray,
    labels: np.ndarray,
    seed: int = 0,
    groups: np.ndarray | None = None,
    input_modality: str = "oct",
    swap_embeddings: Mapping[str, np.ndarray] | None = None,
) -> LinearHead:
    """Fit the head for ``task`` on rows with a finite label.

    ``groups`` (e.g. patient ids) keeps one patient's rows in one fold for the out-of-fold
    metrics and the threshold choice. Rows whose label is NaN/None are ignored.
    ``swap_embeddings``: {modality: (N, D)} embeddings of the other modality, row for row paired with
    ``embeddings``, for the modality swap (module docstring).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    x = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"embeddings (N, D) and labels (N,) disagree: {x.shape} vs {y.shape}")
    others = {m: np.asarray(e, dtype=np.float64) for m, e in (swap_embeddings or {}).items()
              if m != input_modality}
    for modality, other in others.items():
        if other.shape != x.shape:
            raise ValueError(f"swap embeddings of {modality} {other.shape} are not paired with {x.shape}")
    keep = np.isfinite(y) & np.isfinite(x).all(axis=1)
    x, y = x[keep], y[keep]
    others = {m: e[keep] for m, e in others.items()}
    g = None if groups is None else np.asarray(groups)[keep]
    info = TASKS[task]
    if info.kind == "regression":
        if len(y) < 3:
            raise ValueError(f"{task}: need at least 3 labelled rows, got {len(y)}")
        weight, bias, metrics = _fit_ridge(x, y, g, seed, others)
        threshold = None
        training_range = label_range(y)
    else:
        if not set(np.unique(y)) <= {0.0, 1.0}:
            raise ValueError(f"{task}: binary labels must be 0 or 1")
        if len(np.unique(y)) < 2:
            only = int(y[0]) if len(y) else "-"
            raise ValueError(f"{task}: labels have a single class ({only}); cannot fit")
        weight, bias, threshold, metrics = _fit_logistic(x, y, g, seed, others)
        training_range = None
    _record_swap(metrics, info.kind, input_modality)
    return LinearHead(
        task=task,
        kind=info.kind,
        weight=weight,
        bias=bias,
        threshold=threshold,
        units=info.units,
        label_meaning=info.label_meaning,
        metrics=metrics,
        n_train=len(y),
        input_modality=input_modality,
        training_range=training_range,
    )


def label_range(y: np.ndarray, margin: float = PLAUSIBLE_MARGIN) -> dict[str, float]:
    """The labels' range and the plausible output range: [min, max] widened by ``margin`` x its width
    on each side (a constant label gets no widening: any other value is outside what was seen)."""
    low, high = float(np.min(y)), float(np.max(y))
    pad = margin * (high - low)
    return {"min": low, "max": high, "margin": float(margin), "low": low - pad, "high": high + pad}


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    return mean, np.where(scale > 1e-12, scale, 1.0)


def _fold(
    coef: np.ndarray, intercept: float, mean: np.ndarray, scale: np.ndarray
) -> tuple[np.ndarray, float]:
    """Fold standardisation into the affine map: w·(x-m)/s + b = (w/s)·x + (b - Σ w m / s)."""
    weight = coef / scale
    return weight, float(intercept - weight @ mean)


def _folds(y: np.ndarray, groups: np.ndarray | None, seed: int, stratify: bool):
    """Cross-validation splitter and n_splits, or (None, 0) when the data is too small."""
    from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

    n_units = len(np.unique(groups)) if groups is not None else len(y)
    n_splits = min(MAX_FOLDS, n_units)
    if stratify:
        minority = int(min(np.sum(y == 0), np.sum(y == 1)))
        n_splits = min(n_splits, minority)
    if n_splits < 2:
        return None, 0
    if groups is not None:
        if stratify:
            return StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed), n_splits
        return GroupKFold(n_splits=n_splits), n_splits
    if stratify:
        return StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed), n_splits
    return KFold(n_splits=n_splits, shuffle=True, random_state=seed), n_splits


def _ridge_fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, float]:
    from sklearn.linear_model import RidgeCV

    mean, scale = _standardise(x)
    model = RidgeCV(alphas=RIDGE_ALPHAS).fit((x - mean) / scale, y)
    weight, bias = _fold(model.coef_, float(model.intercept_), mean, scale)
    return weight, bias, float(model.alpha_)


def _regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    err = pred - y
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return {
        "mae": float(np.mean(np.abs(err))),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "r2": float(1.0 - np.sum(err**2) / ss_tot) if ss_tot > 0 else float("nan"),
    }


def _fit_ridge(x, y, groups, seed, others=None):
    weight, bias, alpha = _ridge_fit(x, y)
    metrics: dict[str, Any] = {"alpha": alpha, "train": _regression_metrics(y, x @ weight + bias)}
    splitter, n_splits = _folds(y, groups, seed, stratify=False)
    if splitter is not None:
        oof = np.empty_like(y)
        oof_other = {m: np.empty_like(y) for m in others or {}}
        for tr, te in splitter.split(x, y, groups):
            w, b, _ = _ridge_fit(x[tr], y[tr])
            oof[te] = x[te] @ w + b
            for m, pred in oof_other.items():
                pred[te] = others[m][te] @ w + b
        cv_info = {"folds": n_splits, "grouped": groups is not None}
        metrics["cv"] = {**_regression_metrics(y, oof), **cv_info}
        metrics["swap"] = {
            m: {**_regression_metrics(*_finite(y, pred)), **cv_info} for m, pred in oof_other.items()
        }
    return weight, bias, metrics


def _finite(y: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows whose swapped prediction is finite (an unreadable paired item can leave NaN)."""
    ok = np.isfinite(pred)
    return y[ok], pred[ok]


def _record_swap(metrics: dict[str, Any], kind: str, input_modality: str) -> None:
    """Add the verdict to each swap result; a swap that meets the bar becomes ``cv_by_modality``."""
    from retinacli.headinfo import swap_verdict

    swaps = metrics.pop("swap", None)
    if not swaps or "cv" not in metrics:
        return
    metrics["swap"] = {}
    for modality, result in swaps.items():
        verdict = swap_verdict(kind, metrics["cv"], result, input_modality, modality)
        metrics["swap"][modality] = {**result, **verdict}
        if verdict["validated"]:
            metrics.setdefault("cv_by_modality", {})[modality] = dict(result)


def _logistic_fit(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression

    mean, scale = _standardise(x)
    model = LogisticRegression(C=LOGISTIC_C, class_weight="balanced", max_iter=5000, random_state=seed)
    model.fit((x - mean) / scale, y.astype(int))
    return _fold(model.coef_[0], float(model.intercept_[0]), mean, scale)


def youden_threshold(y: np.ndarray, prob: np.ndarray) -> float:
    """Probability threshold maximising sensitivity + specificity - 1 (ties: the middle one)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(y.astype(int), prob)
    j = tpr - fpr
    best = np.flatnonzero(j == j.max())
    t = float(thresholds[best[len(best) // 2]])
    return float(min(max(t, 0.0), 1.0))  # roc_curve's first threshold is +inf


def _binary_metrics(y: np.ndarray, prob: np.ndarray, threshold: float) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, balanced_accuracy_score, roc_auc_score

    both = len(np.unique(y)) == 2
    return {
        "auroc": float(roc_auc_score(y, prob)) if both else float("nan"),
        "auprc": float(average_precision_score(y, prob)) if both else float("nan"),
        "balanced_accuracy": float(balanced_accuracy_score(y.astype(int), (prob >= threshold).astype(int))),
        "positive_rate": float(np.mean(y)),
    }


def _fit_logistic(x, y, groups, seed, others=None):
    weight, bias = _logistic_fit(x, y, seed)
    train_prob = _sigmoid(x @ weight + bias)
    splitter, n_splits = _folds(y, groups, seed, stratify=True)
    metrics: dict[str, Any] = {"C": LOGISTIC_C, "class_weight": "balanced"}
    if splitter is not None:
        oof = np.empty_like(y)
        oof_other = {m: np.empty_like(y) for m in others or {}}
        for tr, te in splitter.split(x, y.astype(int), groups):
            w, b = (weight, bias) if len(np.unique(y[tr])) < 2 else _logistic_fit(x[tr], y[tr], seed)
            # (a fold without one class falls back to the global fit)
            oof[te] = _sigmoid(x[te] @ w + b)
            for m, prob in oof_other.items():
                prob[te] = _sigmoid(others[m][te] @ w + b)
        threshold = youden_threshold(y, oof)
        metrics["threshold_source"] = "youden_j_out_of_fold"
        cv_info = {"folds": n_splits, "grouped": groups is not None}
        metrics["cv"] = {**_binary_metrics(y, oof, threshold), **cv_info}
        # the swap uses the threshold chosen on the own modality: the one the head ships with
        metrics["swap"] = {
            m: {**_binary_metrics(*_finite(y, prob), threshold), **cv_info} for m, prob in oof_other.items()
        }
    else:
        threshold = youden_threshold(y, train_prob)
        metrics["threshold_source"] = "youden_j_in_sample (too few rows per class for cross-validation)"
    metrics["train"] = _binary_metrics(y, train_prob, threshold)
    return weight, bias, threshold, metrics


# --- persistence --------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: store them as null (the one helper, retinacli.jsonutil.clean_json)."""
    from retinacli.jsonutil import clean_json

    return clean_json(value)


def save_heads(
    run_dir: str | Path, heads: list[LinearHead] | dict[str, LinearHead], extra: dict | None = None
) -> Path:
    """Write ``RUN/heads.json`` atomically (replaces heads for the same tasks, keeps the others).

    New heads without a ``checkpoint_sha256`` get the one of ``RUN/checkpoints/last.pt`` (what
    ``load_run`` loads), so ``retina export`` can refuse heads fitted on an older checkpoint.
    """
    run_dir = Path(run_dir)
    new = list(heads.values()) if isinstance(heads, dict) else list(heads)
    checkpoint = run_dir / CHECKPOINT_FILE
    if checkpoint.is_file() and any(h.checkpoint_sha256 is None for h in new):
        from retinacli.package import sha256_file

        digest = sha256_file(checkpoint)
        for head in new:
            head.checkpoint_sha256 = head.checkpoint_sha256 or digest
    current = {h.task: h for h in load_heads(run_dir)} if (run_dir / HEADS_FILE).exists() else {}
    current.update({h.task: h for h in new})
    payload = {
        "schema_version": HEADS_SCHEMA_VERSION,
        "heads": [_json_safe(current[t].to_dict()) for t in sorted(current)],
        **(extra or {}),
    }
    path = run_dir / HEADS_FILE
    atomic_write_json(path, payload)
    return path


def load_heads(run_dir: str | Path) -> list[LinearHead]:
    """Heads stored in ``RUN/heads.json``; an empty list when the run has none."""
    path = Path(run_dir) / HEADS_FILE
    if not path.exists():
        return []
    payload = json.loads(path.read_text(encoding="utf-8"))
    return [LinearHead.from_dict(d) for d in payload.get("heads", [])]
