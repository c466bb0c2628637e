"""The one preprocessing implementation (numpy), driven by a small spec dict.

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


# Largest input span (pixels) one block of output rows may cover: wide enough that a block is a real
# matrix product, narrow enough that the zeros outside the filter's support cost little.
_BAND_SPAN = 32
_BAND_OUTPUTS = 16
_COLUMN_CHUNK = 512


@lru_cache(maxsize=64)
def _bands(n_in: int, n_out: int) -> tuple[tuple[int, int, int, int, np.ndarray], ...]:
    """The resampling matrix as blocks ``(o0, o1, i0, i1, weights[o0:o1, i0:i1])`` of consecutive
    output rows and the input span holding all their non-zero weights.

    Each output reads only ~2 x scale inputs, so products over these blocks skip the zeros a dense
    product multiplies: the same weights and sums, in a different order (float rounding only).
    """
    weights = _resample_matrix(n_in, n_out)
    nonzero = weights != 0
    first = np.where(nonzero.any(axis=1), nonzero.argmax(axis=1), 0)
    last = np.where(nonzero.any(axis=1), n_in - nonzero[:, ::-1].argmax(axis=1), 1)
    blocks = []
    o0 = 0
    while o0 < n_out:
        o1 = o0 + 1
        while o1 - o0 < _BAND_OUTPUTS and o1 < n_out and last[o1] - first[o0] <= _BAND_SPAN:
            o1 += 1
        i0, i1 = int(first[o0:o1].min()), int(last[o0:o1].max())
        block = np.ascontiguousarray(weights[o0:o1, i0:i1])
        block.flags.writeable = False  # cached: shared by every later call
        blocks.append((o0, o1, i0, i1, block))
        o0 = o1
    return tuple(blocks)


def _column_split(n: int) -> int:
    """How many equal column chunks the rows pass splits `n` columns into: each product stays small
    enough that BLAS runs it on the calling thread (waking BLAS threads per small product costs more
    than it saves, and far more when the cores are busy, e.g. with inference)."""
    for chunks in range(-(-n // _COLUMN_CHUNK), n // 128 + 1):
        if n % chunks == 0:
            return chunks
    return 1


def _resample_rows(x: np.ndarray, n_out: int, dtype: np.dtype, out: np.ndarray | None = None) -> np.ndarray:
    """Apply the resampling matrix along axis -2 of (..., H, W), block by block, in `dtype` (into
    `out`, a C-contiguous (..., n_out, W) array of that dtype, when given)."""
    *lead, height, width = x.shape
    chunks = _column_split(width)
    # (L, chunks, H, W / chunks) views of input and output: one batched product per block
    parts = x.reshape(-1, height, chunks, width // chunks).transpose(0, 2, 1, 3)
    if out is None:
        out = np.empty((*lead, n_out, width), dtype)
    out_parts = out.reshape(-1, n_out, chunks, width // chunks).transpose(0, 2, 1, 3)
    for o0, o1, i0, i1, w in _bands(height, n_out):
        w = w.astype(dtype, copy=False)
        np.matmul(w, parts[..., i0:i1, :], out=out_parts[..., o0:o1, :], dtype=dtype)
    return out


def _resample_cols(x: np.ndarray, n_out: int, dtype: np.dtype) -> np.ndarray:
    """Apply the resampling matrix along axis -1 of (..., H, W), block by block, in `dtype`."""
    out = np.empty((*x.shape[:-1], n_out), dtype)
    for o0, o1, i0, i1, w in _bands(x.shape[-1], n_out):
        out[..., o0:o1] = np.matmul(x[..., i0:i1], w.T.astype(dtype, copy=False), dtype=dtype)
    return out


def _resize(stack: np.ndarray, height: int, width: int, dtype: np.dtype) -> np.ndarray:
    """resize_2d's maths computed in `dtype` (float32 or float64), result in `dtype`.

    Rows first: that pass reads whole contiguous rows (the big input once), the second pass works on
    the already shortened array. Integer inputs are converted block by block inside the products.
    """
    return _resample_cols(_resample_rows(stack, height, dtype), width, dtype)


def resize_2d(stack: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize the last two axes of a float32 array (..., H, W) -> (..., height, width).

    float64 input is computed in float64 (then rounded to float32), anything else in float32.
    """
    dtype = np.dtype(np.float64 if stack.dtype == np.float64 else np.float32)
    return _resize(stack, height, width, dtype).astype(np.float32, copy=False)


# --- OCT --------------------------------------------------------------------------------------


def slice_indices(n_bscans: int, slices: int) -> np.ndarray:
    """Index of the B-scan nearest each of `slices` evenly spaced bin centres (repeats if too few)."""
    centres = (np.arange(slices) + 0.5) * n_bscans / slices
    return np.minimum(np.floor(centres).astype(np.int64), n_bscans - 1)


def _exact_ints(a: np.ndarray) -> bool:
    """Integer pixels that float32 holds exactly (the spec's maths starts from a float32 copy)."""
    return a.dtype.kind in "ui" and a.dtype.itemsize <= 2


