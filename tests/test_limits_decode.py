"""Limits: decoded size. Small files that declare gigabytes are refused from what they declare (the
JPEG 2000 / JPEG codestream, the TIFF tags, the PNG header, the .npy header) before any pixel buffer is
allocated; `--max-pixels` sets the per-item budget; TIFF thumbnail pages, multi-page colour TIFFs and
EXIF orientation are read as what they are (docs/reliability.md, "Limits: decoded size")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from bombs import (
    build_bombs,
    deflated_dicom,
    j2k_dicom,
    npy_bomb,
    patch_siz,
    png_bomb,
    tiff_bomb,
    tiff_patched,
)
from PIL import Image
from test_readers_support import ramp_volume, write_opt

from retinacli.errors import ReadError
from retinacli.readers import iter_items, read_fundus, read_item, read_oct
from retinacli.readers.common import DEFAULT_MAX_PIXELS, max_pixels, parse_max_pixels, set_max_pixels
from retinacli.readers.dicom import codestream_size

TESTS = Path(__file__).parent
RSS_LIMIT_MB = 300


@pytest.fixture(autouse=True)
def _default_budget(monkeypatch):
    monkeypatch.delenv("RETINA_MAX_PIXELS", raising=False)
    set_max_pixels(None)
    yield
    set_max_pixels(None)


def _read_in_child(paths: list[Path]) -> tuple[list[str], float]:
    """Read each path in a fresh interpreter: (one line per path, peak RSS in MB (VmHWM))."""
    script = textwrap.dedent(
        """
        import json, sys
        from retinacli.readers import read_item
        lines = []
        for path in sys.argv[1:]:
            try:
                item = read_item(path)
                lines.append(f"read {item.shape}")
            except Exception as exc:
                lines.append(str(exc))
        peak = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        print(json.dumps({"lines": lines, "peak_mb": int(peak.split()[1]) / 1024}))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    env.pop("RETINA_MAX_PIXELS", None)
    done = subprocess.run([sys.executable, "-c", script, *map(str, paths)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["lines"], result["peak_mb"]


def test_bombs_are_refused_before_a_large_allocation(tmp_path):
    bombs = build_bombs(tmp_path / "bombs")
    assert all(path.stat().st_size < 500_000 for path in bombs)  # small files ...
    started = time.monotonic()
    lines, peak_mb = _read_in_child(bombs)
    elapsed = time.monotonic() - started
    assert peak_mb < RSS_LIMIT_MB, (peak_mb, lines)  # ... that would decode to gigabytes
    assert elapsed < 30
    for path, line in zip(bombs, lines, strict=True):
        assert line.startswith(str(path) + ": "), line  # names the file
        assert "\n" not in line and len(line) < 200
    reasons = dict(zip([p.name for p in bombs], lines, strict=True))
    assert "JPEG 2000 pixel data (frame 1) too large: decoded size 7.20e9 samples" in reasons["j2k_bomb.dcm"]
    assert "exceeds --max-pixels 1.34e8" in reasons["j2k_bomb.dcm"]
    assert "deflated data set too large" in reasons["deflated_bomb.dcm"]
    assert "TIFF pages too large: decoded size 3.36e9 samples (3.4 GB)" in reasons["tiff_bomb.tif"]
    assert "TIFF page too large: decoded size 3.60e9 samples" in reasons["tiff_patched.tif"]
    assert "image too large: decoded size 3.60e9 pixels exceeds the decompression-bomb guard" in reasons[
        "png_bomb.png"]
    assert "array too large: decoded size 6.87e10 samples (68.7 GB)" in reasons["npy_bomb.npy"]
    assert "truncated or unreadable .npy" in reasons["npy_truncated.npy"]


def test_a_bomb_never_stops_the_batch(tmp_path):
    folder = tmp_path / "mixed"
    build_bombs(folder)
    write_opt(folder / "good.dcm", ramp_volume(3, 64, 64), jpeg2000=True)
    results = list(iter_items([folder]))
    read = [r for r in results if not isinstance(r, ReadError)]
    errors = [r for r in results if isinstance(r, ReadError)]
    assert [Path(item.path).name for item in read] == ["good.dcm"]
    assert len(errors) == 7 and all("too large" in str(e) or "truncated" in str(e) for e in errors)


def test_embed_over_bombs_stays_small(tmp_path, toy_package):
    """The whole `retina embed` path (discovery, reading, the failure report) in a fresh process."""
    folder = tmp_path / "mixed"
    bombs = build_bombs(folder)
    Image.fromarray(np.full((50, 60, 3), 90, np.uint8)).save(folder / "ok.png")
    wrapper = (
        "import json, resource, subprocess, sys\n"
        "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
        "print(json.dumps([peak, done.returncode, done.stdout, done.stderr]))\n"
    )
    retina = Path(sys.executable).parent / "retina"
    command = [str(retina), "embed", str(folder), "--model", str(toy_package), "--store",
               str(tmp_path / "store"), "--json"]
    env = {k: v for k, v in os.environ.items() if k != "RETINA_MAX_PIXELS"}
    out = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True,
                         env=env, timeout=300, check=True)
    peak_mb, code, stdout, stderr = json.loads(out.stdout)
    assert peak_mb < RSS_LIMIT_MB, peak_mb
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["embedded"] == 1 and report["failed"] == len(bombs)
    failed = {Path(e["path"]).name: e["error"] for e in report["errors"]}
    assert set(failed) == {p.name for p in bombs}
    assert all("too large" in why or "truncated" in why for why in failed.values()), failed
    assert "Traceback" not in stderr and "tifffile" not in stderr  # no raw library warning


def test_codestream_size_differs_from_the_dicom_header(tmp_path):
    path = j2k_dicom(tmp_path / "mismatch.dcm", width=128, height=96)  # within the budget
    with pytest.raises(ReadError, match="JPEG 2000 codestream declares another image size than the "
                       "header's Rows/Columns") as caught:
        read_item(path)
    assert "128" not in str(caught.value) and "96" not in str(caught.value)  # no declared value quoted


def test_deflated_dicom(tmp_path):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    volume = ramp_volume(3, 64, 64)
    ds = write_opt(tmp_path / "ok.dcm", volume)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "ok.dcm", enforce_file_format=True)
    np.testing.assert_array_equal(read_oct(tmp_path / "ok.dcm").pixels, volume)  # a good one reads
    small = deflated_dicom(tmp_path / "small.dcm", megabytes=40)  # 40 MB beyond its 8 KB of pixels
    with pytest.raises(ReadError, match="deflated data set too large: inflates to more than 17 MB"):
        read_item(small)


