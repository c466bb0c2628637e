"""Model integrity: packages load only sha256-verified ONNX bytes, a broken package is refused by every
command that loads one (exit 3, one line naming the file or field, nothing written), training
checkpoints load with weights_only=True, and no code path unpickles anything (a static audit)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
from fixtures_packages import make_toy_package
from typer.testing import CliRunner

from retinacli.cli import app
from retinacli.errors import EXIT_MODEL_INVALID

REPO = Path(__file__).resolve().parents[1]
AUDITED = ("retinacli", "training", "fuzz")
UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


# --- static audit: nothing unpickles ------------------------------------------------------------------


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value == value
               for k in call.keywords)


def unsafe_loads(source: str, filename: str = "<string>") -> list[str]:
    """Calls that can run code from a file: pickle & co., torch.load without weights_only=True,
    np.load(allow_pickle=True), yaml.load without a safe loader, TorchScript."""
    problems = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        where = f"{filename}:{node.lineno}: {name}"
        last = name.rsplit(".", 1)[-1]
        root = name.split(".", 1)[0]
        if root in UNPICKLERS and last in {"load", "loads", "open", "Unpickler"}:
            problems.append(where)
        elif name == "torch.load" and not _keyword_is(node, "weights_only", True):
            problems.append(f"{where} without weights_only=True")
        elif name in {"np.load", "numpy.load"} and _keyword_is(node, "allow_pickle", True):
            problems.append(f"{where} with allow_pickle=True")
        elif name in {"pd.read_pickle", "pandas.read_pickle", "torch.jit.load"}:
            problems.append(where)
        elif name == "yaml.load" and not any(k.arg == "Loader" and "Safe" in _dotted(k.value)
                                             for k in node.keywords):
            problems.append(f"{where} without a SafeLoader")
    return problems


def test_the_audit_catches_each_unsafe_load():
    bad = (
        "import pickle, torch, numpy as np, yaml\n"
        "pickle.load(f)\npickle.loads(b)\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
        "np.load(p, allow_pickle=True)\nyaml.load(s)\ntorch.jit.load(p)\n"
    )
    assert len(unsafe_loads(bad)) == 7
    good = "torch.load(p, map_location='cpu', weights_only=True)\nnp.load(p, allow_pickle=False)\n"
    assert unsafe_loads(good) == []


def test_no_code_path_unpickles():
    files = [path for folder in AUDITED for path in sorted((REPO / folder).rglob("*.py"))]
    assert len(files) > 20
    problems = [p for path in files for p in unsafe_loads(path.read_text(), str(path.relative_to(REPO)))]
    assert problems == []


def test_training_checkpoints_refuse_pickled_objects(tmp_path):
    torch = pytest.importorskip("torch")
    from training.checkpoint import load_checkpoint

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"model": {"w": torch.zeros(2)}, "payload": Path("/")}, folder / "last.pt")  # arbitrary object
    with pytest.raises(Exception, match=r"[Ww]eights only load failed|Unsupported global"):
        load_checkpoint(tmp_path / "run")
    torch.save({"model": {"w": torch.zeros(2)}, "epoch": 1}, folder / "last.pt")
    assert load_checkpoint(tmp_path / "run")["epoch"] == 1


# --- a broken package is refused from the CLI --------------------------------------------------------


def corrupt(package: Path, how: str) -> tuple[str, ...]:
    """Break `package` one way; return what the error must name."""
    descriptor_path = package / "retina.json"
    descriptor = json.loads(descriptor_path.read_text())
    if how == "flipped byte":
        target = package / "oct_encoder.onnx"
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
        return ("oct_encoder.onnx: sha256 mismatch",)
    if how == "missing file":
        (package / "fundus_encoder.onnx").unlink()
        return ("fundus_encoder.onnx: missing",)
    if how == "missing field":
        del descriptor["embed_dim"]
    elif how == "wrong type":
        descriptor["embed_dim"] = "four"
    elif how == "not json":
        descriptor_path.write_text("{ not json")
        return ("retina.json: descriptor is not valid JSON",)
    elif how == "listed pickle":
        (package / "weights.pkl").write_bytes(b"\x80\x04N.")
        descriptor["files"].append({"path": "weights.pkl", "sha256": "0" * 64, "bytes": 4})
        descriptor_path.write_text(json.dumps(descriptor))
        return ("retina.json: files", "weights.pkl")
    elif how == "unlisted checkpoint":
        (package / "extra.pt").write_bytes(b"\x80\x04N.")
        return ("extra.pt: not listed in retina.json",)
    descriptor_path.write_text(json.dumps(descriptor))
    return "retina.json: ", "embed_dim"


CORRUPTIONS = ["flipped byte", "missing file", "missing field", "wrong type", "not json", "listed pickle",
               "unlisted checkpoint"]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_every_command_refuses_a_broken_package(tmp_path, monkeypatch, how):
    monkeypatch.setenv("RETINA_MODEL", "")
    monkeypatch.chdir(tmp_path)
    package = make_toy_package(tmp_path / "toy")
    image = tmp_path / "photo.npy"
    np.save(image, np.zeros((8, 8, 3), np.uint8))
    expected = corrupt(package, how)
    runner = CliRunner()
    for args in (["embed", str(image), "--store", str(tmp_path / "store")],
                 ["predict", str(image), "--task", "cst", "--modality", "fundus"],
                 ["retrieve", str(image), "--store", str(tmp_path / "store")],
                 ["models", "verify", str(package)]):
        if args[0] != "models":
            args += ["--model", str(package)]
        result = runner.invoke(app, args)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        if args[0] == "retrieve" and result.exit_code != EXIT_MODEL_INVALID:
            # No store exists: retrieve may refuse for that first; it must still be one clean line.
            assert isinstance(result.exception, SystemExit) and len(errors) == 1, result.output
            continue
        assert result.exit_code == EXIT_MODEL_INVALID, (args, result.output)
        assert isinstance(result.exception, SystemExit), (args, result.exception)
        assert len(errors) == 1 and all(part in errors[0] for part in expected), (args, result.stderr)
    assert not (tmp_path / "store").exists()  # nothing was written with a broken model
