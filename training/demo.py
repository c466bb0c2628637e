"""`retina demo`: the whole chain on a synthetic cohort, in one folder a user can keep working in.

synth -> train CLIP, then CLOOB started from the CLIP run (demo preset) -> probe heads -> export ONNX
packages (fp32 and int8 encoders, the int8 ones used where they pass the accuracy gate) -> retrieval
through the exported packages on the held-out patients and on a fresh cohort of unseen patients
(another seed) -> embed / retrieve / predict with the torch-free CLI.

The demo folder is laid out so the CLI's card commands work there as typed, with no flags:
    manifest.csv  dicom/         the synthetic cohort (`retina train` picks up ./manifest.csv)
    train.toml                     the training settings the demo used (`retina train` reads it)
    exported/                      model packages (`retina embed` finds the newest one here)
    oct_dir/                       held-out OCT volumes (`retina embed ./oct_dir`)
    fundus.png                     one held-out fundus photo (`retina retrieve fundus.png --top 5`)
    .retina/store/                 the embedding store the demo filled from ./oct_dir
    runs/clip, runs/cloob          training runs (config, checkpoints, metrics, heads)
    unseen/                        a fresh synthetic cohort (seed + 1000) the models never saw
    demo_summary.json              every number the summary prints
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retinacli.errors import UsageError
from retinacli.tasks import TASKS

MARKER = ".retina-demo"
OBJECTIVES = ("clip", "cloob")
UNSEEN_SEED_OFFSET = 1000  # the unseen cohort's seed: never a training cohort's seed of nearby demo runs


class DemoFolderError(UsageError, ValueError):
    """The demo folder holds something that is not a previous demo: never overwrite user data."""


@dataclass
class DemoSettings:
    workdir: Path
    # Many eyes at small image sizes: contrastive training generalises from the number of distinct
    # eyes (120 -> 240 patients lifted unseen-patient retrieval most of every lever tried,
    # docs/training.md), and the demo preset's inputs are 4x32x32 OCT and 48 px fundus anyway.
    patients: int = 240
    visits: int = 2
    seed: int = 0
    preset: str = "demo"
    epochs: int | None = None
    oct_shape: tuple[int, int, int] = (12, 128, 160)
    fundus_size: int = 160
    # CLOOB starts from the CLIP run's encoders (a CLIP warm-up): from random weights InfoLOOB stays on
    # its starting plateau for longer than the demo's budget (docs/training.md)
    cloob_from_clip: bool = True
    cloob_epochs: int = 2
    cloob_lr: float = 1e-4  # a third of the preset's: it refines the CLIP encoders instead of reshaping them
    # the unseen cohort: as `retina synth` makes it by default (24 patients, 3 visits), the demo's sizes
    unseen_patients: int = 24
    unseen_visits: int = 3

    @property
    def unseen_seed(self) -> int:
        return self.seed + UNSEEN_SEED_OFFSET


@dataclass
class DemoSummary:
    workdir: str
    cohort: dict[str, Any]
    objectives: dict[str, dict[str, Any]] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "workdir": self.workdir,
            "cohort": self.cohort,
            "objectives": self.objectives,
            "card": self.card,
            "seconds": self.seconds,
        }


def prepare_workdir(workdir: Path) -> None:
    """Create the folder, or clear a previous demo in it; refuse a non-empty folder that is not one."""
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).exists():
            raise DemoFolderError(
                f"{workdir}: folder is not empty and was not made by `retina demo`; choose another --workdir"
            )
        for child in workdir.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    workdir.mkdir(parents=True, exist_ok=True)


def mark_workdir(workdir: Path) -> None:
    (workdir / MARKER).write_text("made by `retina demo`; the next demo run may clear this folder\n")


def write_train_config(workdir: Path, settings: DemoSettings) -> Path:
    """`train.toml`: the settings the demo trained with, so a plain `retina train` here repeats them."""
    lines = [
        "# Written by `retina demo`: `retina train` in this folder reads it (flags still override).",
        f'preset = "{settings.preset}"',
        f"seed = {settings.seed}",
    ]
    if settings.epochs is not None:
        lines.append(f"epochs = {settings.epochs}")
    path = workdir / "train.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _held_out_rows(rows: list[dict[str, str]], run_dir: Path) -> list[dict[str, str]]:
    val = set(json.loads((run_dir / "split.json").read_text())["val"])
    return [r for r in rows if r["patient_id"] in val]


def engine_retrieval(package_dir: Path, rows: list[dict[str, str]]) -> dict[str, Any]:
    """Fundus->OCT and OCT->fundus retrieval on paired rows through the exported ONNX package, at
    visit level and eye level (:mod:`retinacli.ranking`; the pool is every row, so the other visits of
    an eye are candidates too)."""
    from retinacli.engine import Engine
    from retinacli.ranking import both_directions, eye_key
    from retinacli.readers import read_fundus, read_oct

    engine = Engine.load(str(package_dir))
    fundus = np.stack([engine.preprocess(read_fundus(r["fundus_path"])) for r in rows])
    oct_ = np.stack([engine.preprocess(read_oct(r["oct_path"])) for r in rows])
    result = both_directions(engine.embed("fundus", fundus), engine.embed("oct", oct_),
                             eyes=[eye_key(r) for r in rows])
    result["patients"] = len({r["patient_id"] for r in rows})
    return result


def make_unseen_cohort(workdir: Path, settings: DemoSettings) -> list[dict[str, str]]:
    """A fresh `retina synth` cohort with another seed: patients no demo model trained on."""
    from retinacli.cohort_manifest import read_cohort_manifest
    from retinacli.synth import generate_cohort

    manifest = generate_cohort(
        workdir / "unseen", patients=settings.unseen_patients, visits=settings.unseen_visits,
        seed=settings.unseen_seed, oct_shape=settings.oct_shape, fundus_size=settings.fundus_size,
        formats=("dicom",),
    )
    return read_cohort_manifest(manifest)


def int8_summary(package_dir: Path) -> dict[str, Any]:
    """The int8 gate verdict per encoder and backend, and the engine `auto` runs each encoder with here
    (``openvino/int8`` when OpenVINO is installed and its int8 graph passed the gate)."""
    from retinacli.backends import choose_variant

    descriptor = json.loads((package_dir / "retina.json").read_text())
    encoders = ((descriptor.get("quantized") or {}).get("int8") or {}).get("encoders") or {}
    return {
        "gate": {m: {backend: g["passed"] for backend, g in entry["gate"].items()}
                 for m, entry in encoders.items()},
        "engine": {m: choose_variant(descriptor, m).label for m in ("fundus", "oct")},
    }


def _gate_line(objective: str, int8: dict[str, Any]) -> str:
    verdicts = "; ".join(
        f"{m} " + ", ".join(f"{b} {'passed' if ok else 'failed'}" for b, ok in gates.items())
        for m, gates in int8["gate"].items()
    )
    engines = ", ".join(f"{m} {label}" for m, label in int8["engine"].items())
    return f"  int8 accuracy gate of {objective.upper()}: {verdicts} -> runs as {engines}"


def _head_metrics(package_dir: Path) -> dict[str, Any]:
    descriptor = json.loads((package_dir / "retina.json").read_text())
    out = {}
    for task, head in (descriptor.get("heads") or {}).items():
        info = TASKS.get(task)
        if info is None:  # a head of a task this version does not know: nothing to report
            continue
        cv = (head.get("metrics") or {}).get("cv") or {}
        out[task] = {metric: cv.get(metric) for metric in info.metrics}
    return out


CARD_PATIENTS = 8


def card_rows(held_out: list[dict[str, str]], patients: int = CARD_PATIENTS) -> list[dict[str, str]]:
    """The held-out visits of the first `patients` held-out patients: a folder a user would embed."""
    keep = sorted({r["patient_id"] for r in held_out})[:patients]
    return [r for r in held_out if r["patient_id"] in keep]


def card_name(row: dict[str, str]) -> str:
    """File name of a held-out OCT in oct_dir: the patient folder + the cohort's file name."""
    source = Path(row["oct_path"])
    return f"{source.parent.name}_{source.name}"


