"""Paths in outputs: relative to the root the user gave, folders and files named after the patient
replaced by the patient's pseudonym, every component replaced with --redact-paths; stores of formats
1 and 2 (absolute paths, no roots) still open, and the next embed does not duplicate their sources.

The inputs are DICOMs the tests write into folders named after the patient in their headers
(`DOE_JANE_JD4711/oct.dcm` with PatientName DOE^JANE, PatientID JD4711), one file named by its
accession number and one unreadable file in a folder named after its own (different) patient."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from fixtures_packages import make_toy_package
from test_readers_support import ramp_volume, write_op, write_opt
from typer.testing import CliRunner

from retinacli.cli import app
from retinacli.privacy import SECRET_FILE, load_secret, pseudonym
from retinacli.redaction import PathRedactor, Root, matches, redact_every_component, tokens
from retinacli.store import EmbeddingStore

runner = CliRunner()
# Every token a planted identifier yields (the matching rule's tokens of 3+ characters).
PLANTED = ["DOE", "JANE", "JD4711", "ACC99123", "ROE", "RICHARD", "RR8812"]
PSEUDONYM_PART = re.compile(r"^c[0-9a-f]{10}(\.[A-Za-z0-9]{1,5})?$")


def run(*args, check=True):
    result = runner.invoke(app, [str(a) for a in args])
    if check:
        assert result.exit_code == 0, (args, result.output)
    return result


def _set(path: Path, **values) -> None:
    ds = pydicom.dcmread(path)
    for name, value in values.items():
        setattr(ds, name, value)
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def export(tmp_path, monkeypatch):
    """tmp/export/ with patient-named folders and files; the working folder is tmp (empty env)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RETINA_MODEL", "")
    monkeypatch.delenv("RETINA_STORE", raising=False)
    root = tmp_path / "export"
    jane = root / "DOE_JANE_JD4711"
    jane.mkdir(parents=True)
    fundus = write_op(jane / "fundus.dcm", np.zeros((20, 24, 3), np.uint8), "JD4711", "OD")
    write_opt(jane / "oct.dcm", ramp_volume(4, 32, 32), "JD4711", "OD", localizer_uid=fundus.SOPInstanceUID)
    write_op(jane / "fundus_ACC99123.dcm", np.full((20, 24, 3), 9, np.uint8), "JD4711", "OS")
    write_opt(jane / "oct_os.dcm", ramp_volume(4, 32, 32)[::-1].copy(), "JD4711", "OS")
    for name in ("fundus.dcm", "oct.dcm", "fundus_ACC99123.dcm", "oct_os.dcm"):
        _set(jane / name, PatientName="DOE^JANE", AccessionNumber="ACC99123")
    # An unreadable file (truncated pixel data) in a folder named after its own patient, whose
    # header still names him: its error path must not name him either.
    richard = root / "roe.richard-RR8812"
    richard.mkdir()
    write_op(richard / "photo.dcm", np.full((40, 40, 3), 7, np.uint8), "RR8812", "OD")
    _set(richard / "photo.dcm", PatientName="ROE^RICHARD")
    data = (richard / "photo.dcm").read_bytes()
    (richard / "photo.dcm").write_bytes(data[: len(data) - 2000])
    package = make_toy_package(tmp_path / "toy")
    return root, package


