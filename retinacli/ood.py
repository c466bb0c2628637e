"""Out-of-distribution check: does an item look like the package's training data? (no torch)

A package exported by this retina records, per modality, k centroids of its training embeddings (in
``ood_reference.json``, listed and hashed like the graphs) and a threshold in retina.json's ``ood``
entry: the 1st percentile of held-out training items' scores (training/export/ood.py). An item's
score is the cosine similarity of its embedding to the nearest centroid; below the threshold it is
flagged. Packages without the entry (older exports) have no check, and commands say so once.

A second check looks at the model's input, not its output: ``input_statistics`` of the preprocessed
array (roughness, anisotropy, colour, ...) must lie within the training items' range recorded in
``ood.modalities.<m>.inputs`` (the 0.5th-99.5th percentiles widened by INPUT_MARGIN of their width each
side, at least INPUT_FLOOR). Trained encoders map noise close to real items; its pixels are not close.
An item is flagged when either check fails. Packages exported before this have the embedding check only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

REFERENCE_FILE = "ood_reference.json"
REFERENCE_FORMAT = "retina-ood-reference"
REFERENCE_VERSION = 1
METHOD = "nearest-centroid-cosine"
QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5)
NO_CHECK = "no out-of-distribution check in this package"
MAX_REFERENCE_BYTES = 64 << 20  # 16 centroids x 2 modalities of any sane embed_dim fit easily
INPUT_QUANTILES = (0.005, 0.995)  # the training range of each input statistic, before widening
INPUT_MARGIN = 0.5  # widened by half the inter-quantile width each side ...
INPUT_FLOOR = 0.05  # ... and at least this much, so a near-constant statistic does not flag everything
_TINY = 1e-6  # a constant image has std 0: its ratios are then 0, not a division error


def input_statistic_names(modality: str, channels: int = 3) -> list[str]:
    """The names of `input_statistics`' columns, in order (fundus: `channels` of the spec)."""
    if modality == "oct":
        return ["mean", "std", "roughness_h", "roughness_v", "anisotropy", "slice_change", "dark_fraction",
                "row_profile"]
    named = {3: ["red", "green", "blue"], 1: ["gray"]}
    colours = named.get(channels, [f"channel{c}" for c in range(channels)])
    names = [f"mean_{c}" for c in colours] + [f"std_{c}" for c in colours]
    if channels == 3:
        names += ["red_minus_green", "green_minus_blue"]
    return [*names, "roughness_h", "roughness_v", "anisotropy", "centre_minus_corners"]


