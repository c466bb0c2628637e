"""The two-tower model and the run-dir loader (contract 4).

Run dir layout (``retina train --out RUN``)::

    RUN/config.json          resolved config (objective, archs, embed_dim, inits, preset, seed,
                             manifest path + sha256)
    RUN/preprocess.json      the preprocessing spec (retinacli.preprocess) the model was trained on
    RUN/split.json           {"seed", "train": [patient ids], "val": [patient ids]}
    RUN/metrics.jsonl        one JSON object per epoch
    RUN/checkpoints/last.pt  and epoch_NNN.pt: dicts loadable with torch.load(weights_only=True);
                             "model" = state_dict, plus optimiser/scheduler/RNG state for --resume
    RUN/train.log            the messages printed during training

Temperature parameters live in the model so they are checkpointed and synchronised with it:
``logit_scale`` (CLIP, SigLIP) and ``log_inv_tau`` (CLOOB) are stored as natural logs.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.config import TrainConfig, config_from_dict
from training.encoders import Encoder

CONFIG_FILE = "config.json"
SPEC_FILE = "preprocess.json"
SPLIT_FILE = "split.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"

INV_TAU_RANGE = (1.0, 100.0)


def _as_config(config: TrainConfig | dict[str, Any]) -> TrainConfig:
    return config if isinstance(config, TrainConfig) else config_from_dict(config)


class RetinaModel(nn.Module):
    """Fundus encoder + OCT encoder into one L2-normalised embedding space, plus the loss temperatures."""

    def __init__(self, config: TrainConfig | dict[str, Any]):
        super().__init__()
        config = _as_config(config)
        self.objective = config.objective
        self.embed_dim = int(config.embed_dim)
        self.fundus_encoder = Encoder(
            config.fundus_arch, int(config.fundus_channels), self.embed_dim, config.fundus_init
        )
        self.oct_encoder = Encoder(
            config.oct_arch, 1, self.embed_dim, config.oct_init, bool(config.activation_checkpointing)
        )
        self.logit_scale_max = float(config.logit_scale_max)
        if config.objective in ("clip", "siglip"):
            self.logit_scale = nn.Parameter(torch.tensor(math.log(config.logit_scale_init)))
        if config.objective == "siglip":
            self.logit_bias = nn.Parameter(torch.tensor(float(config.logit_bias_init)))
        if config.objective == "cloob":
            log_inv_tau = torch.tensor(math.log(config.inv_tau))
            if config.learn_inv_tau:
                self.log_inv_tau = nn.Parameter(log_inv_tau)
            else:
                self.register_buffer("log_inv_tau", log_inv_tau)
            self.scale_hopfield = float(config.scale_hopfield)

    def encode_fundus(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D), L2-normalised."""
        return self.fundus_encoder(x)

    def encode_oct(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, H, W) -> (B, D), L2-normalised."""
        return self.oct_encoder(x)

    def forward(self, fundus: torch.Tensor, oct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_fundus(fundus), self.encode_oct(oct)

    def encode(
        self,
        modality: str,
        x: np.ndarray | torch.Tensor,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        bf16: bool = False,
        channels_last: bool = False,
    ) -> np.ndarray:
        """Embeddings (N, D) float32 on the CPU of preprocessed inputs, batch by batch (open_clip's
        ``encode_image`` pattern, for arrays of any length): see :func:`batched_inference`.

        Rows are L2-normalised by the encoders (contract 4); empty input gives shape (0, D).
        """
        if modality not in ("fundus", "oct"):
            raise ValueError(f"unknown modality {modality!r} (use fundus or oct)")
        forward = self.encode_oct if modality == "oct" else self.encode_fundus
        return batched_inference(self, x, batch_size, device, forward, (self.embed_dim,), bf16, channels_last)

    @torch.no_grad()
    def clamp_temperatures(self) -> None:
        """Keep exp(logit_scale) <= logit_scale_max and 1/tau within [1, 100] (called after each step)."""
        if hasattr(self, "logit_scale"):
            self.logit_scale.clamp_(max=math.log(self.logit_scale_max))
        if isinstance(getattr(self, "log_inv_tau", None), nn.Parameter):
            self.log_inv_tau.clamp_(math.log(INV_TAU_RANGE[0]), math.log(INV_TAU_RANGE[1]))

    def temperatures(self) -> dict[str, float]:
        """Current temperature values (for logs)."""
        out: dict[str, float] = {}
        if hasattr(self, "logit_scale"):
            out["logit_scale"] = float(self.logit_scale.detach().exp())
        if hasattr(self, "logit_bias"):
            out["logit_bias"] = float(self.logit_bias.detach())
        if hasattr(self, "log_inv_tau"):
            out["inv_tau"] = float(self.log_inv_tau.detach().exp())
        return out


def batched_inference(
    module: nn.Module,
    x: np.ndarray | torch.Tensor,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    row_shape: tuple[int, ...] = (),
    bf16: bool = False,
    channels_last: bool = False,
) -> np.ndarray:
    """``forward(batch)`` (default ``module(batch)``) over the rows of ``x``: float32 numpy on the CPU.

    The one batched inference loop. ``module`` runs in eval mode under ``torch.inference_mode``;
    the train/eval mode of each of its submodules is restored afterwards. ``device``: where batches
    run, default the module's own. Inputs (numpy or torch) are cast to the module's float dtype.
    ``bf16``: bfloat16 autocast; ``channels_last``: channels-last 3-d memory for 5-d batches. Empty
    input gives shape ``(0, *row_shape)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    param = next(module.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    if device is None:
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    forward = forward or module
    # per submodule: a container's flag need not match its children's (split_encoder's Sequential)
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    out = []
    try:
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                batch = x[start : start + batch_size]
                if not isinstance(batch, torch.Tensor):
                    batch = torch.from_numpy(np.ascontiguousarray(batch))
                batch = batch.to(device=device, dtype=dtype)
                if channels_last and batch.ndim == 5:
                    batch = batch.contiguous(memory_format=torch.channels_last_3d)
                amp = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16
                       else contextlib.nullcontext())
                with amp:
                    out.append(forward(batch).float().cpu().numpy())
    finally:
        for m, training in modes:
            m.training = training
    return np.concatenate(out) if out else np.zeros((0, *row_shape), np.float32)


