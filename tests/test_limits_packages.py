"""Model packages are validated before they are trusted (issue 14, "Limits: model packages").

Hand-damaged copies of the torch-free toy package: every bad descriptor value, malformed or absurd
JSON and every descriptor/graph disagreement gives exit 3 and one line naming retina.json and the
field, in `retina models verify`, `retina embed` and `retina predict`. No JSON output holds NaN.
The model id covers int8 graphs and embed_dim, not heads; a store of the older id rule still opens.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from fixtures_cli import run_cli as run
from fixtures_packages import TOY_DIM, _linear_encoder, make_toy_package

from retinacli.errors import EXIT_MODEL_INVALID

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture
def env(private_home, monkeypatch):
    """Private $RETINA_HOME, an empty working folder, no default model or store."""
    monkeypatch.setenv("RETINA_STORE", str(private_home / "store"))
    return private_home


@pytest.fixture
def photo(tmp_path) -> Path:
    """A folder holding one small fundus photo (what embed/predict read)."""
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / "a_fundus.png")
    return folder


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _descriptor(package: Path) -> dict:
    return json.loads((package / "retina.json").read_text())


def _write(package: Path, descriptor: dict) -> None:
    """Write the descriptor with every listed file's size and sha256 refreshed (the damage under test
    is then the descriptor value or graph, not a hash mismatch). NaN/inf become JSON literals."""
    for entry in descriptor["files"]:
        path = package / entry["path"]
        entry["sha256"], entry["bytes"] = _sha(path), path.stat().st_size
    (package / "retina.json").write_text(json.dumps(descriptor, indent=2), encoding="utf-8")


def _with_int8(package: Path, weight_dim: int = TOY_DIM, seed: int = 5) -> Path:
    """Add an int8 OCT encoder (a linear graph standing in for a quantised one) and its descriptor section."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(128, weight_dim))
    _linear_encoder(package / "oct_encoder.int8.onnx", "oct", [1, 2, 8, 8], weight)
    d = _descriptor(package)
    if not any(f["path"] == "oct_encoder.int8.onnx" for f in d["files"]):
        d["files"].append({"path": "oct_encoder.int8.onnx", "sha256": "0" * 64, "bytes": 0})
    d["quantized"] = {"int8": {
        "method": "static", "calibration": {"items": 4, "source": "test"},
        "gate": {"min_cosine": 0.99, "min_top5_agreement": 0.8, "items": 4},
        "encoders": {"oct": {"file": "oct_encoder.int8.onnx", "gate": {
            "onnxruntime": {"min_cosine": 0.999, "top5_agreement": 1.0, "passed": True}}}},
    }}
    _write(package, d)
    return package


def _head_graph(path: Path, in_dim: int, output_name: str) -> None:
    """A linear head taking (batch, in_dim) embeddings."""
    from onnx import TensorProto, helper, numpy_helper, save

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["embedding", "w"], ["raw"]),
         helper.make_node("Flatten", ["raw"], [output_name], axis=0)],
        "head",
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", in_dim])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.ones((in_dim, 1), np.float32), "w")],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def _set(d: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for key in parents:
        d = d[int(key)] if isinstance(d, list) else d[key]
    d[int(last) if isinstance(d, list) else last] = value


# (descriptor field, value, what the error line must contain besides retina.json)
VALUE_DAMAGE = [
    ("heads.tn.threshold", math.nan, "heads.tn.threshold: must be a finite number, got NaN"),
    ("heads.tn.threshold", 1.5, "heads.tn.threshold: must be <= 1, got 1.5"),
    ("preprocessing.oct.mean", math.inf, "preprocessing.oct.mean: must be a finite number, got Infinity"),
    ("parity.fundus.max_abs_diff", -math.inf, "parity.fundus.max_abs_diff"),
    ("preprocessing.oct.std", 0, "preprocessing.oct.std: must be a finite number > 0, got 0"),
    ("preprocessing.fundus.std.1", 0.0, "preprocessing.fundus.std[1]: must be a finite number > 0"),
    ("preprocessing.oct.percentiles", [99.5, 1.0], "preprocessing.oct.percentiles"),
    ("preprocessing.oct.percentiles", [1.0, 101.0], "preprocessing.oct.percentiles"),
    ("embed_dim", True, "embed_dim: must be integer, got bool True"),
    ("preprocessing.fundus.size", True, "preprocessing.fundus.size: must be an integer"),
    ("preprocessing.oct.slices", 2.0, "preprocessing.oct.slices: must be an integer"),
    ("preprocessing.oct.height", 10**9, "preprocessing.oct.height: must be an integer in [1, 4096]"),
    ("parity.tolerance_abs", "0.1", "parity.tolerance_abs: must be number, got str '0.1'"),
    ("heads.cst.n_train", "many", "heads.cst.n_train: must be integer"),
    ("embed_dim", 0, "embed_dim: must be >= 1"),
    ("embed_dim", 10**7, "embed_dim: must be <= 65536, got 10000000"),
    ("inputs.oct.shape", ["batch", 1, 2, 8, 9], "inputs.oct.shape"),
    ("inputs.fundus.output_shape", ["batch", 7], "inputs.fundus.output_shape"),
    ("inputs.oct.input_name", "volume", "inputs.oct.input_name: oct_encoder.onnx has inputs ['oct']"),
    ("heads.cst.output_name", "score", "heads.cst.output_name: head_cst.onnx has no output 'score'"),
    ("name", "x y" * 5000, "name: "),
]


