"""`retina probe` + `retina export` on the tiny run: ONNX parity with torch, descriptor, heads, CLI."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from typer.testing import CliRunner  # noqa: E402

from retinacli.cli import app  # noqa: E402
from retinacli.cohort_manifest import read_cohort_manifest  # noqa: E402
from retinacli.descriptor_schema import descriptor_errors  # noqa: E402
from retinacli.engine import Engine  # noqa: E402
from retinacli.tasks import TASKS  # noqa: E402
from training.data import load_pairs  # noqa: E402
from training.export import ExportError, canonical_sha256, export_run  # noqa: E402
from training.heads import load_heads  # noqa: E402
from training.probe import resolve_manifest_path  # noqa: E402


def _descriptor(package):
    return json.loads((package / "retina.json").read_text())


def test_package_holds_only_onnx_and_a_valid_descriptor(tiny_package, tiny_loaded_run):
    m = _descriptor(tiny_package)
    assert descriptor_errors(m) == []
    on_disk = sorted(p.name for p in tiny_package.iterdir())
    listed = sorted(f["path"] for f in m["files"])
    assert on_disk == sorted([*listed, "retina.json"])
    # ONNX graphs plus the out-of-distribution reference (retina.json `ood`; tests/test_ood.py)
    assert all(name.endswith(".onnx") for name in listed if name != m["ood"]["file"])
    assert m["ood"]["file"] == "ood_reference.json" and "ood_reference.json" in listed
    for entry in m["files"]:
        data = (tiny_package / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
    run = tiny_loaded_run
    assert m["preprocessing"] == run.spec  # the one spec travels with the model
    assert m["embed_dim"] == run.model.embed_dim
    assert m["training"]["config_sha256"] == canonical_sha256(run.config)
    assert m["training"]["seed"] == run.config["seed"]
    assert m["export"]["exporter"] == "torch.onnx.export(dynamo=True)" and m["export"]["opset"] == 18
    assert m["packages"]["torch"] == torch.__version__ and m["packages"]["onnxruntime"]
    assert m["inputs"]["oct"]["shape"][0] == "batch" and m["inputs"]["oct"]["shape"][1] == 1
    assert "cst" in m["heads"]
    assert m["heads"]["cst"]["units"] == "µm" and m["heads"]["cst"]["threshold"] is None
    assert set(m["heads"]) == set(TASKS)  # tiny_package is probed for every registry task
    for task, head in m["heads"].items():
        assert head["kind"] == TASKS[task].kind and head["units"] == TASKS[task].units
        if head["kind"] == "binary":
            assert 0.0 <= head["threshold"] <= 1.0
        else:
            assert head["threshold"] is None
    # recorded parity: within tolerance, on real items from the run's manifest
    p = m["parity"]
    assert "items of manifest.csv" in p["inputs"]
    for modality in ("fundus", "oct"):
        assert p[modality]["max_abs_diff"] <= p["tolerance_abs"] == 1e-4
        assert p[modality]["min_cosine"] > 0.99999


def test_onnxruntime_embeddings_match_torch_on_preprocessed_items(tiny_package, tiny_loaded_run):
    """Reader -> Engine.preprocess -> onnxruntime equals the torch encoders on the same arrays."""
    from retinacli.readers import read_fundus, read_oct

    run = tiny_loaded_run
    tiny_package_run = run.run_dir
    manifest = resolve_manifest_path(run.config, tiny_package_run, None)
    rows = read_cohort_manifest(manifest)[:5]  # paths made absolute
    engine = Engine.load(tiny_package, threads=1)
    tolerance = _descriptor(tiny_package)["parity"]["tolerance_abs"]
    for modality, reader, column in (("oct", read_oct, "oct_path"), ("fundus", read_fundus, "fundus_path")):
        batch = np.stack([engine.preprocess(reader(r[column])) for r in rows])
        with torch.no_grad():
            encode = run.model.encode_oct if modality == "oct" else run.model.encode_fundus
            expected = encode(torch.from_numpy(batch)).numpy()
        got = engine.embed(modality, batch)
        assert np.max(np.abs(got - expected)) <= tolerance
        cosine = np.sum(got * expected, axis=1) / (
            np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1)
        )
        assert cosine.min() > 0.99999
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        # the training loader (used by probe and export) produces the same arrays as Engine.preprocess
        data = load_pairs(rows, run.spec)
        np.testing.assert_array_equal(data.oct if modality == "oct" else data.fundus, batch)


def test_onnx_heads_equal_the_numpy_heads(tiny_package, tiny_package_run):
    engine = Engine.load(tiny_package, threads=1)
    heads = {h.task: h for h in load_heads(tiny_package_run)}
    assert set(heads) == set(engine.tasks)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(16, engine.embed_dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    for task, head in heads.items():
        got = engine.predict_raw(task, emb)
        expected = head.predict(emb)
        if head.kind == "regression":
            np.testing.assert_allclose(got, expected, rtol=1e-5)
        else:
            np.testing.assert_allclose(got, expected, atol=1e-5)  # float32 graph vs float64
            assert ((got >= 0) & (got <= 1)).all()
            labels = [r["label"] for r in engine.predict(task, emb)]
            assert labels == [int(p >= head.threshold) for p in got]


def test_probe_cli_reports_metrics_as_json(tiny_package_run, tmp_path, reuse_loaded_run):
    run = tmp_path / "run"
    shutil.copytree(tiny_package_run, run)
    (run / "heads.json").unlink()
    result = CliRunner().invoke(app, ["probe", str(run), "--tasks", "cst,tn", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["heads"]) == {"cst", "tn"}
    assert report["embedded"] == report["rows"] > 0
    assert report["heads"]["cst"]["metrics"]["train"]["mae"] >= 0
    assert report["heads"]["cst"]["units"] == "µm"
    assert {h.task for h in load_heads(run)} == {"cst", "tn"}
    bad = CliRunner().invoke(app, ["probe", str(run), "--tasks", "iop"])
    assert bad.exit_code == 2 and "unknown task" in bad.stderr


def test_probe_records_the_modality_swap_computed_out_of_fold(tiny_package_run, tiny_loaded_run, tmp_path,
                                                             reuse_loaded_run):
    """`retina probe --modality fundus`: the cst head's swap is each fold's head applied to the paired OCT
    embeddings of its held-out patients (by hand below), with the bar's verdict; the table says so."""
    from sklearn.model_selection import GroupKFold

    from retinacli.headinfo import swap_verdict
    from training.heads import fit_linear_head
    from training.probe import label_array

    run = tmp_path / "run"
    shutil.copytree(tiny_package_run, run)
    (run / "heads.json").unlink(missing_ok=True)
    result = CliRunner().invoke(app, ["probe", str(run), "--tasks", "cst", "--modality", "fundus"])
    assert result.exit_code == 0, result.stderr
    (head,) = load_heads(run)
    assert head.input_modality == "fundus" and set(head.metrics["swap"]) == {"oct"}
    swap = head.metrics["swap"]["oct"]
    rows = read_cohort_manifest(resolve_manifest_path(tiny_loaded_run.config, run, None))
    data = load_pairs([r for r in rows if r.get("cst_um")], tiny_loaded_run.spec)
    fundus = tiny_loaded_run.model.encode("fundus", data.fundus, 8)
    oct_ = tiny_loaded_run.model.encode("oct", data.oct, 8)
    y = label_array(data.rows, "cst")
    groups = np.array([r["patient_id"] for r in data.rows])
    keep = np.isfinite(y)
    fundus, oct_, y, groups = fundus[keep], oct_[keep], y[keep], groups[keep]
    oof = np.empty_like(y)
    for tr, te in GroupKFold(n_splits=swap["folds"]).split(fundus, y, groups):
        oof[te] = fit_linear_head("cst", fundus[tr], y[tr]).predict(oct_[te])
    assert swap["mae"] == pytest.approx(np.mean(np.abs(oof - y)), rel=1e-6)
    assert swap["grouped"] is True
    verdict = swap_verdict("regression", head.metrics["cv"], swap, "fundus", "oct")
    assert swap["validated"] is verdict["validated"] and swap["ratio"] == pytest.approx(verdict["ratio"])
    assert ("oct" in head.metrics.get("cv_by_modality", {})) is swap["validated"]
    shown = " ".join(result.stdout.split())
    assert f"fundus head on oct embeddings: cv: MAE {swap['mae']:.1f} µm" in shown
    assert f"{swap['ratio']:.2f}x the fundus MAE -> " in shown
    verdict_text = "-> validated on oct" if swap["validated"] else "-> not validated on oct (bar: MAE on oct"
    assert verdict_text in shown


