"""Render a macular OCT volume (raster of horizontal B-scans) from the latent anatomy.

Geometry: a ``scan_mm`` x ``scan_mm`` raster centred on the fovea; frame 0 is the most superior
B-scan; columns run left to right in the fundus image's orientation (temporal -> nasal for OD,
nasal -> temporal for OS); rows run from the vitreous (top) into the choroid over ``depth_mm``.
Each A-scan's layer boundaries come from ``anatomy.layer_thicknesses`` at its position, so the
ILM-BM distance in the image is the thickness map the CST label is computed from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retinacli.synth.anatomy import LAYERS, EyeAnatomy, VisitState, layer_thicknesses, splat

SCAN_MM = 6.0
DEPTH_MM = 1.92  # Spectralis-like: 496 rows x 3.87 µm

# Linear reflectivity per region (vitreous, LAYERS..., choroid, sclera), before speckle.
_REFLECTIVITY = {
    "vitreous": 0.012,
    "rnfl": 0.80,
    "gcl": 0.30,
    "ipl": 0.50,
    "inl": 0.16,
    "opl": 0.46,
    "onl": 0.09,
    "myoid": 0.17,
    "ez": 0.90,
    "os": 0.28,
    "srf": 0.015,
    "rpe": 1.00,
    "sub_rpe": 0.40,  # drusen material; serous PED is set per A-scan below
    "choroid": 0.50,
    "sclera": 0.22,
}
_REGIONS = ("vitreous", *LAYERS, "choroid", "sclera")
FLUID_REFLECTIVITY = 0.012


def _quantile_table(draw) -> np.ndarray:
    samples = np.sort(draw(np.random.default_rng(20231), 1 << 16))
    return samples[(np.arange(256) * 256 + 128)].astype(np.float32)


_SPECKLE_TABLE = _quantile_table(lambda r, n: r.standard_gamma(3.0, n) / 3.0)
_NOISE_TABLE = _quantile_table(lambda r, n: 0.003 * r.standard_exponential(n))
PED_REFLECTIVITY = 0.06


@dataclass
class OctGeometry:
    """Where the volume sits: A-scan positions (eye frame, mm) and voxel spacing (mm)."""

    xs_image: np.ndarray  # lateral position of each column, image orientation, mm from the fovea
    ys: np.ndarray  # vertical position of each B-scan (superior positive), mm from the fovea
    xs_eye: np.ndarray  # lateral position in the eye frame (nasal positive)
    slice_spacing_mm: float
    axial_spacing_mm: float
    lateral_spacing_mm: float


def oct_geometry(eye: EyeAnatomy, shape: tuple[int, int, int], scan_mm: float = SCAN_MM) -> OctGeometry:
    s, h, w = shape
    half = scan_mm / 2.0
    xs_image = np.linspace(-half, half, w)
    ys = np.linspace(half, -half, s) if s > 1 else np.zeros(1)
    return OctGeometry(
        xs_image=xs_image,
        ys=ys,
        xs_eye=eye.sign * xs_image,
        slice_spacing_mm=scan_mm / max(s - 1, 1),
        axial_spacing_mm=DEPTH_MM / h,
        lateral_spacing_mm=scan_mm / max(w - 1, 1),
    )


def render_oct(
    eye: EyeAnatomy,
    state: VisitState,
    shape: tuple[int, int, int],
    vessel_map: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, OctGeometry, dict]:
    """Return (uint8 volume (S, H, W), geometry, truth) where truth holds ILM/BM depths in µm."""
    s, h, w = shape
    geo = oct_geometry(eye, shape)
    t = layer_thicknesses(eye, state, geo.xs_eye, geo.ys)
    X, Y = np.meshgrid(geo.xs_eye, geo.ys)
    depth_um = DEPTH_MM * 1000.0
    # Bruch's membrane: the eye's bowl (periphery rises in the image) plus a per-eye tilt.
    z_bm = (
        0.64 * depth_um
        - eye.bowl_um_per_mm2 * (X**2 + Y**2)
        + eye.tilt_um_per_mm[0] * X * eye.sign
        + eye.tilt_um_per_mm[1] * Y
    )
    tops = {}
    below = np.zeros_like(z_bm)
    for name in reversed(LAYERS):
        below = below + t[name]
        tops[name] = z_bm - below
    bottoms = {name: tops[name] + t[name] for name in LAYERS}

    # Piecewise-constant reflectivity profile per A-scan: (knot depth, reflectivity below it).
    v = np.clip(vessel_map, 0.0, 1.0)
    # Fundus-visible lesions that also show on OCT (same maps as the fundus renderer uses).
    exudate = np.clip(splat(geo.xs_eye, geo.ys, state.exudates, "smooth") * 1.5, 0.0, 1.0)
    hemorrhage = np.clip(splat(geo.xs_eye, geo.ys, state.hemorrhages, "smooth") * 1.3, 0.0, 1.0)
    shadow = np.ones_like(z_bm)
    knots: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros_like(z_bm), _const("vitreous", z_bm))]
    for name in LAYERS:
        r = _const(name, z_bm)
        if name == "sub_rpe":  # serous PED is dark, drusen material moderately reflective
            r = np.where(t["_ped"] > t["_drusen"], PED_REFLECTIVITY, r)
        if name == "rnfl" and hemorrhage.any():  # blood: bright inner retina, shadow below
            r = np.maximum(r, 0.9 * hemorrhage)
        if name == "opl" and exudate.any():  # hard exudates: hyperreflective foci, faint shadow
            r = np.maximum(r, 1.2 * exudate)
        if name == "gcl":  # a retinal vessel: bright lumen in the GCL, shadow on everything below
            mid = (tops[name] + bottoms[name]) / 2.0
            half = np.minimum(10.0 + 22.0 * v, t[name] / 2.0) * (v > 0.1)
            knots += [(tops[name], r * shadow), (mid - half, np.maximum(r, 0.6 * v))]
            shadow = 1.0 - 0.85 * v
            knots.append((mid + half, r * shadow))
        elif name in ("inl", "onl"):  # intraretinal cysts: a dark pocket centred in the layer
            mid = (tops[name] + bottoms[name]) / 2.0
            half = t[f"_cyst_{name}"] / 2.0
            knots += [
                (tops[name], r * shadow),
                (mid - half, np.full_like(r, FLUID_REFLECTIVITY)),
                (mid + half, r * shadow),
            ]
        else:
            knots.append((tops[name], r * shadow))
        if name == "rnfl":
            shadow = shadow * (1.0 - 0.6 * hemorrhage)
        elif name == "opl":
            shadow = shadow * (1.0 - 0.4 * exudate)
    melanin_absorption = 1.25 - 0.6 * eye.melanin  # pigmented eyes: darker choroid
    knots.append((z_bm, _const("choroid", z_bm) * shadow * melanin_absorption))
    knots.append((z_bm + eye.choroid_um, _const("sclera", z_bm) * shadow))
    intensity = _integrate_profiles(knots, h, depth_um / h)

    # Choroidal vessels (blobby texture) and attenuation with depth below BM, computed only on the
    # rows that lie below Bruch's membrane somewhere in the volume.
    top = int(np.clip(np.floor(z_bm.min() / (depth_um / h)), 0, h - 1))
    zc = ((np.arange(top, h, dtype=np.float32) + 0.5) * np.float32(depth_um / h))[None, :, None]
    below_bm = np.maximum(zc - z_bm.astype(np.float32)[:, None, :], np.float32(0.0))
    lumens = _smooth_noise(rng, (s, h - top, w), scale=(max(1, h // 40), max(2, w // 24)))
    attenuation = np.exp(below_bm * np.float32(-1.0 / 220.0))
    intensity[:, top:, :] *= np.where(below_bm > 0, lumens * attenuation, np.float32(1.0))

    # Speckle (a few averaged frames, as with eye-tracked averaging), then log compression.
    # Gamma(3) speckle and an exponential noise floor, drawn by table look-up (much faster than
    # sampling the distributions directly; 256 quantiles are plenty for 8-bit output).
    signal = intensity  # updated in place from here on: fewer full-volume temporaries
    signal *= _SPECKLE_TABLE[rng.integers(0, 256, size=signal.shape, dtype=np.uint8)]
    smoothed = signal[:, :, 1:-1] * np.float32(0.5)  # lateral speckle correlation
    smoothed += signal[:, :, :-2] * np.float32(0.25)
    smoothed += signal[:, :, 2:] * np.float32(0.25)
    signal[:, :, 1:-1] = smoothed
    signal += _NOISE_TABLE[rng.integers(0, 256, size=signal.shape, dtype=np.uint8)]
    signal *= rng.uniform(0.85, 1.15, size=(s, 1, 1)).astype(np.float32)  # per-B-scan gain
    signal += np.float32(1e-6)
    img = np.log10(signal, out=signal)  # 10 log10 -> dB; -17 dB .. +5 dB maps to 0 .. 255
    img *= np.float32(10.0 * 255.0 / 22.0)
    img += np.float32(17.0 * 255.0 / 22.0)
    np.clip(img, 0.0, 255.0, out=img)
    np.rint(img, out=img)
    truth = {"ilm_um": tops[LAYERS[0]], "bm_um": z_bm, "thickness": t}
    return img.astype(np.uint8), geo, truth


def _const(region: str, like: np.ndarray) -> np.ndarray:
    return np.full_like(like, _REFLECTIVITY[region])


def _integrate_profiles(knots: list[tuple[np.ndarray, np.ndarray]], h: int, pixel_um: float) -> np.ndarray:
    """Average each A-scan's piecewise-constant reflectivity over every pixel's depth interval.

    Exact partial-volume rendering: a 10 µm layer in a 30 µm pixel contributes a third of it.
    Each knot adds its reflectivity step to the pixel it falls in (the covered fraction) and to
    every pixel below it, so a scatter of the steps plus one cumulative sum over depth suffices.
    """
    depth = np.maximum.accumulate(np.stack([k for k, _ in knots]), axis=0)  # (K, S, W), monotonic
    refl = np.stack([r for _, r in knots])
    step = np.diff(refl, axis=0, prepend=0.0)
    pos = np.clip(depth / pixel_um, 0.0, None)
    row = np.floor(pos)
    frac = pos - row
    n_cols = depth.shape[1] * depth.shape[2]
    cols = np.broadcast_to(np.arange(n_cols).reshape(1, *depth.shape[1:]), depth.shape)
    visible = row < h
    row = row.astype(np.int64)
    index = np.concatenate([(row * n_cols + cols)[visible], ((row + 1) * n_cols + cols)[visible]])
    weight = np.concatenate([(step * (1.0 - frac))[visible], (step * frac)[visible]])
    steps = np.bincount(index, weights=weight, minlength=(h + 1) * n_cols)[: (h + 1) * n_cols]
    steps = steps.astype(np.float32).reshape(h + 1, depth.shape[1], depth.shape[2]).transpose(1, 0, 2)
    return np.cumsum(steps, axis=1, dtype=np.float32)[:, :h, :]  # (S, H, W)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], scale: tuple[int, int]):
    """Choroidal texture (S, H, W) in [0.4, 1]: dark vessel lumens in brighter stroma.

    Coarse Gaussian noise through a soft threshold, bilinearly resized per B-scan.
    """
    from PIL import Image

    s, h, w = shape
    coarse = rng.standard_normal((s, max(2, -(-h // scale[0]) + 1), max(2, -(-w // scale[1]) + 1)))
    coarse = 0.4 + 0.6 / (1.0 + np.exp(-3.0 * coarse))
    out = np.empty(shape, dtype=np.float32)
    for k in range(s):
        image = Image.fromarray(coarse[k].astype(np.float32), mode="F")
        out[k] = np.asarray(image.resize((w, h), Image.Resampling.BILINEAR))
    return out