def leaks(text: str | bytes) -> list[str]:
    """The planted identifiers found in `text` (case-insensitive, as whole tokens)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return [t for t in PLANTED if re.search(rf"(?<![0-9A-Za-z]){t}(?![0-9A-Za-z])", text, re.IGNORECASE)]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def folder_blobs(*folders: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for f in folders for p in f.rglob("*")
            if p.is_file() and p.name != SECRET_FILE}


# --- the matching rule ------------------------------------------------------------------------------


def test_matching_rule_splits_on_separators_and_compares_whole_tokens():
    name = tokens("DOE^JANE")
    assert name == {"doe", "jane"}
    assert matches("doe_jane_4711", name) and matches("Jane Doe", name) and matches("x-DOE.y", name)
    assert not matches("janeway", name) and not matches("doe2", name)  # whole tokens only
    # any non-letter, non-digit separates: a "Last, First" folder, a name with an apostrophe or a plus
    assert matches("Doe, Jane (2019)", name) and matches("jane+doe", name) and matches("doe's scans", name)
    assert tokens("O'Brien, Mary") == {"brien", "mary"} and matches("OBrien_mary", tokens("O'Brien, Mary"))
    assert tokens("Müller^Zoë") == {"müller", "zoë"}  # letters beyond ASCII stay letters
    assert tokens("1") == set() and not matches("1", tokens("1")) and not matches("scan_1", tokens("1"))
    assert tokens("AB^C") == set()  # tokens shorter than 3 characters never match
    assert matches("ACC99123.dcm", tokens("acc99123"))


def test_redactor_replaces_the_patient_components_with_the_patient_pseudonym(tmp_path):
    key = b"k" * 32
    shown = PathRedactor([Root("r0", str(tmp_path / "export"))], key)

    class Meta:
        patient_id, patient_name, accession_number = "4711", "DOE^JANE", "ACC1"

    root, path = shown.output(tmp_path / "export" / "doe_jane_4711" / "visit 1" / "oct.dcm", Meta())
    assert (root, path) == ("r0", f"export/{pseudonym('4711', key)}/visit 1/oct.dcm")
    # another file of the run, whose header was not read: identifiers learnt above still apply
    assert shown.show(tmp_path / "export" / "Doe-Jane" / "x.png") == f"export/{pseudonym('4711', key)}/x.png"
    # outside every root: absolute, still redacted
    assert shown.locate(tmp_path / "elsewhere" / "a.png") == (None, str(tmp_path / "elsewhere" / "a.png"))
    every = PathRedactor([Root("r0", str(tmp_path / "export"))], key, redact_all=True)
    hidden = every.show(tmp_path / "export" / "site" / "scan.dcm")
    assert all(PSEUDONYM_PART.match(part) for part in hidden.split("/")) and hidden.endswith(".dcm")
    assert hidden == redact_every_component("export/site/scan.dcm", key)  # keyed: stable within a key
    assert redact_every_component("export/site/scan.dcm", b"o" * 32) != hidden


def test_a_shared_surname_goes_to_the_files_own_patient(tmp_path):
    """Two patients share the token SMITH: a file's folder gets its own patient's pseudonym, whichever
    patient the run happened to learn first."""
    key = b"k" * 32
    shown = PathRedactor([Root("r0", str(tmp_path / "export"))], key)

    class Ann:
        patient_id, patient_name, accession_number = "A111", "SMITH^ANN", None

    class Bob:
        patient_id, patient_name, accession_number = "B222", "SMITH^BOB", None

    export = tmp_path / "export"
    assert shown.show(export / "smith_ann" / "a.dcm", Ann()) == f"export/{pseudonym('A111', key)}/a.dcm"
    assert shown.show(export / "SMITH" / "b.dcm", Bob()) == f"export/{pseudonym('B222', key)}/b.dcm"


# --- every command's output -------------------------------------------------------------------------


def test_patient_named_folders_never_reach_any_output(export, tmp_path):
    root, package = export
    store, pairs = tmp_path / "store", tmp_path / "pairs"
    query = root / "DOE_JANE_JD4711" / "oct.dcm"
    results = {
        "embed --json": run("embed", root, "--model", package, "--store", store, "--json"),
        "embed": run("embed", root, "--model", package, "--store", store),
        "retrieve --json": run("retrieve", query, "--store", store, "--json"),
        "retrieve": run("retrieve", query, "--store", store),
        "predict --json": run("predict", "--task", "cst", "--store", store, "--json"),
        "predict --csv": run("predict", "--task", "tn", "--store", store, "--csv"),
        "predict": run("predict", "--task", "cst", "--store", store),
        "predict files": run("predict", root, "--task", "cst", "--store", store, "--json"),
        "inspect --json": run("inspect", root, "--json"),
        "inspect": run("inspect", root),
        "pair --json": run("pair", root, "--out", pairs / "manifest.csv", "--json"),
        "pair": run("pair", root, "--out", pairs / "again.csv"),
    }
    found = {name: leaks(r.stdout + r.stderr) for name, r in results.items()}
    assert not any(found.values()), found
    for name, blob in folder_blobs(store).items():  # parquet, store.json, errors.csv
        assert not leaks(blob), (name, leaks(blob))
    # the store: rows name root r0 (the PATH given) and a path under it; the folder became the pseudonym
    # of the patient it named, the very value of the `patient` column
    s = EmbeddingStore.open(store)
    assert s.format_version == 4 and [(r.id, r.path) for r in s.roots] == [("r0", str(root))]
    rows = s.metadata()
    assert len(rows) == 4 and {r["root"] for r in rows} == {"r0"}
    for row in rows:
        parts = row["path"].split("/")
        assert parts[0] == "export" and parts[1] == row["patient"] and (root.parent / parts[0]).is_dir()
    assert any(r["path"].endswith(f"/{rows[0]['patient']}.dcm") for r in rows)  # fundus_ACC99123.dcm
    errors = read_csv(store / "errors.csv")
    assert len(errors) == 1 and errors[0]["path"].startswith("export/p")
    assert errors[0]["path"].endswith("/photo.dcm")
    summary = json.loads(results["embed --json"].stdout)
    assert summary["failed"] == 1 and summary["errors"][0]["path"] == errors[0]["path"]
    payload = json.loads(results["retrieve --json"].stdout)
    assert payload["query"]["path"] == "oct.dcm"  # relative to the folder holding the PATH given
    assert {r["root"] for r in payload["results"]} == {"r0"}
    inspected = json.loads(results["inspect --json"].stdout)
    assert {i["root"] for i in inspected["items"]} == {"r0"} and len(inspected["items"]) == 4
    assert len(inspected["errors"]) == 1 and inspected["errors"][0]["path"].startswith("export/p")
    # the manifest's patient pseudonym is the one in pair's printed paths
    paired = json.loads(results["pair --json"].stdout)
    with open(pairs / "manifest.csv", newline="") as fh:
        manifest = list(csv.DictReader(fh))
    assert paired["pairs"] == len(manifest) >= 1
    listed = [u["path"] for u in paired["unpaired"]] + [e["path"] for e in paired["errors"]]
    assert {p.split("/")[1] for p in listed if p.endswith("photo.dcm")} == {
        pseudonym("RR8812", load_secret(pairs))}


def test_manifest_keeps_openable_paths_unless_redacted(export, tmp_path):
    """Documented limit: the cohort manifest names its files so training can open them; with
    --redact-paths its paths are pseudonyms too (a manifest to share)."""
    root, _package = export
    run("pair", root, "--out", tmp_path / "m.csv")
    with open(tmp_path / "m.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    assert (tmp_path / row["oct_path"]).is_file() and "DOE_JANE_JD4711" in row["oct_path"]
    shared = run("pair", root, "--out", tmp_path / "shared" / "m.csv", "--redact-paths", "--json")
    assert not leaks((tmp_path / "shared" / "m.csv").read_text()) and not leaks(shared.stdout)
    with open(tmp_path / "shared" / "m.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            for column in ("oct_path", "fundus_path"):
                assert all(PSEUDONYM_PART.match(part) for part in row[column].split("/")), row[column]


def test_redact_paths_hides_every_component(export, tmp_path):
    root, package = export
    store = tmp_path / "shared-store"
    names = {"export", "DOE_JANE_JD4711", "oct.dcm", "fundus.dcm", "oct_os.dcm", "fundus_ACC99123.dcm",
             "roe.richard-RR8812", "photo.dcm"}
    embedded = run("embed", root, "--model", package, "--store", store, "--redact-paths", "--json")
    paths = [r["path"] for r in EmbeddingStore.open(store).metadata()]
    paths += [e["path"] for e in json.loads(embedded.stdout)["errors"]]
    paths += [row["path"] for row in read_csv(store / "errors.csv")]
    query = root / "DOE_JANE_JD4711" / "oct.dcm"
    retrieved = json.loads(run("retrieve", query, "--store", store, "--redact-paths", "--json").stdout)
    paths += [retrieved["query"]["path"]] + [r["path"] for r in retrieved["results"]]
    predicted = json.loads(run("predict", "--task", "cst", "--store", store, "--redact-paths",
                               "--json").stdout)
    paths += [p["path"] for p in predicted["predictions"]]
    on_files = json.loads(run("predict", root, "--task", "cst", "--model", package, "--redact-paths",
                              "--json").stdout)
    paths += [p["path"] for p in on_files["predictions"]] + [e["path"] for e in on_files["errors"]]
    inspected = json.loads(run("inspect", root, "--redact-paths", "--json").stdout)
    paths += [i["path"] for i in inspected["items"]] + [e["path"] for e in inspected["errors"]]
    assert len(paths) >= 15
    for path in paths:
        parts = path.split("/")
        assert all(PSEUDONYM_PART.match(part) for part in parts) and not set(parts) & names, path
    # keyed with the store's key: the same file has the same redacted path in embed and retrieve
    assert retrieved["results"][0]["path"] in {p for p in paths[:4]}
    # stored rows are redacted at embed time: a plain retrieve shows them redacted too
    plain = json.loads(run("retrieve", query, "--store", store, "--json").stdout)
    assert not leaks(json.dumps(plain["results"]))


# --- older stores -----------------------------------------------------------------------------------


def _as_format_2(store: Path, spelled: str) -> None:
    """Rewrite a store as format 2 wrote it when embedding `spelled` (a root spelled with `..`):
    absolute paths with the `..` kept, source keys hashing them, no root column, no roots list."""
    from retinacli.pipeline import discover_with_readers, source_identity, source_key

    key = load_secret(store)
    sources, _ = discover_with_readers([Path(spelled)])
    legacy = {str(Path(s.path).resolve()): (str(Path(s.path).absolute()),
                                            source_key(source_identity(s, legacy=True), key))
              for s in sources}
    index = json.loads((store / "store.json").read_text())
    roots = {r["id"]: r["path"] for r in index.pop("roots")}
    index["format_version"] = 2
    for shard in index["shards"]:
        table = pq.read_table(store / shard["metadata"])
        data = table.to_pydict()
        where = [str(Path(roots[r]).parent / p) for r, p in zip(data.pop("root"), data["path"], strict=True)]
        data["path"] = [legacy[w][0] for w in where]
        data["source_key"] = [legacy[w][1] for w in where]
        schema = table.schema.remove(table.schema.get_field_index("root"))
        pq.write_table(table.from_pydict(data, schema=schema), store / shard["metadata"])
    (store / "store.json").write_text(json.dumps(index, indent=2) + "\n")


@pytest.fixture
def plain_export(tmp_path, monkeypatch):
    """Folders without identifiers (so format-2 absolute paths name no patient)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RETINA_MODEL", "")
    root = tmp_path / "src"
    root.mkdir()
    fundus = write_op(root / "f.dcm", np.zeros((20, 24, 3), np.uint8), "P1", "OD")
    write_opt(root / "o.dcm", ramp_volume(4, 32, 32), "P1", "OD", localizer_uid=fundus.SOPInstanceUID)
    (tmp_path / "elsewhere").mkdir()
    return root, make_toy_package(tmp_path / "toy")


