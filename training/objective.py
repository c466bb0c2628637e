"""Apply the configured objective to a model's (already gathered) features."""

from __future__ import annotations

import torch

from training.losses import clip_loss, cloob_loss, siglip_loss


def compute_loss(model, fundus: torch.Tensor, oct: torch.Tensor) -> torch.Tensor:
    """The loss of `model.objective` on paired, L2-normalised features, with the model's temperatures."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    if model.objective == "clip":
        return clip_loss(fundus, oct, model.logit_scale.exp())
    if model.objective == "siglip":
        return siglip_loss(fundus, oct, model.logit_scale.exp(), model.logit_bias)
    if model.objective == "cloob":
        return cloob_loss(fundus, oct, model.log_inv_tau.exp(), model.scale_hopfield)
    raise ValueError(f"unknown objective {model.objective!r}")