def input_statistics(modality: str, arrays: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(N, F) statistics of preprocessed items (retinacli.preprocess: fundus (N, C, S, S), OCT
    (N, 1, slices, H, W)) and their names: what the encoder sees, independent of what it learned.

    roughness_h / _v: mean |difference of horizontal / vertical neighbours| / std (pixel noise ~1.1,
    photographs far lower); anisotropy: mean |vertical difference| / mean |horizontal difference|
    (B-scans have horizontal layers); fundus colour differences and centre minus corners (a fundus
    camera's round field leaves dark corners); OCT slice_change: mean |difference of neighbouring
    B-scans| / std; dark_fraction: share of values in the lowest tenth of the volume's value range;
    row_profile: std of the per-row means / std (layers make rows differ)."""
    arrays = np.asarray(arrays)
    names = input_statistic_names(modality, 1 if modality == "oct" else arrays.shape[1])
    # in chunks: the differences are temporaries the size of the input (export passes a whole cohort)
    chunks = [_input_statistics(modality, arrays[i:i + 32]) for i in range(0, len(arrays), 32)]
    return (np.concatenate(chunks) if chunks else np.zeros((0, len(names)))), names


def _input_statistics(modality: str, arrays: np.ndarray) -> np.ndarray:
    x = np.asarray(arrays, dtype=np.float32)
    if modality == "oct":
        x = x.reshape(len(x), x.shape[-3], x.shape[-2], x.shape[-1])  # (N, slices, H, W)
    n = len(x)
    flat = x.reshape(n, -1)
    if modality == "oct":
        std = np.maximum(flat.std(axis=1), _TINY)
        dh = np.abs(np.diff(x, axis=3)).reshape(n, -1).mean(axis=1)
        dv = np.abs(np.diff(x, axis=2)).reshape(n, -1).mean(axis=1)
        ds = np.abs(np.diff(x, axis=1)).reshape(n, -1).mean(axis=1) if x.shape[1] > 1 else np.zeros(n)
        lo, hi = flat.min(axis=1), flat.max(axis=1)
        dark = (flat < (lo + 0.1 * (hi - lo))[:, None]).mean(axis=1)
        rows = x.mean(axis=3).std(axis=2).mean(axis=1)  # (N, slices, H) row means: their spread per slice
        stats = [flat.mean(axis=1), flat.std(axis=1), dh / std, dv / std, dv / np.maximum(dh, _TINY),
                 ds / std, dark, rows / std]
    else:
        c = x.shape[1]
        per = x.reshape(n, c, -1)
        means, stds = per.mean(axis=2), per.std(axis=2)
        dh = np.abs(np.diff(x, axis=3)).mean(axis=(2, 3))  # (N, C)
        dv = np.abs(np.diff(x, axis=2)).mean(axis=(2, 3))
        safe = np.maximum(stds, _TINY)
        s = x.shape[2]
        e = max(1, s // 8)
        corners = np.concatenate([x[:, :, :e, :e], x[:, :, :e, -e:], x[:, :, -e:, :e], x[:, :, -e:, -e:]],
                                 axis=2).mean(axis=(1, 2, 3))
        centre = x[:, :, s // 4:s - s // 4, s // 4:s - s // 4].mean(axis=(1, 2, 3))
        stats = [means[:, i] for i in range(c)] + [stds[:, i] for i in range(c)]
        if c == 3:
            stats += [means[:, 0] - means[:, 1], means[:, 1] - means[:, 2]]
        stats += [(dh / safe).mean(axis=1), (dv / safe).mean(axis=1),
                  dv.mean(axis=1) / np.maximum(dh.mean(axis=1), _TINY), centre - corners]
    return np.stack(stats, axis=1).astype(np.float64)


def input_ranges(statistics: np.ndarray, names: list[str]) -> dict[str, dict[str, float]]:
    """``{name: {"low", "high"}}`` from the training items' (N, F) input statistics: the INPUT_QUANTILES
    widened by max(INPUT_MARGIN x their width, INPUT_FLOOR) each side."""
    q_low, q_high = np.quantile(np.asarray(statistics, dtype=np.float64), INPUT_QUANTILES, axis=0)
    margin = np.maximum(INPUT_MARGIN * (q_high - q_low), INPUT_FLOOR)
    return {name: {"low": round(float(lo), 6), "high": round(float(hi), 6)}
            for name, lo, hi in zip(names, q_low - margin, q_high + margin, strict=True)}


@dataclass(frozen=True)
class OodCheck:
    """One item's verdict: the embedding score, the combined flag, and the first input statistic
    outside its training range (text for the reason), if any."""

    score: float
    flag: bool
    below_threshold: bool
    input_failure: str | None

    @property
    def fields(self) -> dict[str, Any]:
        return {"ood_score": round(self.score, 6), "ood": self.flag}


@dataclass(frozen=True)
class OodReference:
    """Centroids (k, D) and threshold per modality, from a verified package; input statistic ranges
    (names, low, high) per modality where the package records them."""

    centroids: dict[str, np.ndarray]
    thresholds: dict[str, float]
    inputs: dict[str, tuple[list[str], np.ndarray, np.ndarray]] = field(default_factory=dict)

    def score(self, modality: str, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(scores, flags) for (N, D) embeddings, or None when the package has no reference for
        `modality`. Score: cosine similarity to the nearest training centroid; flag: score < threshold."""
        if modality not in self.centroids:
            return None
        x = np.asarray(vectors, dtype=np.float64).reshape(-1, self.centroids[modality].shape[1])
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        scores = np.max(x @ self.centroids[modality].T, axis=1) if len(x) else np.zeros(0)
        return scores, scores < self.thresholds[modality]

    def input_failures(self, modality: str, arrays: np.ndarray) -> list[str | None]:
        """Per preprocessed item, the input statistic farthest outside its training range (in range
        widths: "roughness_h 0.967 outside the training range 0.125 to 0.307"), or None; all None
        without ranges for `modality`."""
        if modality not in self.inputs:
            return [None] * len(arrays)
        names, low, high = self.inputs[modality]
        values, computed = input_statistics(modality, arrays)
        columns = [computed.index(name) for name in names]  # parse_reference checked the names
        failures: list[str | None] = []
        width = np.maximum(high - low, _TINY)
        for row in values[:, columns]:
            excess = np.maximum(low - row, row - high) / width  # > 0 outside the range
            j = int(np.argmax(excess))
            failures.append(None if excess[j] <= 0 else f"{names[j]} {row[j]:.3g} outside the training "
                                                       f"range {low[j]:.3g} to {high[j]:.3g}")
        return failures

    def check(self, modality: str, vectors: np.ndarray, arrays: np.ndarray | None = None
              ) -> list[OodCheck] | None:
        """Both checks per item (the input one only given the preprocessed `arrays`, which produced
        `vectors`), or None without a reference for `modality`."""
        scored = self.score(modality, vectors)
        if scored is None:
            return None
        failures = self.input_failures(modality, arrays) if arrays is not None else [None] * len(scored[0])
        return [OodCheck(float(s), bool(f) or why is not None, bool(f), why)
                for s, f, why in zip(*scored, failures, strict=True)]

    def fields(self, modality: str, vectors: np.ndarray, arrays: np.ndarray | None = None
               ) -> list[dict[str, Any]]:
        """``{"ood_score", "ood"}`` per vector (nulls without a reference for `modality`): the score is
        the embedding's, the flag either check's (the input check only given the preprocessed arrays)."""
        checks = self.check(modality, vectors, arrays)
        if checks is None:
            return [{"ood_score": None, "ood": None} for _ in range(len(vectors))]
        return [c.fields for c in checks]

    def reason(self, modality: str, score: float, model: str, check: OodCheck | None = None) -> str:
        """Why an item was refused (errors.csv, --strict): every check it failed (`check` from
        ``check()``; without it, the embedding check as a stored score says)."""
        failed = []
        if check is None or check.below_threshold:
            failed.append(f"{modality} score {score:.3f} below the package threshold "
                          f"{self.thresholds[modality]:.3f}")
        if check is not None and check.input_failure is not None:
            failed.append(f"{modality} input {check.input_failure}")
        return f"out of distribution for model {model}: " + "; ".join(failed)


def reference_errors(reference: Any, descriptor: dict[str, Any]) -> list[str]:
    """What is wrong with a parsed ood_reference.json for this descriptor, one line each: its format,
    one entry per modality of retina.json's ``ood.modalities`` with a (k, embed_dim) matrix of finite
    numbers, k as retina.json says."""
    if not isinstance(reference, dict):
        return ["must be a JSON object"]
    if reference.get("format") != REFERENCE_FORMAT:
        return [f"format must be {REFERENCE_FORMAT!r}, got {reference.get('format')!r}"]
    if reference.get("version") != REFERENCE_VERSION:
        return [f"version {reference.get('version')!r} is not one this retina reads ({REFERENCE_VERSION})"]
    dim = int(descriptor["embed_dim"])
    modalities = reference.get("modalities")
    if not isinstance(modalities, dict):
        return ["modalities must be an object"]
    errors = []
    for modality, stats in descriptor["ood"]["modalities"].items():
        entry = modalities.get(modality)
        if not isinstance(entry, dict):
            errors.append(f"modalities.{modality}: missing (retina.json ood.modalities names it)")
            continue
        k = stats["k"]
        try:
            centroids = np.asarray(entry.get("centroids"), dtype=np.float64)
        except (TypeError, ValueError):
            errors.append(f"modalities.{modality}.centroids: must be a matrix of numbers")
            continue
        if centroids.shape != (k, dim):
            errors.append(f"modalities.{modality}.centroids: shape {list(centroids.shape)} is not "
                          f"[k, embed_dim] = [{k}, {dim}]")
        elif not np.all(np.isfinite(centroids)):
            errors.append(f"modalities.{modality}.centroids: must be finite numbers")
        elif np.any(np.linalg.norm(centroids, axis=1) < 1e-6):
            errors.append(f"modalities.{modality}.centroids: a centroid has zero length")
    return errors


def parse_reference(data: bytes, descriptor: dict[str, Any]) -> OodReference:
    """The reference from the verified bytes of its file; ValueError naming the problem."""
    from retinacli.jsonutil import loads_bounded

    reference = loads_bounded(data, MAX_REFERENCE_BYTES, 8)
    errors = reference_errors(reference, descriptor)
    if errors:
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ValueError(errors[0] + more)
    centroids, thresholds, inputs = {}, {}, {}
    for modality, stats in descriptor["ood"]["modalities"].items():
        c = np.asarray(reference["modalities"][modality]["centroids"], dtype=np.float64)
        centroids[modality] = c / np.linalg.norm(c, axis=1, keepdims=True)
        thresholds[modality] = float(stats["threshold"])
        if stats.get("inputs") is not None:  # exports before the input check have none
            inputs[modality] = _input_ranges(modality, stats["inputs"], descriptor)
    return OodReference(centroids, thresholds, inputs)


def _input_ranges(modality: str, entry: dict[str, Any], descriptor: dict[str, Any]
                  ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(names, low, high) of retina.json's ``ood.modalities.<m>.inputs``; ValueError for a statistic
    this retina does not compute for the package's preprocessing."""
    channels = int(descriptor.get("preprocessing", {}).get("fundus", {}).get("channels", 3))
    known = input_statistic_names(modality, channels)
    names = list(entry["ranges"])
    for name in names:
        if name not in known:
            raise ValueError(f"ood.modalities.{modality}.inputs.ranges: {name!r} is not an input statistic "
                             f"this retina computes ({', '.join(known)})")
    low = np.array([float(entry["ranges"][n]["low"]) for n in names])
    high = np.array([float(entry["ranges"][n]["high"]) for n in names])
    return names, low, high


def say_no_check(engine: Any) -> None:
    """Tell the user (stderr) that this package cannot flag out-of-distribution items: once per command."""
    from retinacli.console import err, safe

    name = safe(f"{getattr(engine, 'name', 'the model')}@{getattr(engine, 'version', '?')}")
    err.print(f"ood: {NO_CHECK} ({name}; re-export it with this retina to add one); ood fields are null",
              highlight=False)


def reference_json(reference: dict[str, Any]) -> bytes:
    """The file's bytes as export writes them (compact: centroids are most of it)."""
    return (json.dumps(reference, separators=(",", ":")) + "\n").encode("utf-8")
