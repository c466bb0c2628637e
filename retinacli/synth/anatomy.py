"""The latent anatomy both modalities are rendered from.

Coordinates are in millimetres in an *eye frame* centred on the fovea: ``x`` points nasal and ``y``
superior, for both eyes. Renderers map the eye frame to image axes (``x_image = +x`` for OD, ``-x``
for OS), which is what mirrors right and left eyes. Depths inside the retina are in micrometres.

``EyeAnatomy`` holds what is stable for one eye across visits (disc, vessels, normal thickness,
tint, disease type and its treatment response); ``VisitState`` holds what changes per visit (fluid
pockets, drusen, PED, edema). ``lesion_maps`` and ``layer_thicknesses`` turn both into maps on any
grid, and are the single source for the OCT, the fundus and the labels.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import numpy as np

from retinacli.synth.random import rng_for

DISEASES = ("healthy", "dry_amd", "nv_amd", "dme")
DISEASE_WEIGHTS = (0.25, 0.25, 0.30, 0.20)

# Retinal layers from the inner surface (ILM) down to Bruch's membrane (BM), in OCT order.
LAYERS = ("rnfl", "gcl", "ipl", "inl", "opl", "onl", "myoid", "ez", "os", "srf", "rpe", "sub_rpe")
# Normal perifoveal thickness (µm) of the inner layers that vanish towards the foveal pit.
INNER_LAYER_UM = {"rnfl": 22.0, "gcl": 45.0, "ipl": 38.0, "inl": 35.0, "opl": 28.0}
PHOTORECEPTOR_UM = {"myoid": 22.0, "ez": 12.0, "os": 30.0}
RPE_UM = 22.0
MIN_ONL_UM = 25.0


@dataclass
class VesselTree:
    """Vessel centre-line segments in the eye frame; widths in mm."""

    x0: np.ndarray
    y0: np.ndarray
    x1: np.ndarray
    y1: np.ndarray
    width: np.ndarray
    is_vein: np.ndarray


@dataclass
class Bumps:
    """Elliptical bumps (drusen, cysts, ...): centres and radii in mm, height in µm."""

    x: np.ndarray
    y: np.ndarray
    rx: np.ndarray
    ry: np.ndarray
    height: np.ndarray

    @classmethod
    def empty(cls) -> Bumps:
        z = np.zeros(0)
        return cls(z, z, z, z, z)

    def __len__(self) -> int:
        return len(self.x)


@dataclass
class EyeAnatomy:
    patient_index: int
    eye: str  # "OD" or "OS"
    disc_x: float
    disc_y: float
    disc_radius: float  # horizontal radius, mm
    disc_elongation: float  # vertical / horizontal
    cup_ratio: float
    peri_um: float  # normal perifoveal total thickness scale
    rim_gain: float
    pit_depth_um: float
    pit_width_mm: float
    layer_gain: np.ndarray  # per inner layer multiplicative jitter
    choroid_um: float
    bowl_um_per_mm2: float
    tilt_um_per_mm: tuple[float, float]
    tint: np.ndarray  # RGB background of the colour fundus
    pigment: float  # macular pigment strength
    texture_seed: int
    vessels: VesselTree
    disease: str
    severity: float  # 0..1
    resistance: float  # 0..1, poor treatment response (drives recurrence and treatment need)
    lesion_x: float
    lesion_y: float
    has_ped: bool
    srf_prone: bool
    acuity_offset: float  # letters, eye-specific (lens, amblyopia, ...)
    axial_length_mm: float
    melanin: float  # 0 (blond fundus) .. 1 (heavily pigmented)
    tessellation: float  # contrast of the choroidal pattern on the fundus

    @property
    def sign(self) -> int:
        """Image-x direction of the nasal side: +1 for OD (disc on the right), -1 for OS."""
        return 1 if self.eye == "OD" else -1


@dataclass
class VisitState:
    visit: int
    date: dt.date
    activity: float  # 0..1 exudative activity
    edema_um: float
    edema_x: float
    edema_y: float
    edema_sigma: float
    srf: Bumps  # at most one dome
    ped: Bumps
    drusen: Bumps
    cysts: Bumps
    cyst_in_onl: np.ndarray  # bool per cyst: ONL (large, central) or INL
    exudates: Bumps  # hard exudates (fundus only; too small to shape the OCT)
    hemorrhages: Bumps  # fundus only
    fixation: tuple[float, float]  # fundus camera pointing jitter, mm
    extras: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Sampling


def sample_eye(seed: int, patient_index: int, eye: str) -> EyeAnatomy:
    """One eye's fixed anatomy.

    Two shared latents tie the fundus to the OCT, as in real eyes: axial length (long, myopic eyes
    have a thinner choroid, a more tessellated fundus, the disc farther from the fovea, a steeper
    bowl and a slightly thinner retina) and melanin (a darker fundus and a darker choroid on OCT).
    """
    rng = rng_for(seed, "eye", patient_index, eye)
    disease = str(rng.choice(DISEASES, p=DISEASE_WEIGHTS))
    severity = float(rng.uniform(0.35, 1.0)) if disease != "healthy" else 0.0
    axial_length = float(np.clip(rng.normal(23.6, 1.1), 21.5, 27.5))
    myopia = axial_length - 23.6
    melanin = float(rng.uniform(0.0, 1.0))
    disc_x = float(4.25 + 0.25 * myopia + rng.uniform(-0.2, 0.2))
    disc_y = float(rng.uniform(0.1, 0.8))
    disc_radius = float(rng.uniform(0.7, 1.0))
    light = np.array([0.95, 0.50, 0.22])  # blond fundus: orange-red
    dark = np.array([0.62, 0.24, 0.10])  # heavily pigmented: dark red-brown
    tint = (light * (1 - melanin) + dark * melanin) * rng.uniform(0.93, 1.07, size=3)
    choroid = float(np.clip(300.0 - 55.0 * myopia + rng.normal(0.0, 25.0), 120.0, 420.0))
    # Thin choroid -> choroidal vessels show through the RPE (tessellated fundus).
    tessellation = 0.03 + 0.12 * (300.0 - choroid) / 180.0 + 0.04 * (1 - melanin)
    return EyeAnatomy(
        patient_index=patient_index,
        eye=eye,
        disc_x=disc_x,
        disc_y=disc_y,
        disc_radius=disc_radius,
        disc_elongation=float(rng.uniform(1.0, 1.2)),
        cup_ratio=float(rng.uniform(0.2, 0.6)),
        peri_um=float(296.0 - 7.0 * myopia + rng.normal(0.0, 10.0)),
        rim_gain=float(rng.uniform(0.12, 0.22)),
        pit_depth_um=float(rng.normal(95.0, 12.0)),
        pit_width_mm=float(rng.uniform(0.38, 0.55)),
        layer_gain=rng.uniform(0.85, 1.15, size=len(INNER_LAYER_UM)),
        choroid_um=choroid,
        bowl_um_per_mm2=float(np.clip(16.0 + 5.0 * myopia + rng.normal(0.0, 3.0), 5.0, 35.0)),
        tilt_um_per_mm=(float(rng.normal(0, 18.0)), float(rng.normal(0, 10.0))),
        tint=tint,
        pigment=float(rng.uniform(0.15, 0.45)),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
        vessels=sample_vessels(rng, disc_x, disc_y, disc_radius),
        disease=disease,
        severity=severity,
        resistance=float(rng.beta(2.0, 2.0)),
        lesion_x=float(rng.normal(0.0, 0.35)),
        lesion_y=float(rng.normal(0.0, 0.35)),
        has_ped=bool(disease == "nv_amd" and rng.random() < 0.55),
        srf_prone=bool(rng.random() < {"nv_amd": 0.8, "dme": 0.3}.get(disease, 0.0)),
        acuity_offset=float(rng.normal(0.0, 4.0)),
        axial_length_mm=axial_length,
        melanin=melanin,
        tessellation=float(np.clip(tessellation, 0.02, 0.2)),
    )


def _grow_vessel(rng, x, y, heading, width, length, curl, segments, is_vein, depth):
    """Random-walk a vessel from (x, y); ``curl`` steers the heading (rad per mm). Branches recurse."""
    step = 0.22
    n = max(2, int(length / step))
    for i in range(n):
        heading += curl * step + rng.normal(0.0, 0.09)
        curl *= 0.95  # arcades straighten once they have turned around the macula
        nx, ny = x + step * np.cos(heading), y + step * np.sin(heading)
        segments.append((x, y, nx, ny, width, is_vein))
        x, y = nx, ny
        width = max(0.018, width * 0.985)
        if depth < 2 and i > 2 and rng.random() < 0.10:
            side = rng.choice([-1.0, 1.0])
            _grow_vessel(
                rng,
                x,
                y,
                heading + side * rng.uniform(0.5, 1.1),
                width * rng.uniform(0.5, 0.7),
                length * rng.uniform(0.25, 0.5),
                rng.normal(0.0, 0.25),
                segments,
                is_vein,
                depth + 1,
            )


def sample_vessels(rng: np.random.Generator, disc_x: float, disc_y: float, disc_r: float) -> VesselTree:
    """Four temporal arcades arching around the macula, nasal trunks, and their branches."""
    segments: list[tuple] = []
    for is_vein in (False, True):
        base_width = 0.13 if is_vein else 0.10
        for up in (1.0, -1.0):
            # Temporal arcade: leave the disc vertically, then curl temporally around the fovea.
            start_heading = np.pi / 2 * up + rng.normal(0.0, 0.12) + (0.15 if is_vein else 0.0) * up
            _grow_vessel(
                rng,
                disc_x + rng.normal(0, disc_r * 0.15),
                disc_y + up * disc_r * 0.3,
                start_heading,
                base_width,
                rng.uniform(9.0, 11.0),
                up * rng.uniform(0.30, 0.40),
                segments,
                bool(is_vein),
                0,
            )
            # Nasal trunk.
            _grow_vessel(
                rng,
                disc_x + rng.normal(0, disc_r * 0.15),
                disc_y + up * disc_r * 0.3,
                up * rng.uniform(0.4, 1.0),
                base_width * 0.8,
                rng.uniform(4.0, 6.0),
                -up * rng.uniform(0.0, 0.15),
                segments,
                bool(is_vein),
                1,
            )
        # Small macular branches heading from the disc towards the fovea.
        for _ in range(2):
            _grow_vessel(
                rng,
                disc_x - disc_r * 0.8,
                disc_y + rng.normal(0, 0.3),
                np.pi + rng.normal(0, 0.35),
                base_width * 0.45,
                rng.uniform(2.0, 3.3),
                rng.normal(0, 0.15),
                segments,
                bool(is_vein),
                1,
            )
    a = np.array(segments, dtype=np.float64)
    x0, y0, x1, y1 = a[:, 0], a[:, 1], a[:, 2], a[:, 3]
    # Foveal avascular zone: drop segments that end inside it.
    keep = np.hypot(x1, y1) > 0.3
    return VesselTree(
        x0[keep], y0[keep], x1[keep], y1[keep], a[keep, 4], a[keep, 5].astype(bool)
    )


def _sample_bumps(rng, n, cx, cy, spread, r_range, h_range, aspect=0.25) -> Bumps:
    if n <= 0:
        return Bumps.empty()
    x = cx + rng.normal(0.0, spread, n)
    y = cy + rng.normal(0.0, spread, n)
    rx = rng.uniform(*r_range, n)
    ry = rx * rng.uniform(1 - aspect, 1 + aspect, n)
    return Bumps(x, y, rx, ry, rng.uniform(*h_range, n))


def sample_visits(seed: int, eye: EyeAnatomy, dates: list[dt.date]) -> list[VisitState]:
    """Disease course for one eye: activity at baseline, treatment response, recurrences."""
    rng = rng_for(seed, "visits", eye.patient_index, eye.eye)
    states = []
    activity = 0.0
    druse_base = None
    for visit, date in enumerate(dates):
        vr = rng_for(seed, "visit", eye.patient_index, eye.eye, visit)
        exudative = eye.disease in ("nv_amd", "dme")
        if exudative:
            if visit == 0:
                activity = eye.severity * rng.uniform(0.55, 1.0)
            else:  # partial response to treatment, recurrence more likely for resistant eyes
                keep = 0.25 + 0.6 * eye.resistance
                recur = rng.uniform(0.0, 0.6) * eye.resistance * eye.severity
                activity = float(np.clip(activity * keep * rng.uniform(0.7, 1.2) + recur, 0.0, 1.0))
        else:
            activity = 0.0

        lx = eye.lesion_x + vr.normal(0, 0.25)
        ly = eye.lesion_y + vr.normal(0, 0.25)
        srf = ped = cysts = exudates = hemorrhages = drusen = None
        cyst_in_onl = np.zeros(0, dtype=bool)
        edema_um = 0.0
        if exudative and activity > 0.05:
            edema_scale = 170.0 if eye.disease == "dme" else 70.0
            edema_um = activity * eye.severity * edema_scale * vr.uniform(0.7, 1.2)
            n_cysts = int(vr.poisson(14 * activity if eye.disease == "dme" else 5 * activity))
            cysts = _sample_bumps(vr, n_cysts, lx, ly, 0.55, (0.08, 0.32), (30.0, 60.0 + 160.0 * activity))
            cyst_in_onl = vr.random(len(cysts)) < np.clip(1.2 - np.hypot(cysts.x, cysts.y), 0.2, 0.9)
            if eye.srf_prone and activity > 0.15:
                h = 40.0 + 180.0 * activity * vr.uniform(0.6, 1.1)
                r = 0.6 + 1.0 * activity * vr.uniform(0.7, 1.2)
                ry = r * vr.uniform(0.7, 1.0)
                srf = Bumps(np.array([lx]), np.array([ly]), np.array([r]), np.array([ry]), np.array([h]))
            if eye.disease == "dme":
                exudates = _sample_bumps(vr, int(vr.poisson(25 * eye.severity)), lx, ly, 1.1, (0.03, 0.09),
                                         (1.0, 1.0))
            elif activity > 0.3:
                hemorrhages = _sample_bumps(vr, int(vr.poisson(3 * activity)), lx, ly, 0.8, (0.1, 0.35),
                                            (1.0, 1.0))
        if eye.has_ped:  # persists across visits, flattens a little with treatment
            h = (80.0 + 120.0 * eye.severity) * (0.55 + 0.45 * activity)
            r = 0.5 + 0.6 * eye.severity
            ped = Bumps(np.array([eye.lesion_x * 0.5]), np.array([eye.lesion_y * 0.5]), np.array([r]),
                        np.array([r * 0.85]), np.array([h]))
        if eye.disease in ("dry_amd", "nv_amd") or (eye.disease == "healthy" and eye.texture_seed % 4 == 0):
            if druse_base is None:
                dr = rng_for(seed, "drusen", eye.patient_index, eye.eye)
                n = int(dr.integers(20, 70) * max(eye.severity, 0.15)) if eye.disease != "healthy" else 4
                druse_base = _sample_bumps(dr, n, eye.lesion_x, eye.lesion_y, 1.0, (0.05, 0.17), (15.0, 70.0))
            growth = 1.0 + 0.12 * visit * vr.uniform(0.5, 1.5)
            new = _sample_bumps(vr, int(vr.poisson(2 * eye.severity)), eye.lesion_x, eye.lesion_y, 1.0,
                                (0.04, 0.1), (10.0, 35.0))
            drusen = Bumps(
                np.concatenate([druse_base.x, new.x]),
                np.concatenate([druse_base.y, new.y]),
                np.concatenate([druse_base.rx * np.sqrt(growth), new.rx]),
                np.concatenate([druse_base.ry * np.sqrt(growth), new.ry]),
                np.concatenate([druse_base.height * growth, new.height]),
            )
        states.append(
            VisitState(
                visit=visit,
                date=date,
                activity=float(activity),
                edema_um=float(edema_um),
                edema_x=float(lx),
                edema_y=float(ly),
                edema_sigma=float(vr.uniform(0.7, 1.3)),
                srf=srf or Bumps.empty(),
                ped=ped or Bumps.empty(),
                drusen=drusen or Bumps.empty(),
                cysts=cysts or Bumps.empty(),
                cyst_in_onl=cyst_in_onl,
                exudates=exudates or Bumps.empty(),
                hemorrhages=hemorrhages or Bumps.empty(),
                fixation=(float(vr.normal(0, 0.12)), float(vr.normal(0, 0.12))),
            )
        )
    return states


# ---------------------------------------------------------------------------------------------
# Maps on a separable grid: xs (mm, eye frame, along image columns), ys (mm, along image rows)


def splat(xs: np.ndarray, ys: np.ndarray, bumps: Bumps, profile: str = "dome") -> np.ndarray:
    """Sum of bumps on the grid (len(ys), len(xs)); each bump only touches its bounding window.

    ``dome``: height * sqrt(1 - d²) (an ellipsoid cap, fluid pockets and PED);
    ``smooth``: height * (1 - d²)² (drusen, soft edges).
    """
    out = np.zeros((len(ys), len(xs)))
    for i in range(len(bumps)):
        cols = np.nonzero(np.abs(xs - bumps.x[i]) < bumps.rx[i])[0]
        rows = np.nonzero(np.abs(ys - bumps.y[i]) < bumps.ry[i])[0]
        if len(cols) == 0 or len(rows) == 0:
            continue
        c0, c1, r0, r1 = cols[0], cols[-1] + 1, rows[0], rows[-1] + 1
        dx = (xs[c0:c1] - bumps.x[i]) / bumps.rx[i]
        dy = (ys[r0:r1] - bumps.y[i]) / bumps.ry[i]
        d2 = np.clip(1.0 - (dx[None, :] ** 2 + dy[:, None] ** 2), 0.0, None)
        shape = np.sqrt(d2) if profile == "dome" else d2**2
        out[r0:r1, c0:c1] += bumps.height[i] * shape
    return out


def cyst_maps(xs: np.ndarray, ys: np.ndarray, state: VisitState) -> tuple[np.ndarray, np.ndarray]:
    """Total cyst height (µm) in the INL and in the ONL per A-scan position."""
    inl = splat(xs, ys, _subset(state.cysts, ~state.cyst_in_onl))
    onl = splat(xs, ys, _subset(state.cysts, state.cyst_in_onl))
    return inl, onl


def _subset(b: Bumps, mask: np.ndarray) -> Bumps:
    if len(b) == 0:
        return b
    return Bumps(b.x[mask], b.y[mask], b.rx[mask], b.ry[mask], b.height[mask])


def edema_map(state: VisitState, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Diffuse retinal thickening (µm): a Gaussian around the visit's lesion centre."""
    d2 = (X - state.edema_x) ** 2 + (Y - state.edema_y) ** 2
    return state.edema_um * np.exp(-d2 / (2 * state.edema_sigma**2))


