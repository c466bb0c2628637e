"""Batch retrieval (`retina retrieve Q1 Q2 … --queries FILE`, --json / --csv / tables) and the `same_eye`
field, with the real DICOM reader and the torch-free toy package on the tiny synthetic cohort."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fixtures_packages import make_toy_package
from typer.testing import CliRunner

from retinacli.cli import app
from retinacli.errors import EXIT_NOTHING_DONE, EXIT_OK, EXIT_USAGE
from retinacli.store import EmbeddingStore

CSV_HEADER = ["query", "query_id", "query_path", "query_modality", "query_laterality", "rank", "score", "id",
              "path", "modality", "laterality", "date", "same_eye", "ood_score", "ood", "root"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def embedded(tiny_cohort, tmp_path_factory):
    """The cohort embedded with the toy package: (cohort, store, package, manifest rows, store rows)."""
    package = make_toy_package(tmp_path_factory.mktemp("toy_batch") / "toy")
    store = tmp_path_factory.mktemp("batch_store") / "store"
    result = run("embed", tiny_cohort, "--model", package, "--store", store, "--json")
    assert result.exit_code == 0, result.output
    with open(tiny_cohort / "manifest.csv", newline="") as fh:
        manifest = list(csv.DictReader(fh))
    return tiny_cohort, store, package, manifest, EmbeddingStore.open(store).metadata()


@pytest.fixture
def work(isolated_cli):
    return isolated_cli


def planted(cohort: Path) -> set[str]:
    """Every patient id, name and birth date written into the cohort's DICOM headers."""
    found = set()
    for path in cohort.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        found |= {str(ds.PatientID), str(ds.PatientName), str(ds.PatientBirthDate)}
    return found - {""}


def both_eyes_patient(manifest: list[dict]) -> str:
    return next(p for p in sorted({r["patient_id"] for r in manifest})
                if {r["eye"] for r in manifest if r["patient_id"] == p} == {"OD", "OS"})


def row_of(rows: list[dict], relpath: str) -> dict:
    return next(r for r in rows if r["path"].endswith(relpath))


def test_batch_answers_good_queries_and_lists_bad_ones(embedded, work, tmp_path):
    cohort, store, package, manifest, rows = embedded
    first, third = manifest[0], manifest[4]
    oct_row = row_of(rows, first["oct_path"])
    lists = tmp_path / "lists"
    lists.mkdir()
    shutil.copy(cohort / third["fundus_path"], lists / "mine.dcm")  # same SOP UID: same id as in the store
    (lists / "broken.dcm").write_bytes((cohort / third["fundus_path"]).read_bytes()[:300])
    (lists / "queries.txt").write_text(
        "# fundus photos of the clinic\n\nmine.dcm\n  missing.dcm\ni0000000000000000\nbroken.dcm\n")
    args = ("retrieve", cohort / first["fundus_path"], oct_row["id"], "--queries", lists / "queries.txt",
            "--store", store, "--model", package, "--top", "3")
    result = run(*args, "--json")
    assert result.exit_code == EXIT_OK, result.output
    payload = json.loads(result.stdout)
    assert set(payload) == {"model", "store", "search", "queries", "errors"}
    assert payload["search"] == "exact" and payload["model"] == EmbeddingStore.open(store).model_id
    answered = payload["queries"]
    assert [set(a) for a in answered] == [{"query", "target", "results"}] * 3
    # in the order given: the argument file, the argument id, then the file's lines
    assert [a["query"]["id"] for a in answered] == [row_of(rows, first["fundus_path"])["id"], oct_row["id"],
                                                   row_of(rows, third["fundus_path"])["id"]]
    assert [a["target"] for a in answered] == ["oct", "fundus", "oct"]
    assert answered[2]["query"]["path"] == "mine.dcm"  # relative to the list's folder, where it was found
    for answer in answered:
        assert [r["rank"] for r in answer["results"]] == [1, 2, 3]
        assert all(r["modality"] == answer["target"] for r in answer["results"])
    errors = payload["errors"]
    assert [e["query"] for e in errors] == ["missing.dcm", "i0000000000000000", "broken.dcm"]
    assert "missing.dcm: no such file (nor an item id in" in errors[0]["error"]
    assert "i0000000000000000: not a file, and no item with this id" in errors[1]["error"]
    assert errors[2]["error"].startswith("broken.dcm: ") and len(errors[2]["error"]) > len("broken.dcm: ")
    assert all("\n" not in e["error"] for e in errors)
    assert "failed: 3 of 6 queries" in result.stderr and "broken.dcm: " in result.stderr
    # CSV: one row per answered query x rank, the contract's columns, the same values as the JSON
    table = run(*args, "--csv")
    assert table.exit_code == EXIT_OK, table.output
    lines = list(csv.reader(io.StringIO(table.stdout)))
    assert lines[0] == CSV_HEADER and len(lines) == 1 + 3 * 3
    records = [dict(zip(CSV_HEADER, line, strict=True)) for line in lines[1:]]
    expected = [(a, r) for a in answered for r in a["results"]]
    for record, (answer, result_) in zip(records, expected, strict=True):
        assert record["query_id"] == answer["query"]["id"] and record["id"] == result_["id"]
        assert record["query_modality"] == answer["query"]["modality"]
        assert record["query_laterality"] == (answer["query"]["laterality"] or "")
        assert int(record["rank"]) == result_["rank"]
        assert float(record["score"]) == pytest.approx(result_["score"])
        assert (record["path"], record["root"], record["date"]) == (result_["path"], result_["root"],
                                                                   result_["date"])
        assert record["same_eye"] == {True: "True", False: "False", None: ""}[result_["same_eye"]]
    assert [r["query"] for r in records[::3]] == [
        Path(first["fundus_path"]).name, oct_row["id"], "mine.dcm"]
    # tables: one per answered query, each with the same-eye column
    text = run(*args)
    assert text.exit_code == EXIT_OK, text.output
    assert text.stdout.count("items nearest to") == 3 and text.stdout.count("same eye") == 3
    # the planted patient ids, names and birth dates appear in no output
    for secret in planted(cohort):
        for output in (result.stdout, result.stderr, table.stdout, text.stdout, text.stderr):
            assert secret not in output


