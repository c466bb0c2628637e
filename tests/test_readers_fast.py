"""Readers that read only what the model needs (issue 16, part A).

- one header parse per DICOM file: discovery's dataset (``Source.header``) is the one decoded;
- guarded access: a header element a reader uses that pydicom cannot convert is one ReadError naming
  its tag; an element no reader uses is never converted, so it cannot fail the file;
- discovery as `retina embed` runs it (``scan_iter(metas=False)``) converts only what classifies a file;
  the reader converts the metadata, with the same guard, and gets the same items as after ``scan()``;
- frame-selective decoding (``read_source(..., oct_frames=...)``): the same arrays as a full decode
  followed by picking, for every reader that selects, and the same model input after preprocessing.
"""

from __future__ import annotations

import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.encaps import generate_fragments
from pydicom.tag import Tag
from test_readers_support import (
    OPT_SOP,
    _base,
    _set_pixels,
    ramp_volume,
    write_bscan_series,
    write_op,
    write_opt,
    write_png,
)
from typer.testing import CliRunner

from retinacli.cli import app
from retinacli.errors import ReadError
from retinacli.preprocess import make_spec, preprocess_oct, slice_indices
from retinacli.readers import Source, read_oct, read_source, scan
from retinacli.readers.discover import scan_iter

N = 7  # B-scans in each test volume
H, W = 64, 160  # 7 x 64 x 160 uint8 is over 64 KB: the pixel data element stays on disk (deferred)


def noisy_volume(dtype=np.uint8, n: int = N, seed: int = 0) -> np.ndarray:
    high = 255 if dtype == np.uint8 else 4095
    return np.random.default_rng(seed).integers(0, high, (n, H, W)).astype(dtype)


def write_dicom_volume(path: Path, volume: np.ndarray, photometric: str = "MONOCHROME2") -> Path:
    """A multi-frame OPT with any photometric interpretation (RGB: volume is (n, H, W, 3))."""
    ds = _base(OPT_SOP, "OPT", "SYN000001", "OD", "20240102103000", None)
    ds.NumberOfFrames = volume.shape[0]
    _set_pixels(ds, volume, photometric)
    ds.save_as(path, enforce_file_format=True)
    return path


def only_source(path: Path):
    found = scan([path])
    assert found.errors == [] and len(found.sources) == 1, (found.errors, found.sources)
    return found.sources[0]


def pick(k: int):
    return lambda n: slice_indices(n, k)


# --- one header parse per file ---------------------------------------------------------------------


