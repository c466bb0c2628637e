"""Bounded property-based fuzzing (hypothesis) of every parser that takes user files: DICOM, images
(PNG / JPEG / BMP / TIFF), .npy, the labels CSV (`retina pair --labels`), the cohort manifest CSV
and the package descriptor (retina.json). Mutations and the property live in fuzz/fuzz_targets.py;
the long run is `python fuzz/run_fuzz.py --cases 10000` (docs/reliability.md).

Property: an item that keeps the item contract, or `ReadError` / `ValueError` / `RetinaError` with a
one-line message (without the file's patient identifiers); never any other exception.
Deterministic (derandomize): the same cases run on every CI run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
import fuzz_targets

# pydicom warns about each odd value it meets (the CLI silences these; pytest resets filters per test).
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:pydicom"),
    pytest.mark.filterwarnings("ignore:Generating overly large repr"),
]

# A few hundred cases in all, a few seconds each target on CI.
CASES = {"dicom": 150, "image": 100, "npy": 50, "labels": 60, "manifest": 40, "package": 40}


def fuzz_settings(target: str):
    return settings(
        max_examples=CASES[target], deadline=None, derandomize=True, database=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    from fixtures_packages import make_toy_package

    seeds = fuzz_targets.make_seeds()
    workdir = tmp_path_factory.mktemp("fuzz")
    package = make_toy_package(tmp_path_factory.mktemp("fuzz_package") / "toy")
    fuzz_targets.add_package_seed(seeds, package, workdir)
    return seeds, workdir


def run(target, seeds, rnd):
    all_seeds, workdir = seeds
    outcome = fuzz_targets.run_case(target, all_seeds, rnd, workdir)
    assert outcome in ("read", "error")


def test_seeds_are_valid(seeds):
    """Unmutated seeds all read: the fuzzing starts from files that work."""
    all_seeds, workdir = seeds
    for target, (group, _, check) in fuzz_targets.TARGETS.items():
        if target == "manifest":
            continue  # its rows point at files that do not exist; the parser alone is fuzzed
        (workdir / group).mkdir(exist_ok=True)
        for name, data in all_seeds[group].items():
            (workdir / group / name).write_bytes(data)
            assert check(workdir / group / name) == "read", (target, name)


@fuzz_settings("dicom")
@given(rnd=st.randoms(use_true_random=False))
def test_fuzz_dicom_reader(seeds, rnd):
    run("dicom", seeds, rnd)


@fuzz_settings("image")
@given(rnd=st.randoms(use_true_random=False))
def test_fuzz_image_readers(seeds, rnd):
    run("image", seeds, rnd)


@fuzz_settings("npy")
@given(rnd=st.randoms(use_true_random=False))
def test_fuzz_npy_reader(seeds, rnd):
    run("npy", seeds, rnd)


@fuzz_settings("labels")
@given(rnd=st.randoms(use_true_random=False))
def test_fuzz_labels_csv(seeds, rnd):
    run("labels", seeds, rnd)


@fuzz_settings("manifest")
@given(rnd=st.randoms(use_true_random=False))
def test_fuzz_cohort_manifest_csv(seeds, rnd):
    run("manifest", seeds, rnd)


@fuzz_settings("package")
@given(rnd=st.randoms(use_true_random=False))
def test_fuzz_model_package_descriptor(seeds, rnd):
    run("package", seeds, rnd)
