"""Pair OCT volumes with fundus images of the same eye and visit, and write the cohort manifest.

Matching, in order (docs/data-layout.md):
1. same file: a Heidelberg .vol holds its B-scans and its IR-SLO localizer;
2. localizer reference: the OCT's ReferencedImageSequence / per-frame Ophthalmic Frame Location
   names the fundus image's SOPInstanceUID;
3. fallback: same patient + same eye, nearest acquisition time within a window (default 24 h),
   each fundus used once, closest pairs first.

Only headers are read (discovery), so pairing a large export is fast. The manifest follows the
cohort-manifest contract: patient_id (pseudonym unless --keep-identifiers), eye, visit, oct_path,
fundus_path, cst_um, bcva_letters, bcva_label, tn_label, plus visit_date and provenance columns.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from retinacli.cohort_manifest import LABEL_COLUMNS, MANIFEST_COLUMNS
from retinacli.errors import ReadError, UsageError
from retinacli.fsutil import atomic_path
from retinacli.items import ImageMeta
from retinacli.redaction import PathRedactor

EXTRA_COLUMNS = [
    "visit_date",
    "pair_method",
    "hours_apart",
    "oct_format",
    "fundus_format",
    "oct_device",
    "fundus_device",
]


@dataclass
class Entry:
    """One OCT volume or fundus image as discovery saw it (header metadata, no pixels)."""

    path: Path
    modality: str
    format: str
    meta: ImageMeta

    @property
    def when(self) -> dt.datetime | None:
        return parse_stamp(self.meta.acquisition_datetime) or parse_stamp(self.meta.study_date)


@dataclass
class Pair:
    oct: Entry
    fundus: Entry
    method: str  # "same-file", "reference", "time"
    hours_apart: float | None = None


@dataclass
class Unpaired:
    path: Path
    modality: str
    reason: str


@dataclass
class PairingResult:
    pairs: list[Pair] = field(default_factory=list)
    unpaired: list[Unpaired] = field(default_factory=list)
    errors: list[ReadError] = field(default_factory=list)
    ignored: int = 0


def parse_stamp(value: str | None) -> dt.datetime | None:
    """YYYY-MM-DD[THH:MM:SS] (what the readers give) or YYYYMMDD[HHMMSS] -> datetime (None when absent or
    malformed): the digits are what count."""
    if not value:
        return None
    digits = "".join(ch for ch in value if ch.isdigit())
    try:
        if len(digits) >= 14:
            return dt.datetime.strptime(digits[:14], "%Y%m%d%H%M%S")
        if len(digits) >= 8:
            return dt.datetime.strptime(digits[:8], "%Y%m%d")
    except ValueError:
        return None
    return None


def collect_entries(paths) -> tuple[list[Entry], list[ReadError], int]:
    """Discover every OCT volume and fundus image under `paths` (headers only)."""
    from retinacli.readers import scan

    found = scan(paths)
    entries = [
        Entry(source.path, modality, source.format, source.meta(modality))
        for source in found.sources
        for modality in source.modalities
    ]
    return entries, found.errors, len(found.ignored)


def _hours(a: Entry, b: Entry) -> float | None:
    if a.when is None or b.when is None:
        return None
    return abs((a.when - b.when).total_seconds()) / 3600.0


def pair_entries(entries: list[Entry], window_hours: float = 24.0) -> tuple[list[Pair], list[Unpaired]]:
    octs = [e for e in entries if e.modality == "oct"]
    fundi = [e for e in entries if e.modality == "fundus"]
    pairs: list[Pair] = []
    paired_octs: set[int] = set()
    used_fundi: set[int] = set()

    # 1. one file holding both (Heidelberg .vol: B-scans + IR-SLO)
    fundus_by_path = {str(f.path): i for i, f in enumerate(fundi)}
    for oi, entry in enumerate(octs):
        fi = fundus_by_path.get(str(entry.path))
        if fi is not None:
            pairs.append(Pair(entry, fundi[fi], "same-file", 0.0))
            paired_octs.add(oi)
            used_fundi.add(fi)

    # 2. the OCT names its localizer; one fundus may be the localizer of several OCT scans
    fundus_by_uid = {f.meta.sop_instance_uid: i for i, f in enumerate(fundi) if f.meta.sop_instance_uid}
    missing_localizer: set[int] = set()
    for oi, entry in enumerate(octs):
        if oi in paired_octs or not entry.meta.referenced_sop_uids:
            continue
        hits = [fundus_by_uid[uid] for uid in entry.meta.referenced_sop_uids if uid in fundus_by_uid]
        if hits:
            fi = hits[0]
            pairs.append(Pair(entry, fundi[fi], "reference", _hours(entry, fundi[fi])))
            paired_octs.add(oi)
            used_fundi.add(fi)
        else:
            missing_localizer.add(oi)

    # 3. same patient and eye, nearest in time within the window, closest first, 1:1
    def key(entry: Entry) -> tuple[str, str] | None:
        if not entry.meta.patient_id or not entry.meta.laterality:
            return None
        return entry.meta.patient_id, entry.meta.laterality

    fundi_by_key: dict[tuple[str, str], list[int]] = defaultdict(list)
    for fi, entry in enumerate(fundi):
        if fi not in used_fundi and key(entry) and entry.when:
            fundi_by_key[key(entry)].append(fi)
    candidates: list[tuple[float, int, int]] = []
    for oi, entry in enumerate(octs):
        if oi in paired_octs or key(entry) is None or entry.when is None:
            continue
        for fi in fundi_by_key.get(key(entry), []):
            hours = _hours(entry, fundi[fi])
            if hours is not None and hours <= window_hours:
                candidates.append((hours, oi, fi))
    taken_by_closer: set[int] = set()
    for hours, oi, fi in sorted(candidates):
        if oi in paired_octs:
            continue
        if fi in used_fundi:
            taken_by_closer.add(oi)
            continue
        pairs.append(Pair(octs[oi], fundi[fi], "time", hours))
        paired_octs.add(oi)
        used_fundi.add(fi)

    unpaired: list[Unpaired] = []
    window = f"{window_hours:g} h"
    for oi, entry in enumerate(octs):
        if oi in paired_octs:
            continue
        if key(entry) is None or entry.when is None:
            reason = "no patient / eye / acquisition time in the file (not DICOM or .vol?) to match by"
        elif oi in taken_by_closer:
            reason = f"the fundus images within {window} were paired with closer OCT scans"
        else:
            reason = f"no fundus image of the same patient and eye within {window}"
        if oi in missing_localizer:
            reason = f"its referenced localizer image was not found, and {reason}"
        unpaired.append(Unpaired(entry.path, "oct", reason))
    for fi, entry in enumerate(fundi):
        if fi in used_fundi:
            continue
        if key(entry) is None or entry.when is None:
            reason = "no patient / eye / acquisition time in the file (not DICOM or .vol?) to match by"
        else:
            reason = f"no OCT volume of the same patient and eye within {window}"
        unpaired.append(Unpaired(entry.path, "fundus", reason))
    pairs.sort(key=lambda p: (p.oct.meta.patient_id or "", p.oct.meta.laterality or "", str(p.oct.when)))
    return pairs, unpaired


# --- labels ------------------------------------------------------------------------------------------


def _normal_eye(value: str) -> str | None:
    from retinacli.readers.common import normalise_laterality

    return normalise_laterality(value)


def _normal_date(value: str) -> str | None:
    stamp = parse_stamp(value.strip()) if value else None
    return stamp.strftime("%Y-%m-%d") if stamp else None


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
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fields = [f.strip() for f in reader.fieldnames or []]
            # Cells past the header's columns (restkey None -> a list) are not ours: dropped.
            rows = [
                {(k or "").strip(): (v or "").strip() for k, v in row.items() if isinstance(k, str)}
                for row in reader
            ]
    except OSError as exc:
        raise UsageError(f"{path}: cannot read labels CSV ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: labels CSV is not UTF-8 text (byte {exc.start}); save it as UTF-8") \
            from None
    except csv.Error as exc:
        raise UsageError(f"{path}: malformed labels CSV ({' '.join(str(exc).split())})") from None
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


# --- manifest ------------------------------------------------------------------------------------------


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


@dataclass
class PairReport:
    manifest: Path | None
    rows: list[dict[str, object]]
    result: PairingResult
    labels_rows: int = 0
    labels_matched: int = 0
    shown: PathRedactor | None = None  # output paths for the summary (retinacli.redaction)

    def by_method(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for row in self.rows:
            counts[str(row["pair_method"])] += 1
        return dict(counts)


def pair_folders(
    paths,
    out: Path,
    labels_csv: Path | None = None,
    window_hours: float = 24.0,
    keep_identifiers: bool = False,
    redact_paths: bool = False,
) -> PairReport:
    """Discover, pair, join labels and write the manifest at `out` (nothing written when no pair).

    The manifest's oct_path / fundus_path stay openable (relative to it) so training can read the
    files; `redact_paths` replaces every component there too (a manifest to share, not to train on).
    The report's `shown` gives the summary's paths: relative to the PATH named, components naming
    the file's patient replaced by its manifest pseudonym (keyed with the manifest's secret.key,
    else a per-run key), or every component with `redact_paths`."""
    if window_hours <= 0:
        raise UsageError(f"--window-hours must be positive, got {window_hours:g}")
    out = Path(out)
    labels = read_labels(labels_csv) if labels_csv is not None else None
    entries, errors, ignored = collect_entries(paths)
    pairs, unpaired = pair_entries(entries, window_hours)
    result = PairingResult(pairs=pairs, unpaired=unpaired, errors=errors, ignored=ignored)
    from retinacli.privacy import load_or_create_secret

    key = None if keep_identifiers or not pairs else load_or_create_secret(out.parent)
    shown = PathRedactor.for_paths(list(paths), key, redact_all=redact_paths)
    for entry in entries:
        shown.learn(entry.meta)
    if not pairs:
        return PairReport(None, [], result, labels.rows if labels else 0, 0, shown)
    rows, dropped = manifest_rows(pairs, out.parent, key, labels, shown.show if redact_paths else None)
    result.unpaired.extend(dropped)
    if rows:
        write_manifest(rows, out)
    return PairReport(
        out if rows else None,
        rows,
        result,
        labels.rows if labels else 0,
        len(labels.used) if labels else 0,
        shown,
    )
