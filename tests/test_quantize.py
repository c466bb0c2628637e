"""`retina export --quantize int8`: calibrated int8 encoders, the accuracy gate, and running them."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime.quantization")


@pytest.fixture(scope="module")
def int8_package(tiny_package_run, tiny_loaded_run, tiny_package, tmp_path_factory):
    from training.export import export_run

    out = tmp_path_factory.mktemp("int8_package") / "tiny-int8"
    export_run(tiny_package_run, out, name="tiny", version="0.1.0", loaded=tiny_loaded_run,
               quantize="int8", calibration_items=4)
    return out


def test_int8_graphs_are_listed_verified_and_gated(int8_package):
    from retinacli.package import verify_package
    from training.export import GATE_MIN_COSINE, GATE_MIN_TOP5_AGREEMENT

    descriptor, blobs = verify_package(int8_package)  # schema + sha256 of every file, int8 included
    assert {"fundus_encoder.int8.onnx", "oct_encoder.int8.onnx"} <= set(blobs)
    q = descriptor["quantized"]["int8"]
    assert q["calibration"]["items"] == 4
    assert q["gate"]["min_cosine"] == GATE_MIN_COSINE
    assert q["gate"]["min_top5_agreement"] == GATE_MIN_TOP5_AGREEMENT
    for modality in ("fundus", "oct"):
        gate = q["encoders"][modality]["gate"]["onnxruntime"]
        assert -1.0 <= gate["min_cosine"] <= gate["mean_cosine"] <= 1.0 + 1e-6
        assert 0.0 <= gate["top5_agreement"] <= 1.0
        assert gate["passed"] == (gate["min_cosine"] >= GATE_MIN_COSINE
                                  and gate["top5_agreement"] >= GATE_MIN_TOP5_AGREEMENT)


def test_int8_graph_quantises_the_convolutions_and_keeps_the_head_fp32(int8_package):
    import onnx

    for modality in ("fundus", "oct"):
        nodes = list(onnx.load(str(int8_package / f"{modality}_encoder.int8.onnx")).graph.node)
        produced_by = {out: node for node in nodes for out in node.output}
        convs = [i for i, node in enumerate(nodes) if node.op_type == "Conv"]
        # every convolution reads int8-dequantised activations and weights
        for i in convs:
            assert all(produced_by[name].op_type == "DequantizeLinear" for name in nodes[i].input[:2])
        # the projection after the pooling reads fp32 features and fp32 weights
        (projection,) = [node for node in nodes[convs[-1] + 1 :] if node.op_type == "Gemm"]
        assert not any(name in produced_by and produced_by[name].op_type == "DequantizeLinear"
                       for name in projection.input)


def test_quantising_changes_the_model_id_but_not_the_legacy_one(int8_package, tiny_package):
    """Model id rule 2 covers the int8 graphs a package ships (docs/model-package.md); the rule-1
    (legacy) id, which older stores record, covers the fp32 graphs only and stays the same."""
    from retinacli.engine import Engine

    quantised, plain = Engine.load(int8_package), Engine.load(tiny_package)
    assert quantised.model_id != plain.model_id
    assert quantised.legacy_model_id == plain.legacy_model_id


def test_int8_engine_reproduces_the_recorded_gate(int8_package, tiny_loaded_run):
    """Run the int8 graph through the Engine on the gate's items: it is really int8 (not the fp32
    graph) and its cosine to torch fp32 is the one written in the descriptor."""
    from retinacli.engine import Engine
    from training.export import parity_inputs

    engine = Engine.load(int8_package, backend="onnxruntime", precision="int8")
    fp32 = Engine.load(int8_package, backend="onnxruntime", precision="fp32")
    assert engine.variant("oct").file == "oct_encoder.int8.onnx"
    assert fp32.variant("oct").file == "oct_encoder.onnx"
    q = engine.descriptor["quantized"]["int8"]
    arrays, _ = parity_inputs(tiny_loaded_run, 6 + 4 + 64, None)
    n_cal = q["calibration"]["items"]
    gate_items = slice(n_cal, None) if not q["gate"]["overlaps_calibration"] else slice(None)
    x = arrays["oct"][gate_items]
    got = engine.embed("oct", x)
    ref = tiny_loaded_run.model.encode("oct", x, batch_size=8)
    cos = np.sum(got.astype(np.float64) * ref, axis=1)
    recorded = q["encoders"]["oct"]["gate"]["onnxruntime"]
    assert cos.min() == pytest.approx(recorded["min_cosine"], abs=1e-5)
    assert np.max(np.abs(got - fp32.embed("oct", x))) > 1e-6  # not silently the fp32 graph
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)


def test_gate_agreement_measure():
    from training.export import int8_gate, top_k_agreement

    rng = np.random.default_rng(0)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    ref, other = unit(rng.normal(size=(40, 16))), unit(rng.normal(size=(40, 16)))
    assert top_k_agreement(other, ref, ref) == 1.0
    same = int8_gate(ref, ref.copy(), other)
    assert same["passed"] and same["top5_agreement"] == 1.0 and same["min_cosine"] == pytest.approx(1.0)
    scrambled = int8_gate(ref, unit(rng.normal(size=(40, 16))), other)
    assert not scrambled["passed"] and scrambled["top5_agreement"] < 0.5


def test_export_cli_quantize_option_is_checked(tiny_package_run, tmp_path):
    from typer.testing import CliRunner

    from retinacli.cli import app

    result = CliRunner().invoke(app, ["export", str(tiny_package_run), "--out", str(tmp_path / "p"),
                                      "--quantize", "int4"])
    assert result.exit_code == 2
    assert "--quantize must be int8" in result.output
    assert not (tmp_path / "p").exists()


def test_store_rows_record_the_engine(int8_package, tiny_cohort, tmp_path):
    from typer.testing import CliRunner

    from retinacli.cli import app
    from retinacli.store import EmbeddingStore

    store = tmp_path / "store"
    args = ["embed", str(tiny_cohort), "--model", str(int8_package), "--store", str(store),
            "--modality", "oct", "--engine", "onnxruntime", "--precision", "int8", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["engine"]["oct"] == "onnxruntime/int8"
    rows = EmbeddingStore.open(store).metadata(["modality", "engine"])
    assert rows and {r["engine"] for r in rows} == {"onnxruntime/int8"}
