"""Out-of-distribution flags (retinacli/ood.py, training/export/ood.py): the exported package records
its training centroids and threshold; noise, a natural photo and an OCT B-scan given as a fundus photo
are flagged; held-out synthetic items mostly are not (the measured false-flag rate is asserted); the
store's ood columns (format 4), `embed --strict`, `retrieve` and `predict` (JSON, CSV, --strict);
a package without a reference says so; older stores still read."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fixtures_cohort import TINY_COHORT
from fixtures_packages import make_toy_package
from typer.testing import CliRunner

from retinacli.cli import app
from retinacli.engine import Engine
from retinacli.errors import EXIT_NOTHING_DONE
from retinacli.ood import NO_CHECK, REFERENCE_FILE
from retinacli.store import STORE_FORMAT_VERSION, EmbeddingStore

pytest.importorskip("torch")
pytest.importorskip("sklearn")

runner = CliRunner()
ODD = ("noise.png", "china.jpg", "china.png", "bscan_as_fundus.png")
# Held-out synthetic items (another seed: the same generator, patients the model never saw) that the
# tiny test package may flag. Measured (24 patients, 76 items per modality), embedding check alone /
# with the input check: fundus 9/76 / 9/76 (12 %), OCT 0/76 / 2/76 (2.6 %). The tiny model saw only 6
# patients (16 items: their input ranges are narrow); the bounds leave about twice the measured rate.
MAX_FALSE_FLAGS = {"fundus": 0.25, "oct": 0.05}


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _json(result) -> dict:
    assert result.exit_code in (0, EXIT_NOTHING_DONE), result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    """A fresh synthetic cohort (seed 1, 24 patients, PNG): the training distribution, unseen patients."""
    from retinacli.synth import generate_cohort

    out = tmp_path_factory.mktemp("ood_held_out") / "cohort"
    generate_cohort(out, formats=("png",), **{**TINY_COHORT, "seed": 1, "patients": 24})
    return out


@pytest.fixture(scope="module")
def odd_inputs(held_out, tmp_path_factory) -> Path:
    """Inputs that are not the training distribution: noise, a natural photo (JPEG and PNG) and an OCT
    B-scan saved as a PNG and given as a fundus photo."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    out = tmp_path_factory.mktemp("ood_odd") / "odd"
    out.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(out / "noise.png")
    china = Image.fromarray(load_sample_image("china.jpg"))
    china.save(out / "china.jpg", quality=90)
    china.save(out / "china.png")
    bscan = sorted(held_out.glob("png/*/*_oct/bscan_*.png"))[4]  # a middle B-scan of one volume
    Image.open(bscan).convert("RGB").save(out / "bscan_as_fundus.png")
    return out


