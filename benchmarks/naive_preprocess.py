"""FROZEN copy of retinacli/preprocess.py at commit 563ace9, for the benchmark baseline (issue 16).
Do not edit or optimise it: the naive script and the parity tests (tests/test_preprocess_fast.py)
load it by file path as the reference maths that retinacli/preprocess.py must reproduce.

The one preprocessing implementation (numpy), driven by a small spec dict.

The spec travels in every training run and every exported model package (``retina.json`` ->
``preprocessing``), and both training and inference call the functions below with it, so an
exported model sees exactly the arrays it was trained on. See docs/preprocessing.md.

OCT:    (n_bscans, H, W) any dtype -> float32 (1, slices, height, width)
Fundus: (H, W, C) any dtype, C in {1, 3} -> float32 (channels, size, size)
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from functools import lru_cache
from typing import Any

import numpy as np

SPEC_VERSION = 1

# ImageNet statistics: the fundus encoder may start from ImageNet weights.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

DEFAULT_SPEC: dict[str, Any] = {
    "version": SPEC_VERSION,
    "oct": {
        "slices": 16,  # B-scans sampled from the volume
        "slice_sampling": "uniform",  # nearest B-scan to each of `slices` evenly spaced bin centres
        "height": 112,
        "width": 112,
        "axial_crop": 0.5,  # keep this fraction of the B-scan height around the retina (1.0 = no crop)
        "intensity": "percentile",  # per-volume robust scaling: p_low -> 0, p_high -> 1, clipped
        "percentiles": [1.0, 99.5],
        "mean": 0.25,
        "std": 0.25,
    },
    "fundus": {
        "size": 112,
        "crop": "center_square",  # "center_square" or "none" (squash to size x size)
        "channels": 3,  # gray inputs are repeated to 3; colour inputs become luminance when 1
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    },
}

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def make_spec(
    oct_slices: int | None = None,
    oct_size: int | tuple[int, int] | None = None,
    fundus_size: int | None = None,
    fundus_channels: int | None = None,
) -> dict[str, Any]:
    """Return a copy of the default spec with the common size knobs changed."""
    spec = copy.deepcopy(DEFAULT_SPEC)
    if oct_slices is not None:
        spec["oct"]["slices"] = int(oct_slices)
    if oct_size is not None:
        h, w = (oct_size, oct_size) if isinstance(oct_size, int) else oct_size
        spec["oct"]["height"], spec["oct"]["width"] = int(h), int(w)
    if fundus_size is not None:
        spec["fundus"]["size"] = int(fundus_size)
    if fundus_channels is not None and int(fundus_channels) != spec["fundus"]["channels"]:
        spec["fundus"]["channels"] = int(fundus_channels)
        if int(fundus_channels) == 1:  # gray: the channel-average of the ImageNet statistics
            spec["fundus"]["mean"] = [round(sum(IMAGENET_MEAN) / 3, 4)]
            spec["fundus"]["std"] = [round(sum(IMAGENET_STD) / 3, 4)]
        else:
            spec["fundus"]["mean"], spec["fundus"]["std"] = list(IMAGENET_MEAN), list(IMAGENET_STD)
    validate_spec(spec)
    return spec


# Upper bounds a spec may ask for: far above any trained model, low enough that a typo (or a
# hand-edited descriptor) cannot make preprocessing allocate gigabytes per item.
MAX_SIDE = 4096
MAX_SLICES = 1024


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a size


def _is_finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def spec_errors(spec: Any) -> list[str]:
    """Every problem of a preprocessing spec, one line each naming the field (``oct.std: ...``);
    empty when this code can apply it. Sizes must be ints (not bools or floats) within caps, every
    number finite, stds > 0, percentiles ordered in [0, 100]."""
    from retinacli.jsonutil import short_repr

    if not isinstance(spec, dict):
        return [f"(spec): must be an object, got {short_repr(spec)}"]
    errors: list[str] = []
    if spec.get("version") != SPEC_VERSION:
        return [f"version: preprocessing spec version {short_repr(spec.get('version'))} is not supported "
                f"(want {SPEC_VERSION})"]
    o, f = spec.get("oct"), spec.get("fundus")
    for name, part in (("oct", o), ("fundus", f)):
        if not isinstance(part, dict):
            errors.append(f"{name}: preprocessing spec is missing '{name}' (or it is not an object)")
    if errors:
        return errors
    missing = [f"oct.{k}" for k in ("slices", "height", "width", "slice_sampling", "intensity", "percentiles",
                                    "mean", "std") if k not in o]
    missing += [f"fundus.{k}" for k in ("size", "crop", "channels", "mean", "std") if k not in f]
    if missing:
        return [f"{m}: preprocessing spec is missing '{m.split('.')[-1]}'" for m in missing]

    def size(where: str, value: Any, cap: int) -> None:
        if not _is_int(value) or not 1 <= value <= cap:
            errors.append(f"{where}: must be an integer in [1, {cap}], got {short_repr(value)}")

    for key in ("height", "width"):
        size(f"oct.{key}", o[key], MAX_SIDE)
    size("oct.slices", o["slices"], MAX_SLICES)
    crop = o.get("axial_crop", 1.0)
    if not _is_finite(crop) or not 0 < crop <= 1:
        errors.append(f"oct.axial_crop: must be a number in (0, 1], got {short_repr(crop)}")
    if o["slice_sampling"] != "uniform":
        errors.append(f"oct.slice_sampling: unknown oct.slice_sampling {short_repr(o['slice_sampling'])}")
    if o["intensity"] != "percentile":
        errors.append(f"oct.intensity: unknown oct.intensity {short_repr(o['intensity'])}")
    pct = o["percentiles"]
    if not (isinstance(pct, list) and len(pct) == 2 and all(_is_finite(p) for p in pct)
            and 0 <= pct[0] < pct[1] <= 100):
        errors.append(f"oct.percentiles: must be [low, high] with 0 <= low < high <= 100 (oct.percentiles), "
                      f"got {short_repr(pct)}")
    if not _is_finite(o["mean"]):
        errors.append(f"oct.mean: must be a finite number, got {short_repr(o['mean'])}")
    if not _is_finite(o["std"]) or o["std"] <= 0:
        errors.append(f"oct.std: must be a finite number > 0, got {short_repr(o['std'])}")
    size("fundus.size", f["size"], MAX_SIDE)
    if f["crop"] not in ("center_square", "none"):
        errors.append(f"fundus.crop: unknown fundus.crop {short_repr(f['crop'])}")
    channels = f["channels"]
    if not _is_int(channels) or channels not in (1, 3):
        errors.append(f"fundus.channels: fundus.channels must be 1 or 3, got {short_repr(channels)}")
        return errors
    for key in ("mean", "std"):
        values = f[key]
        if not isinstance(values, list) or len(values) != channels:
            errors.append(f"fundus.{key}: fundus.mean and fundus.std need one value per channel "
                          f"({channels}), got {short_repr(values)}")
            continue
        for i, v in enumerate(values):
            if not _is_finite(v) or (key == "std" and v <= 0):
                rule = "a finite number > 0" if key == "std" else "a finite number"
                errors.append(f"fundus.{key}[{i}]: must be {rule}, got {short_repr(v)}")
    return errors


def validate_spec(spec: dict[str, Any]) -> None:
    """Raise ValueError with a readable message (the first of :func:`spec_errors`) if the spec is
    not one this code can apply."""
    errors = spec_errors(spec)
    if errors:
        raise ValueError(errors[0])


def spec_hash(spec: dict[str, Any]) -> str:
    """Stable short hash of a spec (sorted-key JSON), used to tell models' inputs apart."""
    blob = json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --- resampling -------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Antialiased linear (triangle filter) resampling weights, shape (n_out, n_in).

    Downsampling widens the filter by the scale factor (as PIL's BILINEAR does), so small
    outputs average their input rather than alias it.
    """
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out, dtype=np.float64) + 0.5) * scale
    src = np.arange(n_in, dtype=np.float64) + 0.5
    weights = np.clip(1.0 - np.abs(src[None, :] - centres[:, None]) / support, 0.0, None)
    totals = weights.sum(axis=1, keepdims=True)
    # Upsampling beyond the edge can leave a row with one tiny weight; the row sum fixes it.
    weights /= np.where(totals > 0, totals, 1.0)
    return weights.astype(np.float32)


def resize_2d(stack: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize the last two axes of a float32 array (..., H, W) -> (..., height, width)."""
    rows = _resample_matrix(stack.shape[-2], height)
    cols = _resample_matrix(stack.shape[-1], width)
    return np.einsum("oh,...hw,pw->...op", rows, stack, cols, optimize=True).astype(np.float32, copy=False)


# --- OCT --------------------------------------------------------------------------------------


def slice_indices(n_bscans: int, slices: int) -> np.ndarray:
    """Index of the B-scan nearest each of `slices` evenly spaced bin centres (repeats if too few)."""
    centres = (np.arange(slices) + 0.5) * n_bscans / slices
    return np.minimum(np.floor(centres).astype(np.int64), n_bscans - 1)


def axial_window(volume: np.ndarray, fraction: float) -> slice:
    """Rows to keep: a window of `fraction` x height centred on the retina.

    The retina is the bright band of the mean depth profile: its centre is the intensity-weighted
    mean row of the profile above its median (vitreous and deep choroid are dark). B-scans are mostly
    empty vitreous and choroid, so cropping gives the retina most of the rows after resizing.
    """
    height = volume.shape[1]
    rows = max(1, round(fraction * height))
    if rows >= height:
        return slice(0, height)
    profile = volume.mean(axis=(0, 2), dtype=np.float64)
    weights = np.clip(profile - np.median(profile), 0.0, None)
    centre = float((weights * np.arange(height)).sum() / weights.sum()) if weights.sum() > 0 else height / 2
    top = int(np.clip(round(centre - rows / 2), 0, height - rows))
    return slice(top, top + rows)


def preprocess_oct(pixels: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """(n_bscans, H, W) or a single (H, W) B-scan -> float32 (1, slices, height, width)."""
    o = spec["oct"]
    volume = np.asarray(pixels)
    if volume.ndim == 2:
        volume = volume[None]
    if volume.ndim == 4 and volume.shape[-1] in (1, 3):  # B-scans stored as RGB/RGBA images
        volume = volume[..., :3].mean(axis=-1) if volume.shape[-1] == 3 else volume[..., 0]
    if volume.ndim != 3 or min(volume.shape) < 1:
        raise ValueError(f"OCT volume must be (n_bscans, height, width), got shape {volume.shape}")
    picked = volume[slice_indices(volume.shape[0], int(o["slices"]))].astype(np.float32)
    if not np.isfinite(picked).all():
        raise ValueError("OCT volume contains NaN or infinite values")
    picked = picked[:, axial_window(picked, float(o.get("axial_crop", 1.0)))]
    lo, hi = np.percentile(picked, o["percentiles"])
    scaled = np.clip((picked - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)
    resized = resize_2d(scaled, int(o["height"]), int(o["width"]))
    out = (resized - np.float32(o["mean"])) / np.float32(o["std"])
    return out[None].astype(np.float32, copy=False)


# --- fundus -----------------------------------------------------------------------------------


def _to_unit_range(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if np.issubdtype(image.dtype, np.integer):
        peak = float(image.max()) if image.size else 1.0
        # 16-bit exports often use 10-12 stored bits: scale by the smallest power of two that fits.
        full = float(2 ** max(8, int(np.ceil(np.log2(peak + 1))))) - 1.0 if peak > 0 else 1.0
        return image.astype(np.float32) / full
    out = image.astype(np.float32)
    if not np.isfinite(out).all():
        raise ValueError("fundus image contains NaN or infinite values")
    return np.clip(out, 0.0, 1.0)


def preprocess_fundus(pixels: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """(H, W), (H, W, 1) or (H, W, 3[+alpha]) -> float32 (channels, size, size)."""
    f = spec["fundus"]
    image = np.asarray(pixels)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or min(image.shape[:2]) < 1:
        raise ValueError(f"fundus image must be (height, width[, 1|3]), got shape {image.shape}")
    image = _to_unit_range(image[..., :3])
    if f["crop"] == "center_square":
        h, w = image.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        image = image[top : top + side, left : left + side]
    channels = int(f["channels"])
    if channels == 3 and image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    elif channels == 1 and image.shape[-1] == 3:
        image = (image @ _LUMA)[..., None]
    size = int(f["size"])
    chw = resize_2d(np.ascontiguousarray(image.transpose(2, 0, 1)), size, size)
    mean = np.asarray(f["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(f["std"], dtype=np.float32)[:, None, None]
    return ((chw - mean) / std).astype(np.float32, copy=False)


def preprocess(modality: str, pixels: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    if modality == "oct":
        return preprocess_oct(pixels, spec)
    if modality == "fundus":
        return preprocess_fundus(pixels, spec)
    raise ValueError(f"unknown modality {modality!r}")
