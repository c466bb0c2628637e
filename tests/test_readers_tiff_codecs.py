"""Compressed TIFF (LZW, Deflate, PackBits, JPEG) and vendor OCT files retina does not read.

Every TIFF here is written by Pillow's own TIFF writer (libtiff), the way fundus datasets such as DRIVE
ship them; the vendor files are test-made bytes with the real signatures (eyepy's E2E structures parse
the E2E header). Issue 15, "Inputs: Compressed TIFF" and "Other vendor files".
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from fixtures_packages import make_toy_package
from PIL import Image
from typer.testing import CliRunner

from retinacli.cli import app
from retinacli.errors import EXIT_NOTHING_DONE, EXIT_OK, ReadError
from retinacli.readers import read_fundus, read_item, read_oct, scan
from retinacli.readers.common import set_max_pixels
from retinacli.store import EmbeddingStore, read_errors

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]

# Pillow's name -> the Compression tag value libtiff writes (checked in each test, so a file is what
# its test says it is).
LOSSLESS = {"tiff_lzw": 5, "tiff_adobe_deflate": 8, "packbits": 32773}
OLD_DEFLATE = 32946  # the pre-Adobe Deflate code; Pillow writes 8, so the tag is rewritten

E2E_REASON = (
    "Heidelberg E2E file: retina does not read this format; export the scan from HEYEX as DICOM or HEYEX "
    "XML, or convert it with eyepy (pip install 'retina[vendor]': eyepy.import_heyex_e2e) or OCT-Converter"
)
TOPCON_ADVICE = "retina does not read this format; export the scan as DICOM, or convert it with OCT-Converter"
FDA_REASON = "Topcon FDA file: " + TOPCON_ADVICE
FDS_REASON = "Topcon FDS file: " + TOPCON_ADVICE
ZEISS_REASON = (
    "Zeiss Cirrus IMG cube (raw voxels, no header): retina does not read this format; "
    "export the scan as DICOM"
)
TOO_LARGE = "TIFF page too large: decoded size {} samples (0.0 GB) exceeds --max-pixels {}"


@pytest.fixture(autouse=True)
def _default_budget():
    set_max_pixels(None)
    yield
    set_max_pixels(None)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def noise(shape, dtype=np.uint8, seed=0) -> np.ndarray:
    high = np.iinfo(dtype).max
    return np.random.default_rng(seed).integers(0, high, shape, dtype=dtype, endpoint=True)


def save_tiff(path: Path, pixels: np.ndarray, compression: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, compression=compression)
    return path


def compression_of(path: Path) -> list[int]:
    with tifffile.TiffFile(path) as tif:
        return [int(page.compression) for page in tif.pages]


def rewrite_tag(path: Path, code: int, value: int) -> None:
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages[0].tags[code].overwrite(value)


# -- pixels -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", sorted(LOSSLESS))
def test_lossless_compressed_rgb_tiff_reads_the_exact_pixels(tmp_path, compression):
    photo = noise((47, 61, 3))
    path = save_tiff(tmp_path / "photo.tif", photo, compression)
    assert compression_of(path) == [LOSSLESS[compression]]
    item = read_fundus(path)
    assert (item.modality, item.format, item.pixels.dtype) == ("fundus", "tiff", np.uint8)
    np.testing.assert_array_equal(item.pixels, photo)


def test_old_style_deflate_code_reads_too(tmp_path):
    photo = noise((33, 29, 3), seed=1)
    path = save_tiff(tmp_path / "old.tif", photo, "tiff_adobe_deflate")
    rewrite_tag(path, 259, OLD_DEFLATE)
    assert compression_of(path) == [OLD_DEFLATE]
    np.testing.assert_array_equal(read_item(path).pixels, photo)


def test_jpeg_in_tiff_is_close_to_the_source(tmp_path):
    rows, cols = np.mgrid[0:64, 0:80]
    photo = np.stack([cols * 3, rows * 3, (rows + cols) * 1.5], axis=-1).astype(np.uint8)  # smooth
    path = tmp_path / "jpeg.tif"
    Image.fromarray(photo).save(path, compression="jpeg", quality=90)
    assert compression_of(path) == [7]  # new-style JPEG
    pixels = read_fundus(path).pixels
    assert pixels.shape == photo.shape and pixels.dtype == np.uint8
    error = np.abs(pixels.astype(int) - photo.astype(int))
    assert error.mean() < 1.0 and error.max() <= 8  # measured: mean 0.04, max 1


def test_grayscale_16_bit_lzw_keeps_its_16_bits(tmp_path):
    gray = noise((50, 40), np.uint16, seed=2)
    assert gray.max() > 255
    path = save_tiff(tmp_path / "nir16.tif", gray, "tiff_lzw")
    assert compression_of(path) == [5]
    item = read_fundus(path)
    assert item.pixels.dtype == np.uint16 and item.pixels.shape == (50, 40, 1)
    np.testing.assert_array_equal(item.pixels[..., 0], gray)


@pytest.mark.parametrize("compression", sorted(LOSSLESS))
def test_multi_page_compressed_stack_is_an_oct_volume(tmp_path, compression):
    scans = [noise((30, 22), seed=10 + k) for k in range(5)]
    path = tmp_path / "stack.tif"
    images = [Image.fromarray(s) for s in scans]
    images[0].save(path, save_all=True, append_images=images[1:], compression=compression)
    assert compression_of(path) == [LOSSLESS[compression]] * 5
    found = scan([path])
    assert [(s.kind, s.modalities) for s in found.sources] == [("tiff", ("oct",))]
    volume = read_oct(path)
    assert volume.modality == "oct" and volume.pixels.shape == (5, 30, 22)
    np.testing.assert_array_equal(volume.pixels, np.stack(scans))


# -- size guards --------------------------------------------------------------------------------------


def test_budget_refuses_an_oversized_compressed_tiff_before_decoding(tmp_path):
    photo = save_tiff(tmp_path / "photo.tif", np.zeros((600, 500, 3), np.uint8), "tiff_lzw")
    set_max_pixels(100_000)
    with pytest.raises(ReadError) as caught:
        read_item(photo)
    assert caught.value.reason == TOO_LARGE.format("9.00e5", "1.00e5")
    scans = [Image.fromarray(np.zeros((200, 100), np.uint8)) for _ in range(6)]
    stack = tmp_path / "stack.tif"
    scans[0].save(stack, save_all=True, append_images=scans[1:], compression="tiff_lzw")
    with pytest.raises(ReadError) as caught:
        read_oct(stack)
    assert caught.value.reason.startswith("TIFF pages too large: decoded size 1.20e5 samples")
    set_max_pixels(None)
    assert read_item(photo).pixels.shape == (600, 500, 3)  # within the default budget it reads
    # Tags rewritten to declare 60000 x 60000 over a tiny LZW strip: decoding would need 10.8 GB; the
    # refusal comes from the tags alone (a decoder would have failed on the strip or run out of memory).
    bomb = save_tiff(tmp_path / "bomb.tif", np.zeros((16, 16, 3), np.uint8), "tiff_lzw")
    for code in (256, 257, 278):
        rewrite_tag(bomb, code, 60_000)
    with pytest.raises(ReadError) as caught:
        read_item(bomb)
    assert caught.value.reason.startswith("TIFF page too large: decoded size 1.08e10 samples (10.8 GB)")


def test_max_pixels_option_refuses_a_compressed_tiff_through_the_cli(tmp_path, isolated_cli):
    save_tiff(tmp_path / "data" / "photo.tif", np.zeros((600, 500, 3), np.uint8), "tiff_lzw")
    result = run("inspect", tmp_path / "data", "--max-pixels", "1e5", "--json")
    assert result.exit_code == EXIT_NOTHING_DONE, result.output
    errors = json.loads(result.stdout)["errors"]
    assert [e["error"] for e in errors] == [TOO_LARGE.format("9.00e5", "1.00e5")]


# -- codecs tifffile lacks ----------------------------------------------------------------------------


def test_a_compression_nobody_decodes_is_named(tmp_path):
    path = save_tiff(tmp_path / "odd.tif", noise((20, 20, 3)), "tiff_lzw")
    rewrite_tag(path, 259, 60_000)
    with pytest.raises(ReadError) as caught:
        read_item(path)
    assert caught.value.reason == (
        "TIFF compression 60000 is not supported (neither imagecodecs nor Pillow decodes it)"
    )


WITHOUT_IMAGECODECS = """
import json, sys
sys.modules["imagecodecs"] = None  # an install without imagecodecs: tifffile has only its own codecs
import numpy as np
from retinacli.errors import ReadError
from retinacli.readers import read_item
from retinacli.readers.common import set_max_pixels

