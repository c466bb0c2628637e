import numpy as np
import pytest

from retinacli import preprocess as pp


def test_oct_output_shape_dtype_and_normalisation():
    spec = pp.make_spec(oct_slices=8, oct_size=(32, 48))
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 256, size=(49, 120, 160), dtype=np.uint8)
    out = pp.preprocess_oct(volume, spec)
    assert out.shape == (1, 8, 32, 48) and out.dtype == np.float32
    o = spec["oct"]
    # Percentile scaling maps into [0, 1] before mean/std: the bounds follow from the spec.
    assert out.min() >= (0 - o["mean"]) / o["std"] - 1e-5
    assert out.max() <= (1 - o["mean"]) / o["std"] + 1e-5


def test_oct_preprocessing_is_dtype_invariant_and_deterministic():
    spec = pp.make_spec(oct_slices=4, oct_size=16)
    rng = np.random.default_rng(1)
    volume = rng.integers(0, 256, size=(10, 40, 40)).astype(np.uint8)
    a = pp.preprocess_oct(volume, spec)
    b = pp.preprocess_oct(volume.astype(np.uint16) * 257, spec)  # same image, 16-bit
    c = pp.preprocess_oct(volume, spec)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.array_equal(a, c)


def test_slice_sampling_picks_bin_centres_and_repeats_single_bscan():
    assert pp.slice_indices(49, 4).tolist() == [6, 18, 30, 42]
    assert pp.slice_indices(1, 3).tolist() == [0, 0, 0]
    single = pp.preprocess_oct(np.full((30, 30), 7, np.uint8), pp.make_spec(oct_slices=3, oct_size=8))
    assert single.shape == (1, 3, 8, 8)


def test_resize_preserves_constant_and_mean():
    flat = np.full((3, 50, 70), 0.3, np.float32)
    np.testing.assert_allclose(pp.resize_2d(flat, 17, 23), 0.3, atol=1e-6)
    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1))
    small = pp.resize_2d(ramp, 16, 16)
    assert abs(small.mean() - ramp.mean()) < 1e-3
    assert np.all(np.diff(small[0]) > 0)  # monotone ramp stays monotone


def test_fundus_gray_and_colour_channels():
    spec = pp.make_spec(fundus_size=24)
    gray = np.full((60, 80), 128, np.uint8)
    out = pp.preprocess_fundus(gray, spec)
    assert out.shape == (3, 24, 24)
    f = spec["fundus"]
    expected = (128 / 255 - np.asarray(f["mean"])) / np.asarray(f["std"])
    np.testing.assert_allclose(out[:, 12, 12], expected, atol=1e-5)

    one = pp.make_spec(fundus_size=24, fundus_channels=1)
    one["fundus"]["mean"], one["fundus"]["std"] = [0.5], [0.5]
    rgb = np.zeros((40, 40, 3), np.uint8)
    rgb[..., 1] = 255  # pure green -> luminance 0.587
    out1 = pp.preprocess_fundus(rgb, one)
    assert out1.shape == (1, 24, 24)
    np.testing.assert_allclose(out1, (0.587 - 0.5) / 0.5, atol=1e-5)


def test_fundus_center_square_crop_discards_sides():
    spec = pp.make_spec(fundus_size=10)
    spec["fundus"]["mean"], spec["fundus"]["std"] = [0, 0, 0], [1, 1, 1]
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, 100:200] = 255  # the central square is white, the sides black
    assert np.allclose(pp.preprocess_fundus(img, spec), 1.0, atol=1e-5)


def test_16bit_fundus_with_12_stored_bits_uses_full_range():
    spec = pp.make_spec(fundus_size=8)
    spec["fundus"]["mean"], spec["fundus"]["std"] = [0, 0, 0], [1, 1, 1]
    img = np.full((20, 20), 4095, np.uint16)
    np.testing.assert_allclose(pp.preprocess_fundus(img, spec), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s["oct"].update(slices=0), "oct.slices"),
        (lambda s: s["fundus"].update(channels=2), "channels"),
        (lambda s: s.update(version=99), "version"),
        (lambda s: s["oct"].pop("height"), "missing"),
    ],
)
def test_invalid_specs_are_rejected_with_reason(mutate, message):
    spec = pp.make_spec()
    mutate(spec)
    with pytest.raises(ValueError, match=message):
        pp.validate_spec(spec)


def test_nan_volume_is_rejected():
    vol = np.zeros((4, 8, 8), np.float32)
    vol[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pp.preprocess_oct(vol, pp.make_spec(oct_slices=4))


def test_spec_hash_is_stable_and_sensitive():
    a, b = pp.make_spec(), pp.make_spec()
    assert pp.spec_hash(a) == pp.spec_hash(b)
    b["fundus"]["size"] = 64
    assert pp.spec_hash(a) != pp.spec_hash(b)


def test_axial_crop_centres_the_retina_band():
    volume = np.zeros((2, 200, 40), np.float32)
    volume[:, 130:150] = 1.0  # a bright band low in the B-scan
    window = pp.axial_window(volume, 0.5)
    assert window.stop - window.start == 100 and window.start <= 130 and window.stop >= 150
    assert abs((window.start + window.stop) / 2 - 140) <= 1
    # Near the bottom edge the window is clamped inside the image.
    volume[:] = 0
    volume[:, 195:] = 1.0
    assert pp.axial_window(volume, 0.5) == slice(100, 200)
    # No crop when asked for the full height; a flat image keeps the centre.
    assert pp.axial_window(volume, 1.0) == slice(0, 200)
    assert pp.axial_window(np.ones((1, 200, 10), np.float32), 0.5) == slice(50, 150)


def test_axial_crop_gives_the_retina_more_rows_after_resizing():
    volume = np.zeros((4, 240, 64), np.float32)
    volume[:, 100:130] = 1.0
    cropped = pp.make_spec(oct_slices=4, oct_size=48)
    full = pp.make_spec(oct_slices=4, oct_size=48)
    full["oct"]["axial_crop"] = 1.0
    bright_rows = [int((pp.preprocess_oct(volume, s)[0, 0, :, 10] > 0).sum()) for s in (cropped, full)]
    assert bright_rows[0] >= 2 * bright_rows[1] - 1
