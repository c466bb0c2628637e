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

import csv
import datetime as dt
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field, replace
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
    held: str | None = None  # kept out of matching, listed with this reason (a bad --metadata row, say)
    unknown: str | None = None  # the reason to list when it has no patient / eye / date (no row, no match)

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


NO_KEY = ("no patient / eye / acquisition time in the file to match by (plain images? give them with "
          "--metadata meta.csv or --pattern)")


def pair_entries(entries: list[Entry], window_hours: float = 24.0) -> tuple[list[Pair], list[Unpaired]]:
    unpaired: list[Unpaired] = [Unpaired(e.path, e.modality, e.held) for e in entries if e.held]
    octs = [e for e in entries if e.modality == "oct" and not e.held]
    fundi = [e for e in entries if e.modality == "fundus" and not e.held]
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
    # A tie (dates without times, say) is not guessed: every item of it is listed as ambiguous.
    by_oct: dict[tuple[int, float], list[int]] = defaultdict(list)
    by_fundus: dict[tuple[int, float], list[int]] = defaultdict(list)
    for hours, oi, fi in candidates:
        by_oct[(oi, hours)].append(fi)
        by_fundus[(fi, hours)].append(oi)
    taken_by_closer: set[int] = set()
    behind_a_tie: set[int] = set()
    ambiguous_octs: dict[int, str] = {}
    ambiguous_fundi: dict[int, str] = {}
    for hours, oi, fi in sorted(candidates):
        if oi in paired_octs or oi in ambiguous_octs:
            continue
        if fi in used_fundi or fi in ambiguous_fundi:
            (taken_by_closer if fi in used_fundi else behind_a_tie).add(oi)
            continue
        tied_fundi = [f for f in by_oct[(oi, hours)] if f not in used_fundi and f not in ambiguous_fundi]
        tied_octs = [o for o in by_fundus[(fi, hours)] if o not in paired_octs and o not in ambiguous_octs]
        if len(tied_fundi) > 1 or len(tied_octs) > 1:
            reason = (f"ambiguous: {len(tied_octs)} OCT volume(s) and {len(tied_fundi)} fundus image(s) "
                      "of the same patient and eye are equally close in time; give acquisition times "
                      "(a time column or {time} group) or pair them by hand")
            ambiguous_octs.update(dict.fromkeys(tied_octs, reason))
            ambiguous_fundi.update(dict.fromkeys(tied_fundi, reason))
            continue
        pairs.append(Pair(octs[oi], fundi[fi], "time", hours))
        paired_octs.add(oi)
        used_fundi.add(fi)

    window = f"{window_hours:g} h"
    for oi, entry in enumerate(octs):
        if oi in paired_octs:
            continue
        if key(entry) is None or entry.when is None:
            reason = entry.unknown or NO_KEY
        elif oi in ambiguous_octs:
            reason = ambiguous_octs[oi]
        elif oi in taken_by_closer:
            reason = f"the fundus images within {window} were paired with closer OCT scans"
            if oi in behind_a_tie:
                reason += " or are ambiguous"
        elif oi in behind_a_tie:
            reason = f"the fundus images within {window} are ambiguous (equally close to other OCT scans)"
        else:
            reason = f"no fundus image of the same patient and eye within {window}"
        if oi in missing_localizer:
            reason = f"its referenced localizer image was not found, and {reason}"
        unpaired.append(Unpaired(entry.path, "oct", reason))
    for fi, entry in enumerate(fundi):
        if fi in used_fundi:
            continue
        if key(entry) is None or entry.when is None:
            reason = entry.unknown or NO_KEY
        elif fi in ambiguous_fundi:
            reason = ambiguous_fundi[fi]
        else:
            reason = f"no OCT volume of the same patient and eye within {window}"
        unpaired.append(Unpaired(entry.path, "fundus", reason))
    pairs.sort(key=lambda p: (p.oct.meta.patient_id or "", p.oct.meta.laterality or "", str(p.oct.when)))
    return pairs, unpaired


# --- patient, eye and date for plain images: a sidecar CSV (--metadata) or the file names (--pattern) ---

_MODALITY_WORDS = {"oct": "oct", "fundus": "fundus", "cfp": "fundus", "slo": "fundus", "ir": "fundus",
                   "nir": "fundus"}
_WHAT = {"oct": "an OCT volume", "fundus": "a fundus image"}
EYE_SPELLINGS = "OD/OS/R/L/right/left"