@pytest.fixture
def count_parses(monkeypatch):
    """Counter of pydicom.dcmread calls per file (every reader parses through it; a path or an open
    file, counted by its name)."""
    parses: Counter = Counter()
    real = pydicom.dcmread

    def counting(source, *args, **kwargs):
        parses[str(getattr(source, "name", source))] += 1
        return real(source, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    return parses


def mixed_dicom_folder(root: Path) -> list[Path]:
    """Multi-frame OPT (uncompressed and JPEG 2000), an OP photo and a single-frame B-scan series."""
    visit = root / "visit"
    visit.mkdir(parents=True)
    write_opt(visit / "oct.dcm", noisy_volume())
    write_opt(visit / "oct_j2k.dcm", ramp_volume(N, 32, 32), jpeg2000=True)
    write_op(visit / "fundus.dcm", np.random.default_rng(1).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    series = write_bscan_series(root / "series", ramp_volume(5, 16, 16))
    return [visit / "oct.dcm", visit / "oct_j2k.dcm", visit / "fundus.dcm", *series]


@pytest.mark.parametrize("modality", [None, "oct"])
def test_retina_embed_parses_each_dicom_header_exactly_once(toy_package, tmp_path, count_parses, modality):
    """Discovery, planning and reading together: one dcmread per DICOM file, the fundus files included
    when only OCT is embedded (discovery must classify them; they are not parsed again)."""
    files = mixed_dicom_folder(tmp_path / "data")
    store = tmp_path / "store"
    args = ["embed", str(tmp_path / "data"), "--model", str(toy_package), "--store", str(store), "--json"]
    if modality:
        args += ["--modality", modality]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["embedded"], summary["failed"]) == ((3, 0) if modality else (4, 0))
    assert count_parses == Counter({str(path): 1 for path in files})


def test_discovery_dataset_is_decoded_and_left_without_pixels(tmp_path, count_parses):
    """read_source decodes the dataset discovery parsed; afterwards its pixel data is on disk again
    (a queued Source keeps the part of its header decoding needs, never the pixels)."""
    volume = noisy_volume()
    path = tmp_path / "oct.dcm"
    write_opt(path, volume)
    source = only_source(path)
    assert isinstance(source.header, pydicom.Dataset)
    assert count_parses == Counter({str(path): 1})
    # it keeps what decoding needs; the metadata (identifiers included) was taken out already
    assert "Rows" in source.header and "PatientName" not in source.header
    assert source.meta("oct").patient_id == "SYN000001"
    for _ in range(2):
        np.testing.assert_array_equal(read_source(source)[0].pixels, volume)
        assert source.header.get_item(0x7FE00010, keep_deferred=True).value is None
    assert count_parses == Counter({str(path): 1})


def test_a_file_rewritten_after_discovery_is_parsed_again(tmp_path, count_parses):
    """The discovered dataset's offsets would be stale: the reader parses the new file instead."""
    import os

    path = tmp_path / "oct.dcm"
    write_opt(path, noisy_volume())
    source = only_source(path)
    changed = noisy_volume(n=N + 2, seed=9)
    write_opt(path, changed)
    os.utime(path, (1_000_000_000, 1_000_000_000))  # a different mtime, whatever the clock's resolution
    item = read_source(source, oct_frames=pick(4))[0]
    np.testing.assert_array_equal(item.pixels, changed[slice_indices(N + 2, 4)])
    assert item.meta.extra["bscans"] == N + 2 and count_parses == Counter({str(path): 2})


# --- guarded access ----------------------------------------------------------------------------------


def with_broken_element(path: Path, tag: int, vr: str) -> Path:
    """Rewrite `path` with `tag` holding one byte where its VR needs two: pydicom cannot convert it."""
    ds = pydicom.dcmread(path)
    ds._dict[Tag(tag)] = RawDataElement(Tag(tag), vr, 1, b"\x01", 0, False, True)
    ds.save_as(path)
    return path


def test_a_broken_element_a_reader_uses_is_one_error_naming_the_tag(tmp_path):
    for tag, vr, name in ((0x00280010, "US", "rows.dcm"), (0x00280100, "US", "bits.dcm")):
        path = tmp_path / name
        write_opt(path, ramp_volume(3, 16, 16), patient="SYN000777")
        with_broken_element(path, tag, vr)
        found = scan([path])
        assert found.sources == [] and len(found.errors) == 1
        assert found.errors[0].reason == f"broken DICOM header (invalid value in tag {Tag(tag)})"
        assert "SYN000777" not in str(found.errors[0])


def test_a_broken_element_no_reader_uses_does_not_fail_the_file(tmp_path):
    """Smallest Image Pixel Value (0028,0106) is read by no reader: never converted, never an error."""
    volume = ramp_volume(3, 16, 16)
    path = tmp_path / "oct.dcm"
    write_opt(path, volume)
    with_broken_element(path, 0x00280106, "US")
    with pytest.raises(Exception):  # noqa: B017 - pydicom itself cannot convert it
        _ = pydicom.dcmread(path).SmallestImagePixelValue
    np.testing.assert_array_equal(read_oct(path).pixels, volume)


# --- discovery as `retina embed` runs it: the metadata is the reader's -------------------------------

LATERALITY = 0x00200062  # Image Laterality: the metadata reads it, classification does not
BROKEN_LATERALITY = f"broken DICOM header (invalid value in tag {Tag(LATERALITY)})"


def converted_keywords(ds) -> set[str]:
    """Keywords of the elements pydicom has converted (the others are still raw bytes)."""
    return {keyword_for_tag(tag) for tag in tuple(ds.keys())  # iterating a Dataset would convert them
            if not isinstance(ds.get_item(tag, keep_deferred=True), RawDataElement)}


def streamed(paths) -> tuple[list[Source], list[ReadError]]:
    found = list(scan_iter(paths, metas=False))
    return [x for x in found if isinstance(x, Source)], [x for x in found if isinstance(x, ReadError)]


def test_streamed_discovery_converts_only_what_classifies_a_file(tmp_path):
    """metas=False (retina embed): of each header only the SOP class and frame count are converted; the
    metadata, read on first use or by the reader, equals what scan() computes, and so do the items."""
    visit = tmp_path / "visit"
    visit.mkdir()
    write_opt(visit / "oct.dcm", noisy_volume(), patient="SYN000321", localizer_uid="1.2.3.4")
    write_op(visit / "fundus.dcm", np.random.default_rng(2).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    sources, errors = streamed([visit])
    assert errors == [] and sorted(s.path.name for s in sources) == ["fundus.dcm", "oct.dcm"]
    for source in sources:
        assert converted_keywords(source.header) <= {"SpecificCharacterSet", "SOPClassUID", "NumberOfFrames"}
        assert "PatientID" in source.header  # kept, unread, until the reader needs it
    eager = {s.path: s for s in scan([visit]).sources}
    for source in sources:
        modality = source.modalities[0]
        assert source.meta(modality) == eager[source.path].meta(modality)
        assert pickle.loads(pickle.dumps(source)).meta(modality) == source.meta(modality)
        (item,), (expected,) = read_source(source), read_source(eager[source.path])
        assert item.meta == expected.meta and item.meta.patient_id in ("SYN000321", "SYN000001")
        np.testing.assert_array_equal(item.pixels, expected.pixels)
    assert eager[visit / "oct.dcm"].meta("oct").referenced_sop_uids == ("1.2.3.4",)


def test_streamed_discovery_leaves_a_broken_metadata_element_to_the_reader(tmp_path):
    """A broken element only the metadata reads: scan() reports it (as before); streamed discovery
    classifies the file, and the reader (or the metadata's first use) raises the same one line, naming
    the tag and never a header value."""
    path = tmp_path / "oct.dcm"
    write_opt(path, ramp_volume(3, 16, 16), patient="SYN000777")
    with_broken_element(path, LATERALITY, "US")
    found = scan([path])
    assert found.sources == [] and [e.reason for e in found.errors] == [BROKEN_LATERALITY]
    (source,), errors = streamed([path])
    assert errors == []
    for use in (lambda: read_source(source), lambda: source.meta("oct")):
        with pytest.raises(ReadError) as caught:
            use()
        assert caught.value.reason == BROKEN_LATERALITY and "SYN000777" not in str(caught.value)


def test_retina_embed_reports_a_broken_metadata_element_as_that_files_one_error(toy_package, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_opt(data / "good.dcm", noisy_volume())
    write_opt(data / "broken.dcm", noisy_volume(seed=3), patient="SYN000777")
    with_broken_element(data / "broken.dcm", LATERALITY, "US")
    store = tmp_path / "store"
    result = CliRunner().invoke(app, ["embed", str(data), "--model", str(toy_package), "--store", str(store),
                                      "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["embedded"], summary["failed"]) == (1, 1)
    assert [e["error"] for e in summary["errors"]] == [BROKEN_LATERALITY]
    assert "SYN000777" not in result.output + (store / "errors.csv").read_text()


@pytest.mark.parametrize("metas", [True, False])
def test_a_broken_single_frame_b_scan_is_left_out_of_its_series_either_way(tmp_path, metas):
    """Discovery decides a series' members, so a single-frame B-scan is checked whole in both modes."""
    files = write_bscan_series(tmp_path / "series", ramp_volume(5, 16, 16))
    with_broken_element(files[2], LATERALITY, "US")
    found = list(scan_iter([tmp_path / "series"], metas=metas))
    errors = [x for x in found if isinstance(x, ReadError)]
    sources = [x for x in found if isinstance(x, Source)]
    assert [(e.path, e.reason) for e in errors] == [(str(files[2]), BROKEN_LATERALITY)]
    assert len(sources) == 1 and set(sources[0].members) == set(files) - {files[2]}
    assert read_source(sources[0])[0].pixels.shape == (4, 16, 16)


# --- frame-selective decoding --------------------------------------------------------------------------


def build(kind: str, root: Path) -> Path:
    """A volume of N B-scans in the reader `kind`; returns the path discovery is given."""
    root.mkdir(parents=True, exist_ok=True)
    if kind == "dicom-uint8":
        return write_dicom_volume(root / "v.dcm", noisy_volume(np.uint8))
    if kind == "dicom-uint16":
        return write_dicom_volume(root / "v.dcm", noisy_volume(np.uint16))
    if kind == "dicom-rgb":
        gray = noisy_volume(np.uint8)
        rgb = np.stack([gray, gray // 2, 255 - gray], axis=-1)
        return write_dicom_volume(root / "v.dcm", rgb, "RGB")
    if kind == "dicom-monochrome1":
        return write_dicom_volume(root / "v.dcm", noisy_volume(np.uint16), "MONOCHROME1")
    if kind == "dicom-jpeg2000":
        write_opt(root / "v.dcm", noisy_volume(np.uint8)[:, :32, :48], jpeg2000=True)
        return root / "v.dcm"
    if kind == "dicom-series":
        write_bscan_series(root / "series", noisy_volume(np.uint8)[:, :16, :24])
        return root / "series"
    if kind == "tiff":
        tifffile.imwrite(root / "v.tif", noisy_volume(np.uint16))
        return root / "v.tif"
    if kind == "npy":
        np.save(root / "v.npy", noisy_volume(np.uint16))
        return root / "v.npy"
    if kind == "bscan-folder":
        for index, bscan in enumerate(noisy_volume(np.uint8)[:, :32, :40]):
            write_png(root / f"bscan_{index}.png", bscan)
        return root
    raise AssertionError(kind)


KINDS = ["dicom-uint8", "dicom-uint16", "dicom-rgb", "dicom-monochrome1", "dicom-jpeg2000", "dicom-series",
         "tiff", "npy", "bscan-folder"]


@pytest.mark.parametrize("kind", KINDS)
def test_selected_b_scans_equal_the_full_decode_picked(kind, tmp_path):
    """For 1, 3, 4 and 16 of 7 B-scans (16: repeats): the selected volume is the full one's picked
    B-scans (values and dtype), its metadata gives the full count, and preprocessing gives the
    identical model input."""
    source = only_source(build(kind, tmp_path / kind))
    full = read_source(source)[0]
    assert full.pixels.shape[0] == N and "bscans" not in full.meta.extra
    for k in (1, 3, 4, 16):
        picked = read_source(source, oct_frames=pick(k))[0]
        expected = full.pixels[slice_indices(N, k)]
        assert picked.pixels.dtype == expected.dtype
        np.testing.assert_array_equal(picked.pixels, expected)
        assert picked.meta.extra["bscans"] == N
        spec = make_spec(oct_slices=k, oct_size=(16, 24))
        np.testing.assert_array_equal(preprocess_oct(picked.pixels, spec), preprocess_oct(full.pixels, spec))


@pytest.mark.parametrize("kind", ["dicom-uint8", "dicom-uint16", "dicom-rgb", "dicom-monochrome1"])
def test_uncompressed_frames_read_straight_from_the_file_equal_pydicoms_decode(kind, tmp_path):
    """Plain uncompressed layouts are read into the array without pydicom's decoder: the result is
    pydicom's own pixel_array (MONOCHROME1 inverted to bright = high, RGB B-scans to luminance)."""
    from retinacli.readers.common import to_grayscale

    path = build(kind, tmp_path)
    expected = pydicom.dcmread(path).pixel_array
    if kind == "dicom-monochrome1":
        expected = (np.uint16(65535) - expected).astype(np.uint16)  # 16 bits stored: top = 65535
    if kind == "dicom-rgb":
        expected = to_grayscale(expected)
    source = only_source(path)
    for frames in (None, pick(N)):
        item = read_source(source, oct_frames=frames)[0]
        assert item.pixels.dtype == expected.dtype and item.pixels.flags.writeable
        np.testing.assert_array_equal(item.pixels, expected)
    photo = np.random.default_rng(4).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    write_op(tmp_path / "photo.dcm", photo)
    np.testing.assert_array_equal(read_source(only_source(tmp_path / "photo.dcm"))[0].pixels, photo)


def test_uncompressed_dicom_reads_only_the_picked_frames(tmp_path, monkeypatch):
    """The pixel data element is never read whole: the picked frames come from their file offsets."""
    path = write_dicom_volume(tmp_path / "v.dcm", noisy_volume(np.uint16))
    source = only_source(path)
    whole_reads = []
    real = pydicom.filereader.read_deferred_data_element
    monkeypatch.setattr(pydicom.filereader, "read_deferred_data_element",
                        lambda *a, **k: (whole_reads.append(1), real(*a, **k))[1])
    picked = read_source(source, oct_frames=pick(4))[0]
    assert picked.pixels.shape == (4, H, W) and whole_reads == []
    expected = pydicom.dcmread(path).pixel_array[slice_indices(N, 4)]
    _ = source.header.PixelData  # reading the element itself goes through the counted function
    assert whole_reads == [1]
    np.testing.assert_array_equal(picked.pixels, expected)


def test_jpeg2000_decodes_only_the_picked_frames(tmp_path):
    """A frame the model does not sample is not decoded: with its codestream damaged, the full
    decode fails and the selective one still gives the exact picked frames."""
    volume = noisy_volume(np.uint8)[:, :32, :48]
    path = tmp_path / "v.dcm"
    write_opt(path, volume, jpeg2000=True)
    data = bytearray(path.read_bytes())
    fragments = list(generate_fragments(pydicom.dcmread(path).PixelData))
    assert len(fragments) == N + 1  # the basic offset table, then one fragment per frame
    frame2 = bytes(fragments[3])  # frame index 2: slice_indices(7, 3) == [1, 3, 5]
    at = data.find(frame2)
    data[at + 60 : at + len(frame2)] = b"\xff" * (len(frame2) - 60)  # SIZ kept: size checks pass
    path.write_bytes(bytes(data))
    source = only_source(path)
    with pytest.raises(ReadError, match="cannot decode pixel data"):
        read_source(source)
    picked = read_source(source, oct_frames=pick(3))[0]
    np.testing.assert_array_equal(picked.pixels, volume[[1, 3, 5]])


@pytest.mark.parametrize("kind", ["dicom-series", "bscan-folder"])
def test_one_file_per_b_scan_reads_only_the_picked_files(kind, tmp_path):
    """A broken B-scan file the model does not sample fails the full read only."""
    if kind == "dicom-series":  # B-scans over 64 KB: their pixel data stays on disk until decoded
        volume = np.random.default_rng(3).integers(0, 255, (N, 200, 400), np.uint8)
        write_bscan_series(tmp_path / kind, volume)
        source = only_source(tmp_path / kind)
    else:
        source = only_source(build(kind, tmp_path / kind))
    skipped = source.members[2]  # not in slice_indices(7, 3) == [1, 3, 5]
    skipped.write_bytes(skipped.read_bytes()[:-200])  # pixel data cut short, header intact
    with pytest.raises(ReadError):
        read_source(source)
    picked = read_source(source, oct_frames=pick(3))[0]
    assert picked.pixels.shape[0] == 3 and picked.meta.extra["bscans"] == N


def test_guards_still_apply_to_selective_reads(tmp_path):
    """Truncated pixel data, extra frames the header does not declare, and B-scans of another size
    are refused with or without `oct_frames`."""
    volume = noisy_volume(np.uint8)
    good = write_dicom_volume(tmp_path / "good.dcm", volume)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(good.read_bytes()[:-(H * W) // 2])
    ds = pydicom.dcmread(good)
    ds.NumberOfFrames = N - 2  # two whole frames more data than declared
    ds.save_as(tmp_path / "extra.dcm")
    odd = tmp_path / "odd"
    build("bscan-folder", odd)
    write_png(odd / "bscan_6.png", np.zeros((30, 40), np.uint8))  # not a picked B-scan for k = 3
    cases = {cut: "truncated pixel data", tmp_path / "extra.dcm": "pixel data does not match the header",
             odd: "B-scans differ in size"}
    for path, reason in cases.items():
        source = only_source(path)
        for frames in (None, pick(3)):
            with pytest.raises(ReadError, match=reason):
                read_source(source, oct_frames=frames)


def test_a_fundus_photo_ignores_oct_frames(tmp_path):
    photo = np.random.default_rng(2).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    write_op(tmp_path / "f.dcm", photo)
    source = only_source(tmp_path / "f.dcm")
    item = read_source(source, oct_frames=pick(3))[0]
    np.testing.assert_array_equal(item.pixels, photo)
    assert "bscans" not in item.meta.extra
