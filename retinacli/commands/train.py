"""`retina train`: contrastive pre-training of the fundus and OCT encoders (needs retina[train])."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import typer

from retinacli.commands import options
from retinacli.errors import EXIT_USAGE, RetinaError, UsageError

DEFAULT_MANIFEST = Path("manifest.csv")
DEFAULT_CONFIG = Path("train.toml")  # written by `retina demo`; a user may keep their settings there too
START_HINT = (
    "No ./manifest.csv here. To start, make a synthetic cohort:  retina synth ./cohort\n"
    "then train on it:  retina train --manifest ./cohort/manifest.csv"
)
# Shown in --help; the numbers come from training/config.py PRESET_VALUES (kept in step by a test).
PRESET_HELP = (
    "Preset: tiny (tests, seconds), demo (CPU demo, <= 3 min on 2 cores), paper (GPU, published setting). "
    "Options left unset take the preset's value."
)


def _preset_default(key: str) -> str:
    from training.config import PRESET_VALUES, TrainConfig

    values = [f"{name} {PRESET_VALUES[name].get(key, getattr(TrainConfig, key))}" for name in PRESET_VALUES]
    return "default from preset: " + ", ".join(values)


def _help(text: str, key: str) -> str:
    # Preset values are static numbers in training/config.py; importing it needs torch only through
    # training/__init__ (which does not import torch), so --help stays light.
    try:
        return f"{text} ({_preset_default(key)})."
    except ImportError:
        return f"{text} (default from preset)."


def _workers(value: str | None) -> int | str | None:
    """--loader-workers: auto or a whole number (validated with the rest of the config)."""
    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"--loader-workers {value}: use auto or a whole number >= 0") from None


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        manifest: Path = options.manifest_option(
            "Cohort manifest CSV (from 'retina synth' or 'retina pair'). Default: ./manifest.csv if present."
        ),
        manifest_m: Path = options.hidden_alias("-m"),
        out: Path = typer.Option(
            None, "--out", "-o", help="Run folder to create. Default: ./runs/<objective>-<YYYYmmdd-HHMMSS>."
        ),
        objective: str = typer.Option(None, "--objective", help="clip, cloob or siglip. Default: clip."),
        preset: str = typer.Option(None, "--preset", help=PRESET_HELP + " Default: demo."),
        config_file: Path = typer.Option(
            None,
            "--config",
            help="JSON or TOML file of config keys (see docs/training.md); flags override it. "
            "Default: ./train.toml if present.",
        ),
        epochs: int = typer.Option(None, "--epochs", help=_help("Training epochs", "epochs")),
        batch_size: int = typer.Option(
            None, "--batch-size", help=_help("Pairs per step (global, over all processes)", "batch_size")
        ),
        lr: float = typer.Option(None, "--lr", help=_help("Peak AdamW learning rate", "lr")),
        oct_slices: int = typer.Option(
            None, "--oct-slices", help=_help("B-scans per OCT volume", "oct_slices")
        ),
        oct_size: int = typer.Option(None, "--oct-size", help=_help("OCT B-scan height = width", "oct_size")),
        fundus_size: int = typer.Option(
            None, "--fundus-size", help=_help("Fundus side length", "fundus_size")
        ),
        fundus_channels: int = typer.Option(
            None, "--fundus-channels", help="3 for colour photos, 1 for NIR/SLO (default 3)."
        ),
        init: str = typer.Option(
            None,
            "--init",
            help="random, or pretrained (ImageNet fundus + Kinetics-400 OCT weights from the torch hub "
            "cache). Default: random (paper preset: pretrained).",
        ),
        fundus_init: str = typer.Option(
            None, "--fundus-init", help="Fundus encoder init: random, imagenet or a state_dict file."
        ),
        oct_init: str = typer.Option(
            None, "--oct-init", help="OCT encoder init: random, kinetics or a state_dict file."
        ),
        embed_dim: int = typer.Option(
            None, "--embed-dim", help=_help("Shared embedding dimension", "embed_dim")
        ),
        init_from: Path = typer.Option(
            None, "--init-from", help="Start both encoders from another run (its last checkpoint) or a "
            "checkpoint file, e.g. CLOOB from a CLIP run; same architecture and embed_dim (default: none)."
        ),
        seed: int = typer.Option(
            None, "--seed", help="Seed for init, split, data order and augmentation (default 0)."
        ),
        resume: bool = typer.Option(
            False, "--resume", help="Continue the run in --out from its last checkpoint (its config is kept)."
        ),
        device: str = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N (default auto)."),
        threads: int = typer.Option(
            None, "--threads", help="CPU threads for torch; 0 = all cores (default 0)."
        ),
        precision: str = typer.Option(
            None,
            "--precision",
            help="auto, fp32 or bf16 autocast (default auto: bf16 on GPUs of compute capability 8.0 and up, "
            "else fp32).",
        ),
        activation_checkpointing: bool = typer.Option(
            None,
            "--activation-checkpointing/--no-activation-checkpointing",
            help="Recompute the OCT stem and first stage in the backward pass instead of keeping their "
            "activations: less GPU memory for large volumes, same gradients, slower steps (default off).",
        ),
        cache_dir: Path = typer.Option(
            None,
            "--cache-dir",
            help="Folder of the preprocessed training cache (built once per cohort manifest and "
            "preprocessing, then reused; docs/training.md). Default: $RETINA_HOME/cache/training.",
        ),
        loader_workers: str = typer.Option(
            None,
            "--loader-workers",
            help="Data-loading worker processes per training process: a number (0 = load in the "
            "training process) or auto (0 with up to 2 cores per process, else cores/4, at most 4). "
            "Default: auto.",
        ),
    ) -> None:
        """Pre-train the fundus + OCT encoders contrastively (CLIP / CLOOB / SigLIP) into a run folder."""
        from retinacli.commands.common import require_training, training_progress
        from retinacli.console import err, safe

        manifest = options.resolve_manifest(manifest, manifest_m)
        if config_file is None and not resume and DEFAULT_CONFIG.is_file():
            config_file = DEFAULT_CONFIG
            err.print(f"using settings from ./{DEFAULT_CONFIG}", highlight=False)
        if manifest is None and config_file is None and not resume:
            if DEFAULT_MANIFEST.is_file():
                manifest = DEFAULT_MANIFEST
            else:
                err.print(START_HINT, markup=False, highlight=False)
                raise typer.Exit(EXIT_USAGE)
        require_training("retina train", "torch", "torchvision")
        from training.config import load_config_file, resolve_config
        from training.loop import RunExistsError
        from training.loop import train as run_training

        if init is not None and init not in ("random", "pretrained"):
            raise UsageError(f"--init {init}: use random or pretrained (files: --fundus-init, --oct-init)")
        overrides = {
            "objective": objective,
            "preset": preset,
            "manifest": str(manifest) if manifest is not None else None,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "oct_slices": oct_slices,
            "oct_size": oct_size,
            "fundus_size": fundus_size,
            "fundus_channels": fundus_channels,
            "fundus_init": fundus_init or ("imagenet" if init == "pretrained" else init),
            "oct_init": oct_init or ("kinetics" if init == "pretrained" else init),
            "embed_dim": embed_dim,
            "init_from": str(init_from) if init_from is not None else None,
            "seed": seed,
            "device": device,
            "threads": threads,
            "precision": precision,
            "activation_checkpointing": activation_checkpointing,
            "cache_dir": str(cache_dir) if cache_dir is not None else None,
            "loader_workers": _workers(loader_workers),
        }
        try:
            file_values = load_config_file(config_file) if config_file is not None else {}
        except (OSError, ValueError) as exc:
            raise UsageError(f"{config_file}: cannot read config ({exc})") from None
        if manifest is None and "manifest" not in file_values and not resume and DEFAULT_MANIFEST.is_file():
            manifest = DEFAULT_MANIFEST
            overrides["manifest"] = str(manifest)
        try:
            config = resolve_config("demo", file_values, overrides)
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from None
        if resume and out is None:
            raise UsageError("--resume needs --out RUN_DIR (the run to continue)")
        if not resume and config.manifest is None:
            raise UsageError("no manifest: pass --manifest or set 'manifest' in the --config file")
        if out is None:
            out = Path("runs") / f"{config.objective}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"

        if not resume:
            shown = {k: v for k, v in config.to_dict().items() if k not in ("manifest_sha256", "extra")}
            err.print(f"retina train -> {safe(out)}", highlight=False)
            err.print("  " + ", ".join(f"{k}={v}" for k, v in shown.items()), markup=False, highlight=False)

        def echo(message: str) -> None:
            err.print(message, markup=False, highlight=False)

        try:
            run_training(config, out, resume=resume, echo=echo, progress_factory=training_progress(err))
        except RunExistsError as exc:
            raise UsageError(str(exc)) from None
        except RetinaError:
            raise  # with its own exit code (a bad cohort manifest or missing weights: 2)
        except FileNotFoundError as exc:  # the manifest, or the run to resume, is not there
            raise UsageError(str(exc)) from None
        except ValueError as exc:
            raise RetinaError(str(exc)) from None
        except KeyboardInterrupt:
            if resume or (out / "checkpoints" / "last.pt").is_file():
                err.print(f"interrupted; continue with: retina train --out {safe(out)} --resume",
                          highlight=False)
            else:
                err.print("interrupted before the first checkpoint; nothing was kept", highlight=False)
            raise typer.Exit(130) from None
        err.print(f"run saved to {safe(out)} (checkpoints/last.pt, metrics.jsonl)", highlight=False)
