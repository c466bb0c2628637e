"""`retina pair --metadata meta.csv` / `--pattern`: plain image datasets (PNG fundus photos, B-scan
folders, multi-page TIFF volumes) carry no patient, eye or date; a sidecar CSV or the file names give
them, the time-window matching pairs them, and the patients are pseudonymised like header ones."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from test_readers_support import ramp_volume, write_op, write_opt, write_png
from typer.testing import CliRunner

from retinacli.cli import app
from retinacli.pairing import compile_pattern
from retinacli.privacy import SECRET_FILE, load_or_create_secret, pseudonym
from retinacli.readers import read_fundus, read_oct

runner = CliRunner()
NAMES = ("DOE", "JANE", "ROE", "RICHARD", "MOE")  # planted identifiers: never in an output


def _rows(manifest: Path) -> list[dict[str, str]]:
    with open(manifest, newline="") as handle:
        return list(csv.DictReader(handle))


def _fundus(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, np.random.default_rng(seed).integers(0, 255, (40, 44, 3), dtype=np.uint8))
    return path


def _bscans(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(n):
        write_png(folder / f"bscan_{index:03d}.png", np.full((32, 36), 10 * index, np.uint8))
    return folder


def _tiff(path: Path, n: int = 5) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.arange(n * 32 * 36, dtype=np.uint16).reshape(n, 32, 36) % 4000,
                     photometric="minisblack")
    return path


def _leaks(text: str) -> list[str]:
    """The planted names found as words (any case; 'does' is not 'DOE')."""
    return [name for name in NAMES if re.search(rf"(?<![A-Za-z]){name}(?![A-Za-z])", text, re.IGNORECASE)]


def _run(*args):
    result = runner.invoke(app, ["pair", *map(str, args)])
    return result


# --- sidecar CSV ----------------------------------------------------------------------------------------


def _sidecar_dataset(root: Path) -> Path:
    """Neutral folder names (the names live in the sidecar only), mixed eye spellings, both date forms."""
    data = root / "data"
    _fundus(data / "s01" / "v1" / "fundus.png", 1)
    _bscans(data / "s01" / "v1" / "oct")
    _fundus(data / "s01" / "v2" / "fundus.png", 2)
    _tiff(data / "s01" / "v2" / "oct.tif")
    _fundus(data / "s02" / "left" / "cfp.png", 3)  # a folder row covers both items in it
    _bscans(data / "s02" / "left" / "scan")
    _fundus(data / "s02" / "bad_eye.png", 4)
    _fundus(data / "s02" / "bad_date.png", 5)
    _fundus(data / "s03" / "twice.png", 6)
    _bscans(data / "s04" / "oct")  # one OCT, two fundus photos of that day: ambiguous without times
    _fundus(data / "s04" / "macula.png", 7)
    _fundus(data / "s04" / "disc.png", 8)
    _fundus(data / "stray.png", 9)  # no row
    meta = root / "meta.csv"
    meta.write_text(
        "Path,Patient,Eye,Date,Modality\n"                              # line 1: header (any case)
        "data/s01/v1/fundus.png,DOE_JANE,od,2023-01-05,\n"              # 2
        "data/s01/v1/oct,DOE_JANE,R,20230105,oct\n"                     # 3
        "data/s01/v2/fundus.png,DOE_JANE,Right,2023-03-05,fundus\n"     # 4
        "data/s01/v2/oct.tif,DOE_JANE,OD,20230305,\n"                   # 5
        "data/s02/left,ROE_RICHARD,left,2023-02-01,\n"                  # 6: a folder
        "data/s02/bad_eye.png,ROE_RICHARD,X,2023-02-01,\n"              # 7
        "data/s02/bad_date.png,ROE_RICHARD,L,2023-02-30,\n"             # 8
        "data/s03/twice.png,MOE_ANN,OS,2023-04-01,\n"                   # 9
        "data/s03/twice.png,MOE_ANN,OS,2023-04-02,\n"                   # 10: contradicts row 9
        "data/missing.png,ROE_RICHARD,OS,2023-02-01,\n"                 # 11: not there
        "data/s01/v1/oct,DOE_JANE,OD,2023-01-05,fundus\n"               # 12: wrong modality
        "data/s04,MOE_ANN,L,2023-05-01,\n"                              # 13
        "\n",
        encoding="utf-8",
    )
    return meta


def test_sidecar_pairs_plain_images(tmp_path):
    meta = _sidecar_dataset(tmp_path)
    manifest = tmp_path / "out" / "manifest.csv"
    result = _run(tmp_path / "data", "--out", manifest, "--metadata", meta, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["pairs"] == 3 and payload["by_method"] == {"time": 3}
    rows = _rows(manifest)
    got = {(r["eye"], r["visit"], r["visit_date"], r["pair_method"], r["hours_apart"], r["oct_path"],
            r["fundus_path"], r["oct_format"]) for r in rows}  # fmt: skip
    assert got == {
        ("OD", "0", "2023-01-05", "time", "0.0", "../data/s01/v1/oct", "../data/s01/v1/fundus.png",
         "bscan-folder"),
        ("OD", "1", "2023-03-05", "time", "0.0", "../data/s01/v2/oct.tif", "../data/s01/v2/fundus.png",
         "tiff"),
        ("OS", "0", "2023-02-01", "time", "0.0", "../data/s02/left/scan", "../data/s02/left/cfp.png",
         "bscan-folder"),
    }
    # pseudonyms keyed with secret.key beside the manifest; one per patient; the names nowhere
    key = load_or_create_secret(manifest.parent)
    assert (manifest.parent / SECRET_FILE).is_file()
    by_eye = {r["eye"]: r["patient_id"] for r in rows}
    assert by_eye == {"OD": pseudonym("DOE_JANE", key), "OS": pseudonym("ROE_RICHARD", key)}
    assert not _leaks(manifest.read_text()) and not _leaks(result.stdout + result.stderr)
    # the manifest's paths open with the readers
    assert read_oct(manifest.parent / "../data/s01/v2/oct.tif").shape == (5, 32, 36)
    assert read_oct(manifest.parent / "../data/s01/v1/oct").shape == (4, 32, 36)
    assert read_fundus(manifest.parent / "../data/s02/left/cfp.png").shape == (40, 44, 3)

    # every bad row and every item left over is listed with the reason: row number + path
    unpaired = {u["path"]: u["reason"] for u in payload["unpaired"]}
    assert unpaired == {
        "data/s02/bad_eye.png": "--metadata meta.csv row 7: eye is not one of OD/OS/R/L/right/left",
        "data/s02/bad_date.png": "--metadata meta.csv row 8: date is not a real calendar date written "
                                 "YYYY-MM-DD or YYYYMMDD",
        "data/s03/twice.png": "--metadata meta.csv rows 9 and 10 give different patient / eye / date for it",
        "data/s04/oct": "ambiguous: 1 OCT volume(s) and 2 fundus image(s) of the same patient and eye are "
                        "equally close in time; give acquisition times (a time column or {time} group) or "
                        "pair them by hand",
        "data/s04/macula.png": unpaired["data/s04/oct"],
        "data/s04/disc.png": unpaired["data/s04/oct"],
        "data/stray.png": "no patient / eye / acquisition time in the file to match by, and no --metadata "
                          "meta.csv row names it",
    }
    errors = {e["path"]: e["error"] for e in payload["errors"]}
    assert errors == {
        "data/missing.png": "--metadata meta.csv row 11: not among the images and volumes found under the "
                            "PATH(s) given",
        "data/s01/v1/oct": "--metadata meta.csv row 12: says fundus but the path is an OCT volume",
    }

    # the terminal summary lists the same, names nowhere
    table = runner.invoke(app, ["pair", str(tmp_path / "data"), "-o", str(manifest), "--metadata", str(meta)],
                          env={"COLUMNS": "250"})
    assert table.exit_code == 0
    assert "row 7" in table.stderr and "rows 9 and 10" in table.stderr and "row 11" in table.stderr
    assert not _leaks(table.stdout + table.stderr)

    # --keep-identifiers writes the sidecar's ids
    kept = _run(tmp_path / "data", "--out", tmp_path / "kept.csv", "--metadata", meta, "--keep-identifiers")
    assert kept.exit_code == 0
    assert {r["patient_id"] for r in _rows(tmp_path / "kept.csv")} == {"DOE_JANE", "ROE_RICHARD"}


def test_sidecar_times_resolve_a_tie_and_labels_join(tmp_path):
    """A time column tells two photos of one day apart; --labels joins by the sidecar's real patient id."""
    data = tmp_path / "data"
    _bscans(data / "a" / "oct")
    _fundus(data / "a" / "macula.png", 1)
    _fundus(data / "a" / "disc.png", 2)
    _bscans(data / "b" / "oct")
    _fundus(data / "b" / "photo.jpg.png", 3)
    meta = tmp_path / "meta.csv"
    meta.write_text(
        "\ufeffpatient_id,eye,date,time,path\n"  # a BOM, patient_id for patient, any column order
        "DOE_JANE,OD,2023-01-05,10:15,data/a/oct\n"
        "DOE_JANE,OD,2023-01-05,10:20,data/a/macula.png\n"
        "DOE_JANE,OD,2023-01-05,1400,data/a/disc.png\n"
        "DOE_JANE,OD,20230601,,data/b\n",
        encoding="utf-8",
    )
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_id,eye,date,cst_um,tn_label\n"
                      "DOE_JANE,R,20230105,281,1\nDOE_JANE,OD,2023-06-01,302,0\nDOE_JANE,OS,2023-06-01,9,9\n")
    manifest = tmp_path / "manifest.csv"
    result = _run(data, "--out", manifest, "--metadata", meta, "--labels", labels, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["labels_rows"] == 3 and payload["labels_matched"] == 2
    rows = {r["oct_path"]: r for r in _rows(manifest)}
    first, second = rows["data/a/oct"], rows["data/b/oct"]
    assert first["fundus_path"] == "data/a/macula.png"
    assert float(first["hours_apart"]) == pytest.approx(5 / 60, abs=1e-4)
    assert (first["visit"], first["cst_um"], first["tn_label"]) == ("0", "281", "1")
    assert (second["visit"], second["visit_date"], second["cst_um"], second["tn_label"]) == (
        "1", "2023-06-01", "302", "0")
    assert first["patient_id"] == second["patient_id"] != "DOE_JANE"
    assert [u["path"] for u in payload["unpaired"]] == ["data/a/disc.png"]
    assert payload["unpaired"][0]["reason"] == "no OCT volume of the same patient and eye within 24 h"
    assert not _leaks(manifest.read_text() + result.stdout + result.stderr)


def test_sidecar_nearest_row_wins_and_headers_stay(tmp_path):
    """A folder row covers what lies under it unless a nearer row names the item; DICOM files no row
    names keep their headers (and pair by their localizer reference)."""
    data = tmp_path / "data"
    _bscans(data / "photos" / "a" / "oct")
    _fundus(data / "photos" / "a" / "fundus.png", 1)
    _bscans(data / "photos" / "b" / "oct")
    _fundus(data / "photos" / "b" / "fundus.png", 2)
    photo = np.zeros((16, 16, 3), np.uint8)
    (data / "dicom").mkdir()
    op = write_op(data / "dicom" / "f.dcm", photo, "SYN000001", "OS", "20240101100000")
    write_opt(data / "dicom" / "o.dcm", ramp_volume(2, 16, 16), "SYN000001", "OS", "20240101100100",
              localizer_uid=op.SOPInstanceUID)
    meta = tmp_path / "meta.csv"
    meta.write_text("path,patient,eye,date\n"
                    "data/photos,DOE_JANE,OS,2023-01-01\n"
                    f"{data / 'photos' / 'b' / 'oct'},DOE_JANE,OS,2023-02-01\n"  # absolute
                    "data/photos/b/fundus.png,DOE_JANE,OS,2023-02-01\n")
    manifest = tmp_path / "m.csv"
    result = _run(data, "-o", manifest, "--metadata", meta, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["by_method"] == {"time": 2, "reference": 1} and payload["unpaired"] == []
    rows = {r["oct_path"]: r for r in _rows(manifest)}
    first, second = rows["data/photos/a/oct"], rows["data/photos/b/oct"]
    assert (first["visit_date"], first["visit"]) == ("2023-01-01", "0")
    assert (second["visit_date"], second["visit"]) == ("2023-02-01", "1")
    key = load_or_create_secret(tmp_path)
    assert rows["data/dicom/o.dcm"]["patient_id"] == pseudonym("SYN000001", key)
    assert rows["data/photos/a/oct"]["patient_id"] == pseudonym("DOE_JANE", key)


def test_sidecar_usage_errors(tmp_path):
    _fundus(tmp_path / "data" / "f.png")
    out = tmp_path / "m.csv"
    (tmp_path / "meta.csv").write_text("path,patient\ndata/f.png,DOE_JANE\n")
    result = _run(tmp_path / "data", "-o", out, "--metadata", tmp_path / "meta.csv")
    assert result.exit_code == 2 and not out.exists()
    assert "missing eye, date" in " ".join(result.stderr.split())
    assert not _leaks(result.stderr)
    (tmp_path / "empty.csv").write_text("")
    empty = _run(tmp_path / "data", "-o", out, "--metadata", tmp_path / "empty.csv")
    assert empty.exit_code == 2 and "missing path, patient, eye, date" in " ".join(empty.stderr.split())
    (tmp_path / "latin.csv").write_bytes(b"path,patient,eye,date\nf.png,M\xfcller,OD,20230101\n")
    latin = _run(tmp_path / "data", "-o", out, "--metadata", tmp_path / "latin.csv")
    assert latin.exit_code == 2 and "not UTF-8" in latin.stderr
    (tmp_path / "twice.csv").write_text("path,patient,eye,date,PATH\nf.png,A,OD,20230101,g.png\n")
    twice = _run(tmp_path / "data", "-o", out, "--metadata", tmp_path / "twice.csv")
    assert twice.exit_code == 2 and "column(s) path more than once" in twice.stderr
    (tmp_path / "nul.csv").write_bytes(b"path,patient,eye,date\nf\x00.png,A,OD,20230101\n")
    nul = _run(tmp_path / "data", "-o", out, "--metadata", tmp_path / "nul.csv", "--json")
    assert nul.exit_code == 1 and json.loads(nul.stdout)["errors"][0]["error"].endswith(
        "row 2: path is not a usable file path")
    missing = _run(tmp_path / "data", "-o", out, "--metadata", tmp_path / "nope.csv")
    assert missing.exit_code == 2 and "metadata CSV not found" in missing.stderr
    both = _run(tmp_path / "data", "-o", out, "--metadata", tmp_path / "meta.csv", "--pattern",
                "{patient}_{eye}_{date}.png")
    assert both.exit_code == 2 and not out.exists()


# --- file-name pattern -------------------------------------------------------------------------------------


def _pattern_dataset(root: Path) -> Path:
    data = root / "data"
    _fundus(data / "DOE_JANE_OD_20230105_fundus.png", 1)
    _bscans(data / "DOE_JANE_OD_20230105_oct")  # a B-scan folder: its name without the extension
    _fundus(data / "DOE_JANE_od_2023-03-05_fundus.png", 2)
    _tiff(data / "DOE_JANE_right_2023-03-05_OCT.tif")  # .tif: not matched by a pattern ending .png
    _fundus(data / "ROE_RICHARD_L_20230201_fundus.png", 3)
    _bscans(data / "ROE_RICHARD_L_20230201_oct")
    _fundus(data / "ROE_RICHARD_L_20230230_fundus.png", 4)  # impossible date
    _fundus(data / "ROE_RICHARD_L_20230201_angio.png", 5)  # not a modality
    _fundus(data / "ROE_RICHARD_L_20230202_oct.png", 6)  # says oct, is a photo
    _fundus(data / "notes.png", 7)
    return data


def test_pattern_pairs_plain_images(tmp_path):
    data = _pattern_dataset(tmp_path)
    manifest = tmp_path / "manifest.csv"
    pattern = "{patient}_{eye}_{date}_{modality}.png"
    result = _run(data, "--out", manifest, "--pattern", pattern, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    rows = _rows(manifest)
    got = {(r["eye"], r["visit"], r["visit_date"], r["pair_method"], r["oct_path"], r["fundus_path"])
           for r in rows}  # fmt: skip
    assert got == {
        ("OD", "0", "2023-01-05", "time", "data/DOE_JANE_OD_20230105_oct",
         "data/DOE_JANE_OD_20230105_fundus.png"),
        ("OS", "0", "2023-02-01", "time", "data/ROE_RICHARD_L_20230201_oct",
         "data/ROE_RICHARD_L_20230201_fundus.png"),
    }
    key = load_or_create_secret(tmp_path)
    assert {r["eye"]: r["patient_id"] for r in rows} == {
        "OD": pseudonym("DOE_JANE", key), "OS": pseudonym("ROE_RICHARD", key)}
    # the names are in the file names (the manifest's paths must open them), never in printed output
    assert not _leaks(result.stdout + result.stderr)
    assert not _leaks("".join(r["patient_id"] for r in rows))
    reasons = sorted(u["reason"] for u in payload["unpaired"])
    shown = f"--pattern {pattern!r}"
    assert reasons == sorted([
        f"name does not match {shown}",  # the .tif
        "no OCT volume of the same patient and eye within 24 h",  # its fundus
        f"{shown}: in the name, date is not a real calendar date written YYYY-MM-DD or YYYYMMDD",
        f"{shown}: in the name, modality is not one of oct, fundus, cfp, slo, ir, nir",
        f"{shown}: the name says oct but the file is a fundus image",
        f"name does not match {shown}",  # notes.png
    ])
    assert all(u["path"].startswith("data/p") or u["path"] == "data/notes.png" for u in payload["unpaired"])

    # without the extension the pattern matches any: the TIFF pairs too; the table names nobody
    again = runner.invoke(app, ["pair", str(data), "-o", str(manifest), "--pattern",
                                "{patient}_{eye}_{date}_{modality}"], env={"COLUMNS": "250"})
    assert again.exit_code == 0
    assert "wrote 3 pair(s)" in again.stdout and not _leaks(again.stdout + again.stderr)
    tiff_row = next(r for r in _rows(manifest) if r["oct_format"] == "tiff")
    assert (tiff_row["eye"], tiff_row["visit"], tiff_row["visit_date"]) == ("OD", "1", "2023-03-05")

    # --redact-paths: a manifest to share names nobody; --keep-identifiers writes the names
    shared = _run(data, "-o", tmp_path / "shared.csv", "--pattern", pattern, "--redact-paths")
    assert shared.exit_code == 0 and not _leaks((tmp_path / "shared.csv").read_text())
    kept = _run(data, "-o", tmp_path / "kept.csv", "--pattern", pattern, "--keep-identifiers")
    assert kept.exit_code == 0
    assert {r["patient_id"] for r in _rows(tmp_path / "kept.csv")} == {"DOE_JANE", "ROE_RICHARD"}


def test_pattern_with_folders_and_times(tmp_path):
    """A pattern with '/' matches the last path components; {time} tells two scans of one day apart."""
    data = tmp_path / "export"
    _bscans(data / "P7" / "OS" / "20230105" / "0930_oct")
    _fundus(data / "P7" / "OS" / "20230105" / "0931_fundus.png", 1)
    _bscans(data / "P7" / "OS" / "20230105" / "1500_oct")
    _fundus(data / "P7" / "OS" / "20230105" / "1502_fundus.png", 2)
    manifest = tmp_path / "m.csv"
    result = _run(data, "-o", manifest, "--pattern", "{patient}/{eye}/{date}/{time}_{modality}.png", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["oct_path"]: r for r in _rows(manifest)}
    assert rows["export/P7/OS/20230105/0930_oct"]["fundus_path"] == "export/P7/OS/20230105/0931_fundus.png"
    assert rows["export/P7/OS/20230105/1500_oct"]["fundus_path"] == "export/P7/OS/20230105/1502_fundus.png"
    assert {r["visit"] for r in rows.values()} == {"0"}  # one visit date
    assert float(rows["export/P7/OS/20230105/1500_oct"]["hours_apart"]) == pytest.approx(2 / 60, abs=1e-4)


def test_pattern_labels_join(tmp_path):
    data = _pattern_dataset(tmp_path)
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_id,eye,date,bcva_letters\nROE_RICHARD,L,2023-02-01,71\n")
    manifest = tmp_path / "m.csv"
    result = _run(data, "-o", manifest, "--pattern", "{patient}_{eye}_{date}_{modality}.png",
                  "--labels", labels, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["labels_matched"] == 1
    assert {r["eye"]: r["bcva_letters"] for r in _rows(manifest)} == {"OD": "", "OS": "71"}


@pytest.mark.parametrize(
    ("pattern", "says"),
    [
        ("{patient}_{side}_{date}.png", "unknown group {side}"),
        ("{patient}_{eye}.png", "needs the groups {date}"),
        ("{patient}_{eye}_{eye}_{date}.png", "group {eye} appears twice"),
        ("{patient_{eye}_{date}.png", "unbalanced"),
        ("{patient}_{eye}_{date}}.png", "unbalanced"),
        ("/{patient}/{eye}_{date}.png", "no leading, trailing or double /"),
        ("{patient}/{eye}/{date}/", "no leading, trailing or double /"),
    ],
)
def test_bad_patterns_are_usage_errors(tmp_path, pattern, says):
    _fundus(tmp_path / "data" / "f.png")
    result = _run(tmp_path / "data", "-o", tmp_path / "m.csv", "--pattern", pattern)
    assert result.exit_code == 2 and says in " ".join(result.stderr.split())
    assert not (tmp_path / "m.csv").exists()


def test_pattern_groups_split_as_a_user_reads_them():
    """Free text takes as little as lets the rest match; eye and date only their spellings, so a patient
    name holding the separator is not cut short."""
    named = compile_pattern("{patient}_{eye}_{date}_{modality}.png")
    assert named.match(["DOE_JANE_MARY_os_20230105_fundus.png"], folder=False) == {
        "patient": "DOE_JANE_MARY", "eye": "os", "date": "20230105", "modality": "fundus"}
    assert named.match(["DOE_JANE_OD_20230105_oct"], folder=True)["modality"] == "oct"
    assert named.match(["DOE_JANE_OD_20230105_oct.tif"], folder=False) is None
    assert named.match(["DOE.JANE_OD_2023-01-05_FUNDUS.PNG"], folder=False)["patient"] == "DOE.JANE"
    assert named.match(["a/b_OD_20230105_fundus.png"], folder=False) is None  # no '/' inside a group
    deep = compile_pattern("{patient}/{eye}/{date}.jpg")
    assert deep.match(["export", "P1", "left", "2023-01-05.jpg"], folder=False) == {
        "patient": "P1", "eye": "left", "date": "2023-01-05"}
    assert deep.match(["left", "2023-01-05.jpg"], folder=False) is None