def _assert_refused(package: Path, photo: Path, field: str) -> None:
    """verify, embed and predict each exit 3 with one error line naming retina.json and `field`."""
    for args in (("models", "verify", package),
                 ("embed", photo, "--model", package, "--workers", 1),
                 ("predict", "--task", "cst", photo, "--model", package)):
        code, stdout, stderr = run(*args)
        assert code == EXIT_MODEL_INVALID, (args, stdout, stderr)
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in stderr, stderr
        assert str(package / "retina.json") in errors[0] and field in errors[0], (field, errors[0])
        assert len(errors[0]) < 600, "odd values are shown cut short, not whole"


@pytest.mark.parametrize(("field", "value", "expected"), VALUE_DAMAGE, ids=[f"{f}={v!r:.20}" for f, v, _ in
                                                                            VALUE_DAMAGE])
def test_bad_descriptor_value_is_refused_naming_file_and_field(env, photo, field, value, expected):
    package = make_toy_package(env / "pkg")
    d = _descriptor(package)
    _set(d, field, value)
    _write(package, d)
    _assert_refused(package, photo, expected)


@pytest.mark.parametrize(("text", "expected"), [
    ('{"schema_version": 1, "x": ' + "[" * 10000 + "]" * 10000 + "}",
     "nested 10001 levels deep (at most 32)"),
    ('{"schema_version": 1, "changelog": "' + "a" * (5 << 20) + '"}',
     "more than the 1048576 a descriptor may have"),
    ('{"schema_version": 1, "name": "toy",', "not valid JSON"),
    ("[1, 2]", "descriptor must be a JSON object"),
    ('{"a": 1}\xff', "not valid JSON"),
], ids=["deep", "5MB", "truncated", "array", "garbage"])
def test_malformed_or_absurd_json_is_one_line(env, photo, text, expected):
    package = make_toy_package(env / "pkg")
    (package / "retina.json").write_text(text, encoding="utf-8")
    _assert_refused(package, photo, expected)


def test_descriptor_and_graph_disagree_on_shapes_and_embed_dim(env, photo):
    package = make_toy_package(env / "pkg")
    base = _descriptor(package)
    # Consistent with itself (preprocessing and input shape both 9 high), not with the graph.
    d = json.loads(json.dumps(base))
    d["preprocessing"]["oct"]["height"] = 9
    d["inputs"]["oct"]["shape"] = ["batch", 1, 2, 9, 8]
    _write(package, d)
    _assert_refused(package, photo, "inputs.oct.shape: oct_encoder.onnx input shape")
    # embed_dim 5 everywhere in the descriptor; the graphs make 4-d embeddings.
    d = json.loads(json.dumps(base))
    d["embed_dim"] = 5
    for spec in d["inputs"].values():
        spec["output_shape"] = ["batch", 5]
    _write(package, d)
    _assert_refused(package, photo,
                    "embed_dim: fundus_encoder.onnx (inputs.fundus) outputs shape ['batch', 4]")


def test_head_with_another_input_size_is_refused(env, photo):
    package = make_toy_package(env / "pkg")
    _head_graph(package / "head_cst.onnx", TOY_DIM + 3, "value")
    _write(package, _descriptor(package))
    _assert_refused(package, photo, "heads.cst.input_size: head_cst.onnx input shape ['batch', 7]")


def test_int8_graph_is_checked_too(env, photo):
    package = _with_int8(make_toy_package(env / "pkg"))
    code, _, stderr = run("models", "verify", package)
    assert code == 0, stderr
    # swapped for a graph of another embedding size (hashes refreshed: only the graph check can see it)
    _with_int8(package, weight_dim=TOY_DIM + 2)
    _assert_refused(package, photo, "quantized.int8.encoders.oct")
    # swapped without refreshing the descriptor: the sha256 check names the file
    _with_int8(package)
    _linear_encoder(package / "oct_encoder.int8.onnx", "oct", [1, 2, 8, 8], np.ones((128, TOY_DIM)))
    code, _, stderr = run("models", "verify", package)
    assert code == EXIT_MODEL_INVALID and "oct_encoder.int8.onnx: sha256 mismatch" in stderr