def _int_percentiles(values: np.ndarray, percentiles: Any) -> tuple[np.float64, np.float64]:
    """``np.percentile(values.astype(np.float32), percentiles)`` (linear method), bit for bit, for
    integer pixels: the two order statistics each percentile interpolates are found by bisection on
    counts (``count(values <= v)``, a fast vectorised pass), without a float copy or a sort."""
    n = values.size
    vmin, vmax = int(values.min()), int(values.max())
    # A histogram of every 4th row and column guesses each order statistic; counts on all pixels then
    # bracket the exact value around the guess (a few passes instead of one per bit of the range).
    sample = values[..., ::4, ::4] if values.ndim >= 2 else values
    sample_cumulative = np.cumsum(np.bincount(sample.reshape(-1).astype(np.int64) - vmin))

    def at_most(v: int) -> int:
        return int(np.count_nonzero(values <= v))

    def order_stat(k: int, lo: int) -> int:  # the k-th smallest value (0-based), known to be >= lo
        hi = vmax
        rank = min(k * sample.size // n, sample.size - 1)
        guess = min(max(vmin + int(np.searchsorted(sample_cumulative, rank, side="right")), lo), hi)
        step = 1
        if at_most(guess) > k:  # answer <= guess: walk down in growing steps
            hi = guess
            while hi - step >= lo:
                if at_most(hi - step) > k:
                    hi, step = hi - step, step * 2
                else:
                    lo = hi - step + 1
                    break
        else:  # answer > guess: walk up
            lo = guess + 1
            while lo + step - 1 < hi:
                if at_most(lo + step - 1) > k:
                    hi = lo + step - 1
                    break
                lo, step = lo + step, step * 2
        while lo < hi:  # bisect the bracket
            mid = (lo + hi) // 2
            if at_most(mid) > k:
                hi = mid
            else:
                lo = mid + 1
        return lo

    result = []
    for virtual in (n - 1) * np.true_divide(np.asanyarray(percentiles), 100):  # numpy's virtual index
        if virtual >= n - 1:
            result.append(np.float64(np.float32(vmax)))
            continue
        below = int(np.floor(virtual))
        first = order_stat(below, vmin)
        second = first if at_most(first) > below + 1 else order_stat(below + 1, first + 1)
        pair = np.array([first, second], np.float32)
        # numpy's own interpolation of the two neighbours, at numpy's own weight (virtual - below)
        result.append(np.quantile(pair, np.array([virtual - below]))[0])
    return result[0], result[1]


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
    if _exact_ints(volume):  # exact integer sums: the same float64 mean, bit for bit, without a float copy
        # B-scans first (whole contiguous planes) in the narrowest accumulator that cannot overflow
        peak = int(np.iinfo(volume.dtype).max) * volume.shape[0]
        acc = np.int64 if volume.dtype.kind == "i" else np.uint16 if peak < 2**16 else np.uint32
        if peak >= 2**32:
            acc = np.int64
        sums = volume.sum(axis=0, dtype=acc).sum(axis=1, dtype=np.int64)
        profile = sums / (volume.shape[0] * volume.shape[2])
    else:
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
    slices = int(o["slices"])
    # slice_indices(k, k) is arange(k): a volume of exactly the picked B-scans needs no copy
    picked = volume if volume.shape[0] == slices else volume[slice_indices(volume.shape[0], slices)]
    if _exact_ints(picked):  # finite, and exact in float32: the same maths without the float copy
        picked = picked[:, axial_window(picked, float(o.get("axial_crop", 1.0)))]
        lo, hi = _int_percentiles(picked, o["percentiles"])
    else:
        picked = picked.astype(np.float32)
        if not np.isfinite(picked).all():
            raise ValueError("OCT volume contains NaN or infinite values")
        picked = picked[:, axial_window(picked, float(o.get("axial_crop", 1.0)))]
        lo, hi = np.percentile(picked, o["percentiles"])
    # Scaling in float64 (as the maths does: float32 pixels minus a float64 percentile) one B-scan at a
    # time into a reused buffer, each followed by its rows pass: no float64 copy of the whole stack.
    f64 = np.dtype(np.float64)
    rows = np.empty((picked.shape[0], int(o["height"]), picked.shape[2]), f64)
    bscan = np.empty(picked.shape[1:], f64)
    for index in range(picked.shape[0]):
        np.subtract(picked[index], lo, out=bscan, dtype=f64)
        bscan /= max(float(hi - lo), 1e-6)
        np.clip(bscan, 0.0, 1.0, out=bscan)
        _resample_rows(bscan, int(o["height"]), f64, out=rows[index])
    resized = _resample_cols(rows, int(o["width"]), f64).astype(np.float32)
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
    image = image[..., :3]
    # uint8 is divided by 255 after resizing (the same linear map, no full-size float copy);
    # other types go through the range rules first
    divisor = np.float32(255.0) if image.dtype == np.uint8 else None
    if divisor is None:
        image = _to_unit_range(image)
    if f["crop"] == "center_square":
        h, w = image.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        image = image[top : top + side, left : left + side]
    size = int(f["size"])
    f32 = np.dtype(np.float32)
    h, w, c = image.shape
    if c == 1:
        chw = _resize(image[..., 0], size, size, f32)[None]
    else:  # rows first on (H, W*3): whole rows of the large image, no transposed copy of it
        rows = _resample_rows(image.reshape(h, w * c), size, f32).reshape(size, w, c)
        chw = _resample_cols(np.ascontiguousarray(rows.transpose(2, 0, 1)), size, f32)
    if divisor is not None:
        chw /= divisor
    channels = int(f["channels"])
    if channels == 3 and c == 1:  # resized once, then repeated
        chw = np.repeat(chw, 3, axis=0)
    elif channels == 1 and c == 3:
        chw = (chw.transpose(1, 2, 0) @ _LUMA)[None]
    mean = np.asarray(f["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(f["std"], dtype=np.float32)[:, None, None]
    return ((chw - mean) / std).astype(np.float32, copy=False)


def preprocess(modality: str, pixels: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    if modality == "oct":
        return preprocess_oct(pixels, spec)
    if modality == "fundus":
        return preprocess_fundus(pixels, spec)
    raise ValueError(f"unknown modality {modality!r}")
