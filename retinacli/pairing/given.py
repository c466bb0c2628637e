"""Patient, eye and date for plain images: a sidecar CSV (`--metadata`) or the file names (`--pattern`)."""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

from retinacli.errors import ReadError, UsageError
from retinacli.pairing.csvfile import read_csv_rows
from retinacli.pairing.entries import NO_KEY, Entry, _normal_eye

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
    from retinacli.readers.sanitize import iso_date, iso_time

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
        clock = iso_time(time.strip())
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
    fields, rows = read_csv_rows(path, "metadata", header=lambda name: name.strip().casefold())
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
