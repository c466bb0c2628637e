"""The fast preprocessing (retinacli/preprocess.py) against the frozen reference maths
(benchmarks/naive_preprocess.py, the code as it was before issue 16), at acquisition sizes.

Promises (docs/preprocessing.md, "Exactness"):
- OCT: within 1e-6 of the reference for every input type; for integer volumes (the DICOM case) the
  window, percentiles and scaling are the reference's own numbers, bit for bit.
- Fundus: within 5e-6 (normalised units; one grey level is ~0.017): the same weights and sums, in a
  different float32 order.
- A volume holding only the picked B-scans gives the identical array to the full volume.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from retinacli import preprocess as pp
from retinacli.synth.anatomy import sample_eye, sample_visits
from retinacli.synth.fundus import fundus_canvas, render_fundus
from retinacli.synth.oct import oct_geometry, render_oct
from retinacli.synth.random import rng_for
from retinacli.synth.vessels import rasterize_vessels

OCT_TOL = 1e-6
FUNDUS_TOL = 5e-6


def _load_frozen():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "naive_preprocess.py"
    spec = importlib.util.spec_from_file_location("naive_preprocess", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _load_frozen()

DEMO = pp.make_spec(oct_slices=4, oct_size=32, fundus_size=48)
REFERENCE = pp.make_spec(oct_slices=16, oct_size=112, fundus_size=224)


@pytest.fixture(scope="module")
def synth():
    """Real `retina synth` renderings (small), and acquisition-size arrays built from them: upsampled
    anatomy plus fresh speckle, so large downscale factors see both structure and pixel noise."""
    eye = sample_eye(7, 0, "OD")
    state = sample_visits(7, eye, [dt.date(2020, 1, 1)])[0]
    geo = oct_geometry(eye, (25, 224, 256))
    arteries, veins = rasterize_vessels(eye.vessels, geo.xs_eye, geo.ys)
    small_oct, _, _ = render_oct(eye, state, (25, 224, 256), np.maximum(arteries, veins), rng_for(7, "p", 0))
    canvas = fundus_canvas(eye, 384)
    colour, _ = render_fundus(eye, state, canvas, "colour", rng_for(7, "p", 1))
    nir, _ = render_fundus(eye, state, canvas, "nir", rng_for(7, "p", 2))
    rng = np.random.default_rng(3)

    def enlarge(img, shape):
        reps = [int(np.ceil(s / n)) for s, n in zip(shape, img.shape, strict=True)]
        big = np.kron(img.astype(np.int16), np.ones(reps, np.int16))[tuple(slice(0, s) for s in shape)]
        return np.clip(big + rng.integers(-12, 13, size=shape), 0, 255).astype(np.uint8)

    big_colour = enlarge(colour, (1536, 1536, 3))
    return {
        "oct 25x224x256": small_oct,
        "oct 49x496x512": enlarge(small_oct[np.linspace(0, 24, 49).round().astype(int)], (49, 496, 512)),
        "fundus colour 384": colour,
        "fundus nir 384": nir[..., 0],
        "fundus colour 1536": big_colour,
        "fundus nir 1536 (H,W,1)": enlarge(nir, (1536, 1536, 1)),
        "fundus colour 1920x2560": enlarge(colour, (1920, 2560, 3)),
        "fundus gray 2048": enlarge(nir[..., 0], (2048, 2048)),
    }


def _assert_close(fast, frozen, tol):
    assert fast.shape == frozen.shape and fast.dtype == frozen.dtype == np.float32
    assert np.abs(fast.astype(np.float64) - frozen).max() <= tol


@pytest.mark.parametrize("spec", [DEMO, REFERENCE], ids=["demo", "reference"])
@pytest.mark.parametrize("name", ["oct 25x224x256", "oct 49x496x512"])
def test_oct_equals_frozen_maths_at_acquisition_size(synth, name, spec):
    volume = synth[name]
    fast = pp.preprocess_oct(volume, spec)
    _assert_close(fast, ref.preprocess_oct(volume, spec), OCT_TOL)
    # the picked B-scans alone (what frame-selective reading hands over) give the identical array
    picked = np.ascontiguousarray(volume[pp.slice_indices(volume.shape[0], spec["oct"]["slices"])])
    assert np.array_equal(pp.preprocess_oct(picked, spec), fast)
    assert np.array_equal(pp.slice_indices(spec["oct"]["slices"], spec["oct"]["slices"]),
                          np.arange(spec["oct"]["slices"]))


@pytest.mark.parametrize(
    "convert",
    [
        lambda v: v.astype(np.uint16) * 16 + 7,  # 12-bit data in 16-bit words
        lambda v: v.astype(np.int16) - 100,  # signed, negative values
        lambda v: v.astype(np.float32) / 255,  # float reflectivity
        lambda v: v.astype(np.float64) * 3.5,
        lambda v: np.repeat(v[..., None], 3, axis=-1),  # B-scans stored as RGB
        lambda v: v[7],  # one B-scan (line scan)
        lambda v: v[:3],  # fewer B-scans than slices: repeats
        lambda v: np.full_like(v, 9),  # constant: the 1e-6 floor of the scale
    ],
    ids=["uint16", "int16", "float32", "float64", "rgb", "2d", "few", "constant"],
)
@pytest.mark.parametrize(
    "spec",
    [
        REFERENCE,
        pp.make_spec(oct_slices=8, oct_size=(32, 48)),
        pp.make_spec(oct_slices=5, oct_size=300),  # upsampling the cropped height
    ],
    ids=["reference", "wide", "upsample"],
)
def test_oct_equals_frozen_maths_for_every_input_type(synth, convert, spec):
    volume = convert(synth["oct 25x224x256"])
    _assert_close(pp.preprocess_oct(volume, spec), ref.preprocess_oct(volume, spec), OCT_TOL)


@pytest.mark.parametrize("crop, percentiles", [(1.0, [1.0, 99.5]), (0.3, [0, 100]), (0.5, [5, 95]),
                                               (0.5, [33.3, 66.7])])
def test_oct_spec_variants_equal_frozen_maths(synth, crop, percentiles):
    spec = pp.make_spec(oct_slices=16, oct_size=64)
    spec["oct"]["axial_crop"], spec["oct"]["percentiles"] = crop, percentiles
    volume = synth["oct 49x496x512"]
    _assert_close(pp.preprocess_oct(volume, spec), ref.preprocess_oct(volume, spec), OCT_TOL)


def test_integer_axial_window_is_the_float_one(synth):
    volume = synth["oct 49x496x512"][::3]
    for pixels in (volume, volume.astype(np.uint16) * 300, volume.astype(np.int16) - 128):
        for fraction in (0.3, 0.5, 0.9):
            assert pp.axial_window(pixels, fraction) == ref.axial_window(pixels.astype(np.float32), fraction)


def test_integer_percentiles_are_numpys_bit_for_bit():
    rng = np.random.default_rng(11)
    for trial in range(400):
        dtype = [np.uint8, np.uint16, np.int8, np.int16][trial % 4]
        info = np.iinfo(dtype)
        lo = int(rng.integers(info.min, info.max))
        hi = int(rng.integers(lo, int(info.max) + 1))
        values = rng.integers(lo, hi + 1, size=(2, int(rng.integers(1, 40)), 3)).astype(dtype)
        choices = [0, 0.5, 1, 2.5, 50, 99, 99.5, 100, rng.random() * 100]
        q = sorted(float(rng.choice(choices)) for _ in range(2))
        want = np.percentile(values.astype(np.float32), q)
        got = pp._int_percentiles(values, q)
        assert (got[0], got[1]) == (want[0], want[1]) and type(got[0]) is type(want[0])


@pytest.mark.parametrize("spec", [DEMO, REFERENCE], ids=["demo", "reference"])
@pytest.mark.parametrize(
    "name",
    ["fundus colour 384", "fundus nir 384", "fundus colour 1536", "fundus nir 1536 (H,W,1)",
     "fundus colour 1920x2560", "fundus gray 2048"],
)
def test_fundus_equals_frozen_maths_at_acquisition_size(synth, name, spec):
    image = synth[name]
    _assert_close(pp.preprocess_fundus(image, spec), ref.preprocess_fundus(image, spec), FUNDUS_TOL)


@pytest.mark.parametrize(
    "convert",
    [
        lambda im: im.astype(np.uint16) * 16,  # 12-bit colour
        lambda im: im.astype(np.float32) / 200,  # float, partly above 1 (clipped)
        lambda im: np.concatenate([im, np.full((*im.shape[:2], 1), 255, np.uint8)], axis=-1),  # RGBA
        lambda im: im[:300, :, 1],  # gray, not square
        lambda im: im[:1, :1],  # one pixel
    ],
    ids=["uint16", "float", "rgba", "gray-wide", "one-pixel"],
)
@pytest.mark.parametrize(
    "spec",
    [REFERENCE, pp.make_spec(fundus_size=48, fundus_channels=1), pp.make_spec(fundus_size=500)],
    ids=["reference", "one-channel", "upsample"],
)
def test_fundus_equals_frozen_maths_for_every_input_type(synth, convert, spec):
    image = convert(synth["fundus colour 384"])
    _assert_close(pp.preprocess_fundus(image, spec), ref.preprocess_fundus(image, spec), FUNDUS_TOL)


@pytest.mark.parametrize("name", ["fundus colour 1920x2560", "fundus gray 2048"])
def test_fundus_without_crop_equals_frozen_maths(synth, name):
    spec = pp.make_spec(fundus_size=112)
    spec["fundus"]["crop"] = "none"
    image = synth[name]
    _assert_close(pp.preprocess_fundus(image, spec), ref.preprocess_fundus(image, spec), FUNDUS_TOL)


@pytest.mark.parametrize("shape, out", [((3, 1536, 1536), (224, 224)), ((16, 248, 512), (112, 112)),
                                        ((2, 40, 30), (112, 112)), ((1, 1, 1), (5, 3))])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_resize_2d_equals_frozen_maths(shape, out, dtype):
    stack = np.random.default_rng(5).random(shape).astype(dtype)
    fast = pp.resize_2d(stack, *out)
    assert fast.dtype == np.float32 and fast.shape == shape[:-2] + out
    # float64 input is summed in float64 as before, so only the final rounding to float32 can differ
    tol = 1e-6 if dtype == np.float64 else 2e-6
    assert np.abs(fast.astype(np.float64) - ref.resize_2d(stack, *out)).max() <= tol


@pytest.mark.parametrize("n_in, n_out",
                         [(2048, 48), (1536, 224), (248, 112), (512, 32), (40, 112), (1, 7), (5, 5)])
def test_bands_hold_every_weight_of_the_dense_matrix(n_in, n_out):
    dense = pp._resample_matrix(n_in, n_out)
    rebuilt = np.zeros_like(dense)
    covered = 0
    for o0, o1, i0, i1, block in pp._bands(n_in, n_out):
        assert o0 == covered and o1 - o0 <= pp._BAND_OUTPUTS  # consecutive, bounded blocks
        rebuilt[o0:o1, i0:i1] = block
        covered = o1
    assert covered == n_out and np.array_equal(rebuilt, dense)


def test_bad_inputs_fail_as_before():
    volume = np.zeros((4, 20, 20), np.float32)
    volume[1, 2, 3] = np.nan
    for module in (pp, ref):
        with pytest.raises(ValueError, match="OCT volume contains NaN or infinite values"):
            module.preprocess_oct(volume, DEMO)
        with pytest.raises(ValueError, match="fundus image contains NaN or infinite values"):
            module.preprocess_fundus(np.full((8, 8, 3), np.inf, np.float32), DEMO)
        with pytest.raises(ValueError, match=r"got shape \(2, 3, 4, 5, 6\)"):
            module.preprocess_oct(np.zeros((2, 3, 4, 5, 6), np.uint8), DEMO)
        with pytest.raises(ValueError, match=r"got shape \(4, 4, 2\)"):
            module.preprocess_fundus(np.zeros((4, 4, 2), np.uint8), DEMO)
