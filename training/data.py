"""Cohort manifest -> preprocessed arrays cached in memory -> patient-level train/val split -> batches.

Cohorts for contrastive pre-training here are small (hundreds to a few thousand visits), so every
pair is read and preprocessed once with the run's spec (retinacli.preprocess, the same code the
exported model uses) and kept as two float32 arrays. A row that cannot be read is skipped with a
one-line reason; it never stops the run. The manifest is read by
:func:`retinacli.cohort_manifest.read_cohort_manifest` (one reader for training and evaluation).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retinacli.errors import ReadError
from retinacli.preprocess import preprocess_fundus, preprocess_oct


def _readers() -> tuple[Callable, Callable]:
    """retinacli's readers (DICOM, .vol, images, folders, ...)."""
    from retinacli.readers import read_fundus, read_oct

    return read_oct, read_fundus


@dataclass
class PairArrays:
    """Preprocessed pairs: fundus (N, C, s, s) and oct (N, 1, S, H, W), float32, with their rows."""

    fundus: np.ndarray
    oct: np.ndarray
    rows: list[dict[str, str]]
    errors: list[str] = field(default_factory=list)

    @property
    def patients(self) -> list[str]:
        return [r["patient_id"] for r in self.rows]

    def subset(self, patients: set[str]) -> PairArrays:
        keep = [i for i, r in enumerate(self.rows) if r["patient_id"] in patients]
        return PairArrays(self.fundus[keep], self.oct[keep], [self.rows[i] for i in keep])


def load_pairs(
    rows: list[dict[str, str]],
    spec: dict[str, Any],
    on_progress: Callable[[], None] | None = None,
) -> PairArrays:
    """Read and preprocess every row once; unreadable rows are skipped and reported in `errors`."""
    read_oct, read_fundus = _readers()
    # Messages name files as every output does: relative to the cohort's folder, without a path
    # component that names the file's patient (retinacli.redaction).
    paths = _redactor(rows)
    fundus_list, oct_list, kept, errors = [], [], [], []
    for row in rows:
        try:
            try:
                oct_item = read_oct(row["oct_path"])
                paths.learn(oct_item.meta)
                oct_arr = preprocess_oct(oct_item.pixels, spec)
            except ValueError as exc:
                raise ReadError(row["oct_path"], str(exc)) from None
            try:
                fundus_item = read_fundus(row["fundus_path"])
                paths.learn(fundus_item.meta)
                fundus_arr = preprocess_fundus(fundus_item.pixels, spec)
            except ValueError as exc:
                raise ReadError(row["fundus_path"], str(exc)) from None
        except ReadError as exc:
            errors.append(": ".join(paths.error(exc.path, exc.reason)))
        except OSError as exc:
            shown, reason = paths.error(exc.filename or row["oct_path"], str(exc.strerror or exc))
            errors.append(f"{shown}: {reason}")
        else:
            fundus_list.append(fundus_arr)
            oct_list.append(oct_arr)
            kept.append(row)
        if on_progress is not None:
            on_progress()
    if not kept:
        raise ValueError("no readable pairs in the manifest: " + "; ".join(errors[:3]))
    return PairArrays(np.stack(fundus_list), np.stack(oct_list), kept, errors)


def _redactor(rows: list[dict[str, str]]):
    """A PathRedactor rooted at the folder that holds every file of `rows`."""
    import os

    from retinacli.redaction import PathRedactor

    files = [row[key] for row in rows for key in ("oct_path", "fundus_path")]
    common = Path(os.path.commonpath(files)) if files else Path.cwd()
    return PathRedactor.for_paths([common if common.is_dir() else common.parent])


_LAST_LOADED: dict[tuple[str, str], PairArrays] = {}


def load_pairs_once(
    manifest_sha256: str, spec: dict[str, Any], load: Callable[[], PairArrays]
) -> PairArrays:
    """`load()`, unless this process last loaded the same manifest (by sha256) with the same spec.

    `retina demo` trains two objectives on one cohort and probes both: later steps reuse the arrays.
    Only the last cohort is kept, so memory stays that of one cohort.
    """
    key = (manifest_sha256, json.dumps(spec, sort_keys=True))
    if key not in _LAST_LOADED:
        _LAST_LOADED.clear()
        _LAST_LOADED[key] = load()
    return _LAST_LOADED[key]


def split_patients(patients: list[str], val_fraction: float, seed: int) -> dict[str, Any]:
    """Held-out patients for validation: a seeded shuffle of the sorted unique ids."""
    unique = sorted(set(patients))
    if len(unique) < 2:
        raise ValueError("need at least 2 patients to hold some out for validation")
    n_val = min(max(1, round(val_fraction * len(unique))), len(unique) - 1)
    order = np.random.default_rng(seed).permutation(len(unique))
    val = sorted(unique[i] for i in order[:n_val])
    train = sorted(unique[i] for i in order[n_val:])
    return {"seed": seed, "val_fraction": val_fraction, "train": train, "val": val}


def save_split(split: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(split, indent=2) + "\n")


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The epoch's shuffled batches of indices (the last incomplete batch is dropped).

    The order depends only on (seed, epoch), so a resumed run sees exactly the same batches.
    """
    order = np.random.default_rng([seed, epoch, 1]).permutation(n)
    steps = n // batch_size
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]
