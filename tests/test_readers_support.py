"""Small DICOM / image builders for the reader, inspect and pair tests (no tests in this module)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

OPT_SOP = "1.2.840.10008.5.1.4.1.1.77.1.5.4"
OP8_SOP = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
OP16_SOP = "1.2.840.10008.5.1.4.1.1.77.1.5.2"


def _base(sop_class: str, modality: str, patient: str, eye: str, when: str, study_uid: str | None) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    ds.PatientName = f"SYNTH^{patient}"
    ds.PatientID = patient
    ds.PatientBirthDate = "19500101"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate = when[:8]
    ds.StudyTime = when[8:14]
    ds.AcquisitionDateTime = when
    ds.Laterality = "R" if eye == "OD" else "L"
    ds.ImageLaterality = ds.Laterality
    ds.Manufacturer = "Carl Zeiss Meditec"  # a recognised vendor: device names come from a fixed table
    ds.ManufacturerModelName = "CIRRUS HD-OCT 5000"
    return ds


def _set_pixels(ds: Dataset, pixels: np.ndarray, photometric: str) -> None:
    if photometric.startswith("MONO"):
        ds.Rows, ds.Columns = pixels.shape[-2], pixels.shape[-1]
        ds.SamplesPerPixel = 1
    else:
        ds.Rows, ds.Columns = pixels.shape[-3], pixels.shape[-2]
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()


def write_opt(
    path: Path,
    volume: np.ndarray,
    patient: str = "SYN000001",
    eye: str = "OD",
    when: str = "20240102103000",
    study_uid: str | None = None,
    localizer_uid: str | None = None,
    jpeg2000: bool = False,
    per_frame_location: bool = True,
) -> Dataset:
    """Multi-frame Ophthalmic Tomography Image (n, H, W) uint8/uint16."""
    ds = _base(OPT_SOP, "OPT", patient, eye, when, study_uid)
    ds.NumberOfFrames = volume.shape[0]
    _set_pixels(ds, volume, "MONOCHROME2")
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [0.0039, 0.0117]
    measures.SliceThickness = 0.12
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    if localizer_uid:
        ref = Dataset()
        ref.ReferencedSOPClassUID = OP8_SOP
        ref.ReferencedSOPInstanceUID = localizer_uid
        ds.ReferencedImageSequence = Sequence([ref])
        if per_frame_location:
            frames = []
            for index in range(volume.shape[0]):
                location = Dataset()
                location.ReferencedSOPClassUID = OP8_SOP
                location.ReferencedSOPInstanceUID = localizer_uid
                location.ReferenceCoordinates = [float(index), 0.0, float(index), 10.0]
                frame = Dataset()
                frame.OphthalmicFrameLocationSequence = Sequence([location])
                frames.append(frame)
            ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    if jpeg2000:
        from pydicom.uid import JPEG2000Lossless

        ds.compress(JPEG2000Lossless, np.ascontiguousarray(volume), encoding_plugin="pylibjpeg")
    ds.save_as(path, enforce_file_format=True)
    return ds


def write_op(
    path: Path,
    image: np.ndarray,
    patient: str = "SYN000001",
    eye: str = "OD",
    when: str = "20240102102900",
    study_uid: str | None = None,
    photometric: str | None = None,
) -> Dataset:
    """Ophthalmic Photography: (H, W, 3) uint8 RGB, or (H, W) uint8 / uint16 grayscale."""
    sop = OP16_SOP if image.dtype == np.uint16 else OP8_SOP
    ds = _base(sop, "OP", patient, eye, when, study_uid)
    _set_pixels(ds, image, photometric or ("RGB" if image.ndim == 3 else "MONOCHROME2"))
    ds.PixelSpacing = [0.01, 0.01]
    ds.save_as(path, enforce_file_format=True)
    return ds


def write_bscan_series(
    directory: Path, volume: np.ndarray, order_by: str = "position", patient: str = "SYN000002"
) -> list[Path]:
    """One single-frame OPT file per B-scan, written in shuffled file-name order.

    order_by: "position" (ImagePositionPatient + orientation), "instance" (InstanceNumber only)."""
    directory.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    study_uid = generate_uid()
    rng = np.random.default_rng(1)
    names = rng.permutation(len(volume))  # file name numbers unrelated to the scan order
    paths = []
    for index, bscan in enumerate(volume):
        ds = _base(OPT_SOP, "OPT", patient, "OS", "20240103090000", study_uid)
        ds.SeriesInstanceUID = series_uid
        _set_pixels(ds, bscan, "MONOCHROME2")
        ds.PixelSpacing = [0.004, 0.011]
        if order_by == "position":
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # B-scan rows along x, columns along -z
            ds.ImagePositionPatient = [0.0, 0.25 * index, 0.0]  # slices advance along y
            ds.InstanceNumber = int(names[index]) + 1  # deliberately misleading
        else:
            ds.InstanceNumber = index + 1
        path = directory / f"IM{names[index]:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def ramp_volume(n: int = 5, height: int = 32, width: int = 48, dtype=np.uint8) -> np.ndarray:
    """Each B-scan filled with its own index, so the order is checkable."""
    volume = np.zeros((n, height, width), dtype=dtype)
    for index in range(n):
        volume[index] = index * 10 + np.arange(width, dtype=dtype)[None, :] % 7
    return volume


def write_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(pixels).save(path)


def read_back(path: Path) -> Dataset:
    return pydicom.dcmread(path)


def write_dicom_cohort(
    root: Path, patients: int = 3, visits: int = 2, reference: bool = True
) -> list[dict[str, str]]:
    """A small export: per patient, visit and eye an OPT volume and its OP localizer (one minute
    earlier), one folder per visit. Returns the truth: one dict per pair (paths absolute)."""
    truth = []
    rng = np.random.default_rng(7)
    for p in range(patients):
        patient = f"SYN{p + 1:06d}"
        for v in range(visits):
            day = np.datetime64("2024-01-01") + np.timedelta64(30 * v + p, "D")
            date = str(day).replace("-", "")
            folder = root / f"patient{p}" / f"visit{v}"
            folder.mkdir(parents=True, exist_ok=True)
            study = generate_uid()
            for e, eye in enumerate(("OD", "OS")):
                fundus_time = f"{date}10{10 + e:02d}00"
                oct_time = f"{date}10{10 + e:02d}45"
                fundus_path = folder / f"IMG{2 * e + 1:03d}.dcm"
                oct_path = folder / f"IMG{2 * e + 2:03d}.dcm"
                image = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
                op = write_op(fundus_path, image, patient, eye, fundus_time, study)
                write_opt(
                    oct_path, ramp_volume(4, 32, 32), patient, eye, oct_time, study,
                    localizer_uid=op.SOPInstanceUID if reference else None,
                )  # fmt: skip
                truth.append(
                    {"patient": patient, "eye": eye, "date": date, "visit": v,
                     "oct_path": str(oct_path), "fundus_path": str(fundus_path)}
                )  # fmt: skip
    return truth