@pytest.fixture(scope="module")
def held_out_store(tiny_package, held_out, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("ood_store") / "store"
    result = run("embed", held_out, "--model", tiny_package, "--store", store, "--workers", 1, "--json")
    assert result.exit_code == 0, result.output
    return store


def _reference(package: Path) -> tuple[dict, dict]:
    descriptor = json.loads((package / "retina.json").read_text())
    return descriptor, json.loads((package / descriptor["ood"]["file"]).read_text())


# --- the package -----------------------------------------------------------------------------------


def test_export_records_the_training_reference(tiny_package, tiny_package_run, isolated_cli):
    from retinacli.cohort_manifest import read_cohort_manifest
    from retinacli.package import verify_package

    descriptor, reference = _reference(tiny_package)
    ood = descriptor["ood"]
    assert ood["file"] == REFERENCE_FILE and ood["method"] == "nearest-centroid-cosine"
    assert ood["folds"] == 2 and ood["threshold_quantile"] == 0.01
    listed = {f["path"]: f for f in descriptor["files"]}
    assert REFERENCE_FILE in listed  # hashed like the graphs
    rows = read_cohort_manifest(json.loads((tiny_package_run / "config.json").read_text())["manifest"])
    assert ood["source"] == f"{len(rows)} items of manifest.csv"
    for modality in ("fundus", "oct"):
        stats = ood["modalities"][modality]
        centroids = np.asarray(reference["modalities"][modality]["centroids"])
        assert stats["items"] == len(rows) and stats["patients"] == TINY_COHORT["patients"]
        assert stats["k"] == round(np.sqrt(len(rows)))
        assert centroids.shape == (stats["k"], descriptor["embed_dim"])
        np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
        q = stats["held_out_quantiles"]
        assert stats["threshold"] == q["0.01"] and stats["held_out_min"] <= q["0.01"] <= q["0.05"] <= q["0.5"]
    verify_package(tiny_package)
    assert Engine.load(tiny_package).ood is not None
    shown = run("models", "show", tiny_package)
    t = ood["modalities"]["fundus"]
    line = f"fundus: flagged below {t['threshold']:.3f} (k={t['k']}, {t['items']} training items)"
    assert line in shown.stdout
    # the reference does not change the model id: stores stay valid across a re-export with it
    bare = dict(descriptor)
    bare.pop("ood")
    from retinacli.package import model_ids_for

    assert model_ids_for(bare) == model_ids_for(descriptor)


def _rewrite(package: Path, edit) -> None:
    """Edit the reference file and re-list it with its new sha256 (so only the content is wrong)."""
    import hashlib

    path = package / REFERENCE_FILE
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    descriptor = json.loads((package / "retina.json").read_text())
    for entry in descriptor["files"]:
        if entry["path"] == REFERENCE_FILE:
            entry.update(sha256=hashlib.sha256(path.read_bytes()).hexdigest(), bytes=path.stat().st_size)
    (package / "retina.json").write_text(json.dumps(descriptor))


def test_a_bad_reference_is_refused_with_the_file_and_reason(tiny_package, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_package, bad)
    _rewrite(bad, lambda d: d["modalities"]["oct"]["centroids"].pop())
    result = run("models", "verify", bad)
    assert result.exit_code != 0
    k = json.loads((bad / "retina.json").read_text())["ood"]["modalities"]["oct"]["k"]
    assert f"{bad / REFERENCE_FILE}: modalities.oct.centroids: shape [{k - 1}, 32] is not [k, embed_dim]" \
        in result.output
    nan = tmp_path / "nan"
    shutil.copytree(tiny_package, nan)
    text = (nan / "retina.json").read_text()
    descriptor = json.loads(text)
    descriptor["ood"]["modalities"]["fundus"]["threshold"] = float("nan")
    (nan / "retina.json").write_text(json.dumps(descriptor))
    result = run("models", "verify", nan)
    assert result.exit_code != 0
    assert "ood.modalities.fundus.threshold: must be a finite number" in result.output


# --- what is flagged -------------------------------------------------------------------------------


def test_noise_natural_photos_and_a_bscan_as_fundus_are_flagged(tiny_package, odd_inputs, tmp_path):
    store = tmp_path / "store"
    summary = _json(run("embed", odd_inputs, "--model", tiny_package, "--store", store, "--json"))
    assert summary["embedded"] == 4 and summary["ood_flagged"] == 4 and summary["ood_refused"] == 0
    threshold = _reference(tiny_package)[0]["ood"]["modalities"]["fundus"]["threshold"]
    rows = {Path(r["path"]).name: r for r in EmbeddingStore.open(store).metadata()}
    assert sorted(rows) == sorted(ODD)
    for name, row in rows.items():
        assert row["modality"] == "fundus" and row["ood"] is True, (name, row["ood_score"], threshold)
        assert -1.0 <= row["ood_score"] < threshold


def test_held_out_synthetic_items_are_mostly_not_flagged(tiny_package, held_out, held_out_store):
    """The measured false-flag rate on unseen synthetic patients stays within MAX_FALSE_FLAGS."""
    rows = EmbeddingStore.open(held_out_store).metadata()
    for modality, bound in MAX_FALSE_FLAGS.items():
        mine = [r for r in rows if r["modality"] == modality]
        assert len(mine) >= 70
        assert all(isinstance(r["ood"], bool) and isinstance(r["ood_score"], float) for r in mine)
        rate = sum(r["ood"] for r in mine) / len(mine)
        assert rate <= bound, (modality, rate)
    # the stored flag is the package's rule: score below its threshold, or an input statistic of the
    # preprocessed item outside its training range
    engine = Engine.load(tiny_package)
    inputs_out = _input_failures(engine, held_out)
    assert {key[1] for key in inputs_out} == {"fundus", "oct"} and len(inputs_out) == len(rows)
    for r in rows:
        failure = inputs_out[(r["path"], r["modality"])]
        assert r["ood"] == (r["ood_score"] < engine.ood.thresholds[r["modality"]] or failure is not None)
    # the input check depends on the cohort's pixels only, not on training: the measured counts exactly
    assert sum(f is not None for (_, m), f in inputs_out.items() if m == "oct") == 2


def _input_failures(engine: Engine, root: Path) -> dict[tuple[str, str], str | None]:
    """The input check of every item under `root`, read and preprocessed here, by (stored path, modality)."""
    from retinacli.pipeline import discover_with_readers, read_with_readers

    out = {}
    sources, _errors = discover_with_readers([root])
    for source in sources:
        for item in read_with_readers(source, None):
            rel = Path(item.path).resolve().relative_to(root.resolve().parent).as_posix()
            array = engine.preprocess(item)[None]
            out[(rel, item.modality)] = engine.ood.input_failures(item.modality, array)[0]
    return out


def test_input_statistics_tell_noise_from_smooth_images_and_layers():
    """The input check's statistics on constructed arrays, with the numbers they must give."""
    from retinacli.ood import input_statistic_names, input_statistics

    rng = np.random.default_rng(0)
    noise = rng.standard_normal((3, 3, 64, 64)).astype(np.float32)
    ramp = np.broadcast_to(np.linspace(0, 1, 64, dtype=np.float32), (1, 3, 64, 64))  # smooth, left to right
    layers = np.broadcast_to(np.arange(64, dtype=np.float32)[:, None] % 8 / 8, (1, 3, 64, 64))  # horizontal
    yy, xx = np.mgrid[:64, :64]
    disc = np.where((yy - 31.5) ** 2 + (xx - 31.5) ** 2 < 30 ** 2, 1.0, -1.0).astype(np.float32)
    disc = np.stack([disc * 1.0, disc * 0.5, disc * 0.1])[None]  # a red round field on a dark ground
    stats, names = input_statistics("fundus", np.concatenate([noise, ramp, layers, disc]))
    assert names == input_statistic_names("fundus", 3) and len(names) == 12 and stats.shape == (6, 12)
    s = {name: stats[:, j] for j, name in enumerate(names)}
    # iid Gaussian pixels: E|x - y| / std = 2 / sqrt(pi) = 1.128 along either axis; no direction
    np.testing.assert_allclose(s["roughness_h"][:3], 2 / np.sqrt(np.pi), atol=0.03)
    np.testing.assert_allclose(s["roughness_v"][:3], 2 / np.sqrt(np.pi), atol=0.03)
    np.testing.assert_allclose(s["anisotropy"][:3], 1.0, atol=0.03)
    # the ramp: steps of 1/63 over a std of 0.2887 (uniform on [0, 1]) -> 0.055; nothing vertical
    assert s["roughness_h"][3] == pytest.approx((1 / 63) / np.linspace(0, 1, 64).std(), rel=1e-4)
    assert s["roughness_v"][3] == 0 and s["anisotropy"][3] == 0
    assert s["anisotropy"][4] > 1e3 and s["roughness_h"][4] == 0  # layers: all change is vertical
    assert s["centre_minus_corners"][5] == pytest.approx(1.6 / 3 * 2, rel=1e-6)  # bright field, dark corners
    assert s["red_minus_green"][5] > 0 and abs(s["centre_minus_corners"][0]) < 0.1
    # a constant image gives zeros, not a division error; a batch gives what each item gives alone
    flat, _ = input_statistics("fundus", np.zeros((1, 3, 16, 16), np.float32))
    assert np.all(np.isfinite(flat)) and flat[0, names.index("roughness_h")] == 0
    many = rng.standard_normal((70, 3, 16, 16)).astype(np.float32)
    alone = input_statistics("fundus", many[65:66])[0][0]
    np.testing.assert_allclose(input_statistics("fundus", many)[0][65], alone)
    # OCT (N, 1, slices, H, W): identical slices do not change; 8 named statistics; gray fundus 6
    volume = np.broadcast_to(rng.standard_normal((1, 1, 1, 32, 32)), (1, 1, 4, 32, 32))
    oct_stats, oct_names = input_statistics("oct", volume)
    assert oct_stats.shape == (1, 8) and oct_names == input_statistic_names("oct")
    assert oct_stats[0, oct_names.index("slice_change")] == 0
    assert oct_stats[0, oct_names.index("roughness_h")] == pytest.approx(2 / np.sqrt(np.pi), abs=0.1)
    assert input_statistics("fundus", np.zeros((2, 1, 8, 8)))[1] == [
        "mean_gray", "std_gray", "roughness_h", "roughness_v", "anisotropy", "centre_minus_corners"]


def _edit_descriptor(package: Path, edit) -> None:
    descriptor = json.loads((package / "retina.json").read_text())
    edit(descriptor)
    (package / "retina.json").write_text(json.dumps(descriptor))


def test_the_input_check_alone_flags_noise_photo_and_bscan(tiny_package, odd_inputs, held_out, tmp_path):
    """With the embedding check switched off (threshold -1: no score is below it) the input check still
    flags all four odd inputs, naming the statistic; a package without input ranges (as exported before
    this check) then flags nothing."""
    from retinacli.ood import INPUT_FLOOR, INPUT_MARGIN, INPUT_QUANTILES

    descriptor = json.loads((tiny_package / "retina.json").read_text())
    inputs = descriptor["ood"]["modalities"]["fundus"]["inputs"]
    assert (inputs["quantiles"], inputs["margin"], inputs["floor"]) == (list(INPUT_QUANTILES), 0.5, 0.05)
    assert (INPUT_MARGIN, INPUT_FLOOR) == (0.5, 0.05)
    assert len(inputs["ranges"]) == 12
    assert len(descriptor["ood"]["modalities"]["oct"]["inputs"]["ranges"]) == 8
    rough = inputs["ranges"]["roughness_h"]
    assert 0 < rough["low"] < rough["high"] < 0.5  # smooth synthetic photographs; noise is ~1

    def no_threshold(d):
        for stats in d["ood"]["modalities"].values():
            stats["threshold"] = -1.0

    inputs_only = tmp_path / "inputs_only"
    shutil.copytree(tiny_package, inputs_only)
    _edit_descriptor(inputs_only, no_threshold)
    assert run("models", "verify", inputs_only).exit_code == 0
    mixed = tmp_path / "mixed"
    shutil.copytree(odd_inputs, mixed / "odd")
    shutil.copytree(sorted((held_out / "png").iterdir())[0], mixed / "ok")
    store = tmp_path / "store"
    summary = _json(run("embed", mixed, "--model", inputs_only, "--store", store, "--strict", "--json"))
    with open(store / "errors.csv", newline="", encoding="utf-8") as fh:
        errors = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(fh)}
    model = summary["model"]
    assert set(ODD) <= set(errors) and summary["embedded"] >= 2
    for reason in errors.values():  # the embedding check passed: only the input is named
        assert reason.startswith(f"out of distribution for model {model}: ") and " score " not in reason
        assert " input " in reason and " outside the training range " in reason
    assert errors["noise.png"].startswith(f"out of distribution for model {model}: fundus input roughness_h")
    assert errors["noise.png"].split(": ", 1)[1].startswith("fundus input roughness_h 0.9")
    assert ": fundus input anisotropy 3." in errors["bscan_as_fundus.png"]
    assert {r["ood"] for r in EmbeddingStore.open(store).metadata()} == {False}
    # retrieve's query check reads the preprocessed query too
    query = run("retrieve", odd_inputs / "noise.png", "--store", store, "--json")
    assert json.loads(query.stdout)["query"]["ood"] is True and "fundus input roughness_h" in query.stderr
    # without input ranges (a package exported before the input check) threshold -1 flags nothing
    old = tmp_path / "old"
    shutil.copytree(inputs_only, old)
    _edit_descriptor(old, lambda d: [s.pop("inputs") for s in d["ood"]["modalities"].values()])
    assert Engine.load(old).ood.inputs == {}
    summary = _json(run("embed", odd_inputs, "--model", old, "--store", tmp_path / "s_old", "--json"))
    assert summary["embedded"] == 4 and summary["ood_flagged"] == 0


