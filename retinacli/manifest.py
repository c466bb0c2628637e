"""The paired cohort manifest's contract columns (written by `retina synth` and `retina pair`, read by
training). Paths are relative to the CSV's folder; see docs/data-layout.md."""

from __future__ import annotations

MANIFEST_COLUMNS = (
    "patient_id",
    "eye",
    "visit",
    "oct_path",
    "fundus_path",
    "cst_um",
    "bcva_letters",
    "bcva_label",
    "tn_label",
)
