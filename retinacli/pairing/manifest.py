"""The cohort manifest rows `retina pair` writes (paths relative to it, patients pseudonymised)."""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path

from retinacli.cohort_manifest import LABEL_COLUMNS, MANIFEST_COLUMNS
from retinacli.fsutil import atomic_path
from retinacli.pairing.entries import Pair, Unpaired
from retinacli.pairing.labels import Labels

EXTRA_COLUMNS = [
    "visit_date",
    "pair_method",
    "hours_apart",
    "oct_format",
    "fundus_format",
    "oct_device",
    "fundus_device",
]


def _relative(path: Path, base: Path) -> str:
    return Path(os.path.relpath(Path(path).absolute(), base.absolute())).as_posix()


def _patient_key(pair: Pair) -> str:
    """The real identifier used for grouping; without one, the OCT's folder stands in for the patient."""
    return pair.oct.meta.patient_id or pair.fundus.meta.patient_id or f"folder:{Path(pair.oct.path).parent}"


def manifest_rows(
    pairs: list[Pair],
    manifest_dir: Path,
    key: bytes | None,
    labels: Labels | None = None,
    path_of=None,
) -> tuple[list[dict[str, object]], list[Unpaired]]:
    """Rows of the manifest (paths relative to `manifest_dir`, or `path_of(path)`: --redact-paths);
    pairs with no known eye are dropped."""
    from retinacli.privacy import pseudonym

    rows: list[dict[str, object]] = []
    dropped: list[Unpaired] = []

    def relative(path: Path) -> str:
        return _relative(path, manifest_dir)

    visit_dates: dict[tuple[str, str], set[str]] = defaultdict(set)
    prepared = []
    for pair in pairs:
        eye = pair.oct.meta.laterality or pair.fundus.meta.laterality
        if eye not in ("OD", "OS"):
            dropped.append(Unpaired(pair.oct.path, "oct", "eye (laterality) unknown in both OCT and fundus"))
            continue
        when = pair.oct.when or pair.fundus.when
        date = when.strftime("%Y-%m-%d") if when else ""
        patient = _patient_key(pair)
        visit_dates[(patient, eye)].add(date)
        prepared.append((pair, patient, eye, date))
    for pair, patient, eye, date in prepared:
        visit = sorted(visit_dates[(patient, eye)]).index(date)
        shown_id = pseudonym(patient, key) if key is not None else patient
        row: dict[str, object] = {
            "patient_id": shown_id,
            "eye": eye,
            "visit": visit,
            "oct_path": (path_of or relative)(pair.oct.path),
            "fundus_path": (path_of or relative)(pair.fundus.path),
            **dict.fromkeys(LABEL_COLUMNS, ""),
            "visit_date": date,
            "pair_method": pair.method,
            "hours_apart": "" if pair.hours_apart is None else round(pair.hours_apart, 4),
            "oct_format": pair.oct.format,
            "fundus_format": pair.fundus.format,
            "oct_device": pair.oct.meta.device or "",
            "fundus_device": pair.fundus.meta.device or "",
        }
        if labels is not None:
            found = None
            for candidate in {patient, shown_id}:
                found = labels.by_date.get((candidate, eye, date))
                found = found or labels.by_visit.get((candidate, eye, visit))
                if found:
                    break
            if found:
                row.update({c: found[c] for c in LABEL_COLUMNS})
                labels.used.add(int(found["_row"]))
        rows.append(row)
    rows.sort(key=lambda r: (str(r["patient_id"]), str(r["eye"]), int(r["visit"]), str(r["oct_path"])))
    return rows, dropped


def write_manifest(rows: list[dict[str, object]], path: Path) -> None:
    """Write atomically (a crash never leaves half a manifest)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # surrogateescape: a file name that is not valid UTF-8 is written as its own bytes, so the path
    # in the manifest still names the file
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8",
                                        errors="surrogateescape") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*MANIFEST_COLUMNS, *EXTRA_COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