def test_bad_input_ranges_are_refused_naming_the_field(tiny_package, tmp_path):
    reversed_ = tmp_path / "reversed"
    shutil.copytree(tiny_package, reversed_)
    _edit_descriptor(reversed_, lambda d: d["ood"]["modalities"]["fundus"]["inputs"]["ranges"].update(
        roughness_h={"low": 0.5, "high": 0.25}))
    result = run("models", "verify", reversed_)
    assert result.exit_code != 0
    assert "ood.modalities.fundus.inputs.ranges.roughness_h: low 0.5 is above high 0.25" in result.output
    unknown = tmp_path / "unknown"
    shutil.copytree(tiny_package, unknown)
    _edit_descriptor(unknown, lambda d: d["ood"]["modalities"]["oct"]["inputs"]["ranges"].update(
        sharpness={"low": 0, "high": 1}))
    result = run("models", "verify", unknown)
    assert result.exit_code != 0
    assert "ood.modalities.oct.inputs.ranges: 'sharpness' is not an input statistic this retina computes" \
        in result.output


# --- embed --strict, store format 4 -----------------------------------------------------------------


def test_embed_strict_lists_flagged_items_in_errors_csv(tiny_package, odd_inputs, held_out, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(odd_inputs, mixed / "odd")
    patient = sorted((held_out / "png").iterdir())[0]
    shutil.copytree(patient, mixed / "ok")
    store = tmp_path / "store"
    summary = _json(run("embed", mixed, "--model", tiny_package, "--store", store, "--strict", "--json"))
    assert summary["ood_refused"] == 4 and summary["failed"] >= 4 and summary["embedded"] >= 2
    threshold = _reference(tiny_package)[0]["ood"]["modalities"]["fundus"]["threshold"]
    with open(store / "errors.csv", newline="", encoding="utf-8") as fh:
        errors = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(fh)}
    model = summary["model"]
    for name in ODD:  # both checks fail for each; the reason names both
        assert errors[name].startswith(f"out of distribution for model {model}: fundus score 0.")
        assert f"below the package threshold {threshold:.3f}; fundus input " in errors[name]
    assert "; fundus input roughness_h 0.9" in errors["noise.png"]
    assert "; fundus input anisotropy 3." in errors["bscan_as_fundus.png"]
    rows = EmbeddingStore.open(store).metadata()
    assert not any(r["ood"] for r in rows) and not {Path(r["path"]).name for r in rows} & set(ODD)
    # the parquet columns are typed: a float score and a boolean flag
    import pyarrow.parquet as pq

    schema = pq.read_schema(next((store / "metadata").glob("meta_*.parquet")))
    assert str(schema.field("ood_score").type) == "double" and str(schema.field("ood").type) == "bool"
    assert EmbeddingStore.open(store).format_version == STORE_FORMAT_VERSION == 4


