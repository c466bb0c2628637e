"""Model cards (docs/model-package.md "Model card"): assembled by `retina export` from options and/or a
card file, checked by the descriptor schema, shown by `retina models show` and `retina info`, never part
of the model id."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fixtures_cli import run_cli as run
from fixtures_packages import make_toy_package
from typer.testing import CliRunner

from retinacli.cli import app
from retinacli.errors import EXIT_MODEL_INVALID, EXIT_USAGE, UsageError
from retinacli.modelcard import assemble_card
from retinacli.package import package_model_ids

pytest.importorskip("onnx")

FROZEN = Path(__file__).parent / "fixtures" / "v0_1_0"
# tests/test_formats.py: the frozen package's ids under rule 2 (current) and rule 1 (its store's)
FROZEN_IDS = ("toy@0.1.0+248663d55935", "toy@0.1.0+6474dbc96760")

CARD = {
    "licence": "CC-BY-4.0",
    "intended_use": "Research on OCT retrieval in adult AMD cohorts.",
    "out_of_scope_use": "Diagnosis or treatment decisions.",
    "training_data": "1,204 Spectralis volumes from one centre, 2015-2020.",
    "validation": {"summary": "5-fold patient-grouped CV", "metrics": {"cst_mae_um": 21.5, "tn_auroc": 0.81}},
    "authors": "Eye Lab",
    "contact": "eyelab@example.org",
    "limitations": "One device vendor only.",
}
CARD_TOML = """\
licence = "CC-BY-4.0"
intended_use = "Research on OCT retrieval in adult AMD cohorts."
out_of_scope_use = "Diagnosis or treatment decisions."
training_data = "1,204 Spectralis volumes from one centre, 2015-2020."
authors = "Eye Lab"
contact = "eyelab@example.org"
limitations = "One device vendor only."

[validation]
summary = "5-fold patient-grouped CV"
metrics = { cst_mae_um = 21.5, tn_auroc = 0.81 }
"""

runner = CliRunner()


@pytest.fixture
def env(private_home, monkeypatch):
    """A private $RETINA_HOME and an empty working folder, no $RETINA_MODEL."""
    monkeypatch.delenv("RETINA_STORE", raising=False)
    return private_home / "work"


def _with_card(package: Path, card) -> Path:
    """Write `card` into the package's retina.json (None: remove it)."""
    path = package / "retina.json"
    descriptor = json.loads(path.read_text())
    descriptor.pop("card", None)
    if card is not None:
        descriptor["card"] = card
    path.write_text(json.dumps(descriptor, indent=2), encoding="utf-8")
    return package


# --- assembling a card (retina export) --------------------------------------------------------------


def test_card_from_options():
    card = assemble_card(licence="Apache-2.0", intended_use="Research only.", training_data="Synthetic.")
    assert card == {"licence": "Apache-2.0", "intended_use": "Research only.", "training_data": "Synthetic."}
    assert assemble_card() is None  # nothing given: no card


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_card_from_a_file(tmp_path, suffix):
    path = tmp_path / f"card{suffix}"
    path.write_text(CARD_TOML if suffix == ".toml" else json.dumps(CARD), encoding="utf-8")
    assert assemble_card(path) == CARD


def test_options_override_the_file(tmp_path):
    path = tmp_path / "card.toml"
    path.write_text(CARD_TOML, encoding="utf-8")
    card = assemble_card(path, licence="MIT", training_data="Another cohort.")
    assert card == {**CARD, "licence": "MIT", "training_data": "Another cohort."}


def test_unknown_key_is_refused_naming_it(tmp_path):
    path = tmp_path / "card.toml"
    path.write_text(CARD_TOML.replace("authors =", "license ="), encoding="utf-8")
    with pytest.raises(UsageError, match=r"card\.toml: unknown model card key 'license'") as exc:
        assemble_card(path)
    assert exc.value.exit_code == EXIT_USAGE


def test_missing_required_key_names_the_option(tmp_path):
    with pytest.raises(UsageError, match=r"intended_use is missing \(give --intended-use"):
        assemble_card(licence="MIT", training_data="x")
    path = tmp_path / "card.json"
    path.write_text(json.dumps({"licence": "MIT", "intended_use": "x"}), encoding="utf-8")
    with pytest.raises(UsageError, match=r"card\.json: training_data is missing"):
        assemble_card(path)


