"""DICOM output of one visit: an Ophthalmic Photography 8 Bit (OP) fundus image and a multi-frame
Ophthalmic Tomography (OPT) volume that references it as its localizer.

Both share the visit's study; the OPT's per-frame Ophthalmic Frame Location gives each B-scan's
line on the fundus image (row, column of its start and end), and its Pixel Measures give the voxel
spacing. Explicit VR Little Endian, uncompressed. Validated with dicom3tools' ``dciodvfy``.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

from retinacli import __version__
from retinacli.synth.cohort import OCT_DEVICE, VisitRecord, uid
from retinacli.synth.dicom_encode import DicomObject, write_part10
from retinacli.synth.fundus import DEVICES, FIELD_MM
from retinacli.synth.oct import SCAN_MM

OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
OPT = "1.2.840.10008.5.1.4.1.1.77.1.5.4"
MANUFACTURER = "retina synthetic cohort"
IMPLEMENTATION = (uid(0, "implementation-class"), f"RETINA_{__version__}"[:16])


def _code(value: str, scheme: str, meaning: str) -> DicomObject:
    item = DicomObject()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item



def _localizer_reference(fundus_sop_uid: str) -> DicomObject:
    """A ReferencedImageSequence item pointing at the visit's fundus image as the OCT's localizer."""
    item = DicomObject()
    item.ReferencedSOPClassUID = OP_8BIT
    item.ReferencedSOPInstanceUID = fundus_sop_uid
    item.PurposeOfReferenceCodeSequence = [_code(*LOCALIZER)]
    return item

EYE = ("81745001", "SCT", "Eye")
FUNDUS_CAMERA = ("409898007", "SCT", "Fundus Camera")
SLO = ("392001008", "SCT", "Scanning Laser Ophthalmoscope")
OCT_SCANNER = ("392012008", "SCT", "Optical Coherence Tomography Scanner")
LOCALIZER = ("121311", "DCM", "Localizer")
INFRARED_FILTER = ("445169002", "SCT", "Infrared optical filter")
NO_FILTER = ("111609", "DCM", "No filter")
FULL_SPECTRUM = ("414298005", "SCT", "Full Spectrum")
INFRARED = ("414497003", "SCT", "Infrared")


def _dicom_dt(value: dt.datetime) -> tuple[str, str]:
    return value.strftime("%Y%m%d"), value.strftime("%H%M%S")


def _uids(record: VisitRecord) -> dict:
    n, eye, visit, seed = record.identity.patient_number, record.eye.eye, record.state.visit, record.seed
    return {
        "study": uid(seed, "study", n, visit),
        "fundus_series": uid(seed, "series", n, eye, visit, "fundus"),
        "oct_series": uid(seed, "series", n, eye, visit, "oct"),
        "fundus_sop": uid(seed, "sop", n, eye, visit, "fundus"),
        "oct_sop": uid(seed, "sop", n, eye, visit, "oct"),
        "frame_of_reference": uid(seed, "for", n, eye, visit),
        "dimension_organization": uid(seed, "dimorg", n, eye, visit),
    }


def _new_object(sop_class: str, sop_instance: str) -> DicomObject:
    ds = DicomObject()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    return ds


def _common(ds: DicomObject, record: VisitRecord, uids: dict, modality: str, series_uid: str, when):
    ident, state = record.identity, record.state
    study_date, study_time = _dicom_dt(record.acquired)
    date, time = _dicom_dt(when)
    # Patient (synthetic test identities).
    ds.PatientName = ident.patient_name
    ds.PatientID = ident.patient_id
    ds.PatientBirthDate = ident.birth_date
    ds.PatientSex = ident.sex
    # General Study.
    ds.StudyInstanceUID = uids["study"]
    ds.StudyDate, ds.StudyTime = study_date, study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"V{state.visit:02d}"
    ds.AccessionNumber = record.accession
    ds.StudyDescription = "Synthetic retina visit"
    # General Series.
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1 if modality == "OP" else 2
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = "Fundus" if modality == "OP" else "Macular cube"
    # General Equipment.
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = "Synthetic"
    ds.SoftwareVersions = f"retina {__version__}"
    # General Image / content.
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = date, time
    ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    # Ocular Region Imaged.
    ds.ImageLaterality = "R" if record.eye.eye == "OD" else "L"
    ds.AnatomicRegionSequence = [_code(*EYE)]
    # Burned-in annotation / lossy flags.
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"


def _acquisition_parameters(ds: DicomObject, horizontal_fov_deg: float) -> None:
    # Ophthalmic acquisition parameters: type 2 attributes, most unknown for a synthetic eye.
    ds.HorizontalFieldOfView = round(horizontal_fov_deg, 2)
    ds.RefractiveStateSequence = []
    ds.EmmetropicMagnification = None
    ds.IntraOcularPressure = None
    ds.PupilDilated = "NO"


def fundus_dataset(record: VisitRecord, uids: dict) -> DicomObject:
    ds = _new_object(OP_8BIT, uids["fundus_sop"])
    nir = record.fundus_device == "nir"
    _common(ds, record, uids, "OP", uids["fundus_series"], record.acquired)
    ds.ManufacturerModelName = DEVICES[record.fundus_device]
    ds.DeviceSerialNumber = "SYN-F-001"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ""
    ds.PatientEyeMovementCommanded = "NO"
    _acquisition_parameters(ds, FIELD_MM / 0.288)  # ~0.288 mm per degree on an emmetropic retina
    # Ophthalmic Photographic Parameters.
    ds.AcquisitionDeviceTypeCodeSequence = [_code(*(SLO if nir else FUNDUS_CAMERA))]
    ds.IlluminationTypeCodeSequence = [_code(*(INFRARED if nir else FULL_SPECTRUM))]
    ds.LightPathFilterTypeStackCodeSequence = [_code(*(INFRARED_FILTER if nir else NO_FILTER))]
    ds.ImagePathFilterTypeStackCodeSequence = []
    ds.LensesCodeSequence = []
    ds.DetectorType = "CCD"
    # Synchronization (required by OP): acquisition clocks are not synchronised to anything.
    ds.SynchronizationFrameOfReferenceUID = "1.2.840.10008.15.1.1"  # UTC
    ds.SynchronizationTrigger = "NO TRIGGER"
    ds.AcquisitionTimeSynchronized = "N"
    # Multi-frame (the OP IOD is multi-frame capable; this is a single frame).
    ds.NumberOfFrames = 1
    ds.FrameIncrementPointer = 0x00181063  # FrameTime (Cine)
    ds.FrameTime = 0.0
    # Image pixels.
    pixels = record.fundus_pixels
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.PixelSpacing = [f"{record.fundus_geo.pixel_mm:.6g}"] * 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if pixels.shape[2] == 1:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PresentationLUTShape = "IDENTITY"
        ds.set_vr("PixelData", "OB", np.ascontiguousarray(pixels[..., 0]).tobytes())
    else:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.set_vr("PixelData", "OB", np.ascontiguousarray(pixels).tobytes())
    return ds


def oct_dataset(record: VisitRecord, uids: dict) -> DicomObject:
    ds = _new_object(OPT, uids["oct_sop"])
    acquired = record.acquired + dt.timedelta(minutes=2)
    _common(ds, record, uids, "OPT", uids["oct_series"], acquired)
    geo = record.oct_geo
    volume = record.oct_pixels
    n_frames, rows, cols = volume.shape
    # Enhanced General Equipment.
    ds.ManufacturerModelName = OCT_DEVICE
    ds.DeviceSerialNumber = "SYN-O-001"
    # Frame of Reference.
    ds.FrameOfReferenceUID = uids["frame_of_reference"]
    ds.PositionReferenceIndicator = ""
    # Ophthalmic Tomography Image.
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.AcquisitionDuration = round(0.02 * n_frames, 3)
    ds.AcquisitionNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PresentationLUTShape = "IDENTITY"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.Rows, ds.Columns = rows, cols
    ds.NumberOfFrames = n_frames
    # Ophthalmic Tomography Acquisition Parameters (type 2, unknown) and device parameters.
    ds.AxialLengthOfTheEye = None
    _acquisition_parameters(ds, SCAN_MM / 0.288)
    ds.AcquisitionDeviceTypeCodeSequence = [_code(*OCT_SCANNER)]
    ds.LightPathFilterTypeStackCodeSequence = []
    ds.DetectorType = "CCD"
    ds.IlluminationWaveLength = 870.0
    ds.IlluminationPower = 1.2
    ds.IlluminationBandwidth = 50.0
    ds.DepthSpatialResolution = round(geo.axial_spacing_mm * 1000.0 * 1.8, 2)
    ds.AlongScanSpatialResolution = 14.0
    ds.AcrossScanSpatialResolution = 14.0
    # Acquisition Context (no context items).
    ds.AcquisitionContextSequence = []
    # Localizer: the visit's fundus image.
    # Also at the top level (a standard extension) for simple readers; the standard place is the
    # shared functional groups below.
    ds.ReferencedImageSequence = [_localizer_reference(uids["fundus_sop"])]

    # Multi-frame Dimension: frames are ordered by position in one stack.
    org = DicomObject()
    org.DimensionOrganizationUID = uids["dimension_organization"]
    ds.DimensionOrganizationSequence = [org]
    ds.DimensionOrganizationType = "3D"
    index = []
    for pointer in (0x00209056, 0x00209057):  # StackID, InStackPositionNumber
        item = DicomObject()
        item.DimensionOrganizationUID = uids["dimension_organization"]
        item.DimensionIndexPointer = pointer
        item.FunctionalGroupPointer = 0x00209111  # FrameContentSequence
        index.append(item)
    ds.DimensionIndexSequence = index

    # Shared functional groups: spacing, orientation, localizer reference.
    shared = DicomObject()
    measures = DicomObject()
    measures.PixelSpacing = [f"{geo.axial_spacing_mm:.6g}", f"{geo.lateral_spacing_mm:.6g}"]
    measures.SliceThickness = f"{geo.slice_spacing_mm:.6g}"
    measures.SpacingBetweenSlices = f"{geo.slice_spacing_mm:.6g}"
    shared.PixelMeasuresSequence = [measures]
    orientation = DicomObject()
    # Rows run along the scan line (x), columns into the eye (z); frames step along y.
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 0, 1]
    shared.PlaneOrientationSequence = [orientation]
    shared.ReferencedImageSequence = [_localizer_reference(uids["fundus_sop"])]
    anatomy = DicomObject()
    anatomy.AnatomicRegionSequence = [_code(*EYE)]
    anatomy.FrameLaterality = ds.ImageLaterality
    shared.FrameAnatomySequence = [anatomy]
    ds.SharedFunctionalGroupsSequence = [shared]

    per_frame = []
    frame_dt = acquired.strftime("%Y%m%d%H%M%S")
    for k in range(n_frames):
        item = DicomObject()
        content = DicomObject()
        content.FrameAcquisitionDateTime = frame_dt
        content.FrameReferenceDateTime = frame_dt
        content.FrameAcquisitionDuration = 20.0
        content.StackID = "1"
        content.InStackPositionNumber = k + 1
        content.DimensionIndexValues = [1, k + 1]
        item.FrameContentSequence = [content]
        position = DicomObject()
        position.ImagePositionPatient = [
            f"{geo.xs_image[0]:.6g}",
            f"{-geo.ys[k]:.6g}",
            "0",
        ]
        item.PlanePositionSequence = [position]
        location = DicomObject()
        location.ReferencedSOPClassUID = OP_8BIT
        location.ReferencedSOPInstanceUID = uids["fundus_sop"]
        v = -geo.ys[k]  # image-axis mm (down) of this B-scan's line on the fundus
        r0, c0 = record.fundus_geo.to_pixel(geo.xs_image[0], v)
        r1, c1 = record.fundus_geo.to_pixel(geo.xs_image[-1], v)
        location.ReferenceCoordinates = [round(float(x), 3) for x in (r0, c0, r1, c1)]
        location.OphthalmicImageOrientation = "LINEAR"
        item.OphthalmicFrameLocationSequence = [location]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.set_vr("PixelData", "OB", np.ascontiguousarray(volume).tobytes())
    return ds


def write_visit(oct_path: Path, fundus_path: Path, record: VisitRecord) -> None:
    uids = _uids(record)
    record.uids = uids
    oct_path.parent.mkdir(parents=True, exist_ok=True)
    write_part10(fundus_path, fundus_dataset(record, uids), OP_8BIT, uids["fundus_sop"], IMPLEMENTATION)
    write_part10(oct_path, oct_dataset(record, uids), OPT, uids["oct_sop"], IMPLEMENTATION)
