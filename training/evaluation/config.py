"""What one `retina evaluate` run does: sources, modes, tasks, folds, seeds and sizes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from retinacli.tasks import task_names

TASKS = task_names()  # every task of the registry (retinacli.tasks) by default
MODES = ("probe", "finetune")
MODALITIES = ("oct", "fundus")
BASELINE_INITS = ("random", "imagenet", "kinetics")


@dataclass
class EvalConfig:
    manifest: Path
    runs: list[Path]
    out_dir: Path
    # None: the first run's own init; "random" / "imagenet" / "kinetics"; "none"; or a run dir
    baseline: str | None = None
    folds: int = 5
    modes: tuple[str, ...] = MODES
    tasks: tuple[str, ...] = TASKS
    modalities: tuple[str, ...] = MODALITIES
    seed: int = 0
    finetune_epochs: int = 2
    finetune_modalities: tuple[str, ...] = ("oct",)  # the paper's downstream encoder; fundus on request
    finetune_scope: str = "auto"  # auto | full | top (see training/evaluation/finetune.py)
    finetune_batch_size: int = 8
    finetune_lr: float = 1e-2  # the linear layer (SGD, momentum 0.9)
    finetune_encoder_lr: float = 1e-4  # the encoder: 100x lower, so few epochs adapt, not overwrite
    retrieval_k: tuple[int, ...] = (1, 5, 10)
    fit_final: bool = False
    figures: bool = True
    device: str = "cpu"
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """The settings that determine the numbers (input paths as given; no output path, no wall times)."""
        d = asdict(self)
        d["manifest"] = str(self.manifest)
        d["runs"] = [str(r) for r in self.runs]
        for key in ("out_dir", "figures", "fit_final"):  # outputs, not inputs: same numbers either way
            d.pop(key)
        for key in ("modes", "tasks", "modalities", "finetune_modalities", "retrieval_k"):
            d[key] = list(d[key])
        d.pop("extra")
        return d
