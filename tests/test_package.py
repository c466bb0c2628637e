"""Package lookup, descriptor validation and integrity checks (torch-free; toy packages built with onnx)."""

from __future__ import annotations

import json
import shutil

import pytest
from fixtures_packages import make_toy_package

from retinacli.descriptor_schema import descriptor_errors
from retinacli.errors import EXIT_MODEL_INVALID, ModelPackageError
from retinacli.package import (
    find_package_by_model_id,
    get_default_model,
    list_packages,
    model_id_for,
    resolve_package,
    set_default_model,
    verify_package,
)

pytest.importorskip("onnx")


@pytest.fixture
def home(private_home):
    """An empty RETINA_HOME and working directory, no RETINA_MODEL."""
    return private_home


def _flip_byte(path, offset=None):
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_valid_package_verifies_and_returns_the_checked_bytes(toy_package):
    descriptor, blobs = verify_package(toy_package)
    assert descriptor["name"] == "toy"
    assert set(blobs) == {"fundus_encoder.onnx", "oct_encoder.onnx", "head_cst.onnx", "head_tn.onnx"}
    assert blobs["oct_encoder.onnx"] == (toy_package / "oct_encoder.onnx").read_bytes()


def test_flipped_byte_is_refused_naming_the_file(toy_package):
    _flip_byte(toy_package / "oct_encoder.onnx")
    with pytest.raises(ModelPackageError, match=r"oct_encoder\.onnx: sha256 mismatch") as info:
        verify_package(toy_package)
    assert info.value.exit_code == EXIT_MODEL_INVALID == 3


def test_missing_truncated_and_unlisted_files_are_refused(toy_package, tmp_path):
    broken = tmp_path / "missing"
    shutil.copytree(toy_package, broken)
    (broken / "head_tn.onnx").unlink()
    with pytest.raises(ModelPackageError, match=r"head_tn\.onnx: missing"):
        verify_package(broken)

    truncated = tmp_path / "truncated"
    shutil.copytree(toy_package, truncated)
    path = truncated / "fundus_encoder.onnx"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ModelPackageError, match=r"fundus_encoder\.onnx: size .* differs"):
        verify_package(truncated)

    pickled = tmp_path / "pickled"
    shutil.copytree(toy_package, pickled)
    (pickled / "weights.pt").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelPackageError, match=r"weights\.pt: not listed"):
        verify_package(pickled)


def test_listed_file_of_unknown_type_is_refused(toy_package):
    descriptor = json.loads((toy_package / "retina.json").read_text())
    (toy_package / "extra.pkl").write_bytes(b"x")
    descriptor["files"].append({"path": "extra.pkl", "sha256": "0" * 64, "bytes": 1})
    (toy_package / "retina.json").write_text(json.dumps(descriptor))
    # the schema itself only allows .onnx / .json entries
    with pytest.raises(ModelPackageError, match=r"files\[4\]\.path: 'extra\.pkl' does not match"):
        verify_package(toy_package)


def test_descriptor_missing_required_field_is_refused_with_its_name(toy_package):
    descriptor = json.loads((toy_package / "retina.json").read_text())
    del descriptor["embed_dim"]
    del descriptor["heads"]["cst"]["units"]
    (toy_package / "retina.json").write_text(json.dumps(descriptor))
    with pytest.raises(ModelPackageError) as info:
        verify_package(toy_package)
    message = str(info.value)
    assert "retina.json" in message and "missing required field 'embed_dim'" in message
    assert "1 more problem" in message
    errors = descriptor_errors(descriptor)
    assert any("missing required field 'heads.cst.units'" in e for e in errors)


def test_descriptor_type_and_version_errors_are_readable(toy_package):
    descriptor = json.loads((toy_package / "retina.json").read_text())
    descriptor["heads"]["tn"]["threshold"] = "high"
    descriptor["version"] = "v1"
    errors = descriptor_errors(descriptor)
    assert "heads.tn.threshold: must be number or null, got str 'high'" in errors
    assert any(e.startswith("version: 'v1' does not match") for e in errors)
    descriptor["schema_version"] = 2
    assert "schema version 1" in descriptor_errors(descriptor)[0]