def lay_out_card_files(workdir: Path, held_out: list[dict[str, str]]) -> dict[str, Any]:
    """oct_dir/ with the held-out OCT volumes and fundus.png from one held-out visit."""
    oct_dir = workdir / "oct_dir"
    oct_dir.mkdir(exist_ok=True)
    for row in held_out:
        source = Path(row["oct_path"])
        target = oct_dir / card_name(row)
        try:
            os.link(source, target)  # same file system: no copy needed
        except OSError:
            shutil.copy2(source, target)
    query = held_out[0]
    # The photo as a user would export it from a viewer: the DICOM's pixels as a PNG.
    from PIL import Image

    from retinacli.readers import read_fundus

    pixels = read_fundus(query["fundus_path"]).pixels
    Image.fromarray(pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels).save(
        workdir / "fundus.png"
    )
    return {
        "oct_dir_volumes": len(held_out),
        "fundus_png_from": {"patient_id": query["patient_id"], "eye": query["eye"], "visit": query["visit"]},
    }


def run_cli(workdir: Path, *args: str) -> dict[str, Any]:
    """Run a `retina` command in the demo folder as a user would, with --json, and parse its output."""
    command = [sys.executable, "-m", "retinacli.cli", *args, "--json"]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`retina {' '.join(args)}` failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout)