out = {}
for name in sys.argv[1:]:
    try:
        item = read_item(name)
        out[name] = {"sha": __import__("hashlib").sha256(item.pixels.tobytes()).hexdigest(),
                     "shape": list(item.pixels.shape), "dtype": str(item.pixels.dtype)}
    except ReadError as exc:
        out[name] = {"error": exc.reason}
set_max_pixels(1000)
try:
    read_item(sys.argv[1])
except ReadError as exc:
    out["budget"] = exc.reason
print(json.dumps(out))
"""


def test_without_imagecodecs_a_single_page_falls_back_to_pillow(tmp_path):
    """tifffile without imagecodecs cannot decode LZW: Pillow's libtiff reads the single-page file (same
    pixels, same budget); a multi-page stack or a codec neither has is refused naming the compression
    and the package."""
    import hashlib

    photo = noise((40, 36, 3), seed=3)
    gray = noise((25, 30), np.uint16, seed=4)
    lzw = save_tiff(tmp_path / "photo.tif", photo, "tiff_lzw")
    lzw16 = save_tiff(tmp_path / "nir16.tif", gray, "tiff_lzw")
    j2k = tmp_path / "j2k.tif"
    tifffile.imwrite(j2k, photo, compression="jpeg2000")  # needs imagecodecs to write (and to read)
    stack = tmp_path / "stack.tif"
    scans = [Image.fromarray(noise((20, 16), seed=k)) for k in range(3)]
    scans[0].save(stack, save_all=True, append_images=scans[1:], compression="tiff_lzw")
    names = [str(p) for p in (lzw, lzw16, j2k, stack)]
    result = subprocess.run([sys.executable, "-c", WITHOUT_IMAGECODECS, *names], capture_output=True,
                            text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out[str(lzw)] == {"sha": hashlib.sha256(photo.tobytes()).hexdigest(), "shape": [40, 36, 3],
                             "dtype": "uint8"}
    assert out[str(lzw16)] == {"sha": hashlib.sha256(gray[..., None].tobytes()).hexdigest(),
                               "shape": [25, 30, 1], "dtype": "uint16"}
    assert out[str(j2k)] == {"error": "TIFF compression JPEG2000 needs the 'imagecodecs' package "
                                      "(pip install imagecodecs)"}
    assert out[str(stack)] == {"error": "TIFF compression LZW needs the 'imagecodecs' package "
                                        "(pip install imagecodecs)"}
    assert out["budget"] == TOO_LARGE.format("4.32e3", "1.00e3")


# -- DRIVE layout through the CLI ---------------------------------------------------------------------


def test_drive_layout_lzw_tiffs_inspect_and_embed(tmp_path, isolated_cli):
    """DRIVE ships images/NN_test.tif as 565 x 584 RGB LZW TIFF next to GIF masks."""
    drive = tmp_path / "DRIVE" / "test"
    names = ("01_test.tif", "02_test.tif")
    photos = {name: noise((584, 565, 3), seed=20 + k) for k, name in enumerate(names)}
    for name, photo in photos.items():
        assert compression_of(save_tiff(drive / "images" / name, photo, "tiff_lzw")) == [5]
    (drive / "mask").mkdir()
    Image.fromarray(np.full((584, 565), 255, np.uint8)).save(drive / "mask" / "01_test_mask.gif")
    result = run("inspect", drive, "--json")
    assert result.exit_code == EXIT_OK, result.output
    report = json.loads(result.stdout)
    assert report["errors"] == []
    assert sorted((Path(i["path"]).name, i["modality"], i["format"], tuple(i["shape"]), i["dtype"])
                  for i in report["items"]) == [
        ("01_test.tif", "fundus", "tiff", (584, 565, 3), "uint8"),
        ("02_test.tif", "fundus", "tiff", (584, 565, 3), "uint8"),
    ]
    assert [f["reason"] for f in report["ignored_files"]] == ["not an image (.gif file)"]
    package = make_toy_package(tmp_path / "toy")
    store = tmp_path / "store"
    result = run("embed", drive, "--model", package, "--store", store, "--json")
    assert result.exit_code == EXIT_OK, result.output
    summary = json.loads(result.stdout)
    assert (summary["embedded"], summary["failed"]) == (2, 0)
    rows = EmbeddingStore.open(store).metadata()
    assert sorted((Path(r["path"]).name, r["modality"]) for r in rows) == [
        ("01_test.tif", "fundus"), ("02_test.tif", "fundus")
    ]


# -- vendor files retina does not read ----------------------------------------------------------------


def e2e_bytes() -> bytes:
    """The start of an E2E file: the 36-byte version block ("CMDb") and the main directory header
    ("MDbMDir" at 0x24), laid out as eyepy's e2e_format and LibE2E read them; no chunks."""
    version = struct.pack("<12sI10H", b"CMDb", 0x64, *([0] * 10))
    header = struct.pack("<12sI10H4I", b"MDbMDir", 0x64, *([0] * 10), 0, 0x24, 0, 0)
    return version + header + bytes(64)


