"""What readers return: one OCT volume or one fundus image, with the metadata the pipeline needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Modality = Literal["oct", "fundus"]


@dataclass
class ImageMeta:
    """Acquisition metadata. Identifiers here stay internal: outputs use pseudonyms (retinacli.privacy)."""

    laterality: str | None = None  # "OD" (right) or "OS" (left)
    study_date: str | None = None  # YYYY-MM-DD, validated (readers/sanitize.py)
    acquisition_datetime: str | None = None  # YYYY-MM-DDTHH:MM:SS when known, validated
    device: str | None = None  # canonical vendor / model from a fixed table, never header text
    pixel_spacing_mm: tuple[float, ...] | None = None  # OCT: (slice, row, column); fundus: (row, column)
    patient_id: str | None = None  # internal only, never written out unless the user asks
    # internal only, never written out: what retinacli.redaction looks for in path components
    patient_name: str | None = None
    accession_number: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_instance_uid: str | None = None
    referenced_sop_uids: tuple[str, ...] = ()  # e.g. an OCT's localizer (fundus) image
    photometric: str | None = None  # "MONOCHROME2", "RGB", ... for images
    extra: dict = field(default_factory=dict)


@dataclass
class _Pixels:
    """What every reader returns: the file, its pixels, the format it was read as and its metadata."""

    path: str
    pixels: np.ndarray
    format: str
    meta: ImageMeta = field(default_factory=ImageMeta)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.pixels.shape)


@dataclass
class OctVolume(_Pixels):
    """A stack of B-scans, shape (n_bscans, height, width), slow axis first."""

    modality: Modality = "oct"


@dataclass
class FundusImage(_Pixels):
    """A colour fundus photo (H, W, 3) or a grayscale NIR/SLO image (H, W, 1)."""

    modality: Modality = "fundus"


Item = OctVolume | FundusImage
