"""`retina demo` end to end (tiny sizes), then the README card commands typed exactly, in a fresh
process, in the demo's folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from retinacli.tasks import TASKS

RETINA = str(Path(sys.executable).parent / "retina")


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETINA_")}
    env.update(RETINA_HOME=str(home), COLUMNS="250", NO_COLOR="1")
    return env


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    workdir = root / "retina-demo"
    args = [RETINA, "demo", "--workdir", str(workdir), "--preset", "tiny", "--patients", "6", "--visits", "2",
            "--oct-shape", "8x64x64", "--fundus-size", "64", "--json"]
    result = subprocess.run(args, capture_output=True, text=True, env=_env(root / "home"), cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, json.loads(result.stdout), root / "home"


def test_demo_summary_covers_both_objectives_through_the_exported_packages(demo):
    workdir, summary, _ = demo
    assert set(summary["objectives"]) == {"clip", "cloob"}
    for result in summary["objectives"].values():
        f2o = result["retrieval"]["fundus_to_oct"]
        # oct_dir: up to 8 held-out patients
        assert f2o["pool_size"] >= summary["card"]["oct_dir_volumes"] > 0
        assert f2o["chance_top1"] == pytest.approx(1 / f2o["pool_size"])
        assert 0 <= f2o["top1"] <= f2o["top5"] <= 1
        assert Path(result["package"], "retina.json").is_file()
        assert set(result["heads_cv"]) == set(TASKS)  # probe's default: every registry task
        # its model card says what it is: synthetic data, demo/research only, the project's licence
        card = json.loads(Path(result["package"], "retina.json").read_text())["card"]
        assert card["licence"] == "Apache-2.0" and "validation" not in card  # shown from the heads' CV
        assert "synthetic patients" in card["training_data"]
        assert "no real patient data" in card["training_data"]
        assert "research and demonstration only" in card["intended_use"]
        assert "Any clinical use" in card["out_of_scope_use"]
        # int8 encoders exported and gated; `auto` runs int8 only where the gate passed on that engine
        descriptor = json.loads(Path(result["package"], "retina.json").read_text())
        gates = result["int8"]["gate"]
        for modality in ("fundus", "oct"):
            recorded = descriptor["quantized"]["int8"]["encoders"][modality]["gate"]
            assert gates[modality] == {b: g["passed"] for b, g in recorded.items()}
            backend, precision = result["int8"]["engine"][modality].split("/")
            assert precision == "fp32" or gates[modality][backend]
    # held-out and unseen patients, visit and eye level, both directions, exact chance
    unseen = summary["cohort"]["unseen"]
    assert unseen["seed"] == 1000  # the demo's seed 0 + 1000: patients no demo model trained on
    from retinacli.cohort_manifest import read_cohort_manifest

    trained = {r["patient_id"] for r in read_cohort_manifest(workdir / "manifest.csv")}
    fresh = read_cohort_manifest(workdir / "unseen" / "manifest.csv")
    assert len(fresh) == unseen["pairs"] and not trained & {r["patient_id"] for r in fresh}
    eyes = {(r["patient_id"], r["eye"]) for r in fresh}
    for result in summary["objectives"].values():
        for key, pool in (("retrieval", result["retrieval"]["pool_size"]), ("unseen_retrieval", len(fresh))):
            r = result[key]
            assert r["pool_size"] == pool
            assert set(r["eye_level"]) == {"eyes", "fundus_to_oct", "oct_to_fundus"}
            for direction in ("fundus_to_oct", "oct_to_fundus"):
                visit, eye = r[direction], r["eye_level"][direction]
                assert eye["top1"] >= visit["top1"] and eye["mrr"] >= visit["mrr"]
                assert eye["chance_top1"] > visit["chance_top1"] == pytest.approx(1 / pool)
        assert result["unseen_retrieval"]["eye_level"]["eyes"] == len(eyes)
        assert result["unseen_retrieval"]["patients"] == unseen["patients"] == 24
    cloob = json.loads((workdir / "runs" / "cloob" / "config.json").read_text())
    assert cloob["init_from"] == str(workdir / "runs" / "clip")  # CLOOB starts from the CLIP encoders
    cloob_package = Path(summary["objectives"]["cloob"]["package"], "retina.json")
    assert "starting from the encoders of the demo's CLIP run" in json.loads(cloob_package.read_text())[
        "card"]["training_data"]
    default = summary["objectives"][summary["card"]["default_model"].removeprefix("retina-demo-")]
    assert summary["card"]["engine"] == default["int8"]["engine"]  # what `retina embed` ran
    for name in ("manifest.csv", "train.toml", "fundus.png", "demo_summary.json", ".retina/store/store.json"):
        assert (workdir / name).exists(), name
    assert summary["card"]["predict_records"] == summary["card"]["oct_dir_volumes"]


def test_card_commands_run_as_typed_in_the_demo_folder(demo):
    workdir, summary, home = demo
    env = _env(home)
    volumes = sorted(p.name for p in (workdir / "oct_dir").iterdir())

    def run(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), cwd=workdir, capture_output=True, text=True, env=env)

    embed = run(RETINA, "embed", "./oct_dir")
    assert embed.returncode == 0, embed.stderr
    # Everything was embedded by the demo: the second run only skips, and says which defaults it used.
    assert summary["card"]["default_model"] in embed.stderr and ".retina/store" in embed.stderr
    assert f"embedded 0, skipped {len(volumes)}" in embed.stdout + embed.stderr

    retrieve = run(RETINA, "retrieve", "fundus.png", "--top", "5")
    assert retrieve.returncode == 0, retrieve.stderr
    listed = [name for name in volumes if name in retrieve.stdout]
    assert len(listed) == min(5, len(volumes))  # five OCT volumes from the store, nothing else

    predict = run(RETINA, "predict", "--task", "bcva")
    assert predict.returncode == 0, predict.stderr
    assert all(name in predict.stdout for name in volumes)  # one record per stored OCT volume

    train = run(RETINA, "train")
    assert train.returncode == 0, train.stderr
    assert "train.toml" in train.stderr and "preset=tiny" in train.stderr
    runs = [p for p in (workdir / "runs").iterdir() if p.name.startswith("clip-")]
    assert len(runs) == 1 and (runs[0] / "checkpoints" / "last.pt").is_file()


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("user data")
    result = subprocess.run([RETINA, "demo", "--workdir", str(tmp_path)], capture_output=True, text=True,
                            env=_env(tmp_path / "home"))
    assert result.returncode == 2
    assert "not empty" in result.stderr and (tmp_path / "precious.txt").read_text() == "user data"


def test_summary_table_shows_both_levels_and_directions_with_chance():
    from types import SimpleNamespace

    import numpy as np
    from rich.console import Console

    from retinacli.commands.demo import _retrieval_table
    from retinacli.ranking import both_directions

    # 4 visits of 2 eyes; every photo matches the other visit of its eye: visit top-1 0, eye hit@1 1
    fundus = np.eye(4)[[1, 0, 3, 2]]
    result = both_directions(fundus, np.eye(4), eyes=["a", "a", "b", "b"])
    result["patients"] = 2
    summary = SimpleNamespace(objectives={"clip": {"retrieval": result, "unseen_retrieval": result}})
    console = Console(record=True, width=200)
    console.print(_retrieval_table(summary))
    rows = [line for line in console.export_text().splitlines() if "│" in line]
    cells = [[c.strip() for c in row.split("│")[1:-1]] for row in rows]
    assert cells[0] == ["CLIP held-out", "2", "4", "F→O", "0% (25%)", "100% (50%)", "100% (100%)",
                        "100% (100%)", "1.00"]
    assert cells[1][:4] == ["", "", "", "O→F"] and cells[2][0] == "CLIP unseen" and len(cells) == 4
