"""Training loop, run dir (contract 4), exact resume, config resolution, data split, retrieval metrics."""

from __future__ import annotations

import csv
import json
import re
import sys
from collections import Counter

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from retinacli.ranking import cosine_scores, match_ranks, paired_metrics  # noqa: E402
from training.config import (  # noqa: E402
    PRESET_OBJECTIVE_VALUES,
    PRESET_VALUES,
    load_config_file,
    resolve_config,
)
from training.data import epoch_batches, load_pairs_once, split_patients  # noqa: E402
from training.loop import RunExistsError, lr_lambda, train  # noqa: E402
from training.model import build_model, load_run  # noqa: E402


def _tiny(manifest, **overrides):
    return resolve_config("tiny", overrides={"manifest": str(manifest), "threads": 2, **overrides})


# --- config -----------------------------------------------------------------------------------


def test_preset_then_file_then_overrides(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('objective = "cloob"\nepochs = 7\nlr = 0.01\n')
    config = resolve_config("tiny", load_config_file(toml), {"epochs": 3, "lr": None})
    assert (config.objective, config.epochs, config.lr) == ("cloob", 3, 0.01)
    assert config.oct_size == PRESET_VALUES["tiny"]["oct_size"]
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"train": {"preset": "demo", "embed_dim": 48}}))
    config = resolve_config("tiny", load_config_file(js))
    assert (config.preset, config.embed_dim) == ("demo", 48)
    assert config.oct_slices == PRESET_VALUES["demo"]["oct_slices"]


def test_demo_preset_gives_cloob_more_epochs_and_explicit_values_still_win(tmp_path):
    assert resolve_config("demo", overrides={"objective": "clip"}).epochs == PRESET_VALUES["demo"]["epochs"]
    cloob = resolve_config("demo", overrides={"objective": "cloob"})
    demo_epochs = PRESET_VALUES["demo"]["epochs"]
    assert cloob.epochs == PRESET_OBJECTIVE_VALUES["demo"]["cloob"]["epochs"] > demo_epochs
    assert resolve_config("demo", {"objective": "cloob"}).epochs == cloob.epochs  # objective from a file
    assert resolve_config("demo", {"epochs": 2}, {"objective": "cloob"}).epochs == 2
    assert resolve_config("demo", overrides={"objective": "cloob", "epochs": 1}).epochs == 1
    assert resolve_config("tiny", overrides={"objective": "cloob"}).epochs == PRESET_VALUES["tiny"]["epochs"]


@pytest.mark.parametrize(
    ("values", "message"),
    [({"epochz": 1}, "unknown config keys: epochz"), ({"objective": "simclr"}, "unknown objective"),
     ({"batch_size": 1}, "batch_size must be >= 2"), ({"preset": "huge"}, "unknown preset")],
)
def test_bad_config_values_are_named(values, message):
    with pytest.raises(ValueError, match=message):
        resolve_config("tiny", overrides=values)


