"""`retina models list|show|verify|default` and `retina info` (torch-free, toy packages)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fixtures_cli import run_cli as run

pytest.importorskip("onnx")


@pytest.fixture
def env(toy_packages_home):
    """Isolated RETINA_HOME + working dir with two packages in the store and one in ./exported."""
    return toy_packages_home


def test_list_json_and_table(env):
    code, stdout, _ = run("models", "list", "--json")
    assert code == 0
    data = json.loads(stdout)
    refs = sorted((p["name"], p["version"]) for p in data["packages"])
    assert refs == [("mine", "0.1.0"), ("toy", "1.0.0"), ("toy", "1.1.0")]
    assert all(p["tasks"] == ["cst", "tn"] and p["embed_dim"] == 4 for p in data["packages"])
    # created timestamps tie, so the newest version is the implicit default
    assert [p["version"] for p in data["packages"] if p["default"]] == ["1.1.0"]
    code, stdout, _ = run("models", "list")
    assert code == 0 and "toy" in stdout and "mine" in stdout


def test_show_json_carries_the_descriptor(env):
    code, stdout, _ = run("models", "show", "toy@1.0.0", "--json")
    assert code == 0
    shown = json.loads(stdout)
    assert shown["version"] == "1.0.0" and shown["model_id"].startswith("toy@1.0.0+")
    assert shown["heads"]["cst"]["units"] == "µm"
    code, stdout, _ = run("models", "show", "mine")
    assert code == 0 and "mine@0.1.0" in stdout and "head tn" in stdout


def test_verify_ok_and_corrupt_byte_gives_exit_3_naming_the_file(env):
    code, stdout, _ = run("models", "verify", "toy@1.1.0", "--json")
    assert code == 0 and json.loads(stdout)["ok"] is True

    onnx_file = env / "home" / "models" / "toy-1.1.0" / "oct_encoder.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 3] ^= 0x10
    onnx_file.write_bytes(bytes(data))
    code, _, stderr = run("models", "verify", "toy@1.1.0")
    assert code == 3
    assert "oct_encoder.onnx: sha256 mismatch" in stderr
    code, stdout, _ = run("models", "verify", "toy@1.1.0", "--json")
    assert code == 3
    report = json.loads(stdout)
    assert report["ok"] is False and "oct_encoder.onnx" in report["error"]


def test_descriptor_missing_field_gives_exit_3_with_the_field(env):
    descriptor_path = env / "work" / "exported" / "mine" / "retina.json"
    descriptor = json.loads(descriptor_path.read_text())
    del descriptor["preprocessing"]
    descriptor_path.write_text(json.dumps(descriptor))
    for command in ("verify", "show"):
        code, _, stderr = run("models", command, str(descriptor_path.parent))
        assert code == 3
        assert "missing required field 'preprocessing'" in stderr and "retina.json" in stderr


def test_unknown_package_gives_exit_3(env):
    code, _, stderr = run("models", "verify", "nope")
    assert code == 3 and "nope: no such model package" in stderr


def test_default_is_saved_shown_used_and_cleared(env):
    code, stdout, _ = run("models", "default", "toy@1.0.0", "--json")
    assert code == 0
    assert json.loads((env / "home" / "config.json").read_text()) == {"default_model": "toy@1.0.0"}
    code, stdout, _ = run("models", "list", "--json")
    assert [p["version"] for p in json.loads(stdout)["packages"] if p["default"]] == ["1.0.0"]
    code, stdout, _ = run("models", "default", "--json")
    assert json.loads(stdout)["default"] == "toy@1.0.0"
    code, _, _ = run("models", "default", "--clear")
    assert code == 0 and "default_model" not in json.loads((env / "home" / "config.json").read_text())
    code, _, stderr = run("models", "default", "missing-model")
    assert code == 3 and "missing-model" in stderr


def test_info_json(env, monkeypatch):
    code, stdout, _ = run("info", "--json")
    assert code == 0
    info = json.loads(stdout)
    assert info["retina_home"] == str(env / "home")
    assert info["model_store"] == str(env / "home" / "models")
    assert "CPUExecutionProvider" in info["providers"]
    assert info["threads"] >= 1
    assert info["model_used_by_default"].endswith("toy-1.1.0")
    assert info["default_embedding_store"].endswith(".retina/store")
    for key in ("retina", "onnxruntime", "numpy"):
        assert info[key]
    code, stdout, _ = run("info")
    assert code == 0 and "RETINA_HOME" in stdout and "CPUExecutionProvider" in stdout


def test_models_list_does_not_import_torch(env):
    code = (
        "import sys; sys.argv = ['retina', 'models', 'list', '--json']\n"
        "from retinacli.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'onnxruntime' not in sys.modules, 'listing should not need onnxruntime'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["packages"]) == 3


def test_install_copies_a_verified_package_into_the_store(env):
    code, stdout, _ = run("models", "install", "exported/mine", "--json")
    assert code == 0
    target = env / "home" / "models" / "mine-0.1.0"
    assert json.loads(stdout) == {"installed": str(target)}
    assert (target / "retina.json").is_file() and (target / "oct_encoder.onnx").is_file()
    code, _, stderr = run("models", "install", "exported/mine")
    assert code == 3 and "already installed" in stderr
    onnx_file = env / "work" / "exported" / "mine" / "head_cst.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    code, _, stderr = run("models", "install", "exported/mine", "--force")
    assert code == 3 and "head_cst.onnx: size" in stderr
    assert (target / "head_cst.onnx").is_file()  # the installed copy is untouched
