"""pydicom glue for the synthetic cohort's DICOM writer: datasets built attribute by attribute and saved
as Part 10 files (explicit VR little endian). Deterministic: no clock, no random UIDs.

    ds = new_dataset()
    ds.PatientName = "SYNTH^P0001"
    ds.ReferencedImageSequence = [item]        # a list of datasets
    write_part10(path, ds, sop_class_uid, sop_instance_uid, implementation)
"""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian


class DicomObject(Dataset):
    """A pydicom Dataset whose float DS values are written in at most 16 characters."""

    def __setattr__(self, name: str, value: object) -> None:
        if name[:1].isupper() and _is_float_sequence(value):
            from pydicom.datadict import dictionary_VR, tag_for_keyword

            tag = tag_for_keyword(name)
            if tag is not None and dictionary_VR(tag) == "DS":
                value = [_ds_text(v) for v in value] if isinstance(value, (list, tuple)) else _ds_text(value)
        super().__setattr__(name, value)

    def set_vr(self, keyword: str, vr: str, value: bytes) -> None:
        """Set an element whose VR depends on the data (PixelData is OB for 8-bit pixels)."""
        from pydicom.datadict import tag_for_keyword

        self.add_new(tag_for_keyword(keyword), vr, value)


def _is_float_sequence(value: object) -> bool:
    if isinstance(value, float):
        return True
    return isinstance(value, (list, tuple)) and any(isinstance(v, float) for v in value)


def _ds_text(value: object) -> str:
    if not isinstance(value, float):
        return str(value)
    text = f"{value:.10g}"
    return text if len(text) <= 16 else f"{value:.8g}"


def write_part10(
    path: Path, dataset: Dataset, sop_class: str, sop_instance: str, implementation: tuple[str, str]
) -> None:
    """Write preamble, File Meta Information and ``dataset`` to ``path`` with pydicom."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = implementation[0]
    meta.ImplementationVersionName = implementation[1]
    dataset.file_meta = meta
    dataset.save_as(path, enforce_file_format=True)
