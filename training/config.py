"""Training configuration: presets, overrides, config files, and the resolved config in config.json.

Precedence (lowest to highest): preset -> config file (JSON or TOML) -> command-line overrides.
The resolved config is a flat dict so every part of the project reads it the same way.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retinacli.preprocess import make_spec

OBJECTIVES = ("clip", "cloob", "siglip")
PRESETS = ("tiny", "demo", "paper")


@dataclass
class TrainConfig:
    preset: str = "demo"
    objective: str = "clip"
    seed: int = 0
    # data
    manifest: str | None = None
    manifest_sha256: str | None = None
    val_fraction: float = 0.25  # share of patients held out for validation (at least one patient)
    oct_slices: int = 16
    oct_size: int = 112
    fundus_size: int = 112
    fundus_channels: int = 3  # 1 for NIR/SLO fundus
    augment: bool = True
    # random: shuffled pairs; eyes_together: the visits of an eye share a batch (hard negatives)
    batch_composition: str = "random"
    # model
    fundus_arch: str = "resnet18"
    oct_arch: str = "r3d_18"
    fundus_init: str = "random"  # random | imagenet | pretrained | path to a state_dict file
    oct_init: str = "random"  # random | kinetics | pretrained | path to a state_dict file
    # a run folder (its last checkpoint) or checkpoint file whose encoders (backbones + projections) start
    # this run, e.g. CLOOB from a CLIP run (a CLIP warm-up); temperatures start fresh (docs/training.md)
    init_from: str | None = None
    embed_dim: int = 128
    # objective parameters
    logit_scale_init: float = 1 / 0.07  # CLIP/SigLIP: stored as log(scale), learnable
    logit_scale_max: float = 100.0  # clamp after every optimiser step
    logit_bias_init: float = -10.0  # SigLIP only
    inv_tau: float = 14.3  # CLOOB 1/tau
    learn_inv_tau: bool = False  # CLOOB: learn 1/tau (stored as log), clamped to [1, 100]
    scale_hopfield: float = 14.3  # CLOOB Hopfield beta (fixed)
    # optimisation
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 0.1  # linear warm-up over this share of all steps, then cosine to 0
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    keep_epoch_checkpoints: int = 2  # epoch_NNN.pt files kept (newest); 0 = all; last.pt always
    # runtime
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | fp32 | bf16 (autocast); auto = bf16 on CUDA capability >= 8.0, else fp32
    channels_last: str = "auto"  # auto | on | off; auto = on for the 3D encoder on CPU
    threads: int = 0  # torch intra-op threads on CPU; 0 = all cores of this process
    cache_dir: str | None = None  # preprocessed training cache; None = $RETINA_HOME/cache/training
    loader_workers: int | str = "auto"  # DataLoader worker processes per rank; auto: see data.loader_workers
    # recompute the OCT stem + layer1 in the backward pass instead of keeping their activations (half the
    # activation memory at the paper preset; same gradients, ~19% more OCT FLOPs; docs/training.md)
    activation_checkpointing: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def preprocess_spec(self) -> dict[str, Any]:
        return make_spec(
            oct_slices=self.oct_slices,
            oct_size=self.oct_size,
            fundus_size=self.fundus_size,
            fundus_channels=self.fundus_channels,
        )


# Why these sizes:
# - tiny: for tests; finishes in seconds on a 2-core CPU.
# - demo: learns in about a minute per objective on 2 CPU cores on the `retina demo` cohort (240 patients
#   x 2 visits); no augmentation: each pair is seen only a few times, and intensity jitter hides the
#   pigment/choroid signal the networks pick up first (docs/training.md, "Levers tried").
# - paper: the published setting on GPUs (see docs/training.md for the reasoning and assumptions).
PRESET_VALUES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        oct_slices=4, oct_size=32, fundus_size=32, embed_dim=32, epochs=2, batch_size=4, lr=1e-3,
        warmup_fraction=0.0, augment=True,
    ),
    "demo": dict(
        oct_slices=4, oct_size=32, fundus_size=48, embed_dim=128, epochs=3, batch_size=16, lr=3e-4,
        weight_decay=0.05, warmup_fraction=0.1, augment=False,
    ),
    "paper": dict(
        oct_slices=20, oct_size=224, fundus_size=224, embed_dim=128, epochs=100, batch_size=64, lr=1e-4,
        weight_decay=0.1, warmup_fraction=0.05, fundus_init="imagenet", oct_init="kinetics",
    ),
}


# Per-objective changes to a preset. CLOOB (InfoLOOB over Hopfield-retrieved embeddings) moves off
# its starting plateau later than CLIP from random initialisation, so on the CPU budget it gets more
# epochs (docs/training.md).
PRESET_OBJECTIVE_VALUES: dict[str, dict[str, dict[str, Any]]] = {
    "demo": {"cloob": dict(epochs=6)},
}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or TOML config file (flat keys of TrainConfig; a [train] table is also accepted)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        data = tomllib.loads(text)
    else:
        data = json.loads(text)
    if isinstance(data.get("train"), dict):
        data = data["train"]
    return data


def resolve_config(
    preset: str = "demo",
    file_values: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """Preset, then file values, then non-None overrides; unknown keys are an error."""
    file_values = dict(file_values or {})
    preset = (overrides or {}).get("preset") or file_values.get("preset") or preset
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    values: dict[str, Any] = {"preset": preset, **PRESET_VALUES[preset]}
    objective = (overrides or {}).get("objective") or file_values.get("objective") or TrainConfig.objective
    values.update(PRESET_OBJECTIVE_VALUES.get(preset, {}).get(objective, {}))
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for source in (file_values, {k: v for k, v in (overrides or {}).items() if v is not None}):
        unknown = sorted(set(source) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        values.update(source)
    config = TrainConfig(**values)
    validate_config(config)
    return config


def validate_config(config: TrainConfig) -> None:
    if config.objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {config.objective!r}; choose from {', '.join(OBJECTIVES)}")
    for name in ("epochs", "batch_size", "embed_dim", "oct_slices", "oct_size", "fundus_size"):
        if int(getattr(config, name)) < 1:
            raise ValueError(f"{name} must be >= 1")
    if config.batch_size < 2:
        raise ValueError("batch_size must be >= 2 (contrastive losses need negatives)")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise ValueError("lr must be a positive number")
    if not 0 < config.val_fraction < 1:
        raise ValueError("val_fraction must be between 0 and 1")
    if config.precision not in ("auto", "fp32", "bf16"):
        raise ValueError("precision must be auto, fp32 or bf16")
    if str(config.channels_last) not in ("auto", "on", "off"):
        raise ValueError("channels_last must be auto, on or off")
    if config.fundus_channels not in (1, 3):
        raise ValueError("fundus_channels must be 1 or 3")
    workers = config.loader_workers
    if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise ValueError("loader_workers must be auto or a whole number >= 0")
    if config.cache_dir is not None and not isinstance(config.cache_dir, str):
        raise ValueError("cache_dir must be a folder path")
    if config.batch_composition not in ("random", "eyes_together"):
        raise ValueError("batch_composition must be random or eyes_together")
    if config.init_from is not None and not isinstance(config.init_from, str):
        raise ValueError("init_from must be a run folder or checkpoint path")
    if not isinstance(config.activation_checkpointing, bool):
        raise ValueError("activation_checkpointing must be true or false")


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from a saved config.json (keys this version does not know go to `extra`)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in data.items() if k in known}
    extra = {k: v for k, v in data.items() if k not in known}
    if extra:
        values["extra"] = {**values.get("extra", {}), **extra}
    return TrainConfig(**values)