def test_format_2_store_opens_is_read_and_is_not_duplicated(plain_export, tmp_path, monkeypatch):
    root, package = plain_export
    store = tmp_path / "old"
    run("embed", root, "--model", package, "--store", store)
    monkeypatch.chdir(tmp_path / "elsewhere")
    _as_format_2(store, "../src")  # as format 2 wrote it, embedding ../src from ./elsewhere
    monkeypatch.chdir(tmp_path)
    old = EmbeddingStore.open(store)
    assert old.format_version == 2 and old.roots == [] and len(old) == 2
    rows = old.metadata()
    spelled = tmp_path / "elsewhere" / ".." / "src"
    assert {r["path"] for r in rows} == {str(spelled / "f.dcm"), str(spelled / "o.dcm")}
    fundus_id = next(r["id"] for r in rows if r["modality"] == "fundus")
    # read-only commands show old paths as they are
    by_id = json.loads(run("retrieve", fundus_id, "--store", store, "--json").stdout)
    assert by_id["query"]["path"] == str(spelled / "f.dcm") and by_id["query"]["root"] is None
    assert by_id["results"][0]["path"] == str(spelled / "o.dcm")
    predicted = json.loads(run("predict", "--task", "cst", "--store", store, "--json").stdout)
    assert [p["path"] for p in predicted["predictions"]] == [str(spelled / "o.dcm")]
    assert json.loads((store / "store.json").read_text())["format_version"] == 2  # reading never upgrades
    # the next embed, spelled differently (no `..`), upgrades the index and skips both sources: their
    # old keys are matched through the paths the old rows hold
    again = json.loads(run("embed", "src", "--store", store, "--json").stdout)
    assert (again["embedded"], again["skipped"]) == (0, 2)
    # and spelled as before, the old keys themselves match
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert json.loads(run("embed", "../src", "--store", store, "--json").stdout)["embedded"] == 0
    upgraded = EmbeddingStore.open(store)
    assert upgraded.format_version == 4 and len(upgraded) == 2
    assert [(r.id, r.path) for r in upgraded.roots] == [("r0", str(root))]
    # a changed file is a new source (its DICOM instance is still known: not duplicated)
    os.utime(root / "f.dcm", ns=(10**9, 10**9))
    third = json.loads(run("embed", root, "--store", store, "--json").stdout)
    assert (third["embedded"], third["skipped"]) == (0, 2) and len(EmbeddingStore.open(store)) == 2


