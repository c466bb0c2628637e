"""Cohort fixtures (owned by the synthetic-cohort work): tiny synthetic cohorts, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_COHORT = {
    "patients": 6,
    "visits": 2,
    "seed": 0,
    "oct_shape": (8, 64, 64),
    "fundus_size": 64,
    "workers": 1,  # tiny: a process pool would cost more than it saves
}


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DICOM cohort (6 patients, 2 visits per eye, OCT 8x64x64, fundus 64); returns its folder.

    ``<dir>/manifest.csv`` lists the visits; paths in it are relative to ``<dir>``.
    """
    from retinacli.synth import generate_cohort

    out = tmp_path_factory.mktemp("tiny_cohort") / "cohort"
    generate_cohort(out, formats=("dicom",), **TINY_COHORT)
    return out


@pytest.fixture(scope="session")
def tiny_cohort_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same cohort as ``tiny_cohort`` written as PNG files (fundus PNG, OCT folder of B-scans)."""
    from retinacli.synth import generate_cohort

    out = tmp_path_factory.mktemp("tiny_cohort_png") / "cohort"
    generate_cohort(out, formats=("png",), **TINY_COHORT)
    return out