def normal_thickness(eye: EyeAnatomy, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Healthy ILM-BM thickness (µm): perifoveal plateau, parafoveal rim, foveal pit."""
    r = np.hypot(X, Y)
    rim = eye.rim_gain * np.exp(-(((r - 1.1) / 0.75) ** 2))
    slope = -6.0 * np.clip(r - 1.5, 0.0, None)  # thinning towards the periphery
    nasal = 18.0 * np.clip(X / 3.0, -1.0, 1.0)  # thicker towards the disc
    pit = eye.pit_depth_um * np.exp(-((r / eye.pit_width_mm) ** 2))
    return eye.peri_um * (1.0 + rim) + slope + nasal - pit


def layer_thicknesses(eye: EyeAnatomy, state: VisitState, xs: np.ndarray, ys: np.ndarray) -> dict:
    """Thickness (µm) of each layer in ``LAYERS`` on the grid, plus cyst heights per layer.

    The sum over LAYERS is the ILM-BM thickness map the CST label is computed from.
    """
    X, Y = np.meshgrid(xs, ys)
    r = np.hypot(X, Y)
    total_normal = normal_thickness(eye, X, Y)
    pit = 1.0 - np.exp(-((r / (eye.pit_width_mm * 0.9)) ** 2))  # inner layers vanish in the pit
    t = {}
    for gain, (name, um) in zip(eye.layer_gain, INNER_LAYER_UM.items(), strict=True):
        t[name] = um * gain * pit
    t["rnfl"] = t["rnfl"] * (1.0 + 0.6 * np.clip(X / 3.0, 0.0, 1.0))  # thicker nasally
    for name, um in PHOTORECEPTOR_UM.items():
        t[name] = np.full_like(X, um)
    t["os"] = t["os"] * (1.0 + 0.3 * np.exp(-((r / 0.4) ** 2)))  # longer foveal cone outer segments
    t["rpe"] = np.full_like(X, RPE_UM)
    inner = sum(t[k] for k in INNER_LAYER_UM) + sum(t[k] for k in PHOTORECEPTOR_UM) + t["rpe"]
    t["onl"] = np.clip(total_normal - inner, MIN_ONL_UM, None)

    # Pathology.
    drusen = splat(xs, ys, state.drusen, "smooth")
    ped = splat(xs, ys, state.ped, "dome")
    srf = splat(xs, ys, state.srf, "dome")
    cyst_inl, cyst_onl = cyst_maps(xs, ys, state)
    edema = edema_map(state, X, Y)
    # Drusen displace the photoreceptors: the ONL over a druse thins by half its height.
    t["onl"] = np.clip(t["onl"] - 0.5 * drusen, MIN_ONL_UM * 0.6, None)
    t["inl"] = t["inl"] + 0.35 * edema * pit + cyst_inl
    t["opl"] = t["opl"] + 0.15 * edema
    t["onl"] = t["onl"] + (0.65 * edema + 0.35 * edema * (1 - pit)) + cyst_onl
    t["srf"] = srf
    t["sub_rpe"] = drusen + ped
    t["_cyst_inl"], t["_cyst_onl"] = cyst_inl, cyst_onl
    t["_ped"], t["_drusen"] = ped, drusen
    return t


def total_thickness(t: dict) -> np.ndarray:
    return sum(t[k] for k in LAYERS)


def central_subfield_thickness(eye: EyeAnatomy, state: VisitState, n: int = 61) -> float:
    """Mean ILM-BM thickness (µm) in the central 1 mm diameter circle (the ETDRS central subfield)."""
    g = np.linspace(-0.5, 0.5, n)
    t = total_thickness(layer_thicknesses(eye, state, g, g))
    inside = (g[None, :] ** 2 + g[:, None] ** 2) <= 0.25
    return float(t[inside].mean())


def fluid_volumes_nl(eye: EyeAnatomy, state: VisitState, radius_mm: float = 1.5) -> dict[str, float]:
    """IRF / SRF / PED / drusen volumes in nl (1 nl = 1e-3 mm³ = 1 µm·mm²) within ``radius_mm``."""
    g = np.linspace(-radius_mm, radius_mm, 61)
    cell = (g[1] - g[0]) ** 2  # mm²
    inside = (g[None, :] ** 2 + g[:, None] ** 2) <= radius_mm**2
    t = layer_thicknesses(eye, state, g, g)
    vol = {
        "irf": (t["_cyst_inl"] + t["_cyst_onl"]),
        "srf": t["srf"],
        "ped": t["_ped"],
        "drusen": t["_drusen"],
    }
    return {k: float(v[inside].sum() * cell) for k, v in vol.items()}