def _as_format_3(store: Path) -> None:
    """Rewrite a store as format 3 wrote it: no ood columns, format_version 3."""
    import pyarrow.parquet as pq

    index = json.loads((store / "store.json").read_text())
    index["format_version"] = 3
    for name in ("ood_score", "ood"):
        index["columns"].pop(name)
    for shard in index["shards"]:
        table = pq.read_table(store / shard["metadata"])
        pq.write_table(table.drop_columns(["ood_score", "ood"]), store / shard["metadata"])
    (store / "store.json").write_text(json.dumps(index, indent=2) + "\n")


def test_format_3_store_reads_with_null_ood_and_predict_scores_it(tiny_package, held_out_store, tmp_path):
    new = _json(run("predict", "--task", "cst", "--store", held_out_store, "--json"))
    old = tmp_path / "old"
    shutil.copytree(held_out_store, old)
    _as_format_3(old)
    store = EmbeddingStore.open(old)
    assert store.format_version == 3
    assert {r["ood"] for r in store.metadata()} == {None}  # older rows: null ood fields
    # predict scores older rows on the fly from their stored vectors: the same scores as stored in
    # format 4; the flag is the embedding check's only (no preprocessed input to check)
    again = _json(run("predict", "--task", "cst", "--store", old, "--json"))
    got = {p["id"]: (p["ood_score"], p["ood"]) for p in again["predictions"]}
    want = {p["id"]: (p["ood_score"], p["ood"]) for p in new["predictions"]}
    assert got.keys() == want.keys() and len(got) >= 70
    thresholds = Engine.load(tiny_package).ood.thresholds
    modality = {p["id"]: p["modality"] for p in new["predictions"]}
    for key, (score, flag) in want.items():
        assert got[key][0] == pytest.approx(score, abs=1e-6)
        assert got[key][1] == (got[key][0] < thresholds[modality[key]])
        assert flag >= got[key][1]  # the stored flag adds the input check
    # the stored flags hold the embedding check's and add the input check's (which ones the input check
    # adds depends on the trained weights: an item may fail both)
    assert sum(f for _, f in want.values()) >= sum(f for _, f in got.values())
    # retrieve by id shows the stored (null) fields of an old row; reading never upgrades
    some = store.metadata()[0]["id"]
    shown = _json(run("retrieve", some, "--store", old, "--json"))
    assert shown["query"]["ood"] is None and {r["ood"] for r in shown["results"]} == {None}
    assert json.loads((old / "store.json").read_text())["format_version"] == 3
    # the next embed upgrades the index to format 4; the old rows keep null fields
    (tmp_path / "nothing-new").mkdir()
    result = run("embed", tmp_path / "nothing-new", "--store", old)
    assert "upgraded store.json from format version 3 to 4" in result.stderr, result.output
    assert EmbeddingStore.open(old).format_version == 4