def same_eye_top5_rate(workdir: Path, package_dir: Path, held_out: list[dict[str, str]]) -> dict[str, Any]:
    """For every held-out fundus: is an OCT of the same eye among the store's top 5? (the card's claim)

    Eye-level ranking (:mod:`retinacli.ranking` schema: ``top5``, ``chance_top5``, ``queries``, ...): every
    stored OCT of the query's eye counts as a hit. A fundus whose eye has no OCT in the store cannot be
    answered and is left out of ``queries``.
    """
    from retinacli.engine import Engine
    from retinacli.ranking import rank_metrics
    from retinacli.readers import read_fundus
    from retinacli.store import EmbeddingStore

    store = EmbeddingStore.open(workdir / ".retina" / "store")
    meta = store.metadata(columns=["modality", "path"])
    is_oct = np.array([m["modality"] == "oct" for m in meta])
    vectors = store.vectors()
    eye_of = {card_name(r): (r["patient_id"], r["eye"]) for r in held_out}
    candidate_eyes = [eye_of.get(Path(m["path"]).name) for m in meta if m["modality"] == "oct"]
    engine = Engine.load(str(package_dir))
    fundus = np.stack([engine.preprocess(read_fundus(r["fundus_path"])) for r in held_out])
    queries = engine.embed("fundus", fundus)
    relevant = np.array([[e == (r["patient_id"], r["eye"]) for e in candidate_eyes] for r in held_out], bool)
    answerable = relevant.any(axis=1)
    return rank_metrics(queries[answerable] @ vectors[is_oct].T, relevant[answerable], ks=(5,))


def final_validation_score(run_dir: Path) -> tuple[float, float, float]:
    """Held-out fundus->OCT (top-1, top-5, -median rank) at the run's last epoch (higher is better)."""
    lines = (run_dir / "metrics.jsonl").read_text().strip().splitlines()
    f2o = json.loads(lines[-1])["val"]["fundus_to_oct"]
    return f2o["top1"], f2o["top5"], -f2o["median_rank"]


def demo_card(settings: DemoSettings, objective: str) -> dict[str, Any]:
    """The model card of a demo package: what it honestly is (synthetic data, demo only)."""
    epochs = "the demo preset's" if settings.epochs is None else str(settings.epochs)
    training = f"{objective.upper()} pre-training, {epochs} epochs"
    if objective == "cloob" and settings.cloob_from_clip:
        training = (f"CLOOB pre-training, {settings.epochs or settings.cloob_epochs} epochs at learning "
                    f"rate {settings.cloob_lr:g}, starting from the encoders of the demo's CLIP run (a CLIP "
                    "warm-up)")
    return {
        "licence": "Apache-2.0",
        "intended_use": "Trying out the retina tool chain (embed, retrieve, predict) on the demo's synthetic "
                        "images; research and demonstration only.",
        "out_of_scope_use": "Any clinical use (diagnosis, screening, treatment decisions) and any real "
                            "patient image: the model has never seen one.",
        "training_data": f"Synthetic cohort made by 'retina demo' (retina synth): {settings.patients} "
                         f"synthetic patients, {settings.visits} visits, seed {settings.seed}; no real "
                         f"patient data. {training}.",
        "authors": "retina demo (generated)",
        "limitations": "Its metrics describe synthetic images only and say nothing about real fundus "
                       "photographs or OCT volumes.",
    }