def test_schedule_warms_up_then_decays_to_zero():
    f = lr_lambda(total_steps=10, warmup_steps=2)
    assert [round(f(s), 3) for s in (0, 1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.5)
    assert f(10) == pytest.approx(0.0, abs=1e-12)


# --- data -------------------------------------------------------------------------------------


def test_patient_split_holds_out_whole_patients_and_is_seeded():
    patients = [f"p{i}" for i in range(24) for _ in range(3)]
    a, b, c = (split_patients(patients, 0.25, s) for s in (0, 0, 1))
    assert a == b and a["val"] != c["val"]
    assert len(a["val"]) == 6 and len(a["train"]) == 18
    assert not set(a["val"]) & set(a["train"])


def test_cohort_arrays_are_read_once_per_manifest_and_spec():
    loads = []

    def load(tag):
        return lambda: loads.append(tag) or tag

    spec_a, spec_b = {"oct": {"slices": 4}}, {"oct": {"slices": 8}}
    assert load_pairs_once("sha1", spec_a, load("a")) == "a"
    assert load_pairs_once("sha1", {"oct": {"slices": 4}}, load("again")) == "a"  # equal spec, not read
    assert load_pairs_once("sha1", spec_b, load("b")) == "b"  # another spec: read
    assert load_pairs_once("sha2", spec_b, load("c")) == "c"  # another manifest: read
    assert load_pairs_once("sha1", spec_a, load("a2")) == "a2"  # only the last cohort is kept
    assert loads == ["a", "b", "c", "a2"]


def test_epoch_batches_depend_only_on_seed_and_epoch():
    first = epoch_batches(10, 4, seed=3, epoch=1)
    assert [b.tolist() for b in first] == [b.tolist() for b in epoch_batches(10, 4, seed=3, epoch=1)]
    assert len(first) == 2 and len(set(np.concatenate(first).tolist())) == 8  # last partial batch dropped
    assert [b.tolist() for b in first] != [b.tolist() for b in epoch_batches(10, 4, seed=3, epoch=2)]


def test_eyes_together_batches_keep_the_visits_of_an_eye_adjacent():
    from training.data import eye_groups

    rows = [{"patient_id": p, "eye": e} for p, e in
            [("a", "OD"), ("b", "OS"), ("a", "OD"), ("c", "OD"), ("b", "OS"), ("a", "OS"), ("c", "OD"),
             ("a", "OS"), ("d", "OD"), ("d", "OD"), ("e", "OS"), ("e", "OS")]]
    groups = eye_groups(rows)
    assert groups.tolist() == [0, 1, 0, 2, 1, 3, 2, 3, 4, 4, 5, 5]
    for epoch in range(4):
        batches = epoch_batches(12, 4, seed=7, epoch=epoch, groups=groups)
        flat = np.concatenate(batches)
        assert sorted(flat.tolist()) == list(range(12))  # every pair once (12 = 3 full batches)
        eyes = groups[flat]
        # each eye's two visits are next to each other, so with batch 4 they share a batch
        assert all(eyes[i] == eyes[i + 1] for i in range(0, 12, 2))
        assert [b.tolist() for b in batches] == [
            b.tolist() for b in epoch_batches(12, 4, seed=7, epoch=epoch, groups=groups)]  # resumable
    orders = {tuple(groups[np.concatenate(epoch_batches(12, 4, 7, e, groups))][::2]) for e in range(4)}
    assert len(orders) > 1  # the order of the eyes changes between epochs
    with pytest.raises(ValueError, match="batch_composition"):
        resolve_config("tiny", overrides={"batch_composition": "by_patient"})


# --- retrieval metrics ------------------------------------------------------------------------


def test_retrieval_metrics_ranks_chance_and_ties():
    eye = np.eye(4)
    m = paired_metrics(eye, eye, ks=(1, 5))
    assert m["pool_size"] == 4 and m["top1"] == 1.0 and m["chance_top1"] == 0.25 and m["chance_top5"] == 1.0
    assert m["median_rank"] == 1.0
    mixed = 0.6 * eye + 0.8 * np.roll(eye, 1, axis=0)  # each query matches one other row better
    assert match_ranks(cosine_scores(eye, mixed)).tolist() == [2, 2, 2, 2]
    constant = np.ones((4, 2))  # ties count against the query
    assert match_ranks(cosine_scores(constant, constant)).tolist() == [4, 4, 4, 4]


# --- model ------------------------------------------------------------------------------------


def test_model_embeddings_are_unit_length_for_gray_fundus():
    config = resolve_config("tiny", overrides={"fundus_channels": 1, "embed_dim": 16})
    model = build_model(config).eval()
    with torch.no_grad():
        f = model.encode_fundus(torch.randn(2, 1, 32, 32))
        o = model.encode_oct(torch.randn(2, 1, 4, 32, 32))
    assert f.shape == o.shape == (2, 16)
    torch.testing.assert_close(f.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(o.norm(dim=1), torch.ones(2))


def test_temperatures_are_clamped_after_a_step():
    model = build_model(resolve_config("tiny", overrides={"objective": "clip"}))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) >> 100
    model.clamp_temperatures()
    assert model.temperatures()["logit_scale"] == pytest.approx(100.0, rel=1e-5)
    cloob = build_model(resolve_config("tiny", overrides={"objective": "cloob", "learn_inv_tau": True}))
    with torch.no_grad():
        cloob.log_inv_tau.fill_(-3.0)
    cloob.clamp_temperatures()
    assert cloob.temperatures()["inv_tau"] == pytest.approx(1.0, rel=1e-5)


# --- training runs ----------------------------------------------------------------------------


def test_resume_after_epoch_one_matches_uninterrupted_run(tmp_path):
    from fixtures_models import write_noise_cohort

    manifest = write_noise_cohort(tmp_path / "cohort", patients=4)  # 6 training pairs: 1 step per epoch
    full = train(_tiny(manifest, objective="cloob"), tmp_path / "full")
    train(_tiny(manifest, objective="cloob"), tmp_path / "split", stop_after_epochs=1)
    stopped = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)
    assert stopped["epoch"] == 1
    resumed = train(_tiny(manifest), tmp_path / "split", resume=True)  # the saved config wins
    a = torch.load(full / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    lines_a = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    lines_b = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines_b] == [1, 2]
    assert [x["train_loss"] for x in lines_a] == [x["train_loss"] for x in lines_b]


