"""Render the fundus image of one visit: a colour photograph or a grayscale near-infrared SLO image.

The image is a ``FIELD_MM`` square of the posterior pole, centred between fovea and disc so both
are in view, in standard display orientation (superior up; the disc on the right for OD, on the
left for OS). The per-visit camera pointing jitter shifts the field slightly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from retinacli.synth.anatomy import EyeAnatomy, VisitState, edema_map, splat
from retinacli.synth.vessels import rasterize_vessels

FIELD_MM = 12.0
DEVICES = {
    "colour": "SYNTH-CF Colour Fundus Camera",
    "nir": "SYNTH-SLO Near-Infrared Scanning Laser Ophthalmoscope",
}


@dataclass
class FundusGeometry:
    """Pixel centres in the eye frame. ``us``/``vs`` are image-axis mm (right, down) from the fovea."""

    us: np.ndarray  # per column
    vs: np.ndarray  # per row
    xs_eye: np.ndarray  # eye-frame x per column (nasal positive)
    ys_eye: np.ndarray  # eye-frame y per row (superior positive)
    pixel_mm: float

    def to_pixel(self, u_mm: float, v_mm: float) -> tuple[float, float]:
        """(row, column) in pixel coordinates (DICOM: centre of the top-left pixel is (1, 1))."""
        col = (u_mm - self.us[0]) / self.pixel_mm + 1.0
        row = (v_mm - self.vs[0]) / self.pixel_mm + 1.0
        return row, col


@dataclass
class FundusCanvas:
    """What is fixed for one eye at one image size, rendered once on a padded grid.

    Each visit crops it at the (pixel-rounded) camera pointing offset, so visits of an eye share
    vessels, disc and texture exactly, and only the lesions are rendered per visit.
    """

    size: int
    pad: int
    pixel_mm: float
    us: np.ndarray  # padded grid, image-axis mm
    vs: np.ndarray
    layers: dict  # name -> (size + 2 pad, size + 2 pad) array
    backgrounds: dict = field(default_factory=dict)  # device -> static image (no lesions)


def fundus_canvas(eye: EyeAnatomy, size: int) -> FundusCanvas:
    pixel = FIELD_MM / size
    pad = int(np.ceil(0.45 / pixel))
    offsets = (np.arange(size + 2 * pad) - (size + 2 * pad - 1) / 2.0) * pixel
    us = eye.sign * eye.disc_x * 0.38 + offsets
    vs = -eye.disc_y * 0.5 + offsets
    xs, ys = eye.sign * us, -vs
    X, Y = np.meshgrid(xs, ys)
    r_fovea = np.hypot(X, Y)
    arteries, veins = rasterize_vessels(eye.vessels, xs, ys)
    disc, cup, halo = _disc_maps(eye, X, Y)
    layers = {
        "arteries": arteries,
        "veins": veins,
        "disc": disc,
        "cup": cup,
        "halo": halo,
        "texture": _texture(eye, xs, ys),
        "macula": np.exp(-(r_fovea**2) / (2 * 0.7**2)),
        "reflex": np.exp(-(r_fovea**2) / (2 * 0.06**2)),
    }
    return FundusCanvas(size=size, pad=pad, pixel_mm=pixel, us=us, vs=vs, layers=layers)


def fundus_geometry(canvas: FundusCanvas, eye: EyeAnatomy, state: VisitState) -> tuple[FundusGeometry, tuple]:
    """The visit's field of view inside the canvas, and the crop that selects it."""
    shift = [int(np.clip(round(f / canvas.pixel_mm), -canvas.pad, canvas.pad)) for f in state.fixation]
    c0, r0 = canvas.pad + shift[0], canvas.pad + shift[1]
    crop = (slice(r0, r0 + canvas.size), slice(c0, c0 + canvas.size))
    us, vs = canvas.us[crop[1]], canvas.vs[crop[0]]
    return FundusGeometry(us=us, vs=vs, xs_eye=eye.sign * us, ys_eye=-vs, pixel_mm=canvas.pixel_mm), crop


