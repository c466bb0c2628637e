"""Preprocessed arrays for every manifest row, and the embeddings each encoder source gives them.

Arrays come from the training data pipeline (`training.data.load_pairs`: the readers plus the one
preprocessing, `retinacli.preprocess`), computed once per preprocessing spec and shared by all sources
that use it. Rows that cannot be read are dropped from the evaluation and listed, never fatal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retinacli.preprocess import spec_hash
from training.evaluation.cohort import Cohort

ROW_KEY = "_eval_row"


@dataclass
class CohortArrays:
    fundus: np.ndarray  # (N, C, H, W) float32
    oct: np.ndarray  # (N, 1, S, H, W) float32

    def of(self, modality: str) -> np.ndarray:
        return self.oct if modality == "oct" else self.fundus


class ArrayCache:
    """One CohortArrays per preprocessing spec (runs trained at the same sizes share it)."""

    def __init__(self, cohort: Cohort, reporter=None):
        self.cohort = cohort
        self.reporter = reporter
        self._arrays: dict[str, CohortArrays] = {}
        self._rows: dict[str, np.ndarray] = {}  # spec hash -> cohort rows the arrays hold
        self.errors: dict[int, str] = {}  # cohort row -> why it could not be read

    def load(self, specs: list[dict]) -> np.ndarray:
        """Read every distinct spec once; return the cohort rows readable under all of them."""
        distinct = {spec_hash(s): s for s in specs}
        if self.reporter is not None:
            self.reporter.stage("reading", len(self.cohort) * len(distinct))
        for key, spec in distinct.items():
            if key in self._arrays:
                continue
            arrays, rows, errors = preprocess_cohort(self.cohort, spec, self._tick)
            self._arrays[key], self._rows[key] = arrays, rows
            self.errors.update(errors)
        keep = np.array(sorted(set(range(len(self.cohort))) - set(self.errors)), dtype=int)
        return keep

    def restrict(self, keep: np.ndarray, cohort: Cohort) -> None:
        """Keep only `keep` (old cohort rows) in every array; `cohort` is the matching subset."""
        for key, arrays in self._arrays.items():
            position = {int(r): i for i, r in enumerate(self._rows[key])}
            index = [position[int(r)] for r in keep]
            self._arrays[key] = CohortArrays(arrays.fundus[index], arrays.oct[index])
            self._rows[key] = np.arange(len(keep))
        self.cohort = cohort

    def get(self, spec: dict) -> CohortArrays:
        key = spec_hash(spec)
        if key not in self._arrays:
            arrays, rows, errors = preprocess_cohort(self.cohort, spec, None)
            if errors:
                raise ValueError("; ".join(list(errors.values())[:3]))
            self._arrays[key], self._rows[key] = arrays, rows
        return self._arrays[key]

    def _tick(self) -> None:
        if self.reporter is not None:
            self.reporter.advance()


def preprocess_cohort(cohort: Cohort, spec: dict, on_progress=None):
    """(arrays, cohort rows they hold, {row: error}) via the training data pipeline."""
    from training.data import load_pairs

    rows = [
        {
            "patient_id": str(cohort.patient_ids[i]),
            "oct_path": str(cohort.oct_paths[i]),
            "fundus_path": str(cohort.fundus_paths[i]),
            ROW_KEY: str(i),
        }
        for i in range(len(cohort))
    ]
    pairs = load_pairs(rows, spec, on_progress=on_progress)
    kept = np.array([int(r[ROW_KEY]) for r in pairs.rows], dtype=int)
    missing = sorted(set(range(len(cohort))) - set(kept.tolist()))
    # load_pairs reports errors in row order, one per skipped row.
    errors = dict(zip(missing, pairs.errors, strict=False))
    arrays = CohortArrays(fundus=np.asarray(pairs.fundus, np.float32), oct=np.asarray(pairs.oct, np.float32))
    return arrays, kept, errors


def embed(model, modality: str, arrays: np.ndarray, batch_size: int = 16, device: str = "cpu") -> np.ndarray:
    """(N, D) float32 L2-normalised embeddings of one modality, in manifest order (``model.encode``)."""
    return model.encode(modality, arrays, batch_size, device)
