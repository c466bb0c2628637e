"""Checkpoints: plain dicts of tensors and numbers, loadable with torch.load(weights_only=True)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from retinacli.fsutil import atomic_path
from training.encoders import read_state_dict
from training.model import CHECKPOINT_DIR, LAST_CHECKPOINT


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def _atomic_save(obj: dict[str, Any], target: Path) -> None:
    with atomic_path(target) as tmp:  # a crash never leaves a half-written checkpoint
        torch.save(obj, tmp)


def save_checkpoint(run_dir: Path, epoch: int, state: dict[str, Any], keep_epochs: int = 2) -> Path:
    """last.pt = the full training state (for --resume); epoch_NNN.pt = the weights of that epoch.

    Only the newest `keep_epochs` epoch files are kept (0 keeps all): r3d_18 + resnet18 weigh
    ~180 MB per file, the optimiser state twice that.
    """
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"epoch_{epoch:03d}.pt"
    _atomic_save({k: v for k, v in state.items() if k not in ("optimizer", "scheduler", "torch_rng")}, path)
    _atomic_save(state, folder / LAST_CHECKPOINT)
    if keep_epochs > 0:
        for old in sorted(folder.glob("epoch_*.pt"))[:-keep_epochs]:
            old.unlink()
    return path


def load_checkpoint(run_dir: Path, name: str = LAST_CHECKPOINT) -> dict[str, Any]:
    path = checkpoint_dir(run_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    return torch.load(path, map_location="cpu", weights_only=True)


ENCODER_PREFIXES = ("fundus_encoder.", "oct_encoder.")


def init_checkpoint_path(init_from: str | Path) -> Path:
    """The checkpoint file ``init_from`` names: a run folder (its last checkpoint) or a ``.pt`` file."""
    path = Path(init_from).expanduser()
    if path.is_dir():
        path = checkpoint_dir(path) / LAST_CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{init_from}: no checkpoint to start from (a run folder with "
                                f"{CHECKPOINT_DIR}/{LAST_CHECKPOINT}, or a checkpoint file)")
    return path


def load_encoder_weights(model: torch.nn.Module, init_from: str | Path) -> int:
    """Copy both encoders (backbones + projections) of another run into ``model``; returns the tensor
    count. The objective's temperatures are not copied: a CLOOB run started from a CLIP run keeps its
    own inverse temperature. A different architecture or embedding size is a one-line ValueError."""
    path = init_checkpoint_path(init_from)
    encoders = {k: v for k, v in read_state_dict(path).items() if k.startswith(ENCODER_PREFIXES)}
    own = {k: v for k, v in model.state_dict().items() if k.startswith(ENCODER_PREFIXES)}
    mismatched = [k for k in own if k not in encoders or encoders[k].shape != own[k].shape]
    if mismatched or len(encoders) != len(own):
        first = (mismatched or sorted(set(encoders) - set(own)))[0]
        raise ValueError(f"{path}: its encoders do not match this run's (architecture, channels or "
                         f"embed_dim differ; first mismatch: {first})")
    model.load_state_dict(encoders, strict=False)
    return len(encoders)