def test_codestream_size_parsers():
    # JPEG 2000 raw codestream, patched; JPEG baseline from Pillow; unknown bytes
    j2k = b"\xff\x4f\xff\x51\x00\x29\x00\x00" + bytes(32) + b"\x00\x01" + b"\x07\x01\x01"
    assert codestream_size(patch_siz(j2k, 300, 200)) == ("JPEG 2000", 300, 200, 1)
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(buffer, "JPEG")
    assert codestream_size(buffer.getvalue()) == ("JPEG", 30, 20, 3)
    assert codestream_size(b"\x00" * 64) is None


def test_good_compressed_dicom_still_reads(tmp_path):
    volume = ramp_volume(4, 64, 64)
    write_opt(tmp_path / "ok.dcm", volume, jpeg2000=True)
    np.testing.assert_array_equal(read_oct(tmp_path / "ok.dcm").pixels, volume)


def test_default_budget_admits_the_largest_real_acquisitions(tmp_path):
    assert max_pixels() == DEFAULT_MAX_PIXELS == 2**27
    # a 128 x 1024 x 512 OCT cube (6.7e7 voxels) as a deflate TIFF, and a 4000 x 4000 RGB photo
    tifffile.imwrite(tmp_path / "cube.tif", np.zeros((128, 1024, 512), np.uint8), compression="zlib")
    assert read_oct(tmp_path / "cube.tif").shape == (128, 1024, 512)
    Image.fromarray(np.zeros((4000, 4000, 3), np.uint8)).save(tmp_path / "photo.jpg", quality=50)
    assert read_fundus(tmp_path / "photo.jpg").shape == (4000, 4000, 3)
    # 128 x 1024 x 1024 is exactly 2**27 (admitted: only the missing data is reported); one B-scan more
    with pytest.raises(ReadError, match="truncated"):
        read_item(npy_bomb(tmp_path / "at.npy", (128, 1024, 1024)))
    over = r"decoded size 1\.35e8 samples \(0\.1 GB\) exceeds --max-pixels 1\.34e8"
    with pytest.raises(ReadError, match=over):
        read_item(npy_bomb(tmp_path / "over.npy", (129, 1024, 1024)))


def test_smaller_budget_refuses_a_normal_file(tmp_path, monkeypatch):
    write_opt(tmp_path / "ok.dcm", ramp_volume(3, 64, 64))
    Image.fromarray(np.zeros((50, 60, 3), np.uint8)).save(tmp_path / "ok.png")
    set_max_pixels(1000)
    with pytest.raises(ReadError, match=r"pixel data too large: decoded size 1\.23e4 samples exceeds "
                       r"--max-pixels 1\.00e3"):
        read_item(tmp_path / "ok.dcm")
    with pytest.raises(ReadError, match=r"image too large: decoded size 9\.00e3 samples"):
        read_item(tmp_path / "ok.png")
    set_max_pixels(None)
    monkeypatch.setenv("RETINA_MAX_PIXELS", "2**10")
    assert max_pixels() == 1024
    with pytest.raises(ReadError, match="exceeds --max-pixels"):
        read_item(tmp_path / "ok.png")


def test_parse_max_pixels():
    assert parse_max_pixels("134217728") == parse_max_pixels("2**27") == 2**27
    assert parse_max_pixels("1.2e8") == 120_000_000
    for bad in ("0", "-5", "abc", "nan", "inf", ""):
        with pytest.raises(ValueError):
            parse_max_pixels(bad)