def test_dotdot_spelling_is_the_same_source(plain_export, tmp_path, monkeypatch):
    """Source identity resolves the path: `../src` from another folder is not new."""
    root, package = plain_export
    store = tmp_path / "s"
    png = root / "extra.png"
    from test_readers_support import write_png

    write_png(png, np.random.default_rng(3).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    first = json.loads(run("embed", root, "--model", package, "--store", store, "--json").stdout)
    assert first["embedded"] == 3
    monkeypatch.chdir(tmp_path / "elsewhere")
    again = json.loads(run("embed", "../src", "--store", store, "--json").stdout)
    assert (again["embedded"], again["skipped"]) == (0, 3)
    assert len(EmbeddingStore.open(store).roots) == 1  # the same root, however spelled


def test_vol_export_folder_named_by_its_header_patient_id(tmp_path, monkeypatch):
    """A Heidelberg `.vol` export's patient id (its header) hides the folder named after it."""
    import shutil

    from conftest import SHARED_SAMPLES

    sample = SHARED_SAMPLES / "heidelberg_vol" / "Willis_B_716_0.vol"
    if not sample.is_file():
        pytest.skip("shared .vol sample not available")
    from retinacli.readers.heidelberg import read_vol_header

    pid = read_vol_header(sample).patient_id
    assert pid and len(pid) >= 3
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "vols" / f"visit_{pid}"
    folder.mkdir(parents=True)
    shutil.copy(sample, folder / "scan.vol")
    inspected = run("inspect", tmp_path / "vols", "--json")
    paired = run("pair", tmp_path / "vols", "--out", tmp_path / "m" / "manifest.csv", "--json")
    for result in (inspected, paired):
        assert not re.search(rf"(?<![0-9A-Za-z]){pid}(?![0-9A-Za-z])", result.stdout + result.stderr)
    items = json.loads(inspected.stdout)["items"]
    assert items and {i["path"].split("/")[1][:1] for i in items} == {"p"}
    assert {i["path"].split("/")[2] for i in items} == {"scan.vol"}


def test_a_member_file_named_after_the_patient_is_scrubbed_from_reasons(tmp_path):
    key = b"k" * 32
    shown = PathRedactor([Root("r0", str(tmp_path / "in"))], key)
    shown.learn(values=["DOE^JANE", "JD4711"], owner="JD4711")
    path, reason = shown.error(tmp_path / "in" / "series",
                               "B-scan doe_jane_003.png has shape (4, 4), the others (5, 5)")
    assert path == "in/series"
    assert reason == f"B-scan {pseudonym('JD4711', key)}.png has shape (4, 4), the others (5, 5)"
    every = PathRedactor([Root("r0", str(tmp_path / "in"))], key, redact_all=True)
    _, reason = every.error(tmp_path / "in" / "series",
                            "B-scan site_3.png has shape (4, 4), the others (5, 5)")
    assert reason == f"B-scan {redact_every_component('site_3.png', key)} has shape (4, 4), the others (5, 5)"


def test_a_patient_folder_given_as_root_is_not_named_in_store_json(export, tmp_path):
    root, package = export
    store = tmp_path / "store"
    patient_folder = root / "DOE_JANE_JD4711"
    first = run("embed", patient_folder, "--model", package, "--store", store, "--json")
    assert json.loads(first.stdout)["embedded"] == 4 and not leaks(first.stdout + first.stderr)
    for name, blob in folder_blobs(store).items():
        assert not leaks(blob), (name, leaks(blob))
    s = EmbeddingStore.open(store)
    pid = pseudonym("JD4711", load_secret(store))
    assert [(r.id, r.path) for r in s.roots] == [("r0", str(root / pid))]
    assert {r["path"].split("/")[0] for r in s.metadata()} == {pid}
    # the next run names the same folder: recognised by the root's keyed path, not a new root
    again = run("embed", patient_folder, "--store", store, "--json")
    assert json.loads(again.stdout)["skipped"] == 4
    assert [r.id for r in EmbeddingStore.open(store).roots] == ["r0"]


def test_training_reports_unreadable_rows_without_the_patient_folder(export):
    """train / probe / evaluate skip an unreadable manifest row with a message that names the file
    as every output does: relative, with the folder that names its patient replaced."""
    from retinacli.preprocess import make_spec
    from training.data import load_pairs

    root, _package = export
    jane, richard = root / "DOE_JANE_JD4711", root / "roe.richard-RR8812"
    rows = [
        {"patient_id": "p1", "eye": "OD", "visit": "0", "oct_path": str(jane / "oct.dcm"),
         "fundus_path": str(jane / "fundus.dcm")},
        {"patient_id": "p2", "eye": "OD", "visit": "0", "oct_path": str(jane / "oct_os.dcm"),
         "fundus_path": str(richard / "photo.dcm")},
    ]
    spec = make_spec(oct_slices=2, oct_size=16, fundus_size=16)
    pairs = load_pairs(rows, spec)
    assert len(pairs.rows) == 1 and len(pairs.errors) == 1
    message = pairs.errors[0]
    assert message.startswith("export/p") and message.split(":")[0].endswith("/photo.dcm")
    assert leaks(message) == []