def test_nan_metric_is_shown_as_null_never_nan(env):
    package = make_toy_package(env / "pkg")
    d = _descriptor(package)
    d["heads"]["cst"]["metrics"]["cv_nan_probe"] = math.nan  # metrics are informational: allowed
    d["heads"]["tn"]["metrics"]["inf_probe"] = [math.inf, 1.0]
    _write(package, d)
    assert "NaN" in (package / "retina.json").read_text()
    code, _, stderr = run("models", "verify", package)
    assert code == 0, stderr
    for args in (("models", "show", package, "--json"), ("models", "verify", package, "--json")):
        code, stdout, stderr = run(*args)
        assert code == 0, stderr
        assert "NaN" not in stdout and "Infinity" not in stdout

        def refuse(name):
            raise AssertionError(f"{name} in JSON output")

        shown = json.loads(stdout, parse_constant=refuse)
        if args[1] == "show":
            assert shown["heads"]["cst"]["metrics"]["cv_nan_probe"] is None
            assert shown["heads"]["tn"]["metrics"]["inf_probe"] == [None, 1.0]
    code, stdout, _ = run("models", "show", package)
    assert code == 0 and "cst" in stdout


def test_json_writers_never_write_nan(tmp_path):
    from retinacli.fsutil import atomic_write_json
    from retinacli.jsonutil import dumps

    payload = {"a": math.nan, "b": [np.float32("inf"), np.float64(1.5)], "c": {"d": -math.inf}}
    assert json.loads(dumps(payload)) == {"a": None, "b": [None, 1.5], "c": {"d": None}}
    atomic_write_json(tmp_path / "x.json", payload)
    written = (tmp_path / "x.json").read_text()
    assert "NaN" not in written and "Infinity" not in written


def test_model_id_covers_encoders_int8_and_embed_dim_not_heads(env):
    from retinacli.package import model_ids_for, package_model_ids

    package = make_toy_package(env / "pkg")
    plain, plain_legacy = package_model_ids(package)
    _with_int8(package)
    current, legacy = package_model_ids(package)
    assert current != plain and legacy == plain_legacy  # adding int8 graphs changes the id
    _with_int8(package, seed=9)  # another int8 graph, same shapes
    assert package_model_ids(package)[0] not in (current, plain)
    current = package_model_ids(package)[0]
    # A refitted head (another graph and metrics) keeps the id: stores stay valid.
    other = make_toy_package(env / "other", seed=3)
    shutil.copy(other / "head_cst.onnx", package / "head_cst.onnx")
    d = _descriptor(package)
    d["heads"]["cst"]["metrics"] = {"refit": 1}
    _write(package, d)
    assert package_model_ids(package)[0] == current
    d["embed_dim"] = TOY_DIM + 1
    assert model_ids_for(d)[0] != current and model_ids_for(d)[1] == legacy
    d["embed_dim"] = TOY_DIM
    d["preprocessing"]["oct"]["mean"] = 0.3
    assert model_ids_for(d)[0] != current and model_ids_for(d)[1] != legacy


def test_store_of_the_older_id_rule_still_opens(env):
    from retinacli.package import package_model_ids

    source = Path(__file__).parent / "fixtures" / "v0_1_0" / "source"
    photo = env / "src"  # one patient now (an OCT and a photo), the other for the second embed
    patients = sorted(source.iterdir())
    shutil.copytree(patients[0], photo / patients[0].name)
    exported = Path("exported") / "toy"
    package = make_toy_package(exported)
    current, legacy = package_model_ids(package)
    assert current != legacy
    store = env / "store"
    code, stdout, stderr = run("embed", photo, "--model", package, "--workers", 1, "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["model"] == current
    # Make it a store of the older rule: it records the package's legacy id.
    index = json.loads((store / "store.json").read_text())
    index["model_id"] = legacy
    if index.get("package"):
        index["package"]["model_id"] = legacy
    (store / "store.json").write_text(json.dumps(index, indent=2))
    for args in (("predict", "--task", "cst", "--json"),  # the store's package, found by its legacy id
                 ("predict", "--task", "cst", "--json", "--model", package)):
        code, stdout, stderr = run(*args)
        assert code == 0, stderr
        payload = json.loads(stdout)
        assert payload["model"] == legacy and len(payload["predictions"]) == 1
    query = next(photo.rglob("*_fundus.png"))
    code, stdout, stderr = run("retrieve", "--json", query, "--target", "fundus")
    assert code == 0, stderr
    assert json.loads(stdout)["model"] == legacy
    # embed again with --model into it: accepted, the store keeps its id
    shutil.copytree(patients[1], photo / patients[1].name)
    code, stdout, stderr = run("embed", photo, "--model", package, "--workers", 1, "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["model"] == legacy and summary["embedded"] == 2 and summary["rows"] == 4
    assert json.loads((store / "store.json").read_text())["model_id"] == legacy
    # another package's id is still refused
    other = make_toy_package(env / "other", seed=7)
    code, _, stderr = run("predict", "--task", "cst", "--model", other)
    assert code != 0 and f"the store holds embeddings of model {legacy}" in stderr
