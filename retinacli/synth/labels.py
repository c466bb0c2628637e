"""Clinical labels derived from the latent anatomy, with measurement noise.

- ``cst_um``: central subfield thickness, the mean ILM-BM thickness in the central 1 mm circle,
  plus segmentation noise (SD ``CST_NOISE_UM``).
- ``bcva_letters``: ETDRS letters (0-100), falling with central thickening and, saturating, with
  fluid (intraretinal fluid hurts most), PED and drusen load, plus test-retest noise.
- ``bcva_label``: 1 when ``bcva_letters < 70``, i.e. worse than 20/40 Snellen (70 letters = 20/40,
  the usual driving / "good vision" cut-off).
- ``tn_label``: 1 for high treatment need. A latent activity score combines the eye's poor
  response to treatment (how fast fluid comes back), the visit's exudative activity and its fluid
  volume; the label is the score above ``TN_THRESHOLD``.
"""

from __future__ import annotations

import numpy as np

from retinacli.synth.anatomy import (
    EyeAnatomy,
    VisitState,
    central_subfield_thickness,
    fluid_volumes_nl,
)

CST_NOISE_UM = 6.0
BCVA_NOISE_LETTERS = 4.0
BCVA_THRESHOLD_LETTERS = 70  # bcva_label = 1 below this (worse than 20/40)
TN_THRESHOLD = 1.15
TN_NOISE = 0.25


def _saturating(volume_nl: float, scale_nl: float) -> float:
    """0 for no fluid, approaching 1 for large volumes (vision loss saturates)."""
    return float(1.0 - np.exp(-volume_nl / scale_nl))


def visit_labels(eye: EyeAnatomy, state: VisitState, rng: np.random.Generator) -> dict:
    cst_true = central_subfield_thickness(eye, state)
    vol = fluid_volumes_nl(eye, state)
    letters = (
        82.0
        + eye.acuity_offset
        - 0.07 * max(0.0, cst_true - 290.0)
        - 22.0 * _saturating(vol["irf"], 60.0)
        - 10.0 * _saturating(vol["srf"], 300.0)
        - 6.0 * _saturating(vol["ped"], 200.0)
        - 6.0 * _saturating(vol["drusen"], 60.0)
        - 12.0 * eye.severity**2 * (eye.disease == "dry_amd")  # atrophy, not rendered
        + rng.normal(0.0, BCVA_NOISE_LETTERS)
    )
    if letters < 35.0:  # very poor vision degrades more slowly (floor effect of the chart)
        letters = 35.0 - 0.4 * (35.0 - letters)
    letters = int(np.clip(round(letters), 0, 100))
    activity_score = (
        1.6 * eye.resistance * (eye.disease in ("nv_amd", "dme"))
        + 1.2 * state.activity
        + 0.0015 * (vol["irf"] * 4 + vol["srf"])
        + rng.normal(0.0, TN_NOISE)
    )
    return {
        "cst_um": round(cst_true + rng.normal(0.0, CST_NOISE_UM), 1),
        "bcva_letters": letters,
        "bcva_label": int(letters < BCVA_THRESHOLD_LETTERS),
        "tn_label": int(activity_score > TN_THRESHOLD),
        "_cst_true_um": cst_true,
        "_activity_score": float(activity_score),
        "_volumes_nl": vol,
    }