def render_fundus(
    eye: EyeAnatomy, state: VisitState, canvas: FundusCanvas, device: str, rng: np.random.Generator
) -> tuple[np.ndarray, FundusGeometry]:
    """(H, W, 3) uint8 for ``colour``, (H, W, 1) uint8 for ``nir``."""
    geo, crop = fundus_geometry(canvas, eye, state)
    if device not in canvas.backgrounds:
        paint = _colour_background if device == "colour" else _nir_background
        canvas.backgrounds[device] = paint(eye, canvas.layers).astype(np.float32)
    img = canvas.backgrounds[device][crop].copy()
    lesions = _lesion_maps(state, geo.xs_eye, geo.ys_eye)
    if device == "colour":
        _colour_lesions(img, lesions)
        reflex = canvas.layers["reflex"][crop] * (1.0 - 0.8 * np.clip(lesions["fluid"] / 80.0, 0, 1))
        img += (0.35 * reflex)[..., None].astype(np.float32)
    else:
        _nir_lesions(img, lesions)

    # Optics: vignetting, the camera's circular aperture (colour only), sensor noise.
    offsets = (np.arange(canvas.size) - (canvas.size - 1) / 2.0) * canvas.pixel_mm
    rho = np.hypot(offsets[None, :], offsets[:, None]) / (FIELD_MM / 2.0)
    optics = 1.0 - 0.45 * np.clip(rho, 0, 1.5) ** 2.2
    if device == "colour":
        optics = optics * np.clip((0.98 - rho) / 0.03, 0.0, 1.0)
    img *= optics[..., None].astype(np.float32)
    img += rng.normal(0.0, 0.012, size=img.shape).astype(np.float32)
    out = np.clip(img, 0.0, 1.0) ** np.float32(1 / 1.15) * np.float32(255.0)
    return np.round(out).astype(np.uint8), geo


def _disc_maps(eye: EyeAnatomy, X: np.ndarray, Y: np.ndarray):
    dx = (X - eye.disc_x) / eye.disc_radius
    dy = (Y - eye.disc_y) / (eye.disc_radius * eye.disc_elongation)
    d = np.hypot(dx, dy)
    disc = np.clip((1.0 - d) / 0.12 + 0.5, 0.0, 1.0)
    cup = np.clip((eye.cup_ratio - d) / 0.1 + 0.5, 0.0, 1.0)
    halo = np.exp(-((d - 1.1) ** 2) / 0.02)  # peripapillary ring
    return disc, cup, halo