def test_same_eye_true_for_the_patients_same_eye_only(embedded, work):
    cohort, store, package, manifest, rows = embedded
    patient = both_eyes_patient(manifest)
    visit = next(r for r in manifest if r["patient_id"] == patient and r["eye"] == "OD")
    own = {row_of(rows, r["oct_path"])["id"] for r in manifest
           if r["patient_id"] == patient and r["eye"] == "OD"}
    other_eye = {row_of(rows, r["oct_path"])["id"] for r in manifest
                 if r["patient_id"] == patient and r["eye"] == "OS"}
    n_oct = sum(r["modality"] == "oct" for r in rows)
    assert len(own) == 2 and len(other_eye) == 2 and n_oct == len(manifest)
    by_file = run("retrieve", cohort / visit["fundus_path"], "--store", store, "--model", package,
                  "--top", n_oct, "--json")
    assert by_file.exit_code == EXIT_OK, by_file.output
    by_id = run("retrieve", row_of(rows, visit["fundus_path"])["id"], "--store", store, "--top", n_oct,
                "--json")
    for result in (by_file, by_id):
        payload = json.loads(result.stdout)
        assert set(payload) == {"query", "model", "store", "target", "search", "results"}  # one query
        assert len(payload["results"]) == n_oct
        flags = {r["id"]: r["same_eye"] for r in payload["results"]}
        assert {i for i, f in flags.items() if f is True} == own
        assert all(flags[i] is False for i in other_eye)  # the same patient's other eye
        assert sum(f is False for f in flags.values()) == n_oct - 2
        assert "patient" not in payload["query"] and all("patient" not in r for r in payload["results"])
    # the table marks the two same-eye results
    table = run("retrieve", cohort / visit["fundus_path"], "--store", store, "--model", package,
                "--top", n_oct)
    assert table.exit_code == EXIT_OK
    lines = table.stdout.splitlines()
    header = [c.strip() for c in next(line for line in lines if "rank" in line).split("┃")]
    column = header.index("same eye")
    cells = [line.split("│") for line in lines if line.count("│") == len(header) - 1]
    marks = [c[column].strip() for c in cells if c[1].strip().isdigit()]
    assert sorted(marks) == sorted(["yes"] * 2 + ["no"] * (n_oct - 2))


