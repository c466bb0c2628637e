"""Metadata filters for retrieval: eye, pseudonymous patient, study-date range.

The same Filter is applied by exact search (numpy masks over the store's columns) and translated by
each index backend (faiss: an id selector; LanceDB: an SQL ``where``; Qdrant: a payload filter), so a
filtered query means the same thing on every backend. The modality is not a filter: each modality
has its own index, and exact search selects it by the `modality` column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Filter:
    laterality: str | None = None  # "OD" / "OS"
    patient: str | None = None  # the store's `patient` pseudonym
    date_from: int | None = None  # YYYYMMDD, inclusive
    date_to: int | None = None  # YYYYMMDD, inclusive

    def is_empty(self) -> bool:
        return all(v is None for v in (self.laterality, self.patient, self.date_from, self.date_to))

    def mask(self, laterality: list[Any], patient: list[Any], date: np.ndarray) -> np.ndarray:
        """Rows (columns as in IndexedRows) that match. A row with an unknown date fails any date bound."""
        keep = np.ones(len(date), dtype=bool)
        if self.laterality is not None:
            keep &= np.array([(v or "").upper() == self.laterality for v in laterality], dtype=bool)
        if self.patient is not None:
            keep &= np.array([(v or "") == self.patient for v in patient], dtype=bool)
        date = np.asarray(date, dtype=np.int64)
        if self.date_from is not None:
            keep &= date >= self.date_from
        if self.date_to is not None:
            keep &= (date <= self.date_to) & (date > 0)
        return keep


def date_number(value: Any) -> int:
    """A stored `date` (YYYY-MM-DD, or YYYYMMDD in stores written by 0.1.0) -> YYYYMMDD int, 0 if unknown."""
    from retinacli.readers.sanitize import iso_date

    day = iso_date(value)
    return int(day.replace("-", "")) if day else 0