@pytest.mark.parametrize(("value", "message"), [
    ("x" * 4001, r"card\.intended_use: 4001 characters, more than the 4000 allowed"),
    ("fine\x1b[2Jnot", r"card\.intended_use: holds the control character '\\x1b' at offset 4"),
    ("left\u202eright", r"card\.intended_use: holds the control character '\\u202e' at offset 4"),
    ("   ", r"card\.intended_use: must not be blank"),
])
def test_bad_values_are_refused_before_export(value, message):
    with pytest.raises(UsageError, match=message):
        assemble_card(licence="MIT", intended_use=value, training_data="x")


def test_bad_card_files_are_one_line_each(tmp_path):
    cases = {
        "card.yaml": ("licence: MIT", r"card\.yaml: a model card file must be \.toml or \.json"),
        "broken.toml": ("licence = ", r"broken\.toml: not a valid model card"),
        "list.json": ("[1, 2]", r"list\.json: a model card must be a JSON object"),
        "types.toml": ('licence = 3\nintended_use = "x"\ntraining_data = "y"',
                       r"types\.toml: card\.licence: must be string, got int 3"),
        "nan.toml": ('licence = "x"\nintended_use = "x"\ntraining_data = "y"\n'
                     '[validation]\nmetrics = {a = nan}',
                     r"nan\.toml: card\.validation\.metrics\.a: must be a finite number, got NaN"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(UsageError, match=message):
            assemble_card(tmp_path / name)
    with pytest.raises(UsageError, match=r"missing\.toml: cannot read the model card"):
        assemble_card(tmp_path / "missing.toml")


# --- the descriptor: verify, show, info ---------------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "message"), [
    ("training_data", "y" * 4001, "card.training_data: 4001 characters, more than the 4000 allowed"),
    ("licence", "L" * 201, "card.licence: 201 characters, more than the 200 allowed"),
    ("limitations", "bell\x07", "card.limitations: holds the control character '\\x07' at offset 4"),
    ("contact", "a\rb", "card.contact: holds the control character '\\r' at offset 1"),
    ("funding", "x", "card: unexpected field 'card.funding'"),
])
def test_verify_refuses_a_bad_card_naming_the_field(env, tmp_path, field, value, message):
    package = _with_card(make_toy_package(tmp_path / "toy"), {**CARD, field: value})
    code, _, stderr = run("models", "verify", package)
    assert code == EXIT_MODEL_INVALID
    assert message in stderr and "retina.json" in stderr
    assert "\x07" not in stderr and "\r" not in stderr  # the bad value is named, never replayed raw
    assert run("models", "show", package)[0] == EXIT_MODEL_INVALID


def test_show_prints_the_card(env, tmp_path):
    card = {**CARD, "training_data": "Line one.\nLine two."}
    package = _with_card(make_toy_package(tmp_path / "toy"), card)
    code, stdout, _ = run("models", "show", package)
    assert code == 0
    for text in ("licence", "CC-BY-4.0", "intended use", "Research on OCT retrieval in adult AMD cohorts.",
                 "out of scope use", "Diagnosis or treatment decisions.", "Line one. Line two.",
                 "5-fold patient-grouped CV; cst_mae_um 21.5; tn_auroc 0.81", "Eye Lab",
                 "eyelab@example.org", "One device vendor only."):
        assert text in " ".join(stdout.split()), text
    assert "no model card" not in stdout
    code, stdout, _ = run("models", "show", package, "--json")
    assert code == 0 and json.loads(stdout)["card"] == card


def test_validation_falls_back_to_the_heads_metrics(env, tmp_path):
    card = {k: CARD[k] for k in ("licence", "intended_use", "training_data")}
    package = _with_card(make_toy_package(tmp_path / "toy"), card)
    descriptor = json.loads((package / "retina.json").read_text())
    cst = descriptor["heads"]["cst"]["metrics"]["cv"]
    auroc = descriptor["heads"]["tn"]["metrics"]["cv"]["auroc"]
    code, stdout, _ = run("models", "show", package)
    shown = " ".join(stdout.split())
    assert code == 0
    assert (f"not in the card; heads: cst cv MAE {cst['mae']:.1f} µm, R² {cst['r2']:.2f} "
            f"({cst['folds']} folds); tn cv AUROC {auroc:.2f}") in shown
    assert "out of scope use" not in shown  # optional fields left out are not shown


