"""Fuzz targets shared by the CI property tests (tests/test_fuzz.py, hypothesis) and the long runner
(fuzz/run_fuzz.py): valid seed files, mutations driven by a `random.Random`, and the property.

Property: a reader given any bytes returns items that keep the item contract, or raises `ReadError`
(`"path: reason"`, one line); a CSV parser returns rows or raises `ValueError` / `RetinaError`, one line.
Anything else (a TypeError, an IndexError, a hang, a warning turned error) is a bug.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np

from retinacli.errors import ReadError, RetinaError
from retinacli.items import FundusImage, OctVolume

OPT_SOP = "1.2.840.10008.5.1.4.1.1.77.1.5.4"
OP8_SOP = "1.2.840.10008.5.1.4.1.1.77.1.5.1"

# Identifiers in the seed DICOM files: never part of an error message.
SEED_IDENTIFIERS = ("SYNTH^P0001", "SYN000001", "19500101")

# Header fields the DICOM mutator rewrites, and values worth trying for them.
DICOM_FIELDS = {
    "Rows": [0, 1, 2, 7, 16, 17, 65535],
    "Columns": [0, 1, 3, 16, 31, 65535],
    "NumberOfFrames": ["0", "1", "2", "3", "4", "-1", "abc", "", "99999999", "1.5"],
    "BitsAllocated": [0, 1, 7, 8, 12, 16, 32, 64],
    "BitsStored": [0, 1, 8, 12, 16, 33],
    "HighBit": [0, 7, 15, 40],
    "SamplesPerPixel": [0, 1, 2, 3, 4],
    "PixelRepresentation": [0, 1, 2],
    "PlanarConfiguration": [0, 1, 2],
    "PhotometricInterpretation": ["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL",
                                  "YBR_FULL_422", "", "BOGUS"],
    "SOPClassUID": [OPT_SOP, OP8_SOP, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.7", "", "1.2.3"],
    "Modality": ["OPT", "OP", "CT", "XC", ""],
    "ImageLaterality": ["R", "L", "B", "", "X"],
    "AcquisitionDateTime": ["20240102103000", "2024", "abcdefgh", "", "99999999999999"],
    "StudyDate": ["20240102", "2024-01-02", "", "00000000"],
    "PixelSpacing": [["0.1", "0.1"], ["0", "0"], ["abc", "1"], ["1"]],
    "ImagePositionPatient": [["0", "0", "0"], ["1", "2"], ["nan", "0", "0"]],
    "TransferSyntaxUID": ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
                          "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.50",
                          "1.2.840.10008.1.2.1.99", "1.2.3.4"],
}


# --- seeds ---------------------------------------------------------------------------------------------


def _dicom_seed(sop: str, modality: str, pixels: np.ndarray, photometric: str, frames: int | None) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[sop, photometric])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.Modality = sop, modality
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "SYNTH^P0001", "SYN000001", "19500101"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[sop])
    ds.StudyDate, ds.StudyTime, ds.AcquisitionDateTime = "20240102", "103000", "20240102103000"
    ds.Laterality = ds.ImageLaterality = "R"
    ds.Manufacturer = "FuzzVendor"
    if frames:
        ds.NumberOfFrames = frames
        location = Dataset()
        location.ReferencedSOPInstanceUID = "1.2.3.4.5"
        location.ReferenceCoordinates = [0.0, 0.0, 1.0, 10.0]
        frame = Dataset()
        frame.OphthalmicFrameLocationSequence = Sequence([location])
        ds.PerFrameFunctionalGroupsSequence = Sequence([frame] * frames)
        measures = Dataset()
        measures.PixelSpacing = [0.0039, 0.0117]
        measures.SliceThickness = 0.12
        shared = Dataset()
        shared.PixelMeasuresSequence = Sequence([measures])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
    else:
        ds.PixelSpacing = [0.01, 0.01]
    color = photometric == "RGB"
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if color else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if color else 1
    if color:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _image_seed(pixels: np.ndarray, fmt: str, **kwargs) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _tiff_seed(pixels: np.ndarray) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pixels)
    return buffer.getvalue()


def _npy_seed(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def make_seeds() -> dict[str, dict[str, bytes]]:
    """{target: {file name: bytes}}: small valid files, the starting points of every mutation."""
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 255, (3, 16, 12), dtype=np.uint8)
    rgb = rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)
    gray = rng.integers(0, 255, (12, 10), dtype=np.uint8)
    return {
        "dicom": {
            "opt.dcm": _dicom_seed(OPT_SOP, "OPT", volume, "MONOCHROME2", 3),
            "opt16.dcm": _dicom_seed(OPT_SOP, "OPT", volume.astype(np.uint16) * 200, "MONOCHROME2", 3),
            "op_rgb.dcm": _dicom_seed(OP8_SOP, "OP", rgb, "RGB", None),
            "op_gray.dcm": _dicom_seed(OP8_SOP, "OP", gray, "MONOCHROME2", None),
        },
        "image": {
            "rgb.png": _image_seed(rgb, "PNG"),
            "gray16.png": _image_seed(gray.astype(np.uint16) * 200, "PNG"),
            "palette.png": _palette_png(rgb),
            "photo.jpg": _image_seed(rgb, "JPEG", quality=80),
            "photo.bmp": _image_seed(rgb, "BMP"),
            "single.tif": _tiff_seed(rgb),
            "stack.tif": _tiff_seed(volume),
        },
        "npy": {
            "volume.npy": _npy_seed(volume),
            "image.npy": _npy_seed(rgb.astype(np.float32)),
        },
        "labels": {
            "labels.csv": (
                b"patient_id,eye,date,visit,cst_um,bcva_letters,bcva_label,tn_label\n"
                b"SYN000001,OD,2024-01-02,0,301.5,70,1,0\n"
                b"SYN000001,L,20240102,1,280,65,0,1\n"
                b"SYN000002,right,,2,,,1,\n"
            ),
        },
        "manifest": {
            "manifest.csv": (
                b"patient_id,eye,visit,oct_path,fundus_path,cst_um,bcva_letters,bcva_label,tn_label\n"
                b"p0a1,OD,0,P0/oct.dcm,P0/fundus.dcm,300,70,1,0\n"
                b"p0a1,OS,1,P0/oct2.dcm,P0/fundus2.dcm,,,,\n"
            ),
        },
    }


def _palette_png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).convert("P").save(buffer, format="PNG")
    return buffer.getvalue()


# --- mutations -----------------------------------------------------------------------------------------


def mutate_bytes(data: bytes, rnd: random.Random) -> bytes:
    """1-4 byte-level edits: truncate, flip bits, overwrite, insert, delete or repeat a chunk."""
    out = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        if not out:
            out.extend(rnd.randbytes(rnd.randint(1, 16)))
            continue
        op = rnd.choice(("truncate", "flip", "flip", "overwrite", "insert", "delete", "repeat", "magic"))
        at = rnd.randrange(len(out))
        if op == "truncate":
            del out[at:]
        elif op == "flip":
            for _ in range(rnd.randint(1, 8)):
                i = rnd.randrange(len(out))
                out[i] ^= 1 << rnd.randrange(8)
        elif op == "overwrite":
            chunk = rnd.randbytes(rnd.randint(1, 8))
            out[at : at + len(chunk)] = chunk
        elif op == "insert":
            out[at:at] = rnd.randbytes(rnd.randint(1, 32))
        elif op == "delete":
            del out[at : at + rnd.randint(1, 64)]
        elif op == "repeat":
            out[at:at] = out[at : at + rnd.randint(1, 256)] * rnd.randint(1, 4)
        else:  # interesting integers where lengths and sizes live
            value = rnd.choice((0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF))
            size = rnd.choice((1, 2, 4))
            out[at : at + size] = value.to_bytes(8, "little")[:size]
    return bytes(out)


def mutate_dicom_header(data: bytes, rnd: random.Random) -> bytes:
    """Rewrite 1-3 header fields with odd values (then maybe byte edits on top)."""
    import warnings

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    for _ in range(rnd.randint(1, 3)):
        keyword = rnd.choice(list(DICOM_FIELDS))
        value = rnd.choice(DICOM_FIELDS[keyword])
        try:
            with warnings.catch_warnings():  # generation only; reading never filters warnings
                warnings.simplefilter("ignore")
                if keyword == "TransferSyntaxUID":
                    ds.file_meta.TransferSyntaxUID = value
                elif rnd.random() < 0.15 and keyword in ds:
                    delattr(ds, keyword)
                else:
                    setattr(ds, keyword, value)
        except Exception:
            continue
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(buffer, enforce_file_format=False)
    except Exception:
        return mutate_bytes(data, rnd)
    out = buffer.getvalue()
    return mutate_bytes(out, rnd) if rnd.random() < 0.3 else out


def mutate_csv(data: bytes, rnd: random.Random) -> bytes:
    """Text-aware edits (cells, quotes, delimiters, encodings) or plain byte edits."""
    if rnd.random() < 0.3:
        return mutate_bytes(data, rnd)
    text = data.decode("utf-8")
    lines = text.split("\n")
    for _ in range(rnd.randint(1, 4)):
        op = rnd.choice(("cell", "extra", "drop", "quote", "dupline", "header", "bom", "nul", "long"))
        i = rnd.randrange(len(lines))
        cells = lines[i].split(",")
        if op == "cell":
            j = rnd.randrange(len(cells))
            cells[j] = rnd.choice(("", "OD", "X", "-1", "1e309", "nan", "2024-13-45", "99999999", "\"", "é",
                                   "\t", "0" * 40, "=cmd()", "None"))
        elif op == "extra":
            cells.extend(["extra"] * rnd.randint(1, 3))
        elif op == "drop":
            del cells[rnd.randrange(len(cells)) :]
        elif op == "quote":
            j = rnd.randrange(len(cells))
            cells[j] = '"' + cells[j] + rnd.choice(('"', "", '""', '\n"'))
        elif op == "dupline":
            lines.insert(i, lines[i])
        elif op == "header":
            lines[0] = ",".join(rnd.sample(lines[0].split(","), k=max(1, len(lines[0].split(",")) - 1)))
            continue
        elif op == "bom":
            lines[0] = "\ufeff" + lines[0]
            continue
        elif op == "nul":
            cells[0] += "\x00"
        else:
            cells[-1] += "x" * rnd.choice((1000, 200_000))
        lines[i] = ",".join(cells)
    encoding = rnd.choice(("utf-8", "utf-8", "utf-16", "latin-1"))
    return "\n".join(lines).encode(encoding, "replace")


# --- the property ----------------------------------------------------------------------------------------


def check_reader(path: Path) -> str:
    """Read `path` with the public API; 'read' or 'error'. Any other exception escapes (a bug)."""
    from retinacli.readers import read_items

    try:
        items = read_items(path)
    except ReadError as exc:
        message = str(exc)
        assert message.startswith(f"{path}: ") and "\n" not in message, repr(message)
        assert exc.reason.strip(), repr(message)
        assert not any(identifier in exc.reason for identifier in SEED_IDENTIFIERS), repr(message)
        return "error"
    assert items, "read_items returned nothing without an error"
    for item in items:
        check_item_contract(item)
    return "read"


def check_item_contract(item) -> None:
    pixels = item.pixels
    assert isinstance(pixels, np.ndarray)
    if isinstance(item, OctVolume):
        assert pixels.ndim == 3 and min(pixels.shape) > 0, pixels.shape
    elif isinstance(item, FundusImage):
        assert pixels.ndim == 3 and pixels.shape[2] in (1, 3) and min(pixels.shape) > 0, pixels.shape
    else:  # pragma: no cover
        raise AssertionError(f"unexpected item type {type(item)}")
    assert pixels.dtype in (np.uint8, np.uint16, np.float32), pixels.dtype


def check_labels(path: Path) -> str:
    from retinacli.pairing import read_labels

    try:
        read_labels(path)
    except (ValueError, RetinaError) as exc:
        assert "\n" not in str(exc).strip(), repr(str(exc))
        return "error"
    return "read"


def check_manifest(path: Path) -> str:
    from retinacli.cohort_manifest import read_cohort_manifest

    try:
        read_cohort_manifest(path)
    except (ValueError, RetinaError, FileNotFoundError) as exc:
        assert "\n" not in str(exc).strip(), repr(str(exc))
        return "error"
    return "read"


def mutate_json(data: bytes, rnd: random.Random) -> bytes:
    """Structure-aware edits of a JSON document (values swapped for other types, keys dropped or
    added, numbers pushed to extremes), or plain byte edits."""
    import json

    if rnd.random() < 0.25:
        return mutate_bytes(data, rnd)
    doc = json.loads(data)
    for _ in range(rnd.randint(1, 3)):
        parent, key = _random_slot(doc, rnd)
        if parent is None:
            continue
        op = rnd.choice(("replace", "replace", "delete", "add"))
        if op == "delete" and isinstance(parent, dict):
            del parent[key]
        elif op == "add" and isinstance(parent, dict):
            parent[rnd.choice(("extra", "file", "sha256", "__proto__", "path"))] = _odd_value(rnd)
        else:
            parent[key] = _odd_value(rnd)
    return json.dumps(doc).encode()


def _random_slot(doc, rnd: random.Random):
    """A random (container, key) inside `doc`."""
    node, slot = doc, None
    for _ in range(rnd.randint(1, 5)):
        if isinstance(node, dict) and node:
            key = rnd.choice(sorted(node))
        elif isinstance(node, list) and node:
            key = rnd.randrange(len(node))
        else:
            break
        slot = (node, key)
        node = node[key]
    return slot if slot is not None else (None, None)


def _odd_value(rnd: random.Random):
    return rnd.choice((None, True, 0, -1, 1e308, float("inf"), "", "x" * 300, "../../etc/passwd", [], {},
                       [1, 2], {"a": 1}, "model.pkl", "0" * 64, 2**63))


def check_package(path: Path) -> str:
    """`path` is a package's retina.json: verification passes or raises ModelPackageError (one line)."""
    from retinacli.errors import ModelPackageError
    from retinacli.package import verify_package

    try:
        verify_package(path.parent, read=False)
    except ModelPackageError as exc:
        assert "\n" not in str(exc).strip(), repr(str(exc))
        return "error"
    return "read"