@pytest.fixture
def reuse_loaded_run(monkeypatch, tiny_loaded_run):
    """Commands below load the run by path; hand them the session's loaded model (same weights)."""
    import training.model

    monkeypatch.setattr(training.model, "load_run", lambda *args, **kwargs: tiny_loaded_run)


@pytest.fixture
def fast_encoder_export(monkeypatch, tiny_package, reuse_loaded_run):
    """Reuse the session package's encoder graphs (same weights) instead of re-exporting: seconds saved,
    while parity still runs torch against onnxruntime for real."""
    import training.export.graphs as graphs

    def copy_graph(model, modality, example, path, opset, exporter):
        shutil.copyfile(tiny_package / graphs.ENCODER_FILES[modality], path)

    monkeypatch.setattr(graphs, "export_encoder", copy_graph)


def test_failed_parity_leaves_no_package(tiny_package_run, tmp_path, fast_encoder_export):
    out = tmp_path / "pkg"
    with pytest.raises(ExportError, match=r"parity check failed .*fundus encoder max"):
        export_run(tiny_package_run, out, tolerance=-1.0)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no staging debris


def test_export_cli_then_verify(tiny_package_run, tmp_path, fast_encoder_export, monkeypatch):
    monkeypatch.setenv("RETINA_HOME", str(tmp_path / "home"))
    out = tmp_path / "pkg"
    runner = CliRunner()
    result = runner.invoke(
        app, ["export", str(tiny_package_run), "--out", str(out), "--name", "demo", "--version", "1.2.3"]
    )
    assert result.exit_code == 0, result.stderr
    assert "demo@1.2.3" in result.stdout and "max |Δ|" in result.stdout
    m = _descriptor(out)
    assert (m["name"], m["version"]) == ("demo", "1.2.3")
    verify = runner.invoke(app, ["models", "verify", str(out), "--json"])
    assert verify.exit_code == 0 and json.loads(verify.stdout)["ok"] is True
    again = runner.invoke(app, ["export", str(tiny_package_run), "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.stderr  # a usage error (docs/cli.md)


def test_heads_fitted_on_another_checkpoint_are_refused(tiny_package_run, tiny_loaded_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(tiny_package_run / "checkpoints")
    payload = json.loads((tiny_package_run / "heads.json").read_text())
    assert all(len(h["checkpoint_sha256"]) == 64 for h in payload["heads"])  # recorded by probe
    payload["heads"][0]["checkpoint_sha256"] = "0" * 64  # as if the run was trained further since
    (run / "heads.json").write_text(json.dumps(payload))
    with pytest.raises(ExportError, match=r"fitted on another checkpoint .*re-run 'retina probe"):
        export_run(run, tmp_path / "pkg", loaded=tiny_loaded_run)
    assert not (tmp_path / "pkg").exists()
