"""The cohort manifest: the CSV of paired visits (one OCT volume + one fundus image per row, with labels).

Written by ``retina synth`` and ``retina pair``; read by training, ``retina probe``, ``retina export``
(parity items) and ``retina evaluate``, all through :func:`read_cohort_manifest`. Paths in it are
relative to the CSV's folder; see docs/data-layout.md. Which label column belongs to which task is the
task registry's business (:mod:`retinacli.tasks`). Torch-free.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from retinacli.errors import UsageError

KEY_COLUMNS = ("patient_id", "eye", "visit")
PATH_COLUMNS = ("oct_path", "fundus_path")
LABEL_COLUMNS = ("cst_um", "bcva_letters", "bcva_label", "tn_label")
# The contract columns, in the order every writer puts them (writers may append provenance columns).
MANIFEST_COLUMNS = (*KEY_COLUMNS, *PATH_COLUMNS, *LABEL_COLUMNS)
# What every reader needs; label columns are required only for the tasks a command is asked for.
REQUIRED_COLUMNS = (*KEY_COLUMNS, *PATH_COLUMNS)
_NON_EMPTY = ("patient_id", *PATH_COLUMNS)


class CohortManifestError(UsageError, ValueError):
    """A cohort manifest that cannot be used; the message is one line naming the file (and line).

    Also a ValueError, so callers that treat bad data as ValueError keep catching it.
    """


def parse_label(text: str | None) -> float:
    """A label cell as a float: NaN when empty (no label); ValueError when not a number."""
    if text is None or not str(text).strip():
        return math.nan
    return float(text)


def read_cohort_manifest(
    path: str | Path,
    label_columns: Sequence[str] = (),
    check_files: bool = False,
    optional_label_columns: Sequence[str] = (),
) -> list[dict[str, str]]:
    """Rows of the cohort manifest, checked; ``oct_path`` / ``fundus_path`` become absolute.

    ``label_columns`` must be present and hold numbers or nothing (the columns of the tasks asked
    for); ``optional_label_columns`` are checked the same way where present. ``check_files``: also
    fail on the first OCT or fundus file that does not exist. Any problem raises
    :class:`CohortManifestError` in one line naming the file and CSV line.
    """
    path = Path(path)
    if not path.is_file():
        raise CohortManifestError(f"{path}: manifest not found")
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CohortManifestError(f"{path}: not a readable CSV manifest ({_one_line(exc)})") from None
    missing = [c for c in dict.fromkeys((*REQUIRED_COLUMNS, *label_columns)) if c not in columns]
    if missing:
        raise CohortManifestError(f"{path}: missing column(s) {', '.join(missing)}")
    if not rows:
        raise CohortManifestError(f"{path}: the manifest has no rows")
    checked = [c for c in dict.fromkeys((*label_columns, *optional_label_columns)) if c in columns]
    base = path.parent
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        if any(not (row.get(c) or "").strip() for c in _NON_EMPTY):
            raise CohortManifestError(f"{path}: line {line} lacks patient_id, oct_path or fundus_path")
        for column in checked:
            try:
                parse_label(row.get(column))
            except ValueError:
                raise CohortManifestError(
                    f"{path}: line {line}: column {column} has a non-numeric value {row[column]!r}"
                ) from None
        for key in PATH_COLUMNS:
            row[key] = str((base / row[key]).resolve())
            if check_files and not Path(row[key]).exists():
                raise CohortManifestError(f"{row[key]}: file not found (manifest {path.name} row {line})")
    return rows


def label_values(rows: Iterable[dict[str, str]], column: str) -> list[float]:
    """The column's labels of rows already read (and checked) by :func:`read_cohort_manifest`;
    NaN where a row has none (or, for rows read without checking this column, an unparseable cell)."""
    out = []
    for row in rows:
        try:
            out.append(parse_label(row.get(column)))
        except ValueError:
            out.append(math.nan)
    return out


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