def _retina(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, **(env or {}), "COLUMNS": "200"}
    if env is None:
        full.pop("RETINA_MAX_PIXELS", None)
    retina = Path(sys.executable).parent / "retina"
    return subprocess.run([str(retina), *args], capture_output=True, text=True, env=full, timeout=120)


def test_max_pixels_option_on_the_cli(tmp_path):
    Image.fromarray(np.zeros((50, 60, 3), np.uint8)).save(tmp_path / "ok.png")
    png_bomb(tmp_path / "bomb.png")
    done = _retina("inspect", "--json", "--max-pixels", "1000", str(tmp_path))
    report = json.loads(done.stdout)
    reasons = {Path(e["path"]).name: e["error"] for e in report["errors"]}
    assert reasons["ok.png"] == "image too large: decoded size 9.00e3 samples exceeds --max-pixels 1.00e3"
    assert "image too large" in reasons["bomb.png"] and not report["items"]
    done = _retina("inspect", "--json", str(tmp_path))  # default: the photo reads, the bomb does not
    report = json.loads(done.stdout)
    assert [Path(i["path"]).name for i in report["items"]] == ["ok.png"]
    done = _retina("inspect", "--json", str(tmp_path), env={"RETINA_MAX_PIXELS": "1e3"})
    assert not json.loads(done.stdout)["items"]
    for command in ("embed", "predict", "retrieve", "inspect", "pair"):
        done = _retina(command, "--max-pixels", "zero", str(tmp_path))
        assert done.returncode == 2, (command, done.stderr)
        assert "--max-pixels" in done.stderr and "positive number of samples" in done.stderr


# --- TIFF pages and EXIF orientation -------------------------------------------------------------


def test_tiff_thumbnail_pages_are_not_slices(tmp_path):
    volume = ramp_volume(3, 16, 24)
    with tifffile.TiffWriter(tmp_path / "stack.tif") as tif:
        for bscan in volume:
            tif.write(bscan)
        tif.write(volume[0, ::2, ::2], subfiletype=1)  # reduced-resolution preview
    item = read_oct(tmp_path / "stack.tif")
    np.testing.assert_array_equal(item.pixels, volume)
    photo = np.arange(20 * 30 * 3, dtype=np.uint32).reshape(20, 30, 3).astype(np.uint8)
    with tifffile.TiffWriter(tmp_path / "photo.tif") as tif:
        tif.write(photo, photometric="rgb")
        tif.write(photo[::4, ::4], photometric="rgb", subfiletype=1)  # thumbnail
    item = read_item(tmp_path / "photo.tif")  # one full-resolution page: a photo, not a 2-slice volume
    assert item.modality == "fundus"
    np.testing.assert_array_equal(item.pixels, photo)


def test_multipage_colour_tiff_is_not_an_oct_volume(tmp_path):
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 255, (3, 16, 24, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "colour.tif", colour, photometric="rgb")
    with pytest.raises(ReadError, match=r"multi-page colour TIFF \(3 pages\): not an OCT volume"):
        read_item(tmp_path / "colour.tif")
    gray = np.repeat(ramp_volume(3, 16, 24)[..., None], 3, axis=-1)  # B-scans saved as RGB, R = G = B
    tifffile.imwrite(tmp_path / "gray_rgb.tif", gray, photometric="rgb")
    item = read_oct(tmp_path / "gray_rgb.tif")
    np.testing.assert_array_equal(item.pixels, gray[..., 0])


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_is_applied(tmp_path, suffix):
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[0, 0] = 255  # top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    path = tmp_path / f"photo{suffix}"
    Image.fromarray(stored).save(path, exif=exif.tobytes(), **({"quality": 100} if suffix == ".jpg" else {}))
    item = read_fundus(path)
    assert item.shape == (40, 20, 3)  # displayed upright: portrait
    expected = np.rot90(stored, k=-1)
    assert item.pixels[0, -1].min() > 200 and item.pixels[-1, 0].max() < 50  # stored top-left -> top-right
    if suffix == ".png":
        np.testing.assert_array_equal(item.pixels, expected)


def test_tiff_bomb_header_and_patched_tags(tmp_path):
    small = tiff_bomb(tmp_path / "small.tif", pages=3, side=256)  # the same shared-strip layout, small
    assert read_oct(small).shape == (3, 256, 256)
    set_max_pixels(3 * 256 * 256 - 1)
    with pytest.raises(ReadError, match="TIFF pages too large"):
        read_item(small)
    set_max_pixels(None)
    with pytest.raises(ReadError, match="TIFF page too large"):
        read_item(tiff_patched(tmp_path / "patched.tif"))


def test_single_page_stack_is_still_a_volume(tmp_path):
    """Page classification keeps a stack held in one IFD (planar samples, or an ImageJ file) a volume."""
    volume = ramp_volume(6, 16, 24)
    tifffile.imwrite(tmp_path / "planar.tif", volume, photometric="minisblack", planarconfig="separate")
    tifffile.imwrite(tmp_path / "imagej.tif", volume, imagej=True)
    for name in ("planar.tif", "imagej.tif"):
        np.testing.assert_array_equal(read_oct(tmp_path / name).pixels, volume)
