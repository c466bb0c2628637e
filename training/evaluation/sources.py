"""Encoder sources to compare: the untrained baseline and each contrastive run.

The baseline is the runs' starting point without contrastive training: `build_model(config)` from the
first run's config (same architectures, embedding size, preprocessing and seed) with its own
initialisation, or with the one `--baseline` names; `--baseline RUN_DIR` uses another trained run
(e.g. a supervised or differently initialised one) as the reference instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from retinacli.errors import UsageError
from training.evaluation.cohort import check_run_dir
from training.evaluation.config import BASELINE_INITS

OBJECTIVE_LABELS = {"clip": "CLIP", "cloob": "CLOOB", "siglip": "SigLIP"}


@dataclass
class EncoderSource:
    key: str  # short id used in results.json ("baseline", "clip", "cloob", ...)
    label: str  # shown in results.md
    model: Any  # training.model.RetinaModel, eval mode
    config: dict[str, Any]
    spec: dict[str, Any]
    run_dir: Path | None = None
    val_patients: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {
            "label": self.label,
            "run": str(self.run_dir) if self.run_dir else None,
            "objective": c.get("objective") if self.run_dir else None,
            "fundus_arch": c.get("fundus_arch"),
            "oct_arch": c.get("oct_arch"),
            "fundus_init": c.get("fundus_init"),
            "oct_init": c.get("oct_init"),
            "embed_dim": c.get("embed_dim"),
            "seed": c.get("seed"),
            "val_patients": len(self.val_patients),
        }


def _split_val(run_dir: Path) -> list[str]:
    path = run_dir / "split.json"
    if not path.is_file():
        return []
    return [str(p) for p in json.loads(path.read_text()).get("val", [])]


def check_sources(runs: list[Path], baseline: str | None) -> None:
    """Cheap checks on every run dir and the baseline option (before anything is embedded)."""
    if not runs:
        raise UsageError("give at least one training run with --runs")
    for run in runs:
        check_run_dir(run)
    if baseline and baseline not in BASELINE_INITS and baseline != "none":
        check_run_dir(Path(baseline))


def _unique_key(key: str, taken: set[str]) -> str:
    candidate, n = key, 2
    while candidate in taken:
        candidate, n = f"{key}{n}", n + 1
    taken.add(candidate)
    return candidate


def load_sources(runs: list[Path], baseline: str | None, device: str = "cpu") -> list[EncoderSource]:
    from training.model import build_model, load_run

    sources: list[EncoderSource] = []
    taken: set[str] = set()
    loaded = [load_run(run, device=device) for run in runs]
    if baseline != "none":
        sources.append(_baseline_source(loaded[0], baseline, build_model, load_run, device, taken))
    for run in loaded:
        objective = str(run.config.get("objective", "run"))
        key = _unique_key(objective, taken)
        label = OBJECTIVE_LABELS.get(objective, objective)
        if key != objective:
            label = f"{label} ({Path(run.run_dir).name})"
        run_dir = Path(run.run_dir)
        val = _split_val(run_dir)
        sources.append(EncoderSource(key, label, run.model, run.config, run.spec, run_dir, val))
    return sources


def _baseline_source(reference, baseline, build_model, load_run, device, taken) -> EncoderSource:
    if baseline and baseline not in BASELINE_INITS:
        run = load_run(baseline, device=device)
        return EncoderSource(
            _unique_key("baseline", taken),
            f"baseline ({Path(baseline).name})",
            run.model,
            run.config,
            run.spec,
            Path(run.run_dir),
            _split_val(run.run_dir),
        )
    config = dict(reference.config)
    if baseline == "random":
        config["fundus_init"] = config["oct_init"] = "random"
    elif baseline in ("imagenet", "kinetics"):
        # torchvision's supervised weights for each tower: ImageNet (2D fundus), Kinetics-400 (3D OCT).
        config["fundus_init"] = config["oct_init"] = "pretrained"
    torch.manual_seed(int(config.get("seed", 0)))  # the same seed the run started from
    model = build_model(config).to(device).eval()
    init = config["fundus_init"] if config["fundus_init"] == config["oct_init"] else (
        f"{config['fundus_init']}/{config['oct_init']}"
    )
    return EncoderSource(
        _unique_key("baseline", taken),
        f"baseline ({init} init)",
        model,
        config,
        reference.spec,
        None,
        _split_val(reference.run_dir),
    )
