"""What pairing works on: each OCT volume / fundus image discovery found (header metadata, no pixels),
the pairs made and what stayed unpaired; the date and eye spellings every input is normalised to."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from retinacli.errors import ReadError
from retinacli.items import ImageMeta

NO_KEY = ("no patient / eye / acquisition time in the file to match by (plain images? give them with "
          "--metadata meta.csv or --pattern)")


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



def _normal_eye(value: str) -> str | None:
    from retinacli.readers.common import normalise_laterality

    return normalise_laterality(value)


def _normal_date(value: str) -> str | None:
    stamp = parse_stamp(value.strip()) if value else None
    return stamp.strftime("%Y-%m-%d") if stamp else None