@dataclass
class Given:
    """Patient, eye and date (validated) that a sidecar row or a file name gives for an item."""

    patient: str
    eye: str  # OD / OS
    date: str  # YYYY-MM-DD
    time: str | None = None  # HH:MM:SS
    modality: str | None = None  # oct / fundus, when stated

    def values(self) -> tuple:
        return self.patient, self.eye, self.date, self.time


def _given(patient: str, eye: str, date: str, time: str = "", modality: str = "") -> Given | str:
    """A Given, or why the values are not usable (the reason never quotes a value: it could be anything)."""
    from retinacli.readers.sanitize import _iso_time, iso_date

    if not patient.strip():
        return "no patient"
    side = _normal_eye(eye)
    if side is None:
        return f"eye is not one of {EYE_SPELLINGS}" if eye.strip() else "no eye"
    if not date.strip():
        return "no date"
    day = iso_date(date.strip()) if len(date.strip()) in (8, 10) else None
    if day is None:
        return "date is not a real calendar date written YYYY-MM-DD or YYYYMMDD"
    clock = None
    if time.strip():
        clock = _iso_time(time.strip())
        if clock is None:
            return "time is not a clock time written HH:MM[:SS] or HHMM[SS]"
    kind = None
    if modality.strip():
        kind = _MODALITY_WORDS.get(modality.strip().casefold())
        if kind is None:
            return f"modality is not one of {', '.join(_MODALITY_WORDS)}"
    return Given(patient.strip(), side, day, clock, kind)


def _with_given(entry: Entry, given: Given) -> None:
    """The sidecar / file name wins over the file's header: the user wrote it down on purpose."""
    entry.meta = replace(
        entry.meta,
        patient_id=given.patient,
        laterality=given.eye,
        study_date=given.date,
        acquisition_datetime=f"{given.date}T{given.time}" if given.time else None,
    )


def _where(path: Path | str) -> str:
    """The real absolute path (links resolved; a virtual series / B-scan path keeps its last part)."""
    return os.path.realpath(os.path.abspath(os.fspath(path)))


@dataclass
class MetaRow:
    line: int  # the row's line in the CSV (the header is line 1)
    where: str  # the real absolute path it names
    given: Given | None
    problem: str | None = None
    patient: str = ""  # as written, even in a bad row: output paths must hide it


@dataclass
class Sidecar:
    path: Path
    rows: list[MetaRow]


SIDECAR_COLUMNS = ("path", "patient", "eye", "date")