# --- retrieve and predict ----------------------------------------------------------------------------


def test_retrieve_shows_the_flag_for_query_and_results(tiny_package, held_out_store, odd_inputs,
                                                       isolated_cli):
    payload = _json(run("retrieve", odd_inputs / "china.png", "--store", held_out_store, "--json"))
    q = payload["query"]
    assert q["ood"] is True and q["ood_score"] < _reference(tiny_package)[0]["ood"]["modalities"]["fundus"][
        "threshold"]
    assert all(isinstance(r["ood"], bool) and isinstance(r["ood_score"], float) for r in payload["results"])
    stored = {r["id"]: r for r in EmbeddingStore.open(held_out_store).metadata()}
    for r in payload["results"]:
        assert (r["ood_score"], r["ood"]) == (stored[r["id"]]["ood_score"], stored[r["id"]]["ood"])
    table = run("retrieve", odd_inputs / "china.png", "--store", held_out_store, "--top", 3)
    assert table.exit_code == 0, table.output
    assert "OUT OF DISTRIBUTION: score" in table.stdout and " ood " in table.stdout
    assert "the query is out of distribution for model" in table.stderr


def test_predict_carries_ood_in_json_and_csv_and_strict_refuses(tiny_package, odd_inputs, isolated_cli):
    args = ("predict", odd_inputs, "--task", "cst", "--modality", "fundus", "--model", tiny_package)
    payload = _json(run(*args, "--json"))
    assert len(payload["predictions"]) == 4
    assert all(p["ood"] is True and p["ood_score"] < 1 for p in payload["predictions"])
    rows = list(csv.DictReader(io.StringIO(run(*args, "--csv").stdout)))
    assert len(rows) == 4 and {r["ood"] for r in rows} == {"True"}
    assert all(float(r["ood_score"]) < 1 for r in rows)
    table = run(*args).stdout  # the table says what the flag means, not only "flagged" per row
    assert table.count("flagged") >= 4
    assert "ood: 4 of 4 item(s) look unlike the package's training data" in " ".join(table.split())
    strict = run(*args, "--strict", "--json")
    assert strict.exit_code == EXIT_NOTHING_DONE  # nothing predicted
    refused = json.loads(strict.stdout)
    assert refused["predictions"] == [] and len(refused["errors"]) == 4
    assert {Path(e["path"]).name for e in refused["errors"]} == set(ODD)
    assert all("out of distribution for model" in e["error"] for e in refused["errors"])


