"""Readers on every supported format, their metadata, and one-line errors for broken input."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless
from test_readers_support import (
    ramp_volume,
    write_bscan_series,
    write_op,
    write_opt,
    write_png,
)

from retinacli.errors import ReadError
from retinacli.items import FundusImage, OctVolume
from retinacli.readers import read_fundus, read_item, read_items, read_oct

# --- DICOM OCT -------------------------------------------------------------------------------------


def test_multiframe_opt_pixels_and_metadata(tmp_path):
    volume = ramp_volume(5, 32, 48)
    path = tmp_path / "oct.dcm"
    written = write_opt(path, volume, "SYN000123", "OS", "20240215103000", localizer_uid="1.2.3.4")
    item = read_item(path)
    assert isinstance(item, OctVolume) and item.modality == "oct" and item.format == "dicom"
    assert item.pixels.dtype == np.uint8
    np.testing.assert_array_equal(item.pixels, volume)
    meta = item.meta
    assert meta.laterality == "OS"
    assert meta.study_date == "2024-02-15"  # validated, ISO (readers/sanitize.py)
    assert meta.acquisition_datetime == "2024-02-15T10:30:00"
    assert meta.device == "Carl Zeiss Meditec Cirrus"  # canonical, not the header's text
    assert meta.pixel_spacing_mm == pytest.approx((0.12, 0.0039, 0.0117))
    assert meta.patient_id == "SYN000123"  # kept internally (outputs pseudonymise it)
    assert meta.study_uid == written.StudyInstanceUID
    assert meta.series_uid == written.SeriesInstanceUID
    assert meta.sop_instance_uid == written.SOPInstanceUID
    assert meta.referenced_sop_uids == ("1.2.3.4",)


def test_a_dicom_header_is_parsed_once_per_read_and_again_after_the_file_changes(tmp_path, monkeypatch):
    """One parse per read: discovery's dataset is the one decoded (Source.header); a changed file is
    parsed afresh. (Counts pydicom.dcmread: no element-by-element conversion pass exists any more.)"""
    volume = ramp_volume(4, 16, 24)
    path = tmp_path / "oct.dcm"
    write_opt(path, volume, "SYN000123", "OD", "20240215103000")
    parses = []
    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread",  # a path or an open file: counted by its name
                        lambda *a, **k: (parses.append(str(getattr(a[0], "name", a[0]))), real(*a, **k))[1])
    np.testing.assert_array_equal(read_oct(path).pixels, volume)  # discovery header, then its pixels
    assert parses == [str(path)]
    np.testing.assert_array_equal(read_oct(path).pixels, volume)
    assert parses == [str(path)] * 2
    changed = ramp_volume(5, 16, 24)
    write_opt(path, changed, "SYN000123", "OD", "20240215103000")  # new content (size and mtime)
    np.testing.assert_array_equal(read_oct(path).pixels, changed)
    assert parses == [str(path)] * 3


def test_jpeg2000_opt_decodes_losslessly(tmp_path):
    volume = ramp_volume(4, 64, 64)
    path = tmp_path / "j2k.dcm"
    write_opt(path, volume, jpeg2000=True, localizer_uid="1.2.3")
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEG2000Lossless
    item = read_oct(path)
    np.testing.assert_array_equal(item.pixels, volume)


def test_16bit_opt(tmp_path):
    volume = (ramp_volume(3, 16, 16).astype(np.uint16) * 200).astype(np.uint16)
    write_opt(tmp_path / "oct16.dcm", volume)
    item = read_oct(tmp_path / "oct16.dcm")
    assert item.pixels.dtype == np.uint16
    np.testing.assert_array_equal(item.pixels, volume)


@pytest.mark.parametrize("order_by", ["position", "instance"])
def test_single_frame_series_is_reordered(tmp_path, order_by):
    volume = ramp_volume(7, 16, 20)
    series_dir = tmp_path / "series"
    write_bscan_series(series_dir, volume, order_by=order_by)
    # file names are a shuffled numbering, so name order is wrong
    item = read_oct(series_dir)
    assert item.format == "dicom-series"
    assert item.shape == (7, 16, 20)
    np.testing.assert_array_equal(item.pixels, volume)
    assert item.meta.laterality == "OS"
    if order_by == "position":  # slice spacing from the positions (0.25 mm apart)
        assert item.meta.pixel_spacing_mm == pytest.approx((0.25, 0.004, 0.011))


# --- DICOM fundus ----------------------------------------------------------------------------------


def test_op_rgb_8bit(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    write_op(tmp_path / "op.dcm", image, "SYN000001", "OD")
    item = read_fundus(tmp_path / "op.dcm")
    assert isinstance(item, FundusImage) and item.shape == (30, 40, 3)
    np.testing.assert_array_equal(item.pixels, image)
    assert item.meta.laterality == "OD" and item.meta.pixel_spacing_mm == (0.01, 0.01)


def test_op_16bit_gray(tmp_path):
    image = (np.arange(24 * 20, dtype=np.uint16).reshape(24, 20) * 97).astype(np.uint16)
    write_op(tmp_path / "op16.dcm", image)
    assert pydicom.dcmread(tmp_path / "op16.dcm").SOPClassUID.endswith("77.1.5.2")
    item = read_fundus(tmp_path / "op16.dcm")
    assert item.shape == (24, 20, 1) and item.pixels.dtype == np.uint16
    np.testing.assert_array_equal(item.pixels[..., 0], image)


def test_monochrome1_is_inverted(tmp_path):
    image = np.arange(256, dtype=np.uint8).reshape(16, 16)
    write_op(tmp_path / "mono1.dcm", image, photometric="MONOCHROME1")
    item = read_fundus(tmp_path / "mono1.dcm")
    np.testing.assert_array_equal(item.pixels[..., 0], 255 - image)  # bright = high after reading


def test_ybr_full_is_converted_to_rgb(tmp_path):
    from pydicom.pixels import convert_color_space

    rgb = np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    write_op(tmp_path / "ybr.dcm", ybr, photometric="YBR_FULL")
    item = read_fundus(tmp_path / "ybr.dcm")
    assert np.abs(item.pixels.astype(int) - rgb.astype(int)).max() <= 2


def test_multiframe_op_reads_first_frame_as_fundus(tmp_path):
    frames = np.stack([np.full((16, 16), 10 * (i + 1), np.uint8) for i in range(3)])
    path = tmp_path / "angio.dcm"
    ds = write_op(path, frames[0])
    ds.NumberOfFrames = 3
    ds.PixelData = frames.tobytes()
    ds.save_as(path, enforce_file_format=True)
    item = read_item(path)
    assert item.modality == "fundus" and item.shape == (16, 16, 1)
    assert int(item.pixels[0, 0, 0]) == 10 and item.meta.extra["frames"] == 3
    with pytest.raises(ReadError, match="is a fundus image, not an OCT volume"):
        read_oct(path)


# --- images, TIFF, npy ------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".ppm", ".tif"])
def test_colour_fundus_images(tmp_path, suffix):
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    image[..., 0] = 200
    image[..., 2] = 50
    path = tmp_path / f"fundus{suffix}"
    if suffix == ".tif":
        tifffile.imwrite(path, image, photometric="rgb")
    else:
        Image.fromarray(image).save(path)
    item = read_item(path)
    assert item.modality == "fundus" and item.shape == (20, 30, 3)
    tolerance = 3 if suffix == ".jpg" else 0
    assert np.abs(item.pixels.astype(int) - image.astype(int)).max() <= tolerance


def test_gray_and_rgba_png(tmp_path):
    gray = np.arange(200, dtype=np.uint8).reshape(10, 20)
    write_png(tmp_path / "gray.png", gray)
    assert read_fundus(tmp_path / "gray.png").shape == (10, 20, 1)
    rgba = np.zeros((10, 20, 4), dtype=np.uint8)
    rgba[..., 1] = 99
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    item = read_fundus(tmp_path / "rgba.png")
    assert item.shape == (10, 20, 3) and int(item.pixels[0, 0, 1]) == 99
    gray16 = (np.arange(200, dtype=np.uint16).reshape(10, 20) * 300).astype(np.uint16)
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    item16 = read_fundus(tmp_path / "gray16.png")
    assert item16.pixels.dtype == np.uint16
    np.testing.assert_array_equal(item16.pixels[..., 0], gray16)


def test_bscan_png_folder_natural_order(tmp_path):
    folder = tmp_path / "volume"
    folder.mkdir()
    for index in range(12):  # bscan_2 must come before bscan_10
        write_png(folder / f"bscan_{index}.png", np.full((8, 10), index * 20, dtype=np.uint8))
    item = read_item(folder)
    assert item.modality == "oct" and item.format == "bscan-folder" and item.shape == (12, 8, 10)
    assert [int(v) for v in item.pixels[:, 0, 0]] == [i * 20 for i in range(12)]


def test_multipage_tiff_is_oct_single_page_is_fundus(tmp_path):
    volume = ramp_volume(6, 16, 24)
    tifffile.imwrite(tmp_path / "stack.tif", volume)
    item = read_item(tmp_path / "stack.tif")
    assert item.modality == "oct" and item.format == "tiff"
    np.testing.assert_array_equal(item.pixels, volume)
    tifffile.imwrite(tmp_path / "slo.tiff", volume[0])
    assert read_item(tmp_path / "slo.tiff").shape == (16, 24, 1)
    with pytest.raises(ReadError, match="is a fundus image, not an OCT volume"):
        read_oct(tmp_path / "slo.tiff")


def test_npy_by_shape(tmp_path):
    volume = ramp_volume(4, 8, 8)
    np.save(tmp_path / "vol.npy", volume)
    np.save(tmp_path / "gray.npy", volume[0])
    np.save(tmp_path / "rgb.npy", np.zeros((8, 8, 3), np.uint8))
    np.save(tmp_path / "f64.npy", np.ones((3, 8, 9)))
    assert read_item(tmp_path / "vol.npy").shape == (4, 8, 8)
    assert read_item(tmp_path / "gray.npy").shape == (8, 8, 1)
    assert read_item(tmp_path / "rgb.npy").modality == "fundus"
    assert read_item(tmp_path / "f64.npy").pixels.dtype == np.float32
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ReadError, match="Python objects"):
        read_item(tmp_path / "objects.npy")
    with pytest.raises(ReadError, match="is an OCT volume, not a fundus image"):
        read_fundus(tmp_path / "vol.npy")


# --- Heidelberg .vol -------------------------------------------------------------------------------


@pytest.mark.parametrize("name,pattern", [("Willis_B_716_0.vol", "line"), ("valid.vol", "circle")])
def test_heidelberg_vol_gives_oct_and_slo(shared_samples, name, pattern):
    path = shared_samples / "heidelberg_vol" / name
    oct_item, slo_item = read_items(path)
    assert oct_item.modality == "oct" and oct_item.shape == (1, 496, 768)
    assert oct_item.pixels.dtype == np.uint8
    assert slo_item.modality == "fundus" and slo_item.shape == (768, 768, 1)
    # the intensity transform makes the B-scan visible: a plain cast of reflectivity 0..1 is ~0
    assert 20 < oct_item.pixels.mean() < 120 and oct_item.pixels.max() > 200
    assert oct_item.meta.laterality == "OD" and oct_item.meta.extra["scan_pattern"] == pattern
    assert oct_item.meta.device.startswith("Heidelberg")
    assert read_fundus(path).shape == (768, 768, 1)
    assert read_oct(path).shape == (1, 496, 768)


def test_heidelberg_vol_without_eyepy(shared_samples, monkeypatch):
    monkeypatch.setitem(sys.modules, "eyepy", None)
    monkeypatch.setitem(sys.modules, "eyepy.io.he.vol_reader", None)
    with pytest.raises(ReadError, match=r"pip install 'retina\[vendor\]'"):
        read_item(shared_samples / "heidelberg_vol" / "valid.vol")


def test_truncated_vol(shared_samples, tmp_path):
    data = (shared_samples / "heidelberg_vol" / "valid.vol").read_bytes()
    (tmp_path / "cut.vol").write_bytes(data[:100_000])
    with pytest.raises(ReadError, match=r"truncated \.vol file"):
        read_item(tmp_path / "cut.vol")


# --- errors ----------------------------------------------------------------------------------------


def test_broken_files_give_one_line_reasons(tmp_path):
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "text.dcm").write_text("this is not DICOM\n" * 20)
    write_opt(tmp_path / "good.dcm", ramp_volume(4, 32, 32))
    data = (tmp_path / "good.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[:-500])
    write_png(tmp_path / "good.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    png = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    expected = {
        "empty.dcm": "empty file (0 bytes)",
        "text.dcm": "not a DICOM file",
        "cut.dcm": "truncated pixel data",
        "cut.png": "image truncated",
    }
    for name, reason in expected.items():
        with pytest.raises(ReadError) as caught:
            read_item(tmp_path / name)
        assert caught.value.reason.startswith(reason), (name, caught.value.reason)
        assert str(caught.value) == f"{tmp_path / name}: {caught.value.reason}"
        assert "\n" not in str(caught.value)


def test_unsupported_transfer_syntax_names_the_plugin(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLosslessSV1

    # JPEG Lossless (process 14) has no decoder in the default or test install (pyjpegls, which highdicom
    # brings, decodes JPEG-LS, so that one is no longer "unsupported" here)
    assert not get_decoder(JPEGLosslessSV1).is_available
    path = tmp_path / "jpeg_lossless.dcm"
    ds = write_opt(path, ramp_volume(2, 32, 32))
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([b"\xff\xd8garbage\xff\xd9", b"\xff\xd8garbage\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ReadError, match=r"unsupported transfer syntax JPEG Lossless.*pip install"):
        read_item(path)
    # a decodable syntax with a broken stream: still one line naming the file
    jls = tmp_path / "jls.dcm"
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.save_as(jls, enforce_file_format=True)
    with pytest.raises(ReadError, match=r"jls\.dcm: (cannot decode pixel data|unsupported transfer syntax)"):
        read_item(jls)


def test_decompression_bomb_guards(tmp_path, monkeypatch):
    path = tmp_path / "huge.dcm"
    ds = write_opt(path, ramp_volume(2, 32, 32))
    ds.Rows, ds.Columns, ds.NumberOfFrames = 60000, 60000, 1000  # header claims 3.6e12 samples
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ReadError, match="too large"):
        read_item(path)
    write_png(tmp_path / "big.png", np.zeros((100, 100), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ReadError, match="decompression-bomb"):
        read_item(tmp_path / "big.png")


def test_missing_path_and_non_image(tmp_path):
    with pytest.raises(ReadError, match="no such file or directory"):
        read_item(tmp_path / "nope.dcm")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ReadError, match="not an image"):
        read_item(tmp_path / "notes.txt")


def test_vol_sample_copy_is_readable_elsewhere(shared_samples, tmp_path):
    """A .vol is found by its content header, so a renamed copy still reads (and pairs with itself)."""
    shutil.copy(shared_samples / "heidelberg_vol" / "valid.vol", tmp_path / "scan.vol")
    assert [i.modality for i in read_items(tmp_path / "scan.vol")] == ["oct", "fundus"]