def test_a_package_without_a_card_says_so(env, tmp_path):
    toy = make_toy_package(tmp_path / "toy")
    code, stdout, _ = run("models", "show", toy)
    assert code == 0 and "no model card" in stdout
    assert json.loads(run("models", "show", toy, "--json")[1])["card"] is None
    frozen = tmp_path / "frozen"
    shutil.copytree(FROZEN / "package", frozen)
    code, stdout, _ = run("models", "show", frozen)
    assert code == 0 and "no model card" in stdout
    assert json.loads(run("models", "show", frozen, "--json")[1])["card"] is None


def test_info_shows_the_card_of_the_model_used(env):
    package = make_toy_package(env / "exported" / "toy")
    code, stdout, _ = run("info")
    assert code == 0 and "no model card (toy@1.0.0)" in stdout
    data = json.loads(run("info", "--json")[1])
    assert data["model_card"] == {"package": "toy@1.0.0", "card": None}
    _with_card(package, CARD)
    code, stdout, _ = run("info")
    shown = " ".join(stdout.split())
    assert code == 0 and "no model card" not in shown
    assert "model card toy@1.0.0" in shown and "licence CC-BY-4.0" in shown
    assert "Research on OCT retrieval in adult AMD cohorts." in shown
    data = json.loads(run("info", "--json")[1])
    assert data["model_card"] == {"package": "toy@1.0.0", "card": CARD}


def test_info_reports_an_unreadable_card_without_failing(env):
    _with_card(make_toy_package(env / "exported" / "toy"), {**CARD, "licence": "x\x1b]8;;"})
    code, stdout, _ = run("info")
    assert code == 0 and "model card" in stdout and "unreadable" in stdout
    assert "card.licence: holds the control character" in " ".join(stdout.split())
    assert "\x1b" not in stdout


# --- the model id -----------------------------------------------------------------------------------


def test_a_card_does_not_change_the_model_id(env, tmp_path):
    toy = make_toy_package(tmp_path / "toy")
    before = package_model_ids(toy)
    code, stdout, _ = run("models", "verify", _with_card(toy, CARD), "--json")
    assert code == 0 and json.loads(stdout)["model_id"] == before[0]
    assert package_model_ids(toy) == before
    # the frozen 0.1.0 package with a card keeps both of its ids: its 0.1.0 store still matches
    frozen = tmp_path / "frozen"
    shutil.copytree(FROZEN / "package", frozen)
    assert package_model_ids(frozen) == FROZEN_IDS
    _with_card(frozen, CARD)
    assert package_model_ids(frozen) == FROZEN_IDS
    assert run("models", "verify", frozen)[0] == 0


# --- retina export (one real export: encoder graphs copied from the session package, as in test_export)


def test_export_writes_the_card_and_keeps_the_model_id(tiny_package, tiny_package_run, tiny_loaded_run,
                                                        tmp_path, monkeypatch):
    import training.export.graphs as graphs
    import training.model

    # the same weights' graphs, byte for byte: so the model id must equal the card-less package's
    monkeypatch.setattr(training.model, "load_run", lambda *args, **kwargs: tiny_loaded_run)
    monkeypatch.setattr(graphs, "export_encoder", lambda model, modality, example, path, opset, exporter:
                        shutil.copyfile(tiny_package / graphs.ENCODER_FILES[modality], path))
    monkeypatch.setenv("RETINA_HOME", str(tmp_path / "home"))
    card_file = tmp_path / "card.toml"
    card_file.write_text(CARD_TOML, encoding="utf-8")
    out = tmp_path / "pkg"
    bad = runner.invoke(app, ["export", str(tiny_package_run), "--out", str(out), "--card", str(card_file),
                              "--intended-use", "bad\x1b[2J"])
    assert bad.exit_code == EXIT_USAGE and "card.intended_use: holds the control character" in bad.stderr
    assert not out.exists()  # refused before any export work
    result = runner.invoke(app, ["export", str(tiny_package_run), "--out", str(out), "--name", "tiny",
                                 "--card", str(card_file), "--licence", "Apache-2.0"])
    assert result.exit_code == 0, result.stderr
    assert "model card: licence Apache-2.0" in result.stdout
    descriptor = json.loads((out / "retina.json").read_text())
    assert descriptor["card"] == {**CARD, "licence": "Apache-2.0"}
    assert package_model_ids(out) == package_model_ids(tiny_package)
    assert "card" not in json.loads((tiny_package / "retina.json").read_text())
    verify = runner.invoke(app, ["models", "verify", str(out), "--json"])
    assert verify.exit_code == 0
    assert json.loads(verify.stdout)["model_id"] == package_model_ids(tiny_package)[0]
