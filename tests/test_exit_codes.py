"""Exit codes are the documented table in every command (docs/cli.md "Exit codes"; issue 14):
a usage error (a bad option value, a missing path) is 2, an invalid model package 3, everywhere.

Each case runs one command in a scratch folder that holds:
- ``notpkg/``: a folder that is not a model package (no retina.json),
- ``nonempty/``: a folder with a file in it,
- ``fakerun/``: a folder that looks like a training run (config.json),
- ``store/``: a copy of the frozen 0.1.0 embedding store, ``exported/toy``: its package,
- ``data/``: a readable fundus image.
The error must be one ``error:`` line (or Click's usage box for Click's own checks), never a traceback.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from retinacli.cli import app
from retinacli.errors import EXIT_MODEL_INVALID, EXIT_USAGE

FROZEN = Path(__file__).parent / "fixtures" / "v0_1_0"
IMAGE = FROZEN / "source" / "p8fd3ea9ca936" / "OS_v00_fundus.png"

# (command line, expected exit code). "nope*" never exists.
MISSING_PATH = [
    ["inspect", "nope"],
    ["inspect", "data", "nope"],  # one missing argument among good ones is still a typo to fix
    ["embed", "nope", "--model", "exported/toy", "--store", "new_store"],
    ["pair", "nope", "--out", "m.csv"],
    ["probe", "nope"],
    ["probe", "fakerun", "--manifest", "nope.csv"],
    ["train", "--manifest", "nope.csv", "--out", "run"],
    ["train", "--manifest", "m.csv", "--out", "run", "--fundus-init", "nope.pt"],
    ["export", "nope"],
    ["evaluate", "--manifest", "nope.csv", "--runs", "fakerun", "--out", "ev"],
    ["retrieve", "data/OS_v00_fundus.png", "--store", "nope"],
    ["predict", "nope.png", "--task", "cst", "--model", "exported/toy"],
    ["store", "info", "--store", "nope"],
    ["store", "index", "--store", "nope"],
    ["store", "verify", "--store", "nope"],
]
MISSING_PACKAGE = [  # a package named that is not there: "model package missing" is 3, like a bad one
    ["models", "verify", "nope_pkg"],
    ["models", "install", "nope_pkg"],
    ["embed", "data", "--model", "nope_pkg", "--store", "new_store"],
]
BAD_OPTION = [
    ["inspect", "data", "--bogus"],
    ["embed", "data", "--modality", "xray", "--store", "new_store"],
    ["embed", "data", "--batch-size", "0", "--store", "new_store"],
    ["pair", "data", "--out", "m.csv", "--window-hours", "soon"],
    ["probe", "fakerun", "--tasks", "vision"],
    ["train", "--manifest", "m.csv", "--out", "run", "--init", "imagenet21k"],
    ["train", "--manifest", "m.csv", "--out", "run", "--objective", "mse"],
    ["train", "--manifest", "m.csv", "--out", "run"],  # the cohort manifest lacks eye and visit
    ["export", "fakerun", "--quantize", "int4"],
    ["export", "fakerun", "--out", "nonempty"],
    ["evaluate", "--manifest", "m.csv", "--runs", "fakerun", "--modes", "zero-shot", "--out", "ev"],
    ["evaluate", "--manifest", "m.csv", "--runs", "fakerun", "--folds", "1", "--out", "ev"],
    ["retrieve", "data/OS_v00_fundus.png", "--store", "store", "--top", "0"],
    ["predict", "data", "--task", "vision", "--model", "exported/toy"],
    ["synth", "nonempty"],
    ["synth", "cohort", "--patients", "0"],
    ["demo", "--workdir", "nonempty"],
    ["info", "--bogus"],
    ["models", "list", "--bogus"],
    ["store", "info", "--store", "store", "--bogus"],
]
INVALID_PACKAGE = [
    ["embed", "data", "--model", "notpkg", "--store", "new_store"],
    ["retrieve", "data/OS_v00_fundus.png", "--store", "store", "--model", "notpkg"],
    ["predict", "data", "--task", "cst", "--model", "notpkg"],
    ["models", "verify", "notpkg"],
    ["models", "show", "notpkg"],
    ["models", "install", "notpkg"],
    ["models", "default", "notpkg"],
]
CASES = (
    [pytest.param(args, EXIT_USAGE, id="missing-path:" + " ".join(args)) for args in MISSING_PATH]
    + [pytest.param(args, EXIT_MODEL_INVALID, id="missing-package:" + " ".join(args))
       for args in MISSING_PACKAGE]
    + [pytest.param(args, EXIT_USAGE, id="bad-option:" + " ".join(args)) for args in BAD_OPTION]
    + [pytest.param(args, EXIT_MODEL_INVALID, id="invalid-package:" + " ".join(args))
       for args in INVALID_PACKAGE]
)
TRAINING = {"probe", "train", "export", "evaluate"}


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    (tmp_path / "notpkg").mkdir()
    (tmp_path / "notpkg" / "notes.txt").write_text("not a package")
    (tmp_path / "nonempty").mkdir()
    (tmp_path / "nonempty" / "keep.txt").write_text("mine")
    (tmp_path / "fakerun").mkdir()
    (tmp_path / "fakerun" / "config.json").write_text("{}")
    (tmp_path / "data").mkdir()
    shutil.copy(IMAGE, tmp_path / "data" / "OS_v00_fundus.png")
    (tmp_path / "m.csv").write_text("patient_id,oct_path,fundus_path\n")
    shutil.copytree(FROZEN / "store", tmp_path / "store")
    shutil.copytree(FROZEN / "package", tmp_path / "exported" / "toy")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RETINA_STORE", raising=False)
    monkeypatch.delenv("RETINA_MODEL", raising=False)
    monkeypatch.setenv("RETINA_HOME", str(tmp_path / "home"))
    return tmp_path


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize(("args", "expected"), CASES)
def test_exit_code_table(args, expected, scratch):
    if args[0] in TRAINING:
        pytest.importorskip("torch")
    before = _snapshot(scratch)
    result = CliRunner().invoke(app, args)
    text = result.output
    assert result.exit_code == expected, f"{args}: {result.exit_code}\n{text}"
    assert "Traceback" not in text
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), (
        repr(result.exception)
    )
    if "error:" in text:  # our own errors are one line
        assert len([line for line in text.splitlines() if line.startswith("error:")]) == 1, text
    # A refused command leaves nothing behind (no store, run folder, package or cohort started).
    assert _snapshot(scratch) == before, sorted(_snapshot(scratch) - before)


def test_table_is_documented():
    """docs/cli.md lists every exit code of retinacli.errors with its meaning."""
    from retinacli import errors

    doc = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    codes = {v for k, v in vars(errors).items() if k.startswith("EXIT_") and isinstance(v, int)}
    for code in codes:
        assert f"| {code} |" in doc, code