def test_same_eye_unknown_without_the_querys_patient_or_eye(embedded, work, tmp_path):
    """A plain photo has no patient and no eye in it: every result's same_eye is null (empty cell)."""
    from PIL import Image

    _, store, package, _, _ = embedded
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(photo)
    result = run("retrieve", photo, "--store", store, "--model", package, "--top", 4, "--json")
    assert result.exit_code == EXIT_OK, result.output
    payload = json.loads(result.stdout)
    assert payload["query"]["laterality"] is None and len(payload["results"]) == 4
    assert [r["same_eye"] for r in payload["results"]] == [None] * 4
    lines = list(csv.reader(io.StringIO(run("retrieve", photo, "--store", store, "--model", package,
                                            "--top", 4, "--csv").stdout)))
    assert lines[0] == CSV_HEADER and [line[CSV_HEADER.index("same_eye")] for line in lines[1:]] == [""] * 4
    assert {line[0] for line in lines[1:]} == {"photo.png"}


def test_exit_codes(embedded, work, tmp_path):
    _, store, _, _, rows = embedded
    listing = tmp_path / "bad.txt"
    listing.write_text("i0000000000000000\nnowhere.png\n")
    none = run("retrieve", "--queries", listing, "--store", store, "--json")
    assert none.exit_code == EXIT_NOTHING_DONE, none.output
    payload = json.loads(none.stdout)
    assert payload["queries"] == [] and [e["query"] for e in payload["errors"]] == ["i0000000000000000",
                                                                                  "nowhere.png"]
    one_good = run("retrieve", "i0000000000000000", rows[0]["id"], "--store", store, "--json")
    assert one_good.exit_code == EXIT_OK and len(json.loads(one_good.stdout)["queries"]) == 1
    missing = run("retrieve", "--queries", tmp_path / "absent.txt", "--store", store)
    assert missing.exit_code == EXIT_USAGE and "absent.txt" in missing.stderr
    both = run("retrieve", rows[0]["id"], "--store", store, "--json", "--csv")
    assert both.exit_code == EXIT_USAGE and "--json and --csv" in both.stderr
    nothing = run("retrieve", "--store", store)
    assert nothing.exit_code == EXIT_USAGE and "no query" in nothing.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n\n")
    assert run("retrieve", "--queries", empty, "--store", store).exit_code == EXIT_USAGE
    # one query argument fails as a whole, as before batch retrieval
    single = run("retrieve", "i0000000000000000", "--store", store, "--json")
    assert single.exit_code == EXIT_USAGE and single.stdout == ""


def test_same_eye_rule():
    """Same pseudonymous patient and eye: True; another patient or eye: False; either side unknown: None."""
    from retinacli.retrieval import same_eye

    row = {"patient": "p1", "laterality": "OD"}
    assert same_eye("p1", "OD", row) is True
    assert same_eye("p1", "od", row) is True  # laterality case does not matter
    assert same_eye("p1", "OS", row) is False
    assert same_eye("p2", "OD", row) is False
    assert same_eye(None, "OD", row) is None and same_eye("p1", None, row) is None
    assert same_eye("p1", "OD", {"patient": None, "laterality": "OD"}) is None
    assert same_eye("p1", "OD", {"patient": "p1", "laterality": None}) is None
    assert same_eye("p1", "OD", {"patient": "p1", "laterality": "OU"}) is None  # both eyes: not one eye


def test_redact_paths_covers_the_failed_queries(embedded, work, tmp_path):
    """--redact-paths: a failed query's name is a keyed pseudonym too, in JSON, CSV and stderr."""
    cohort, store, package, manifest, _ = embedded
    (tmp_path / "Doe_Jane.dcm").write_bytes(b"not a dicom")
    args = ("retrieve", tmp_path / "Doe_Jane.dcm", tmp_path / "Roe_Richard.png",
            cohort / manifest[0]["fundus_path"], "--store", store, "--model", package, "--top", 2,
            "--redact-paths")
    result = run(*args, "--json")
    assert result.exit_code == EXIT_OK, result.output
    payload = json.loads(result.stdout)
    assert len(payload["queries"]) == 1 and len(payload["errors"]) == 2
    assert [e["query"].rsplit(".", 1)[1] for e in payload["errors"]] == ["dcm", "png"]
    text = run(*args, "--csv")
    for output in (result.stdout, result.stderr, text.stdout, text.stderr):
        assert not {"Doe", "Jane", "Roe", "Richard", "v00", "dicom"} & set(re.split(r"[^A-Za-z0-9]+", output))
