"""Folder discovery: what is a volume, what is an image, what is ignored, what is an error."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from test_readers_support import ramp_volume, write_bscan_series, write_op, write_opt, write_png

from retinacli import readers
from retinacli.errors import ReadError
from retinacli.readers import discover, iter_items, read_item, scan
from retinacli.readers.common import natural_key


def _names(sources):
    return sorted(str(s.path.name) for s in sources)


def test_rules_for_a_mixed_export(tmp_path):
    root = tmp_path / "export"
    root.mkdir()
    write_op(root / "fundus.dcm", np.zeros((16, 16, 3), np.uint8))
    write_opt(root / "oct.dcm", ramp_volume(3, 16, 16))
    write_bscan_series(root / "series", ramp_volume(4, 16, 16))
    bscans = root / "bscans"
    bscans.mkdir()
    for index in range(5):
        write_png(bscans / f"b{index}.png", np.full((8, 8), index, np.uint8))
    (root / "notes.txt").write_text("visit notes")
    (root / "table.csv").write_text("a,b\n")
    (root / "meta.json").write_text("{}")
    (root / "DICOMDIR").write_bytes(b"\0" * 200)
    (root / ".hidden.dcm").write_text("hidden files are skipped")
    (root / ".retina").mkdir()
    (root / ".retina" / "x.npy").write_bytes(b"junk")
    store = root / "mystore"
    (store / "embeddings").mkdir(parents=True)
    (store / "store.json").write_text("{}")
    np.save(store / "embeddings" / "emb_00000.npy", np.zeros((4, 8), np.float32))
    (root / "broken.png").write_bytes(b"\x89PNG not really")

    found = scan([root])
    kinds = {s.path.name: (s.kind, s.modalities) for s in found.sources}
    assert kinds == {
        "fundus.dcm": ("dicom", ("fundus",)),
        "oct.dcm": ("dicom", ("oct",)),
        "series": ("dicom-series", ("oct",)),
        "bscans": ("bscan-folder", ("oct",)),
    }
    assert [e.path for e in found.errors] == [str(root / "broken.png")]
    assert "not a readable image" in found.errors[0].reason
    assert sorted(p.name for p, _ in found.ignored) == [
        "DICOMDIR", "meta.json", "mystore", "notes.txt", "table.csv"]
    assert "embedding store (has store.json)" in dict((p.name, w) for p, w in found.ignored)["mystore"]
    paths, errors = discover([root])
    assert sorted(p.name for p in paths) == ["bscans", "fundus.dcm", "oct.dcm", "series"]
    assert len(errors) == 1


def test_discovery_reads_headers_only(tmp_path, monkeypatch):
    write_opt(tmp_path / "oct.dcm", ramp_volume(4, 32, 32))
    data = (tmp_path / "oct.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[:-700])  # header fine, pixel data truncated
    write_png(tmp_path / "photo.png", np.zeros((10, 10, 3), np.uint8))

    def no_pixels(*args, **kwargs):
        raise AssertionError("discovery decoded pixel data")

    monkeypatch.setattr(readers.dicom, "load_pixels", no_pixels)
    monkeypatch.setattr(readers.images, "load_image", no_pixels)
    found = scan([tmp_path])
    assert _names(found.sources) == ["cut.dcm", "oct.dcm", "photo.png"]
    assert found.errors == []
    monkeypatch.undo()
    # the truncation shows up when the pixels are read, as that file's error, not a crash
    results = list(iter_items([tmp_path]))
    errors = [r for r in results if isinstance(r, ReadError)]
    assert [os.path.basename(e.path) for e in errors] == ["cut.dcm"]
    assert errors[0].reason == "truncated pixel data"
    assert sorted(r.modality for r in results if not isinstance(r, ReadError)) == ["fundus", "oct"]


def test_two_series_in_one_folder_are_two_volumes(tmp_path):
    folder = tmp_path / "flat"
    write_bscan_series(folder, ramp_volume(3, 16, 16), patient="SYN000010")
    first_files = set(folder.iterdir())
    other = tmp_path / "other"
    write_bscan_series(other, ramp_volume(5, 16, 16) + 1, patient="SYN000011")
    for path in other.iterdir():
        path.rename(folder / f"X{path.name}")
    found = scan([folder])
    assert len(found.sources) == 2
    assert all(s.kind == "dicom-series" and s.path.name.startswith("series=") for s in found.sources)
    sizes = sorted(len(s.members) for s in found.sources)
    assert sizes == [3, 5]
    three = next(s for s in found.sources if len(s.members) == 3)
    assert set(three.members) == first_files
    # the virtual path reads back on its own
    item = read_item(three.path)
    assert item.shape == (3, 16, 16)
    np.testing.assert_array_equal(item.pixels, ramp_volume(3, 16, 16))


def test_bscans_next_to_a_fundus_and_colour_photo_folders(tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for index in range(4):
        write_png(mixed / f"scan_{index:03d}.png", np.full((12, 20), index, np.uint8))
    write_png(mixed / "slo.png", np.zeros((30, 30), np.uint8))
    found = scan([mixed])
    by_kind = {s.kind: s for s in found.sources}
    assert set(by_kind) == {"bscan-folder", "image"}
    assert len(by_kind["bscan-folder"].members) == 4 and by_kind["image"].path.name == "slo.png"
    assert read_item(by_kind["bscan-folder"].path).shape == (4, 12, 20)

    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(3):  # colour photos are never B-scans, even when numbered
        write_png(photos / f"img_{index}.png", np.zeros((10, 10, 3), np.uint8))
    found = scan([photos])
    assert [s.kind for s in found.sources] == ["image"] * 3


def test_symlink_loops_and_broken_links(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    write_png(root / "a" / "photo.png", np.zeros((8, 8, 3), np.uint8))
    os.symlink(root, root / "a" / "loop")  # a -> root -> a -> ...
    os.symlink(tmp_path / "missing.dcm", root / "dangling.dcm")
    found = scan([root])
    assert [s.path.name for s in found.sources] == ["photo.png"]
    assert [e.reason for e in found.errors] == ["broken symbolic link"]


def test_iter_items_filters_by_modality(shared_samples):
    folder = shared_samples / "heidelberg_vol"
    fundus = list(iter_items([folder], modality="fundus"))
    assert [i.modality for i in fundus] == ["fundus", "fundus"]
    octs = list(iter_items(folder, modality="oct"))
    assert [i.shape for i in octs] == [(1, 496, 768), (1, 496, 768)]


def test_natural_key():
    names = ["bscan_10.png", "bscan_2.png", "bscan_1.png", "Bscan_3.png"]
    assert sorted(names, key=natural_key) == ["bscan_1.png", "bscan_2.png", "Bscan_3.png", "bscan_10.png"]


def test_import_readers_does_not_import_torch():
    code = (
        "import sys, retinacli.readers as r, retinacli.readers.dicom, retinacli.readers.volumes, "
        "retinacli.readers.heidelberg, retinacli.pairing; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_numbered_nir_images_beside_visit_folders_are_fundus_images(tmp_path):
    """The synthetic PNG layout: <patient>/OD_v00_fundus.png + <patient>/OD_v00_oct/bscan_000.png..."""
    patient = tmp_path / "p1234"
    patient.mkdir()
    for visit in range(2):
        write_png(patient / f"OD_v{visit:02d}_fundus.png", np.full((32, 32), 50 + visit, np.uint8))
        oct_dir = patient / f"OD_v{visit:02d}_oct"
        oct_dir.mkdir()
        for index in range(3):
            write_png(oct_dir / f"bscan_{index:03d}.png", np.full((32, 32), index, np.uint8))
    found = scan([tmp_path])
    kinds = sorted((s.path.name, s.kind) for s in found.sources)
    assert kinds == [
        ("OD_v00_fundus.png", "image"),
        ("OD_v00_oct", "bscan-folder"),
        ("OD_v01_fundus.png", "image"),
        ("OD_v01_oct", "bscan-folder"),
    ]


def test_folder_path_names_its_series_next_to_the_localizer(tmp_path):
    """A flat export: single-frame B-scans + their OP localizer in one folder (extension-less names)."""
    folder = tmp_path / "export"
    write_bscan_series(folder, ramp_volume(4, 16, 16))
    for path in folder.iterdir():
        path.rename(path.with_suffix(""))  # IM0003.dcm -> IM0003
    write_op(folder / "IM9999", np.zeros((16, 16, 3), np.uint8), "SYN000002", "OS")
    found = scan([folder])
    kinds = sorted((s.path.name, s.kind) for s in found.sources)
    assert kinds == [("IM9999", "dicom"), ("export", "dicom-series")]
    item = readers.read_oct(folder)
    np.testing.assert_array_equal(item.pixels, ramp_volume(4, 16, 16))
    assert read_item(folder).modality == "oct"
    assert readers.read_fundus(folder / "IM9999").shape == (16, 16, 3)


def test_store_folders_are_never_read_as_images(tmp_path):
    store = tmp_path / "store"
    (store / "embeddings").mkdir(parents=True)
    (store / "store.json").write_text("{}")
    np.save(store / "embeddings" / "emb_00000.npy", np.zeros((4, 8), np.float32))  # would look like a fundus
    for path in (store, store / "embeddings", tmp_path):
        found = scan([path])
        assert found.sources == [] and found.errors == [], path