def test_init_from_copies_both_encoders_but_not_the_temperatures(tmp_path):
    from fixtures_models import write_noise_cohort

    from training.checkpoint import load_encoder_weights

    manifest = write_noise_cohort(tmp_path / "cohort", patients=4)
    clip = train(_tiny(manifest, epochs=1), tmp_path / "clip")
    source = torch.load(clip / "checkpoints" / "last.pt", weights_only=True)["model"]
    cloob = build_model(_tiny(manifest, objective="cloob"))
    before = {k: v.clone() for k, v in cloob.state_dict().items()}
    copied = load_encoder_weights(cloob, str(clip))  # a run folder: its last checkpoint
    state = cloob.state_dict()
    encoder_keys = [k for k in state if k.startswith(("fundus_encoder.", "oct_encoder."))]
    assert copied == len(encoder_keys) > 0
    assert all(torch.equal(state[k], source[k]) for k in encoder_keys)
    assert not any(torch.equal(before[k], source[k]) for k in encoder_keys if k.endswith("projection.weight"))
    assert torch.equal(state["log_inv_tau"], before["log_inv_tau"])  # CLOOB's own temperature
    # a run started from it begins from those encoders and says so in its log
    run = train(_tiny(manifest, objective="cloob", epochs=1, init_from=str(clip)), tmp_path / "cloob")
    assert f"encoders start from {clip}" in (run / "train.log").read_text()
    assert json.loads((run / "config.json").read_text())["init_from"] == str(clip)


