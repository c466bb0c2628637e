"""Helpers more than one command uses (instead of commands importing each other's private functions)."""

from __future__ import annotations

from pathlib import Path


def pass_undecodable_names_through() -> None:
    """File names that are not valid UTF-8 (Python holds them as surrogate escapes) are written back
    as their original bytes, as `ls` shows them, instead of crashing a strict UTF-8 stdout."""
    import sys

    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None and (sys.stdout.encoding or "").lower().replace("-", "") == "utf8":
        reconfigure(errors="surrogateescape")


def default_model_marker() -> tuple[str | None, str | None]:
    """(path of the package used when none is named, why) without failing when there is none."""
    from retinacli.errors import ModelPackageError
    from retinacli.package import resolve_package

    try:
        return str(resolve_package(None).resolve()), None
    except ModelPackageError as exc:
        return None, str(exc)


def require_training(feature: str, *modules: str) -> None:
    """Raise the one "extra missing" error when the `train` extra (torch, ...) is not installed."""
    from retinacli.errors import require

    require(feature, "train", *(modules or ("torch",)))


def require_paths(paths, what: str = "PATH") -> None:
    """Every path argument exists, or a usage error (exit 2) naming the first missing one, before any
    work starts (a missing argument is a typo to fix, not a bad file to report and skip)."""
    from retinacli.console import safe
    from retinacli.errors import UsageError

    for path in paths:
        if not Path(path).exists() and not Path(path).is_symlink():
            raise UsageError(f"{safe(path)}: no such file or folder ({what})")


def require_run_dir(run_dir: Path) -> None:
    """A training run folder has config.json; anything else is a usage error."""
    from retinacli.errors import UsageError

    if not (run_dir / "config.json").is_file():
        raise UsageError(f"{run_dir}: not a training run (no config.json)")


def training_progress(console):
    """A factory of Rich progress bars for training loops (epoch, step count, loss, times)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    def make():
        return Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        )

    return make