def test_bad_json_and_not_a_package(tmp_path):
    (tmp_path / "retina.json").write_text("{not json")
    with pytest.raises(ModelPackageError, match="not valid JSON"):
        verify_package(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelPackageError, match=r"empty: no retina\.json here"):
        resolve_package(str(tmp_path / "empty"))
    with pytest.raises(ModelPackageError, match="no such model package"):
        resolve_package(str(tmp_path / "does-not-exist"))


def test_lookup_by_path_name_version_env_and_default(home):
    store = home / "home" / "models"
    old = make_toy_package(store / "toy-1", name="toy", version="1.0.0")
    new = make_toy_package(store / "toy-1.10", name="toy", version="1.10.0")
    other = make_toy_package(home / "work" / "exported" / "other", name="other", version="0.2.0")

    assert resolve_package(str(old)) == old
    assert resolve_package(str(old / "retina.json")) == old
    assert resolve_package("toy") == new  # semver: 1.10.0 > 1.0.0
    assert resolve_package("toy@1.0.0") == old
    assert resolve_package("other").resolve() == other.resolve()  # found in ./exported
    with pytest.raises(ModelPackageError, match="nope: no such model package"):
        resolve_package("nope")

    # nothing named: newest created wins (toy packages share the timestamp, then semver decides)
    assert resolve_package(None) == new
    set_default_model("toy@1.0.0")
    assert get_default_model() == "toy@1.0.0"
    assert json.loads((home / "home" / "config.json").read_text()) == {"default_model": "toy@1.0.0"}
    assert resolve_package(None) == old
    import os

    os.environ["RETINA_MODEL"] = "other"
    try:
        assert resolve_package(None).resolve() == other.resolve()
    finally:
        del os.environ["RETINA_MODEL"]
    set_default_model(None)
    assert get_default_model() is None


def test_no_package_anywhere_says_where_it_looked(home):
    with pytest.raises(ModelPackageError, match=r"no model package found .*exported.*models"):
        resolve_package(None)


def test_listing_reports_broken_descriptors_instead_of_hiding_them(home):
    store = home / "home" / "models"
    make_toy_package(store / "good")
    (store / "broken").mkdir()
    (store / "broken" / "retina.json").write_text("[")
    infos = {i.path.name: i for i in list_packages()}
    assert infos["good"].problem is None and infos["good"].tasks == ("cst", "tn")
    assert "not valid JSON" in infos["broken"].problem


def test_model_id_tracks_encoders_not_heads(home, toy_package):
    descriptor = json.loads((toy_package / "retina.json").read_text())
    model_id = model_id_for(descriptor)
    assert model_id.startswith("toy@1.0.0+") and len(model_id.split("+")[1]) == 12
    refit = json.loads(json.dumps(descriptor))
    refit["heads"]["tn"]["threshold"] = 0.3
    assert model_id_for(refit) == model_id
    other = json.loads(json.dumps(descriptor))
    entry = next(f for f in other["files"] if f["path"] == "fundus_encoder.onnx")
    entry["sha256"] = "f" * 64
    assert model_id_for(other) != model_id
    target = home / "home" / "models" / "toy"
    shutil.copytree(toy_package, target)
    assert find_package_by_model_id(model_id) == target
    assert find_package_by_model_id("toy@1.0.0+000000000000") is None


def test_documented_schema_is_the_shipped_schema():
    from pathlib import Path

    from retinacli.descriptor_schema import load_schema

    repo = Path(__file__).resolve().parents[1]
    documented = json.loads((repo / "exported" / "retina.schema.json").read_text(encoding="utf-8"))
    assert documented == load_schema()