def test_init_from_refuses_missing_or_mismatched_weights(tmp_path):
    from fixtures_models import write_noise_cohort

    from training.checkpoint import load_encoder_weights
    from training.encoders import WeightsNotFoundError

    manifest = write_noise_cohort(tmp_path / "cohort", patients=4)
    with pytest.raises(FileNotFoundError, match="no checkpoint to start from"):
        train(_tiny(manifest, init_from=str(tmp_path / "nothing")), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before the run folder was made
    small = build_model(_tiny(manifest, embed_dim=16))
    torch.save({"model": small.state_dict()}, tmp_path / "small.pt")
    with pytest.raises(ValueError, match=r"do not match this run's.*first mismatch"):
        load_encoder_weights(build_model(_tiny(manifest)), tmp_path / "small.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsNotFoundError, match=r"broken\.pt: cannot load weights"):
        load_encoder_weights(build_model(_tiny(manifest)), tmp_path / "broken.pt")


def test_refuses_to_overwrite_a_run(noise_cohort, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    with pytest.raises(RunExistsError, match="--resume"):
        train(_tiny(noise_cohort), run)


def test_tiny_run_layout_follows_contract(tiny_run):
    config = json.loads((tiny_run / "config.json").read_text())
    for key in ("objective", "fundus_arch", "oct_arch", "embed_dim", "fundus_init", "oct_init", "preset",
                "seed", "manifest", "manifest_sha256"):
        assert key in config, key
    spec = json.loads((tiny_run / "preprocess.json").read_text())
    assert spec["oct"]["slices"] == config["oct_slices"] and spec["fundus"]["size"] == config["fundus_size"]
    split = json.loads((tiny_run / "split.json").read_text())
    assert split["train"] and split["val"] and not set(split["train"]) & set(split["val"])
    lines = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == list(range(1, config["epochs"] + 1))
    retrieval = lines[-1]["val"]["fundus_to_oct"]
    assert retrieval["chance_top1"] == pytest.approx(1 / retrieval["pool_size"])
    assert retrieval["pool_size"] == lines[-1]["val_pairs"]
    # eye level: the val pool's eyes from the manifest; any visit of the query's eye is a hit
    with open(config["manifest"], newline="") as handle:
        val_rows = [r for r in csv.DictReader(handle) if r["patient_id"] in set(split["val"])]
    visits = Counter((r["patient_id"], r["eye"]) for r in val_rows)
    eye_level = lines[-1]["val"]["eye_level"]
    assert eye_level["eyes"] == len(visits) and sum(visits.values()) == retrieval["pool_size"]
    n = retrieval["pool_size"]
    for direction in ("fundus_to_oct", "oct_to_fundus"):
        visit, eye = lines[-1]["val"][direction], eye_level[direction]
        assert eye["pool_size"] == n and eye["queries"] == n
        for k in (1, 5, 10):
            assert eye[f"top{k}"] >= visit[f"top{k}"]
        # exact chance from the pool's eye structure: query of an eye with m visits hits at top-1 w.p. m / n
        assert eye["chance_top1"] == pytest.approx(sum(m * m / n for m in visits.values()) / n)
        assert eye["mrr"] >= visit["mrr"]
    for name in ("last.pt", f"epoch_{config['epochs']:03d}.pt"):
        state = torch.load(tiny_run / "checkpoints" / name, weights_only=True)
        assert "model" in state

    run = load_run(tiny_run)
    assert run.spec == spec and run.config == config and not run.model.training
    s, size = spec["oct"]["slices"], spec["oct"]["height"]
    with torch.no_grad():
        o = run.model.encode_oct(torch.zeros(2, 1, s, size, size))
        f = run.model.fundus_encoder(torch.zeros(2, spec["fundus"]["channels"], 32, 32))
    assert o.shape == (2, run.model.embed_dim) == f.shape
    torch.testing.assert_close(o.norm(dim=1), torch.ones(2))


# --- command line -----------------------------------------------------------------------------


def _invoke(args, cwd, monkeypatch):
    from typer.testing import CliRunner

    from retinacli.cli import app

    monkeypatch.chdir(cwd)
    return CliRunner().invoke(app, ["train", *args])


def test_cli_without_arguments_explains_how_to_start(tmp_path, monkeypatch):
    result = _invoke([], tmp_path, monkeypatch)
    assert result.exit_code == 2
    text = result.output
    assert "retina synth ./cohort" in text and "retina train --manifest ./cohort/manifest.csv" in text
    assert len(text.strip().splitlines()) == 2


def test_cli_without_torch_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    result = _invoke(["--manifest", "m.csv"], tmp_path, monkeypatch)
    assert result.exit_code == 1
    assert "pip install 'retina[train]'" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_trains_and_echoes_its_settings(noise_cohort, tmp_path, monkeypatch):
    out = tmp_path / "run"
    result = _invoke(
        ["--manifest", str(noise_cohort), "--out", str(out), "--preset", "tiny", "--epochs", "1",
         "--objective", "siglip", "--threads", "2"],
        tmp_path,
        monkeypatch,
    )
    assert result.exit_code == 0, result.output
    for setting in ("objective=siglip", "epochs=1", "oct_size=32", "lr=0.001"):
        assert setting in result.output
    assert "fundus->OCT top-1" in result.output and "pool 4" in result.output
    # 2 eyes of 2 visits: any same-eye candidate is a hit, chance top-1 = 2/4, top-5 and top-10 certain
    line = " ".join(result.output.split())
    assert "eye level (2 eyes) fundus->OCT hit@1/5/10" in line
    for direction in ("fundus->OCT", "OCT->fundus"):
        found = re.search(direction + r" hit@1/5/10 ([\d.]+)/1\.000/1\.000 \(chance 0\.500/1\.000/1\.000\), "
                          r"MRR ([\d.]+)", line)
        assert found, line[-600:]
        hit1, mrr = float(found[1]), float(found[2])
        assert hit1 <= mrr <= 1 and mrr >= 1 / 3  # ranks are 1..3 (two of the 4 candidates are hits)
    config = json.loads((out / "config.json").read_text())
    assert config["objective"] == "siglip" and config["epochs"] == 1
    again = _invoke(["--manifest", str(noise_cohort), "--out", str(out)], tmp_path, monkeypatch)
    assert again.exit_code == 2 and "--resume" in again.output