def _texture(eye: EyeAnatomy, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Per-eye choroidal pattern (zero mean, ~unit SD) on the grid (len(ys), len(xs)), defined in
    the eye frame so every image size shows the same pattern: a smooth isotropic random field (a
    sum of random plane waves), ridged into a network of choroidal vessels with darker spaces.

    Plane waves separate over a regular grid, cos(a x + b y + p) = cos(a x) cos(b y + p) -
    sin(a x) sin(b y + p), so the whole field is one matrix product.
    """
    rng = np.random.default_rng(eye.texture_seed)
    n_waves = 24
    freq = rng.uniform(0.6, 1.6, n_waves) * 2 * np.pi  # cycles per mm
    angle = rng.uniform(0, np.pi, n_waves)
    phase = rng.uniform(0, 2 * np.pi, n_waves)
    ax, by = freq * np.cos(angle), freq * np.sin(angle)
    along_x = np.concatenate([np.cos(np.outer(ax, xs)), np.sin(np.outer(ax, xs))])  # (2K, n)
    wy = np.outer(ys, by) + phase  # (m, K)
    along_y = np.concatenate([np.cos(wy), -np.sin(wy)], axis=1)  # (m, 2K)
    field = (along_y @ along_x) / np.sqrt(n_waves / 2)
    ridges = 1.0 - 2.0 * np.abs(np.clip(field, -1.5, 1.5)) / 1.5
    return (ridges - 0.1) / 0.55


def _lesion_maps(state: VisitState, xs: np.ndarray, ys: np.ndarray) -> dict:
    X, Y = np.meshgrid(xs, ys)
    edema = edema_map(state, X, Y)
    fluid = splat(xs, ys, state.srf) + splat(xs, ys, state.cysts) + 0.5 * edema  # µm of extra fluid
    return {
        "drusen": np.clip(splat(xs, ys, state.drusen, "smooth") / 50.0, 0.0, 1.0),
        "ped": np.clip(splat(xs, ys, state.ped) / 150.0, 0.0, 1.0),
        "fluid": fluid,
        "exudates": np.clip(splat(xs, ys, state.exudates, "smooth") * 1.5, 0.0, 1.0),
        "hemorrhages": np.clip(splat(xs, ys, state.hemorrhages, "smooth") * 1.3, 0.0, 1.0),
    }


def _blend(img: np.ndarray, colour, alpha: np.ndarray) -> np.ndarray:
    """Paint ``colour`` over ``img`` with per-pixel opacity, in place (skips empty layers)."""
    if not alpha.any():
        return img
    a = np.clip(alpha, 0.0, 1.0).astype(np.float32)[..., None]
    img *= 1 - a
    img += np.asarray(colour, dtype=np.float32) * a
    return img


def _colour_background(eye: EyeAnatomy, m: dict) -> np.ndarray:
    base = eye.tint * (1.0 + eye.tessellation * m["texture"])[..., None]
    img = (base * (1.0 - eye.pigment * m["macula"])[..., None]).astype(np.float32)  # darker macula
    _blend(img, (0.55, 0.30, 0.12), 0.3 * m["halo"])
    _blend(img, (0.96, 0.74, 0.52), 0.9 * m["disc"])
    _blend(img, (1.0, 0.93, 0.78), 0.75 * m["cup"])
    _blend(img, (0.48, 0.07, 0.05), 0.85 * m["veins"])
    _blend(img, (0.72, 0.16, 0.08), 0.75 * m["arteries"])
    return img


def _colour_lesions(img: np.ndarray, lesions: dict) -> None:
    _blend(img, (0.80, 0.62, 0.42), 0.45 * np.clip(lesions["fluid"] / 120.0, 0.0, 1.0))  # macular sheen
    _blend(img, (0.55, 0.30, 0.16), 0.5 * lesions["ped"])  # PED: orange-brown dome
    _blend(img, (0.98, 0.90, 0.50), 0.85 * lesions["drusen"])
    _blend(img, (1.0, 0.95, 0.45), 0.95 * lesions["exudates"])
    _blend(img, (0.40, 0.03, 0.02), 0.9 * lesions["hemorrhages"])


def _nir_background(eye: EyeAnatomy, m: dict) -> np.ndarray:
    # Near-infrared reflectance: grey background whose level tracks pigmentation, dark vessels,
    # a darker disc and cup.
    level = 0.62 - 0.25 * eye.melanin
    img = level * (1.0 + 0.8 * eye.tessellation * m["texture"]) * (1.0 - 0.25 * eye.pigment * m["macula"])
    img = img * (1.0 - 0.25 * m["disc"]) * (1.0 - 0.25 * m["cup"])
    img = img * (1.0 - 0.55 * np.maximum(m["veins"], 0.85 * m["arteries"]))
    return img[..., None]


def _nir_lesions(img: np.ndarray, lesions: dict) -> None:
    # Fluid darkens; drusen, PED and exudates reflect more; haemorrhages absorb.
    fluid = np.clip(lesions["fluid"] / 120.0, 0.0, 1.0)
    delta = 0.25 * lesions["drusen"] + 0.15 * lesions["ped"] + 0.2 * lesions["exudates"]
    delta = delta - 0.2 * lesions["hemorrhages"]
    img *= (1.0 - 0.3 * fluid)[..., None].astype(np.float32)
    img += delta[..., None].astype(np.float32)
