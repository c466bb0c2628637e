"""Header text -> metadata that may leave the readers: parsed, validated, never copied.

Free-text header fields (names, descriptions, device strings, dates typed by hand) can hold a
patient's name. Readers keep only what this module derives from them:

- dates: parsed and validated, written ``YYYY-MM-DD`` (date-times ``YYYY-MM-DDTHH:MM:SS``); anything
  else becomes None, never the raw text;
- device: a canonical name from a fixed table of recognised vendor/model tokens, or None;
- laterality: ``OD`` / ``OS``, or None;
- photometric interpretation: one of the DICOM defined terms, or None;
- error reasons: `scrub` takes header values out of a message built from a parser's exception.
"""

from __future__ import annotations

import datetime as dt
import re

# Dates outside this range are typing errors or placeholders (00010101, 99991231), not acquisitions.
MIN_YEAR, MAX_YEAR = 1900, 2100

_DATE_PARTS = re.compile(r"^(\d{4})[.\-/]?(\d{2})[.\-/]?(\d{2})$")
_TIME_PARTS = re.compile(r"^(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.\d{1,6})?)?)?$")
_DT_PARTS = re.compile(r"^(\d{8})(\d{2,6}(?:\.\d{1,6})?)?(?:[+-]\d{4})?$")


def _valid(year: int, month: int, day: int) -> dt.date | None:
    if not MIN_YEAR <= year <= MAX_YEAR:
        return None
    try:
        return dt.date(year, month, day)
    except ValueError:
        return None


def iso_date(value: object) -> str | None:
    """A DICOM DA (``YYYYMMDD``, legacy ``YYYY.MM.DD``), ``YYYY-MM-DD`` or a date/datetime -> ``YYYY-MM-DD``.
    Anything that is not a real calendar date in 1900-2100 -> None."""
    if isinstance(value, dt.datetime | dt.date):
        day = _valid(value.year, value.month, value.day)
        return day.isoformat() if day else None
    if value is None:
        return None
    match = _DATE_PARTS.match(str(value).strip().rstrip("\x00"))
    if not match:
        return None
    day = _valid(*(int(part) for part in match.groups()))
    return day.isoformat() if day else None


def iso_time(value: object) -> str | None:
    """A DICOM TM (``HH``, ``HHMM``, ``HHMMSS[.ffffff]``, or with colons) -> ``HH:MM:SS``, else None."""
    if value is None:
        return None
    match = _TIME_PARTS.match(str(value).strip().rstrip("\x00"))
    if not match:
        return None
    hour, minute, second = (int(part or 0) for part in match.groups())
    if hour > 23 or minute > 59 or second > 60:
        return None
    return f"{hour:02d}:{minute:02d}:{min(second, 59):02d}"


def iso_datetime(date: object, time: object = None) -> str | None:
    """Date (+ time) -> ``YYYY-MM-DDTHH:MM:SS`` (00:00:00 when the time is absent), else None.
    A datetime object is accepted as `date`."""
    if isinstance(date, dt.datetime):
        day = iso_date(date)
        return f"{day}T{date.hour:02d}:{date.minute:02d}:{date.second:02d}" if day else None
    day = iso_date(date)
    if day is None:
        return None
    clock = iso_time(time) if time not in (None, "") else "00:00:00"
    return f"{day}T{clock or '00:00:00'}"


def iso_dicom_datetime(value: object) -> str | None:
    """A DICOM DT (``YYYYMMDD[HH[MM[SS[.ffffff]]]][&ZZXX]``) -> ``YYYY-MM-DDTHH:MM:SS``, else None."""
    if value is None:
        return None
    match = _DT_PARTS.match(str(value).strip().rstrip("\x00"))
    if not match:
        return None
    date, time = match.groups()
    if time is not None and iso_time(time) is None:
        return None
    return iso_datetime(date, time)


def date_of(study_date: str | None, acquisition_datetime: str | None) -> str | None:
    """The item's date (``YYYY-MM-DD``): its study date, else its acquisition date."""
    return iso_date(study_date) or iso_date((acquisition_datetime or "")[:10])


def normalise_laterality(value: object) -> str | None:
    """DICOM 'R'/'L', vendor 'OD'/'OS', words -> 'OD' / 'OS'; anything else -> None."""
    if value is None:
        return None
    text = str(value).strip().upper().rstrip("\x00")
    if text in {"R", "OD", "RIGHT"}:
        return "OD"
    if text in {"L", "OS", "LEFT"}:
        return "OS"
    return None


# --- devices -----------------------------------------------------------------------------------------

