"""The two modalities of a synthetic visit genuinely correspond (checked from the written files only).

- Vessel shadows: along each B-scan's line on the fundus (from the OPT's Ophthalmic Frame Location),
  dark fundus vessels line up with the shadows they cast on the outer retina and choroid in the OCT.
- CST: the ILM-to-BM thickness segmented from the OCT volume, averaged over the central 1 mm circle
  with the DICOM pixel spacing, matches the manifest's ``cst_um`` within the label noise.
- Identity at low resolution: visits of the same eye are each other's nearest neighbours.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from retinacli.synth import generate_cohort
from retinacli.synth.anatomy import RPE_UM
from retinacli.synth.labels import CST_NOISE_UM


def read_manifest(root: Path) -> list[dict]:
    with open(root / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def medium_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten patients, one visit, OCT fine enough to segment (31 x 160 x 192), fundus 256."""
    out = tmp_path_factory.mktemp("medium") / "cohort"
    generate_cohort(out, patients=10, visits=1, seed=0, oct_shape=(31, 160, 192), fundus_size=256,
                    formats=("dicom",))
    return out


def moving_average(a: np.ndarray, k: int, axis: int) -> np.ndarray:
    pad = [(k // 2, k - 1 - k // 2) if i == axis else (0, 0) for i in range(a.ndim)]
    c = np.cumsum(np.pad(a, pad, mode="edge"), axis=axis, dtype=np.float64)
    c = np.concatenate([np.zeros_like(np.take(c, [0], axis=axis)), c], axis=axis)
    n = a.shape[axis]
    return (np.take(c, np.arange(k, k + n), axis=axis) - np.take(c, np.arange(n), axis=axis)) / k


def line_profiles(oct_path: Path, fundus_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """OCT shadow depth and fundus darkness (high-passed) along every B-scan line, concatenated."""
    import pydicom

    oct_ds, fundus = pydicom.dcmread(oct_path), pydicom.dcmread(fundus_path)
    volume = oct_ds.pixel_array.astype(np.float64)
    image = fundus.pixel_array.astype(np.float64)
    gray = image[..., 1] if image.ndim == 3 else image  # green: the best vessel contrast
    _, h, w = volume.shape
    oct_signal, fundus_signal = [], []
    for k, frame in enumerate(oct_ds.PerFrameFunctionalGroupsSequence):
        r0, c0, r1, c1 = (float(v) for v in frame.OphthalmicFrameLocationSequence[0].ReferenceCoordinates)
        t = np.linspace(0.0, 1.0, w)
        rows = np.clip(np.round(r0 - 1 + t * (r1 - r0)).astype(int), 0, gray.shape[0] - 1)
        cols = np.clip(np.round(c0 - 1 + t * (c1 - c0)).astype(int), 0, gray.shape[1] - 1)
        along_fundus = gray[rows, cols]
        below = volume[k, h // 2 :, :].mean(axis=0)  # outer retina + choroid: shadowed under vessels
        # Keep only "darker than the surroundings": vessels on the fundus, shadows on the OCT
        # (bright lesions such as exudates are not what this test is about).
        oct_signal.append(np.minimum(below - moving_average(below, 15, 0), 0.0))
        fundus_signal.append(np.minimum(along_fundus - moving_average(along_fundus, 15, 0), 0.0))
    return np.concatenate(oct_signal), np.concatenate(fundus_signal)


def test_vessel_shadows_line_up_with_fundus_vessels(medium_cohort: Path) -> None:
    rows = read_manifest(medium_cohort)
    matched, mismatched = [], []
    for i, r in enumerate(rows):
        a, b = line_profiles(medium_cohort / r["oct_path"], medium_cohort / r["fundus_path"])
        matched.append(np.corrcoef(a, b)[0, 1])
        other = rows[(i + 3) % len(rows)]  # another eye's fundus: its vessels are elsewhere
        a, b = line_profiles(medium_cohort / r["oct_path"], medium_cohort / other["fundus_path"])
        mismatched.append(np.corrcoef(a, b)[0, 1])
    matched, mismatched = np.array(matched), np.array(mismatched)
    assert matched.min() > 0.3 and matched.mean() > 0.5, matched
    assert np.abs(mismatched).mean() < 0.08, mismatched


def segment_cst(oct_path: Path) -> float:
    """Mean ILM-BM thickness (µm) in the central 1 mm circle, from the pixels and DICOM spacing.

    ILM: first crossing (sub-pixel) of half-way between vitreous and bright retina.
    BM: centre of the brightest band well below the ILM (the RPE; lateral running median, parabolic
    peak) plus half the RPE thickness.
    """
    import pydicom

    ds = pydicom.dcmread(oct_path)
    volume = ds.pixel_array.astype(np.float64)
    measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    axial_mm, lateral_mm = (float(v) for v in measures.PixelSpacing)
    slice_mm = float(measures.SpacingBetweenSlices)
    s, h, w = volume.shape
    lateral = moving_average(volume, 7, 2)
    vitreous = lateral[:, : h // 8, :].mean()
    threshold = vitreous + 0.5 * (np.percentile(lateral, 97) - vitreous)
    first = np.argmax(lateral > threshold, axis=1)
    before = np.take_along_axis(lateral, np.maximum(first - 1, 0)[:, None, :], 1)[:, 0]
    at = np.take_along_axis(lateral, first[:, None, :], 1)[:, 0]
    ilm = first - 0.5 + (threshold - before) / np.maximum(at - before, 1e-6)
    smooth = moving_average(lateral, 3, 1)
    # The RPE lies at least ~150 µm below the ILM; searching from there skips the bright RNFL and
    # vessel walls, which win where a vessel shadows the RPE.
    floor = first + round(0.15 / axial_mm)
    below_ilm = np.where(np.arange(h)[None, :, None] > floor[:, None, :], smooth, -1.0)
    peak = np.argmax(below_ilm, axis=1)
    # Like any layer segmentation, keep the surface continuous: a lateral running median.
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(peak, ((0, 0), (4, 4)), mode="edge"), 9, axis=1)
    peak = np.median(windows, axis=2).astype(int)
    up, centre, down = (
        np.take_along_axis(smooth, np.clip(peak + d, 0, h - 1)[:, None, :], 1)[:, 0] for d in (-1, 0, 1)
    )
    rpe = peak + 0.5 + 0.5 * (up - down) / np.minimum(up - 2 * centre + down, -1e-6)
    thickness = (rpe - ilm) * axial_mm * 1000.0 + RPE_UM / 2.0
    ys = (np.arange(s) - (s - 1) / 2.0) * slice_mm
    xs = (np.arange(w) - (w - 1) / 2.0) * lateral_mm
    inside = ys[:, None] ** 2 + xs[None, :] ** 2 <= 0.5**2
    return float(thickness[inside].mean())


def test_cst_recomputed_from_oct_matches_label(medium_cohort: Path) -> None:
    # Eyes whose RPE lies on Bruch's membrane (no PED / drusen): there the BM is the RPE's base.
    rows = [r for r in read_manifest(medium_cohort) if r["disease"] in ("healthy", "dme")]
    assert len(rows) >= 6
    label = np.array([float(r["cst_um"]) for r in rows])
    measured = np.array([segment_cst(medium_cohort / r["oct_path"]) for r in rows])
    error = measured - label
    # Label noise has SD CST_NOISE_UM; segmentation on 12 µm pixels adds a few µm.
    assert np.median(np.abs(error)) <= 2 * CST_NOISE_UM, error
    assert np.abs(error).max() <= 4 * CST_NOISE_UM, error
    assert np.corrcoef(measured, label)[0, 1] > 0.95


def test_same_eye_is_nearest_neighbour_at_low_resolution(tiny_cohort_png: Path) -> None:
    """Identity survives 64-pixel fundus and 8x64x64 OCT: what fundus->OCT retrieval builds on."""
    from PIL import Image

    rows = read_manifest(tiny_cohort_png)

    def unit(a: np.ndarray) -> np.ndarray:
        a = a - a.mean()
        return (a / np.linalg.norm(a)).ravel()

    def fundus(r: dict) -> np.ndarray:
        a = np.asarray(Image.open(tiny_cohort_png / r["fundus_path"]), dtype=np.float64)
        return unit(a.mean(axis=2) if a.ndim == 3 else a)

    def oct_volume(r: dict) -> np.ndarray:
        files = sorted((tiny_cohort_png / r["oct_path"]).glob("bscan_*.png"))
        return unit(np.stack([np.asarray(Image.open(f), dtype=np.float64) for f in files]))

    eye_of = [(r["patient_id"], r["eye"]) for r in rows]
    for embed, floor in ((fundus, 0.8), (oct_volume, 0.8)):
        x = np.stack([embed(r) for r in rows])
        similarity = x @ x.T
        np.fill_diagonal(similarity, -np.inf)
        nearest = similarity.argmax(axis=1)
        same_eye = np.mean([eye_of[i] == eye_of[j] for i, j in enumerate(nearest)])
        assert same_eye >= floor, (embed.__name__, same_eye)
