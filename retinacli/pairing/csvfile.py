"""Reading the CSVs a user hands to `retina pair` (--metadata, --labels): one place for the encoding,
the header clean-up and the one-line usage errors."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

from retinacli.errors import UsageError


def read_csv_rows(
    path: Path, what: str, header: Callable[[str], str] = str.strip
) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """(the header's column names through `header`, [(line number, {column: stripped cell})]). UTF-8 with
    or without a byte-order mark; cells past the header's columns are not ours and are dropped. An
    unreadable, non-UTF-8 or malformed file is a UsageError naming `path` and `what` ("labels")."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fields = [header(f or "") for f in reader.fieldnames or []]
            reader.fieldnames = fields
            rows = [
                (reader.line_num, {k: (v or "").strip() for k, v in row.items() if isinstance(k, str)})
                for row in reader
            ]
    except OSError as exc:
        raise UsageError(f"{path}: cannot read {what} CSV ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: {what} CSV is not UTF-8 text (byte {exc.start}); save it as UTF-8") \
            from None
    except csv.Error as exc:
        raise UsageError(f"{path}: malformed {what} CSV ({' '.join(str(exc).split())})") from None
    return fields, rows