def saved_activation_bytes(
    encoder: nn.Module, x: torch.Tensor, bf16: bool = False
) -> int:
    """Bytes autograd keeps for the backward pass of one training-mode forward of `encoder` on `x`.

    Counted with ``torch.autograd.graph.saved_tensors_hooks``, each storage once; the encoder's
    parameters and the input batch (held anyway) are not counted. Inside an activation-checkpointed
    segment the checkpoint's own hooks apply, so what it drops is not counted, as on the device.
    """
    skip = {p.untyped_storage().data_ptr() for p in encoder.parameters()} | {x.untyped_storage().data_ptr()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    amp = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    modes = [(m, m.training) for m in encoder.modules()]
    encoder.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), amp:
            out = encoder(x)
        del out  # frees the graph and with it the saved tensors
    finally:
        for m, training in modes:
            m.training = training
    return sum(storages.values())


def build_model(config: TrainConfig | dict[str, Any]) -> RetinaModel:
    """A fresh model for `config` (a TrainConfig or the dict saved in config.json)."""
    return RetinaModel(config)


@dataclass
class LoadedRun:
    model: RetinaModel
    config: dict[str, Any]
    spec: dict[str, Any]
    run_dir: Path


def load_run(run_dir: str | Path, checkpoint: str = LAST_CHECKPOINT, device: str = "cpu") -> LoadedRun:
    """Load a trained run: model (eval mode, on `device`) with the weights of `checkpoint`."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a training run (no {CONFIG_FILE})")
    config = json.loads(config_path.read_text())
    spec = json.loads((run_dir / SPEC_FILE).read_text())
    ckpt_path = Path(checkpoint) if Path(checkpoint).is_absolute() else run_dir / CHECKPOINT_DIR / checkpoint
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"{ckpt_path}: checkpoint not found (has the run finished an epoch?)")
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    # The weights come from the checkpoint: don't look for pretrained files again.
    model = build_model({**config, "fundus_init": "random", "oct_init": "random"})
    model.load_state_dict(state["model"])
    model.to(device).eval()
    return LoadedRun(model=model, config=config, spec=spec, run_dir=run_dir)
