"""Batch augmentation of preprocessed arrays (torch, per-sample parameters from a seeded generator).

Works in the spec's normalised space; intensity changes are applied in the unit range the spec
normalises from, so they mean the same for every spec. Training calls these on one sample at a time
with a generator seeded by (seed, epoch, sample) (training.data.BatchReader), so a pair's augmentation
does not depend on its batch, the number of processes or the loader workers.

Fundus (2D): small rotation (±10°), isotropic scale (0.9–1.1), shift (±5 %), brightness (±0.1)
and contrast (×0.8–1.2) jitter. No flips: left/right laterality is anatomy (optic disc side), and
a flipped right eye looks like a left eye.

OCT (1, S, H, W): small vertical (axial) shift of all B-scans together (±6 % of the height; retinal
depth in the scan window varies between acquisitions), intensity gain/offset jitter, and
multiplicative speckle-like noise. No lateral flips or slice reordering (same anatomy reason).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


def _uniform(gen: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def augment_fundus(x: torch.Tensor, spec: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
    """(B, C, s, s) normalised -> augmented, same shape."""
    b = x.shape[0]
    angle = _uniform(gen, b, -10, 10) * math.pi / 180
    scale = _uniform(gen, b, 0.9, 1.1)
    shift = _uniform(gen, 2 * b, -0.05, 0.05).view(b, 2)
    brightness = _uniform(gen, b, -0.1, 0.1).view(b, 1, 1, 1)
    contrast = _uniform(gen, b, 0.8, 1.2).view(b, 1, 1, 1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    rows = [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)]
    theta = torch.stack(rows, 1)
    mean = torch.tensor(spec["fundus"]["mean"], dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(spec["fundus"]["std"], dtype=x.dtype).view(1, -1, 1, 1)
    unit = x * std + mean  # back to [0, 1]; the border outside the field of view stays black (0)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    unit = F.grid_sample(unit, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    centre = unit.mean(dim=(1, 2, 3), keepdim=True)
    unit = ((unit - centre) * contrast + centre + brightness).clamp(0, 1)
    return (unit - mean) / std


def augment_oct(x: torch.Tensor, spec: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
    """(B, 1, S, H, W) normalised -> augmented, same shape."""
    b, _, _, h, _ = x.shape
    o = spec["oct"]
    unit = x * o["std"] + o["mean"]
    max_shift = max(1, round(0.06 * h))
    shifts = torch.randint(-max_shift, max_shift + 1, (b,), generator=gen)
    shifted = torch.zeros_like(unit)
    for i, s in enumerate(shifts.tolist()):  # zero-fill (vitreous/background is dark), no wrap-around
        if s >= 0:
            shifted[i, :, :, s:] = unit[i, :, :, : h - s]
        else:
            shifted[i, :, :, :s] = unit[i, :, :, -s:]
    gain = _uniform(gen, b, 0.85, 1.15).view(b, 1, 1, 1, 1)
    offset = _uniform(gen, b, -0.05, 0.05).view(b, 1, 1, 1, 1)
    speckle = 1 + 0.1 * torch.randn(shifted.shape, generator=gen, dtype=x.dtype)
    unit = (shifted * gain * speckle + offset).clamp(0, 1)
    return (unit - o["mean"]) / o["std"]