def test_predict_store_strict_refuses_only_flagged(tiny_package, held_out_store):
    every = _json(run("predict", "--task", "cst", "--store", held_out_store, "--json"))["predictions"]
    flagged = {p["id"] for p in every if p["ood"]}
    strict = _json(run("predict", "--task", "cst", "--store", held_out_store, "--strict", "--json"))
    assert {p["id"] for p in strict["predictions"]} == {p["id"] for p in every} - flagged
    assert len(strict["errors"]) == len(flagged)
    assert all(e["error"].startswith("out of distribution for model") for e in strict["errors"])


# --- packages without a reference --------------------------------------------------------------------


def test_a_package_without_reference_says_so_and_leaves_fields_null(tmp_path, isolated_cli):
    package = make_toy_package(tmp_path / "toy")
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), np.uint8)).save(src / "a.png")
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (16, 16, 3), np.uint8)).save(src / "b.png")
    store = tmp_path / "store"
    result = run("embed", src, "--model", package, "--store", store, "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr.count(NO_CHECK) == 1
    summary = json.loads(result.stdout)
    assert summary["ood_flagged"] is None and summary["ood_refused"] is None
    assert {(r["ood_score"], r["ood"]) for r in EmbeddingStore.open(store).metadata()} == {(None, None)}
    strict = run("embed", src, "--model", package, "--store", tmp_path / "s2", "--strict", "--json")
    assert strict.exit_code == 0 and json.loads(strict.stdout)["embedded"] == 2  # nothing to refuse by
    predicted = run("predict", src, "--task", "cst", "--modality", "fundus", "--model", package, "--json")
    assert predicted.stderr.count(NO_CHECK) == 1
    assert {(p["ood_score"], p["ood"]) for p in json.loads(predicted.stdout)["predictions"]} == {(None, None)}
    query = run("retrieve", src / "a.png", "--store", store, "--target", "fundus", "--json")
    assert query.stderr.count(NO_CHECK) == 1 and json.loads(query.stdout)["query"]["ood"] is None
    assert "no check in this package" in run("models", "show", package).stdout


def test_frozen_0_1_0_package_has_no_check_and_its_store_still_reads(tmp_path, isolated_cli):
    frozen = Path(__file__).parent / "fixtures" / "v0_1_0"
    copy = tmp_path / "v0_1_0"
    shutil.copytree(frozen, copy)
    assert "ood" not in json.loads((copy / "package" / "retina.json").read_text())
    assert Engine.load(copy / "package").ood is None
    result = run("predict", "--task", "cst", "--store", copy / "store", "--model", copy / "package", "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr.count(NO_CHECK) == 1
    assert {(p["ood_score"], p["ood"]) for p in json.loads(result.stdout)["predictions"]} == {(None, None)}


def test_a_synthetic_only_package_flags_real_retinal_images(tiny_package, shared_samples, tmp_path):
    """Real Heidelberg .vol exports (OCT + SLO localizer) against a package trained on 6 synthetic
    patients: its SLO fundus images are flagged, and 3 of the 4 items in all (the honest answer)."""
    pytest.importorskip("eyepy")
    store = tmp_path / "store"
    summary = _json(run("embed", shared_samples / "heidelberg_vol", "--model", tiny_package, "--store", store,
                        "--workers", 1, "--json"))
    assert summary["embedded"] == 4 and summary["ood_flagged"] >= 3
    rows = EmbeddingStore.open(store).metadata()
    assert [r["ood"] for r in rows if r["modality"] == "fundus"] == [True, True]


def test_strict_stores_a_multi_item_file_whole_or_not_at_all(tiny_package, shared_samples, tmp_path):
    """A .vol holds an OCT and its SLO: with --strict, one flagged item keeps the whole file out (the other
    item listed with why), so a later run without --strict stores the file whole instead of skipping it."""
    pytest.importorskip("eyepy")
    store = tmp_path / "store"
    args = ("embed", shared_samples / "heidelberg_vol", "--model", tiny_package, "--store", store,
            "--workers", 1, "--json")
    strict = _json(run(*args, "--strict"))
    assert strict["embedded"] == 0 and strict["ood_refused"] >= 3
    reasons = [e["error"] for e in strict["errors"]]  # nothing stored: no store, so no errors.csv either
    held_back = [r for r in reasons if r.startswith("not stored: another item of the same file")]
    assert len(reasons) == 4 and len(held_back) == 4 - strict["ood_refused"]
    again = _json(run(*args))
    assert again["embedded"] == 4 and again["skipped"] == 0