# Recognised vendors: a token in Manufacturer / ManufacturerModelName -> the canonical vendor name.
VENDORS: dict[str, str] = {
    "heidelberg": "Heidelberg Engineering",
    "zeiss": "Carl Zeiss Meditec",
    "topcon": "Topcon",
    "optovue": "Optovue",
    "nidek": "Nidek",
    "canon": "Canon",
    "optos": "Optos",
}
# Recognised models: a token -> (vendor, canonical model name).
MODELS: dict[str, tuple[str, str]] = {
    "spectralis": ("Heidelberg Engineering", "Spectralis"),
    "hra": ("Heidelberg Engineering", "HRA"),
    "hrt": ("Heidelberg Engineering", "HRT"),
    "cirrus": ("Carl Zeiss Meditec", "Cirrus"),
    "stratus": ("Carl Zeiss Meditec", "Stratus"),
    "clarus": ("Carl Zeiss Meditec", "Clarus"),
    "visucam": ("Carl Zeiss Meditec", "Visucam"),
    "plex": ("Carl Zeiss Meditec", "PLEX Elite"),
    "triton": ("Topcon", "Triton"),
    "maestro": ("Topcon", "Maestro"),
    "avanti": ("Optovue", "Avanti"),
    "rtvue": ("Optovue", "RTVue"),
    "ivue": ("Optovue", "iVue"),
    "solix": ("Optovue", "Solix"),
    "mirante": ("Nidek", "Mirante"),
    "daytona": ("Optos", "Daytona"),
    "california": ("Optos", "California"),
    "silverstone": ("Optos", "Silverstone"),
    "monaco": ("Optos", "Monaco"),
}
# The synthetic cohort's own devices (retinacli/synth: MANUFACTURER, OCT_DEVICE, fundus.DEVICES), matched
# as whole values: tests/test_identifiers_headers.py checks they stay in step with retinacli.synth.
SYNTH_VENDOR = "retina synthetic cohort"
SYNTH_MODELS = (
    "SYNTH-OCT Spectral-Domain OCT",
    "SYNTH-CF Colour Fundus Camera",
    "SYNTH-SLO Near-Infrared Scanning Laser Ophthalmoscope",
)

_TOKEN = re.compile(r"[a-z0-9]+")


def _clean(value: object) -> str:
    return " ".join(str(value).replace("\x00", " ").split()) if value is not None else ""


def device_name(manufacturer: object, model: object = None) -> str | None:
    """Canonical "Vendor Model" (or "Vendor") from a fixed table; unrecognised text -> None.
    Only table entries are ever returned, never the header's own text."""
    maker, name = _clean(manufacturer), _clean(model)
    if maker.lower() == SYNTH_VENDOR:
        return f"{SYNTH_VENDOR} {name}" if name in SYNTH_MODELS else SYNTH_VENDOR
    tokens = _TOKEN.findall(f"{maker} {name}".lower())
    vendor = next((VENDORS[t] for t in tokens if t in VENDORS), None)
    found = next((MODELS[t] for t in tokens if t in MODELS and (vendor in (None, MODELS[t][0]))), None)
    if found is not None:
        return f"{found[0]} {found[1]}"
    return vendor


PHOTOMETRIC = {
    "MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420",
    "YBR_ICT", "YBR_RCT", "ARGB", "CMYK", "HSV",
}  # fmt: skip


def photometric(value: object) -> str | None:
    """A DICOM defined term for PhotometricInterpretation, else None."""
    text = _clean(value).upper()
    return text if text in PHOTOMETRIC else None


# --- messages -----------------------------------------------------------------------------------------

_SPLIT = re.compile(r"[\^_\-.\s,;:/\\=()\[\]'\"]+")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def header_texts(ds) -> set[str]:
    """Every text value in a DICOM dataset (file meta, nested sequences) and its tokens of 3+ characters:
    what `scrub` keeps out of a message. Valid UIDs (digits and dots, never a name) are left out."""
    found: set[str] = set()
    for owner in (getattr(ds, "file_meta", None), ds):
        if owner is None:
            continue
        for element in owner.iterall():  # nested sequence items included
            try:
                value = element.value
            except Exception:
                continue
            if element.VR == "SQ":
                continue
            several = isinstance(value, list | tuple) or type(value).__name__ == "MultiValue"
            values = value if several else [value]
            for one in values:
                if not isinstance(one, str) and type(one).__name__ != "PersonName":
                    continue  # numbers the reader may quote; bytes are never quoted
                found |= text_and_tokens(one)
    return found


def text_and_tokens(value: object) -> set[str]:
    """A header text (lower case) and its tokens of 3+ characters, split on ^ _ - . space and
    punctuation; nothing for a valid UID or a text shorter than 3 characters."""
    text = _clean(value)
    if len(text) < 3 or _UID.match(text):
        return set()
    return {text.lower(), *(token.lower() for token in _SPLIT.split(text) if len(token) >= 3)}


def scrub(message: str, ds) -> str:
    """`message` with every header text value of `ds` (and each token of 3+ characters) replaced by '…'."""
    try:
        texts = header_texts(ds)
    except Exception:  # a dataset too broken to walk: say nothing from the message
        return "details withheld"
    return scrub_texts(message, texts)


def scrub_texts(message: str, texts: set[str]) -> str:
    """`message` with each of `texts` (whole words, any case) replaced by '…'."""
    for text in sorted(texts, key=len, reverse=True):
        message = re.sub(rf"(?<![a-z0-9]){re.escape(text)}(?![a-z0-9])", "…", message, flags=re.IGNORECASE)
    return message