def read_metadata(path: Path) -> Sidecar:
    """The --metadata CSV: columns path, patient (or patient_id), eye, date, optional time and modality;
    header names in any case. `path` is relative to the CSV's folder (or absolute). A bad row is kept
    with its problem, to be reported; a CSV without the columns is a usage error."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fields = [(f or "").strip().casefold() for f in reader.fieldnames or []]
            reader.fieldnames = fields
            rows = []
            for row in reader:
                cells = {k: (v or "").strip() for k, v in row.items() if isinstance(k, str)}
                rows.append((reader.line_num, cells))
    except OSError as exc:
        raise UsageError(f"{path}: cannot read metadata CSV ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: metadata CSV is not UTF-8 text (byte {exc.start}); save it as UTF-8") \
            from None
    except csv.Error as exc:
        raise UsageError(f"{path}: malformed metadata CSV ({' '.join(str(exc).split())})") from None
    twice = sorted({f for f in fields if f and fields.count(f) > 1})
    if twice:
        raise UsageError(f"{path}: metadata CSV has the column(s) {', '.join(twice)[:80]} more than once")
    patient_column = "patient" if "patient" in fields or "patient_id" not in fields else "patient_id"
    missing = [c for c in SIDECAR_COLUMNS if (patient_column if c == "patient" else c) not in fields]
    if missing:
        found = ", ".join(" ".join(f.split())[:40] for f in fields[:20]) or "no header"
        raise UsageError(
            f"{path}: metadata CSV needs columns {', '.join(SIDECAR_COLUMNS)} (optional: time, modality); "
            f"missing {', '.join(missing)}; found {found}"
        )
    base = path.parent
    parsed = []
    for line, cells in rows:
        if not any(cells.values()):
            continue  # a blank line in a spreadsheet export
        written = cells.get("path", "")
        given = _given(cells.get(patient_column, ""), cells.get("eye", ""), cells.get("date", ""),
                       cells.get("time", ""), cells.get("modality", ""))
        try:
            where = _where(base / written) if written else ""
        except (ValueError, OSError):  # a NUL character, say
            where, given = "", "path is not a usable file path"
        if not written:
            given = "no path"
        patient = cells.get(patient_column, "")
        if isinstance(given, str):
            parsed.append(MetaRow(line, where, None, given, patient))
        else:
            parsed.append(MetaRow(line, where, given, None, patient))
    return Sidecar(path, parsed)


def apply_metadata(entries: list[Entry], sidecar: Sidecar) -> list[ReadError]:
    """Fill each entry's patient, eye and date from the most specific row naming it (its own path, else
    the nearest folder above it). Entries whose row is bad or contradicted at the same path are held
    back with the reason; rows that name nothing discovered are returned as errors."""
    name = f"--metadata {sidecar.path.name}"
    under: dict[str, list[int]] = defaultdict(list)  # a path -> the entries at or under it
    for i, entry in enumerate(entries):
        where = _where(entry.path)
        while True:
            under[where].append(i)
            parent = os.path.dirname(where)
            if parent == where:
                break
            where = parent
    covering: dict[int, list[MetaRow]] = defaultdict(list)
    matched: set[int] = set()
    errors: list[ReadError] = []
    for row in sidecar.rows:
        if not row.where:
            errors.append(ReadError(sidecar.path, f"{name} row {row.line}: {row.problem}"))
            continue
        inside = under.get(row.where, [])
        wanted = [i for i in inside if row.given is None or row.given.modality in (None, entries[i].modality)]
        if not wanted:
            if inside:
                what = _WHAT[entries[inside[0]].modality]
                reason = f"says {row.given.modality} but the path is {what}"
            else:
                reason = "not among the images and volumes found under the PATH(s) given"
            if row.problem:
                reason = f"{row.problem}; and {reason}"
            errors.append(ReadError(row.where, f"{name} row {row.line}: {reason}"))
            continue
        matched.add(row.line)
        for i in wanted:
            covering[i].append(row)
    used: set[int] = set()

    def rank(row: MetaRow) -> tuple[int, bool]:
        # the nearest row wins; at one path, a row for this modality wins over one for any
        return len(row.where), row.given is not None and row.given.modality is not None

    for i, rows in covering.items():
        best = max(map(rank, rows))
        top = [r for r in rows if rank(r) == best]
        used.update(r.line for r in top)
        bad = [r for r in top if r.problem]
        if bad:
            entries[i].held = f"{name} row {bad[0].line}: {bad[0].problem}"
        elif len({r.given.values() for r in top}) > 1:
            lines = " and ".join(str(r.line) for r in top)
            entries[i].held = f"{name} rows {lines} give different patient / eye / date for it"
        else:
            _with_given(entries[i], top[0].given)
    for row in sidecar.rows:  # a bad row that a nearer row overrode everywhere: still reported
        if row.problem and row.line in matched and row.line not in used:
            errors.append(ReadError(row.where, f"{name} row {row.line}: {row.problem}"))
    for i, entry in enumerate(entries):
        if i not in covering:
            entry.unknown = f"{NO_KEY.split(' (')[0]}, and no {name} row names it"
    return errors


PATTERN_GROUPS = ("patient", "eye", "date", "time", "modality")
_GROUP = re.compile(r"\{([^{}]*)\}")
# What each group matches: no '/', never empty; eye and date only their spellings, so that a patient
# name holding '_' is not cut short; free text as little as lets the rest of the name match.
_GROUP_REGEX = {
    "patient": r"[^/]+?",
    "eye": r"right|left|OD|OS|R|L",
    "date": r"\d{4}-\d{2}-\d{2}|\d{8}",
    "time": r"\d{2}(?:[:\-]?\d{2}){1,2}",
    "modality": r"[^/]+?",
}
_EXTENSION = re.compile(r"\.[A-Za-z0-9]{1,5}$")


@dataclass
class NamePattern:
    """A --pattern: `{group}`s between literal text, matched against the last components of a path."""

    text: str
    regex: re.Pattern
    bare: re.Pattern  # without its extension: for a folder (B-scan folder, DICOM series)
    depth: int  # how many path components it spans

    def match(self, parts: list[str], folder: bool) -> dict[str, str] | None:
        if len(parts) < self.depth:
            return None
        subject = "/".join(parts[-self.depth:])
        found = (self.bare if folder else self.regex).fullmatch(subject)
        return found.groupdict() if found else None


def compile_pattern(text: str) -> NamePattern:
    """'{patient}_{eye}_{date}_{modality}.png' -> a NamePattern, or a UsageError saying what is wrong.

    Literal text matches itself (case-insensitively, like the eye spellings); a pattern that ends
    without an extension also matches names with one; one that ends with an extension also matches
    a folder of that name without it (a B-scan folder)."""
    shown = f"--pattern {text!r}"
    if "{" in _GROUP.sub("", text) or "}" in _GROUP.sub("", text):
        raise UsageError(f"{shown}: unbalanced {{ or }} (groups are written {{patient}})")
    seen: list[str] = []
    pieces: list[str] = []
    at = 0
    for found in _GROUP.finditer(text):
        pieces.append(re.escape(text[at:found.start()]))
        group = found.group(1).strip()
        if group not in PATTERN_GROUPS:
            raise UsageError(f"{shown}: unknown group {{{group}}}; groups are "
                             + ", ".join(f"{{{g}}}" for g in PATTERN_GROUPS))
        if group in seen:
            raise UsageError(f"{shown}: group {{{group}}} appears twice")
        seen.append(group)
        pieces.append(f"(?P<{group}>{_GROUP_REGEX[group]})")
        at = found.end()
    tail = text[at:]
    missing = [g for g in ("patient", "eye", "date") if g not in seen]
    if missing:
        raise UsageError(f"{shown}: needs the groups " + ", ".join(f"{{{g}}}" for g in missing))
    if text.startswith("/") or text.endswith("/") or "//" in text:
        raise UsageError(f"{shown}: components are matched at the end of each path; no leading, trailing "
                         "or double /")
    extension = _EXTENSION.search(tail)
    body = "".join(pieces)
    full = body + re.escape(tail)
    loose = full if extension else full + r"(?:\.[A-Za-z0-9]{1,5})?"
    bare = body + re.escape(tail[: extension.start()]) if extension else loose
    try:
        return NamePattern(text, re.compile(loose, re.IGNORECASE), re.compile(bare, re.IGNORECASE),
                           text.count("/") + 1)
    except re.error as exc:  # pragma: no cover - every literal is escaped
        raise UsageError(f"{shown}: {exc}") from None


def _name_parts(entry: Entry, roots: list[str]) -> tuple[list[str], bool]:
    """(path components from the PATH given down to the item, whether the item is a folder). A virtual
    path (`folder/bscan_*.png`, `folder/series=...`) stands for its folder."""
    path = Path(entry.path)
    folder = path.is_dir()
    if not path.exists() and path.parent.is_dir():  # a virtual path made by discovery
        path, folder = path.parent, True
    where = os.path.normpath(os.path.abspath(path))
    for root in sorted(roots, key=len, reverse=True):
        if where == root or where.startswith(root.rstrip(os.sep) + os.sep):
            base = os.path.dirname(root.rstrip(os.sep)) or root
            return Path(os.path.relpath(where, base)).parts, folder
    return [path.name], folder


def apply_pattern(entries: list[Entry], pattern: NamePattern, paths) -> list[str]:
    """Fill patient, eye and date from each item's name. A name that does not match keeps what its header
    says (and is listed with the reason when that is not enough); a name that matches with an unusable
    value (an impossible date, say) holds the item back with the reason. Returns every patient read from
    a name (output paths must hide them, even a held item's)."""
    roots = [os.path.normpath(os.path.abspath(os.fspath(p))) for p in paths]
    shown = f"--pattern {pattern.text!r}"
    by_path: dict[str, list[Entry]] = defaultdict(list)
    for entry in entries:
        by_path[str(entry.path)].append(entry)
    patients: list[str] = []
    for entry in entries:
        parts, folder = _name_parts(entry, roots)
        groups = pattern.match(list(parts), folder)
        if groups is None:
            entry.unknown = f"name does not match {shown}"
            continue
        patients.append(groups["patient"])
        given = _given(groups["patient"], groups["eye"], groups["date"], groups.get("time") or "",
                       groups.get("modality") or "")
        if isinstance(given, str):
            entry.held = f"{shown}: in the name, {given}"
            continue
        stated = given.modality
        if stated and all(e.modality != stated for e in by_path[str(entry.path)]):
            entry.held = f"{shown}: the name says {stated} but the file is {_WHAT[entry.modality]}"
            continue
        if stated and stated != entry.modality:
            continue  # a .vol named for its OCT: its localizer keeps its header
        _with_given(entry, given)
    return patients


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