def topcon_bytes(kind: bytes = b"FDA") -> bytes:
    """The start of a Topcon file as OCT-Converter's fda/fds header reads it: "FOCT", "FDA", two LONGs."""
    return b"FOCT" + kind + struct.pack("<II", 1, 2) + bytes(64)


def vendor_folder(root: Path) -> dict[str, str]:
    """Vendor files -> the reason each must get."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "macula.e2e").write_bytes(e2e_bytes())
    (root / "ONH.E2E").write_bytes(e2e_bytes())
    (root / "scan.fda").write_bytes(topcon_bytes())
    (root / "scan.fds").write_bytes(topcon_bytes())
    (root / "P001_Macular Cube 512x128_OD_cube_raw.img").write_bytes(bytes(4096))
    (root / "P001_Macular Cube 512x128_OD_cube_z.img").write_bytes(bytes(4096))
    (root / "exported").write_bytes(e2e_bytes())  # a renamed E2E: found by its signature
    return {
        "macula.e2e": E2E_REASON,
        "ONH.E2E": E2E_REASON,
        "exported": E2E_REASON,
        "scan.fda": FDA_REASON,
        "scan.fds": FDS_REASON,
        "P001_Macular Cube 512x128_OD_cube_raw.img": ZEISS_REASON,
        "P001_Macular Cube 512x128_OD_cube_z.img": ZEISS_REASON,
    }


def test_test_made_e2e_header_is_what_eyepy_reads():
    eyepy_format = pytest.importorskip("eyepy.io.he.e2e_format")
    data = e2e_bytes()
    version = eyepy_format.version_format.parse(data)
    header = eyepy_format.header_format.parse(data[36:])
    assert (version.name, header.magic2) == ("CMDb", "MDbMDir")


def test_vendor_files_are_named_with_their_converter(tmp_path):
    expected = vendor_folder(tmp_path / "export")
    (tmp_path / "export" / "disk.img").write_bytes(bytes(100))  # an .img that is no Cirrus cube
    (tmp_path / "export" / "broken.fda").write_bytes(b"not topcon")
    found = scan([tmp_path / "export"])
    reasons = {Path(e.path).name: e.reason for e in found.errors}
    assert reasons.pop("broken.fda").startswith(
        "Topcon FDA file (by its name; it lacks the format's signature): retina does not read this format"
    )
    assert reasons.keys() == expected.keys()
    for name, reason in expected.items():
        assert reasons[name].startswith(reason), name
        assert "not an image" not in reasons[name]
    assert reasons["scan.fda"].endswith("(pip install 'eyepy[fda]': eyepy.import_topcon_fda)")
    assert [(p.name, why) for p, why in found.ignored] == [("disk.img", "not an image (.img file)")]
    with pytest.raises(ReadError) as caught:
        read_oct(tmp_path / "export" / "macula.e2e")
    assert caught.value.reason == E2E_REASON
    heyex_db = tmp_path / "db.sdb"
    heyex_db.write_bytes(e2e_bytes())
    assert scan([heyex_db]).errors[0].reason.startswith("Heidelberg HEYEX database file (E2E container)")
    renamed = tmp_path / "scan.bin"  # a Topcon file under another name: found by "FOCT"
    renamed.write_bytes(topcon_bytes())
    assert scan([renamed]).errors[0].reason.startswith("Topcon FDA/FDS file: " + TOPCON_ADVICE)
    cube = tmp_path / "export_2.img"  # no Cirrus name, but the byte size of a 200 x 200 x 1024 cube
    with open(cube, "wb") as handle:
        handle.truncate(1024 * 200 * 200)  # sparse: no 41 MB written
    assert scan([cube]).errors[0].reason.startswith(ZEISS_REASON)


def test_vendor_files_through_inspect_and_embed_next_to_readable_files(tmp_path, isolated_cli):
    data = tmp_path / "data"
    expected = vendor_folder(data)
    photo = noise((584, 565, 3), seed=30)
    save_tiff(data / "01_test.tif", photo, "tiff_lzw")
    Image.fromarray(noise((40, 48, 3), seed=31)).save(data / "slo.png")
    result = run("inspect", data, "--json")
    assert result.exit_code == EXIT_OK, result.output
    report = json.loads(result.stdout)
    assert sorted(Path(i["path"]).name for i in report["items"]) == ["01_test.tif", "slo.png"]
    shown = {Path(e["path"]).name: e["error"] for e in report["errors"]}
    assert shown.keys() == expected.keys()
    assert all(shown[name].startswith(reason) for name, reason in expected.items())
    table = run("inspect", data)  # the terminal table names each format too
    assert "Heidelberg E2E file" in table.output and "Zeiss Cirrus IMG cube" in table.output
    package = make_toy_package(tmp_path / "toy")
    store = tmp_path / "store"
    result = run("embed", data, "--model", package, "--store", store, "--json")
    assert result.exit_code == EXIT_OK, result.output
    summary = json.loads(result.stdout)
    assert (summary["embedded"], summary["failed"]) == (2, len(expected))
    reported = {Path(e["path"]).name: e["error"] for e in summary["errors"]}
    assert all(reported[name].startswith(reason) for name, reason in expected.items())
    listed = {Path(path).name: reason for path, reason in read_errors(store)}  # errors.csv
    assert listed == reported
    assert sorted(Path(r["path"]).name for r in EmbeddingStore.open(store).metadata()) == [
        "01_test.tif", "slo.png"
    ]