# target name -> (seed group, mutators, checker)
TARGETS: dict[str, tuple[str, tuple[Callable[[bytes, random.Random], bytes], ...], Callable[[Path], str]]] = {
    "dicom": ("dicom", (mutate_bytes, mutate_dicom_header, mutate_dicom_header), check_reader),
    "image": ("image", (mutate_bytes,), check_reader),
    "npy": ("npy", (mutate_bytes,), check_reader),
    "labels": ("labels", (mutate_csv,), check_labels),
    "manifest": ("manifest", (mutate_csv,), check_manifest),
    "package": ("package", (mutate_json,), check_package),
}


def add_package_seed(seeds: dict[str, dict[str, bytes]], package: Path, workdir: Path) -> None:
    """Seed the "package" target with a valid package's retina.json; its ONNX files are copied next
    to where the mutated descriptors are written (`workdir`), so verification checks real hashes."""
    import shutil

    folder = workdir / "package"
    folder.mkdir(parents=True, exist_ok=True)
    for child in Path(package).iterdir():
        if child.name != "retina.json":
            shutil.copy(child, folder / child.name)
    seeds["package"] = {"retina.json": (Path(package) / "retina.json").read_bytes()}


def run_case(target: str, seeds: dict[str, dict[str, bytes]], rnd: random.Random, workdir: Path) -> str:
    """One fuzz case: pick a seed of the target, mutate it, write it, check the property."""
    group, mutators, check = TARGETS[target]
    name = rnd.choice(sorted(seeds[group]))
    data = rnd.choice(mutators)(seeds[group][name], rnd)
    folder = workdir / group  # one folder per target: a package folder holds nothing else
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    return check(path)
