"""The --labels CSV: task labels joined to pairs by patient, eye and date (or visit)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from retinacli.cohort_manifest import LABEL_COLUMNS
from retinacli.errors import UsageError
from retinacli.pairing.csvfile import read_csv_rows
from retinacli.pairing.entries import _normal_date, _normal_eye


@dataclass
class Labels:
    """Labels CSV rows keyed by (patient_id, eye, date) and (patient_id, eye, visit)."""

    by_date: dict[tuple[str, str, str], dict[str, str]] = field(default_factory=dict)
    by_visit: dict[tuple[str, str, int], dict[str, str]] = field(default_factory=dict)
    used: set[int] = field(default_factory=set)
    rows: int = 0


def read_labels(path: Path) -> Labels:
    """Columns: patient_id, eye (OD/OS/R/L), date (YYYY-MM-DD or YYYYMMDD) or visit (0-based), and any
    of cst_um, bcva_letters, bcva_label, tn_label. patient_id is the PatientID in the files (or the
    pseudonym this manifest uses)."""
    path = Path(path)
    fields, numbered = read_csv_rows(path, "labels")
    rows = [cells for _line, cells in numbered]
    missing = [c for c in ("patient_id", "eye") if c not in fields]
    if missing or not ({"date", "visit"} & set(fields)):
        found = ", ".join(" ".join(f.split())[:40] for f in fields[:20]) or "no header"
        raise UsageError(
            f"{path}: labels CSV needs columns patient_id, eye and date (or visit); found {found}"
        )
    if not set(LABEL_COLUMNS) & set(fields):
        raise UsageError(f"{path}: labels CSV has none of the label columns {', '.join(LABEL_COLUMNS)}")
    labels = Labels(rows=len(rows))
    for index, row in enumerate(rows):
        eye = _normal_eye(row.get("eye", ""))
        if not row.get("patient_id") or eye is None:
            continue
        values = {c: row.get(c, "") for c in LABEL_COLUMNS}
        values["_row"] = str(index)
        date = _normal_date(row.get("date", ""))
        if date:
            labels.by_date[(row["patient_id"], eye, date)] = values
        elif row.get("visit", "").isdigit():
            labels.by_visit[(row["patient_id"], eye, int(row["visit"]))] = values
    return labels
