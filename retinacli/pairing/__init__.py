"""Pair OCT volumes with fundus images of the same eye and visit, and write the cohort manifest.

Matching, in order (docs/data-layout.md):
1. same file: a Heidelberg .vol holds its B-scans and its IR-SLO localizer;
2. localizer reference: the OCT's ReferencedImageSequence / per-frame Ophthalmic Frame Location
   names the fundus image's SOPInstanceUID;
3. fallback: same patient + same eye, nearest acquisition time within a window (default 24 h),
   each fundus used once, closest pairs first; ties are listed as ambiguous, never guessed.

Plain images have no patient, eye or date in them: a sidecar CSV (`--metadata`, read_metadata /
apply_metadata) or a file-name pattern (`--pattern`, compile_pattern / apply_pattern) gives them.

Only headers are read (discovery), so pairing a large export is fast. The manifest follows the
cohort-manifest contract: patient_id (pseudonym unless --keep-identifiers), eye, visit, oct_path,
fundus_path, cst_um, bcva_letters, bcva_label, tn_label, plus visit_date and provenance columns.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from retinacli.cohort_manifest import MANIFEST_COLUMNS
from retinacli.errors import UsageError
from retinacli.pairing.entries import Entry, Pair, PairingResult, Unpaired, collect_entries, parse_stamp
from retinacli.pairing.given import apply_metadata, apply_pattern, compile_pattern, read_metadata
from retinacli.pairing.labels import Labels, read_labels
from retinacli.pairing.manifest import EXTRA_COLUMNS, manifest_rows, write_manifest
from retinacli.pairing.match import pair_entries
from retinacli.redaction import PathRedactor

__all__ = [
    "EXTRA_COLUMNS",
    "MANIFEST_COLUMNS",
    "Entry",
    "Labels",
    "Pair",
    "PairReport",
    "PairingResult",
    "Unpaired",
    "apply_metadata",
    "apply_pattern",
    "collect_entries",
    "compile_pattern",
    "manifest_rows",
    "pair_entries",
    "pair_folders",
    "parse_stamp",
    "read_labels",
    "read_metadata",
    "write_manifest",
]


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
    metadata_csv: Path | None = None,
    pattern: str | None = None,
) -> PairReport:
    """Discover, pair, join labels and write the manifest at `out` (nothing written when no pair).

    The manifest's oct_path / fundus_path stay openable (relative to it) so training can read the
    files; `redact_paths` replaces every component there too (a manifest to share, not to train on).
    The report's `shown` gives the summary's paths: relative to the PATH named, components naming
    the file's patient replaced by its manifest pseudonym (keyed with the manifest's secret.key,
    else a per-run key), or every component with `redact_paths`.

    Plain images carry no patient, eye or date: `metadata_csv` (a sidecar CSV, read_metadata) or
    `pattern` (a file-name pattern, compile_pattern) gives them, and wins over what a header says."""
    if window_hours <= 0:
        raise UsageError(f"--window-hours must be positive, got {window_hours:g}")
    if metadata_csv is not None and pattern is not None:
        raise UsageError("--metadata and --pattern are alternatives; give one")
    out = Path(out)
    named = compile_pattern(pattern) if pattern is not None else None
    sidecar = read_metadata(metadata_csv) if metadata_csv is not None else None
    labels = read_labels(labels_csv) if labels_csv is not None else None
    entries, errors, ignored = collect_entries(paths)
    patients: list[str] = []
    if sidecar is not None:
        errors.extend(apply_metadata(entries, sidecar))
        patients = [row.patient for row in sidecar.rows if row.patient]
    if named is not None:
        patients = apply_pattern(entries, named, paths)
    pairs, unpaired = pair_entries(entries, window_hours)
    result = PairingResult(pairs=pairs, unpaired=unpaired, errors=errors, ignored=ignored)
    from retinacli.privacy import load_or_create_secret

    key = None if keep_identifiers or not pairs else load_or_create_secret(out.parent)
    shown = PathRedactor.for_paths(list(paths), key, redact_all=redact_paths)
    for entry in entries:
        shown.learn(entry.meta)
    for patient in patients:
        shown.learn(values=[patient], owner=patient)
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
