"""Option names shared by the commands, their deprecated spellings, and the one error path of `retina`.

`--store/-s` is the embedding store everywhere (`embed --out/-o` and `retrieve/predict --index/-i` still
work for one release and warn); `-m` will mean `--model` everywhere (on train/probe/evaluate it still
means `--manifest` for one release, with a warning). Every RetinaError becomes one `error:` line and its
own exit code in `retinacli.cli`, for `retina ...` and for a CliRunner alike.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_embed_cli import run, standins  # noqa: F401  (the stand-in engine fixture)
from test_store import make_folder

from retinacli.errors import EXIT_MODEL_INVALID, EXIT_NOTHING_DONE, EXIT_USAGE, RetinaError, UsageError

STORE_WARNING = "warning: {old} is deprecated; use --store"
MANIFEST_WARNING = "warning: -m for --manifest is deprecated and will mean --model; use --manifest"


def _warnings(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning:")]


# --- the store: --store/-s, and the old --out/-o (embed), --index/-i (retrieve, predict) -------------


@pytest.mark.parametrize("spelling", ["--store", "-s", "--out", "-o"])
def test_embed_store_spellings(standins, tmp_path, spelling):  # noqa: F811
    data = make_folder(tmp_path / "data", n_pairs=2, bad=0)
    result = run("embed", data, spelling, tmp_path / "s", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["store"] == str(tmp_path / "s")
    assert len(json.loads(result.stdout)["errors"]) == 0 and (tmp_path / "s").is_dir()
    if spelling in ("--out", "-o"):
        assert _warnings(result) == [STORE_WARNING.format(old="--out")]
    else:
        assert _warnings(result) == []
        assert f"store: {tmp_path / 's'} (--store)" in result.stderr


@pytest.mark.parametrize("spelling", ["--store", "-s", "--index", "-i"])
def test_retrieve_store_spellings(standins, tmp_path, spelling):  # noqa: F811
    data = make_folder(tmp_path / "data", n_pairs=2, bad=0)
    assert run("embed", data, "--store", tmp_path / "s").exit_code == 0
    result = run("retrieve", data / "eye0_OD_fundus.npy", spelling, tmp_path / "s", "--top", "2", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["store"] == str(tmp_path / "s") and len(payload["results"]) == 2
    expected = [STORE_WARNING.format(old="--index")] if spelling in ("--index", "-i") else []
    assert _warnings(result) == expected


@pytest.mark.parametrize("spelling", ["--store", "-s", "--index", "-i"])
def test_predict_store_spellings(standins, tmp_path, spelling):  # noqa: F811
    data = make_folder(tmp_path / "data", n_pairs=3, bad=0)
    assert run("embed", data, "--store", tmp_path / "s").exit_code == 0
    result = run("predict", "--task", "bcva", spelling, tmp_path / "s", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["store"] == str(tmp_path / "s") and len(payload["predictions"]) == 3
    expected = [STORE_WARNING.format(old="--index")] if spelling in ("--index", "-i") else []
    assert _warnings(result) == expected


def test_store_and_its_old_spelling_together_is_a_usage_error(standins, tmp_path):  # noqa: F811
    result = run("retrieve", "whatever", "--store", tmp_path / "a", "--index", tmp_path / "b")
    assert result.exit_code == EXIT_USAGE
    assert result.stderr.strip() == "error: give --store or --index, not both"


def test_the_old_store_spellings_are_hidden_from_help(standins):  # noqa: F811
    for command, old in (("embed", "--out"), ("retrieve", "--index"), ("predict", "--index")):
        text = run(command, "--help").stdout
        assert "--store" in text and old not in text, command


# --- -m: --model, and the old -m for --manifest on train / probe / evaluate -----------------------


def test_model_is_m_where_a_command_takes_a_model(standins, tmp_path):  # noqa: F811
    data = make_folder(tmp_path / "data", n_pairs=1, bad=0)
    result = run("embed", data, "-m", "other", "-s", tmp_path / "s", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["model"] == "other@1.0.0+111111111111"
    assert _warnings(result) == []


@pytest.fixture
def seen(monkeypatch, tmp_path):
    """Stand-ins for the training entry points, recording the manifest each command passed on."""
    pytest.importorskip("torch")
    import training.evaluation.protocol
    import training.loop
    import training.probe

    calls: dict[str, Path | None] = {}

    def fake_train(config, out, **_kwargs):
        calls["train"] = Path(config.manifest)
        return out

    def fake_probe(run_dir, manifest=None, **_kwargs):
        calls["probe"] = manifest
        raise FileNotFoundError(f"{manifest}: stand-in stops here")

    def fake_prepare(cfg):
        calls["evaluate"] = cfg.manifest
        raise UsageError(f"{cfg.manifest}: stand-in stops here")

    monkeypatch.setattr(training.loop, "train", fake_train)
    monkeypatch.setattr(training.probe, "probe_run", fake_probe)
    monkeypatch.setattr(training.evaluation.protocol, "prepare", fake_prepare)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    (tmp_path / "cohort.csv").write_text("patient_id\n")
    return calls


COMMAND_ARGS = {
    "train": ["train", "--out", "new-run", "--preset", "tiny"],
    "probe": ["probe", "run"],
    "evaluate": ["evaluate", "--runs", "run"],
}
EXIT_AFTER_STAND_IN = {"train": 0, "probe": EXIT_NOTHING_DONE, "evaluate": EXIT_USAGE}


@pytest.mark.parametrize("command", ["train", "probe", "evaluate"])
@pytest.mark.parametrize("spelling", ["--manifest", "-m"])
def test_manifest_spellings(seen, command, spelling):
    result = run(*COMMAND_ARGS[command], spelling, "cohort.csv")
    assert result.exit_code == EXIT_AFTER_STAND_IN[command], result.output
    assert seen[command] == Path("cohort.csv")
    assert _warnings(result) == ([MANIFEST_WARNING] if spelling == "-m" else [])


def test_manifest_and_m_together_is_a_usage_error(seen):
    result = run("probe", "run", "--manifest", "cohort.csv", "-m", "cohort.csv")
    assert result.exit_code == EXIT_USAGE and "give --manifest or -m, not both" in result.stderr
    assert "probe" not in seen


def test_evaluate_still_requires_a_manifest(seen):
    result = run("evaluate", "--runs", "run")
    assert result.exit_code == EXIT_USAGE and "missing option --manifest" in result.stderr
    assert "evaluate" not in seen


# --- one error path ----------------------------------------------------------------------------------


def test_retina_error_carries_its_exit_code():
    assert RetinaError("x").exit_code == EXIT_NOTHING_DONE
    assert RetinaError("x", exit_code=EXIT_USAGE).exit_code == EXIT_USAGE
    assert UsageError("x").exit_code == EXIT_USAGE
    assert RetinaError("y").exit_code == EXIT_NOTHING_DONE  # the class default is untouched


def test_cli_prints_one_error_line_with_the_errors_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("models", "show", tmp_path / "nope")  # a RetinaError from a sub-group's command
    assert result.exit_code == EXIT_MODEL_INVALID
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'nope'}: ")


def test_error_messages_are_literal_text(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    monkeypatch.chdir(tmp_path)
    result = run("demo")
    assert result.exit_code == EXIT_NOTHING_DONE
    assert result.stderr.strip() == (
        "error: retina demo needs the optional 'train' dependencies (torch is not installed). "
        "Install them with: pip install 'retina[train]'"
    )


def test_require_names_the_missing_module():
    from retinacli.errors import MissingExtraError, require

    require("feature", "train", "json", "csv")  # installed: nothing happens
    with pytest.raises(MissingExtraError, match=r"feature needs the optional 'x' dependencies "
                                                r"\(no_such_mod_123 is not installed\)"):
        require("feature", "x", "json", "no_such_mod_123")
