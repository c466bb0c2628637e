"""The onnxruntime engine on a toy package (torch-free): embeddings, predictions, refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from retinacli.engine import Engine, choose_providers, physical_cores
from retinacli.errors import ModelPackageError, UsageError
from retinacli.items import FundusImage, OctVolume
from retinacli.preprocess import preprocess_fundus, preprocess_oct

pytest.importorskip("onnx")


def test_load_exposes_contract_attributes(toy_package):
    engine = Engine.load(toy_package, threads=1)
    assert engine.name == "toy" and engine.version == "1.0.0"
    assert engine.model_id.startswith("toy@1.0.0+")
    assert engine.embed_dim == 4
    assert engine.tasks == ("cst", "tn")
    assert engine.spec["oct"]["slices"] == 2
    assert engine.providers == ["CPUExecutionProvider"] and engine.threads == 1
    engine.check_graphs()


def test_preprocess_uses_the_package_spec_and_embed_is_normalised(toy_package):
    engine = Engine.load(toy_package, threads=1)
    rng = np.random.default_rng(0)
    volume = OctVolume("v", rng.integers(0, 255, size=(7, 20, 24), dtype=np.uint8), "npy")
    photo = FundusImage("f", rng.integers(0, 255, size=(30, 40, 3), dtype=np.uint8), "png")
    x_oct = engine.preprocess(volume)
    x_fundus = engine.preprocess(photo)
    np.testing.assert_array_equal(x_oct, preprocess_oct(volume.pixels, engine.spec))
    np.testing.assert_array_equal(x_fundus, preprocess_fundus(photo.pixels, engine.spec))
    assert x_oct.shape == (1, 2, 8, 8) and x_fundus.shape == (3, 8, 8)

    batch = np.stack([x_oct, x_oct * 0.5 + 1, -x_oct])
    emb = engine.embed("oct", batch)
    assert emb.shape == (3, 4) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    # the toy encoder is linear then normalised: compare with numpy
    import onnx
    from onnx import numpy_helper

    weight = numpy_helper.to_array(onnx.load(str(toy_package / "oct_encoder.onnx")).graph.initializer[0])
    raw = batch.reshape(3, -1) @ weight
    np.testing.assert_allclose(emb, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)
    # a single item without batch axis, and an empty batch
    np.testing.assert_allclose(engine.embed("oct", x_oct), emb[:1], atol=1e-6)
    assert engine.embed("fundus", np.zeros((0, 3, 8, 8), np.float32)).shape == (0, 4)


def test_predict_records_match_the_heads(toy_package):
    from training.heads import LinearHead

    engine = Engine.load(toy_package, threads=1)
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(5, 4)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    descriptor = json.loads((toy_package / "retina.json").read_text())

    cst = engine.predict("cst", emb)
    assert [set(r) for r in cst] == [{"task", "value", "units"}] * 5
    assert all(r["units"] == "µm" and r["task"] == "cst" for r in cst)
    head = engine.head("cst")
    assert head["kind"] == "regression"

    tn = engine.predict("tn", emb)
    assert [set(r) for r in tn] == [{"task", "probability", "label", "threshold", "label_meaning"}] * 5
    threshold = descriptor["heads"]["tn"]["threshold"]
    for record in tn:
        assert 0.0 <= record["probability"] <= 1.0
        assert record["label"] == int(record["probability"] >= threshold)
        assert record["threshold"] == pytest.approx(threshold)
        assert record["label_meaning"] == "1 = high treatment need"

    # the same numbers as the fitted heads in numpy (toy heads are fitted with fit_linear_head)
    from fixtures_packages import _toy_heads

    numpy_heads: dict[str, LinearHead] = {h.task: h for h in _toy_heads(0)}
    np.testing.assert_allclose([r["value"] for r in cst], numpy_heads["cst"].predict(emb), rtol=1e-6)
    np.testing.assert_allclose([r["probability"] for r in tn], numpy_heads["tn"].predict(emb), atol=1e-6)


def test_usage_errors_are_clear(toy_package):
    engine = Engine.load(toy_package, threads=1)
    with pytest.raises(UsageError, match=r"no 'bcva' head .*heads: cst, tn"):
        engine.predict("bcva", np.zeros((1, 4), np.float32))
    with pytest.raises(UsageError, match=r"oct batch must be \(B, 1, 2, 8, 8\)"):
        engine.embed("oct", np.zeros((2, 1, 3, 8, 8), np.float32))
    with pytest.raises(UsageError, match=r"embeddings must be \(N, 4\)"):
        engine.predict("cst", np.zeros((2, 5), np.float32))
    with pytest.raises(UsageError, match="unknown modality"):
        engine.embed("slo", np.zeros((1, 3, 8, 8), np.float32))


def test_engine_refuses_a_corrupted_package(toy_package):
    path = toy_package / "head_tn.onnx"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelPackageError, match=r"head_tn\.onnx: sha256 mismatch"):
        Engine.load(toy_package)


def test_providers_and_threads():
    assert choose_providers(None) == ["CPUExecutionProvider"]
    assert choose_providers("cpu") == ["CPUExecutionProvider"]
    assert choose_providers("auto")[-1] == "CPUExecutionProvider"
    with pytest.raises(UsageError, match="unknown device"):
        choose_providers("tpu")
    with pytest.raises(UsageError, match="not available"):
        choose_providers(["NoSuchExecutionProvider"])
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(UsageError, match="no CUDAExecutionProvider"):
            choose_providers("cuda")
    assert 1 <= physical_cores() <= (__import__("os").cpu_count() or 1)


def test_engine_and_package_modules_do_not_import_torch():
    code = (
        "import sys, retinacli.engine, retinacli.package, retinacli.descriptor_schema; "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