def run_demo(
    settings: DemoSettings,
    echo: Callable[[str], None] = print,
    progress_factory: Callable[..., Any] | None = None,
) -> DemoSummary:
    from retinacli.cohort_manifest import read_cohort_manifest
    from retinacli.synth import generate_cohort
    from training.config import resolve_config
    from training.export import export_run
    from training.loop import train
    from training.probe import probe_run

    workdir = settings.workdir.resolve()
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        seconds[name] = round(now - since, 1)
        return now

    prepare_workdir(workdir)
    echo(f"[1/5] synthetic cohort: {settings.patients} patients, {settings.visits} visits -> {workdir}")
    manifest = generate_cohort(
        workdir, patients=settings.patients, visits=settings.visits, seed=settings.seed,
        oct_shape=settings.oct_shape, fundus_size=settings.fundus_size, formats=("dicom",),
    )
    mark_workdir(workdir)
    write_train_config(workdir, settings)
    rows = read_cohort_manifest(manifest)
    t = lap("synth", started)
    summary = DemoSummary(
        workdir=str(workdir),
        cohort={"pairs": len(rows), "patients": len({r["patient_id"] for r in rows}),
                "manifest": str(manifest)},
    )

    runs: dict[str, Path] = {}
    for objective in OBJECTIVES:
        overrides = {"objective": objective, "manifest": str(manifest), "seed": settings.seed,
                     "epochs": settings.epochs}
        if objective == "cloob" and settings.cloob_from_clip:
            overrides.update(init_from=str(runs["clip"]), epochs=settings.epochs or settings.cloob_epochs,
                             lr=settings.cloob_lr)
            echo(f"[2/5] training CLOOB ({settings.preset} preset), starting from the CLIP run's encoders")
        else:
            echo(f"[2/5] training {objective.upper()} ({settings.preset} preset)")
        config = resolve_config(settings.preset, overrides=overrides)
        runs[objective] = train(config, workdir / "runs" / objective, echo=echo,
                                progress_factory=progress_factory)
        t = lap(f"train_{objective}", t)

    # The newest package in ./exported is the CLI's default: export the better run (held-out retrieval
    # at its last epoch) last, so the card commands use it.
    packages: dict[str, Path] = {}
    int8: dict[str, dict[str, Any]] = {}
    for objective in sorted(OBJECTIVES, key=lambda o: final_validation_score(runs[o])):
        echo(f"[3/5] fitting task heads and exporting {objective.upper()}")
        probe_run(runs[objective])
        # TorchScript exporter: half the dynamo exporter's time for these small graphs, same parity
        # check; `retina export` defaults to dynamo. int8 encoders too: the engine runs them only
        # where they passed the accuracy gate (docs/performance.md), else fp32.
        result = export_run(runs[objective], workdir / "exported" / f"retina-demo-{objective}",
                            name=f"retina-demo-{objective}", overwrite=True, exporter="torchscript",
                            card=demo_card(settings, objective), quantize="int8")
        packages[objective] = result.package_dir
        int8[objective] = int8_summary(result.package_dir)
        echo(_gate_line(objective, int8[objective]))
        t = lap(f"probe_export_{objective}", t)
    default_objective = list(packages)[-1]

    echo("[4/5] retrieval through the exported ONNX packages: held-out patients, then "
         f"{settings.unseen_patients} unseen patients (a fresh cohort, seed {settings.unseen_seed})")
    held_out = _held_out_rows(rows, workdir / "runs" / OBJECTIVES[0])
    unseen = make_unseen_cohort(workdir, settings)
    summary.cohort["unseen"] = {"pairs": len(unseen), "patients": len({r["patient_id"] for r in unseen}),
                                "seed": settings.unseen_seed}
    for objective, package_dir in packages.items():
        summary.objectives[objective] = {
            "package": str(package_dir),
            "retrieval": engine_retrieval(package_dir, held_out),
            "unseen_retrieval": engine_retrieval(package_dir, unseen),
            "heads_cv": _head_metrics(package_dir),
            "int8": int8[objective],
        }
    t = lap("retrieval", t)

    echo("[5/5] card commands in the demo folder: embed ./oct_dir, retrieve fundus.png, predict")
    card = card_rows(held_out)
    summary.card.update(lay_out_card_files(workdir, card))
    default_package = packages[default_objective]
    summary.card["default_model"] = f"retina-demo-{default_objective}"
    summary.card["embed"] = run_cli(workdir, "embed", "./oct_dir")
    # what a user of the default package gets: int8 where its gate passed on the installed engine
    summary.card["engine"] = summary.card["embed"].get("engine") or int8[default_objective]["engine"]
    echo("  retina embed ran the encoders as " + ", ".join(f"{m} {label}" for m, label in
                                                          sorted(summary.card["engine"].items())))
    summary.card["retrieve"] = run_cli(workdir, "retrieve", "fundus.png", "--top", "5")
    predictions = run_cli(workdir, "predict", "--task", "bcva")
    summary.card["predict_records"] = len(predictions["predictions"])
    summary.card["same_eye_top5"] = same_eye_top5_rate(workdir, default_package, card)
    lap("card_commands", t)
    seconds["total"] = round(time.perf_counter() - started, 1)
    summary.seconds = seconds
    from retinacli.jsonutil import dumps

    (workdir / "demo_summary.json").write_text(dumps(summary.to_dict(), indent=2) + "\n")
    return summary
