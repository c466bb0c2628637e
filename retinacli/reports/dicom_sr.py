"""DICOM Structured Reports of predictions (`retina predict --dicom-sr OUTDIR`), written with highdicom.

One Comprehensive 3D SR per DICOM source: a TID 1500 Measurement Report whose observer is the device
(the model package: name, version, model id), with one measurement per task predicted (the value, in UCUM
units; the meaning in the private coding scheme :data:`SCHEME`, as no standard code exists) that
references the source instance (SOP Class and Instance UID). A PACS files an SR under the source's
Patient and Study modules, so highdicom copies them from the source: this is the one output of retina
that carries identifiers, and it is written only when asked for. Files are named by the SR's
SOPInstanceUID. highdicom (the `sr` extra) is imported only here, only with the option.
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path
from typing import Any

# Private coding schemes start with "99" (DICOM PS3.16, "Private Coding Schemes").
SCHEME = "99RETINA"
SCHEME_NAME = "retina model outputs"
NO_DICOM = "no DICOM source to reference"
# Code meanings (LO: ASCII, at most 64 characters) of each task's measurement.
MEANINGS = {
    "cst": "Central subfield thickness",
    "bcva_letters": "Best-corrected visual acuity",
    "bcva": "Probability of BCVA below 70 ETDRS letters",
    "tn": "Probability of high treatment need",
}
# UCUM codes of the task units (retinacli.tasks); a probability is dimensionless ("1").
UNITS = {"µm": ("um", "micrometer"), "letters": ("{letters}", "letters"), None: ("1", "no units")}


def check_option(outdir: Path) -> None:
    """Refuse (exit 2) before the model loads when highdicom is not installed or OUTDIR is a file."""
    from retinacli.errors import UsageError

    if importlib.util.find_spec("highdicom") is None:
        raise UsageError("--dicom-sr needs the 'retina[sr]' extra (highdicom is not installed): "
                         "pip install 'retina[sr]'")
    if outdir.exists() and not outdir.is_dir():
        raise UsageError(f"{outdir}: --dicom-sr names a file; give a folder (OUTDIR)")


def _measurement(hd: Any, task: str, record: dict[str, Any], source: Any) -> Any:
    from retinacli.tasks import TASKS

    spec = TASKS[task]
    value = record["value"] if "value" in record else record["probability"]
    units = spec.units if spec.kind == "regression" else None
    unit_code, unit_meaning = UNITS.get(units, UNITS[None])
    return hd.sr.Measurement(
        name=hd.sr.CodedConcept(task, SCHEME, MEANINGS.get(task, spec.title)[:64]),
        value=float(value),
        unit=hd.sr.CodedConcept(unit_code, "UCUM", unit_meaning),
        referenced_images=[hd.sr.SourceImageForMeasurement(source.SOPClassUID, source.SOPInstanceUID)],
    )


def build_report(source: Any, measurements: dict[str, dict[str, Any]], algorithm: dict[str, str]) -> Any:
    """The SR (a highdicom Comprehensive3DSR) of one source dataset; `measurements`: task -> record
    (a regression record's `value`, a binary one's `probability`); `algorithm`: name, version, model_id."""
    import highdicom as hd
    from highdicom.coding_schemes import CodingSchemeIdentificationItem
    from pydicom.uid import generate_uid

    name, version, model_id = algorithm["name"], algorithm["version"], algorithm["model_id"]
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=["retina-model", model_id]),  # the same device UID for one model
        name=name[:64], manufacturer_name="retina", model_name=model_id[:64])
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
        observer_identifying_attributes=device))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="retina predictions"),
        algorithm_id=hd.sr.AlgorithmIdentification(name=name[:64], version=version[:64],
                                                    parameters=[model_id[:64]]),
        measurements=[_measurement(hd, task, record, source) for task, record in measurements.items()])
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=hd.sr.CodedConcept("prediction", SCHEME, "Retina model prediction"),
        imaging_measurements=[group])
    return hd.sr.Comprehensive3DSR(
        evidence=[source], content=report, series_instance_uid=generate_uid(), series_number=1,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="retina",
        manufacturer_model_name=model_id[:64], software_versions=f"{name} {version}"[:64],
        series_description="retina predictions (research use only)",
        coding_schemes=[CodingSchemeIdentificationItem(SCHEME, name=SCHEME_NAME)],
        is_complete=True)


def _source_dataset(path: Path | None) -> tuple[Any, str | None]:
    """(the DICOM header at `path`, None) or (None, why there is none)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if path is None or not path.is_file():
        return None, NO_DICOM
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return None, NO_DICOM
    if not all(dataset.get(k) for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                                        "SeriesInstanceUID")):
        return None, "the DICOM source lacks its SOP, study or series UID"
    return dataset, None


def write_reports(outdir: Path, task: str, records: list[dict[str, Any]], algorithm: dict[str, str],
                  sources: dict[str, Path | None], reasons: dict[str, str] | None = None
                  ) -> dict[str, Any]:
    """Write one SR per record whose source (`sources`: record id -> file) is DICOM into `outdir`.

    Returns {"written": [{id, path, file}], "skipped": [{id, path, reason}]}; `reasons`: why a record's
    source could not be located. A record that cannot be reported never stops the others."""
    from retinacli.errors import RetinaError
    from retinacli.fsutil import atomic_write_bytes

    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RetinaError(f"{outdir}: cannot create the --dicom-sr folder ({exc.strerror})") from exc
    written, skipped = [], []
    for record in records:
        path = sources.get(record.get("id") or "")
        dataset, why = _source_dataset(path)
        if dataset is None:
            why = (reasons or {}).get(record.get("id") or "") or why
            skipped.append({"id": record.get("id"), "path": record.get("path"), "reason": why})
            continue
        try:
            sr = build_report(dataset, {task: record}, algorithm)
        except (ValueError, TypeError, AttributeError) as exc:  # a source header highdicom refuses
            skipped.append({"id": record.get("id"), "path": record.get("path"),
                            "reason": f"cannot be reported ({type(exc).__name__})"})
            continue
        target = outdir / f"{sr.SOPInstanceUID}.dcm"
        with io.BytesIO() as buffer:
            sr.save_as(buffer, enforce_file_format=True)
            try:
                atomic_write_bytes(target, buffer.getvalue())
            except OSError as exc:  # one file that cannot be written never stops the others
                skipped.append({"id": record.get("id"), "path": record.get("path"),
                                "reason": f"could not be written ({exc.strerror})"})
                continue
        written.append({"id": record.get("id"), "path": record.get("path"), "file": target.name})
    return {"outdir": str(outdir), "written": written, "skipped": skipped}
