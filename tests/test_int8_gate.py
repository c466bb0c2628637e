"""The int8 accuracy gate is tie-aware (docs/performance.md): the order of near-identical visits of one
eye, and score gaps below the fp32 model's own test-retest noise, are ties, not errors; a damaged
int8 graph is still rejected."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retinacli.ranking import top_k_overlap

GATE_COHORT = {"patients": 16, "visits": 2, "seed": 1, "oct_shape": (8, 64, 64), "fundus_size": 64,
               "workers": 1}
CALIBRATION_ITEMS = 8


def unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def visits_of_eyes(rng: np.random.Generator, eyes: int, visits: int, spread: float, dim: int = 16):
    """Embeddings of ``visits`` near-identical visits of each of ``eyes`` eyes, and their eye labels."""
    centres = unit(rng.normal(size=(eyes, dim)))
    labels = np.repeat([f"p{e}/OD" for e in range(eyes)], visits)
    items = unit(np.repeat(centres, visits, axis=0) + spread * rng.normal(size=(eyes * visits, dim)))
    return items, labels


def test_without_eyes_or_tolerance_it_is_the_plain_top5_overlap():
    from training.export.quantize import eye_groups, tie_aware_top_k_agreement

    rng = np.random.default_rng(0)
    ref, new = rng.normal(size=(30, 40)), rng.normal(size=(30, 40))
    groups = eye_groups(None, 40)
    assert tie_aware_top_k_agreement(ref, new, groups, 0.0) == pytest.approx(top_k_overlap(ref, new, 5))
    assert tie_aware_top_k_agreement(ref, ref, groups, 0.0) == 1.0
    assert tie_aware_top_k_agreement(ref[:, :5], new[:, :5], eye_groups(None, 5), 0.0) == 1.0  # <= k eyes


def test_visit_order_within_an_eye_is_a_tie():
    """Swapping the embeddings of the two visits of every eye changes exact top-5 membership but not
    which eyes a search returns: the gate passes it, the exact-order measure would not."""
    from training.export import GATE_MIN_TOP5_AGREEMENT, int8_gate

    rng = np.random.default_rng(1)
    reference, eyes = visits_of_eyes(rng, 20, 2, 0.01)
    other = unit(reference + 0.3 * rng.normal(size=reference.shape))  # the paired other-modality items
    swapped = reference.reshape(20, 2, -1)[:, ::-1].reshape(40, -1)
    gate = int8_gate(reference, swapped, other, eyes)
    assert gate["min_cosine"] > 0.995  # the visits are near-identical
    assert gate["exact_top5_agreement"] < GATE_MIN_TOP5_AGREEMENT
    assert gate["top5_agreement"] == 1.0 and gate["passed"]
    # without the eye labels the same swap is an error
    assert not int8_gate(reference, swapped, other)["passed"]


def test_gaps_below_the_retest_noise_are_ties_and_larger_ones_are_not():
    from training.export.quantize import eye_groups, retest_noise, tie_aware_top_k_agreement

    # one query, six eyes with two visits each; eye scores 0.90 .. 0.50, visits 0.02 apart
    eye_scores = np.array([0.90, 0.80, 0.70, 0.60, 0.50, 0.495])
    ref = np.repeat(eye_scores, 2)[None, :] - np.tile([0.0, 0.02], 6)[None, :]
    groups = eye_groups(np.repeat([f"e{i}" for i in range(6)], 2), 12)
    assert retest_noise(ref, groups) == pytest.approx(0.02)
    near_swap = ref.copy()
    near_swap[0, 10:] += 0.01  # the 6th eye (0.005 behind the 5th) overtakes it: a tie
    assert tie_aware_top_k_agreement(ref, near_swap, groups, 0.02) == 1.0
    assert tie_aware_top_k_agreement(ref, near_swap, groups, 0.0) == pytest.approx(0.8)
    far_swap = ref.copy()
    far_swap[0, 6:8] -= 0.5  # the 4th eye, 0.1 clear of the 5th, drops out: an error at any tolerance
    assert tie_aware_top_k_agreement(ref, far_swap, groups, 0.02) == pytest.approx(0.8)


@pytest.fixture(scope="module")
def gated_package(tiny_package_run, tiny_loaded_run, tmp_path_factory):
    """The tiny run exported with int8 encoders, gated on a second synthetic cohort of 16 patients
    (2 visits per eye): enough eyes that top-5 is a real choice."""
    pytest.importorskip("onnxruntime.quantization")
    from retinacli.synth import generate_cohort
    from training.export import export_run

    work = tmp_path_factory.mktemp("int8_gate")
    manifest = generate_cohort(work / "gate_cohort", formats=("dicom",), **GATE_COHORT)
    out = work / "tiny-int8"
    export_run(tiny_package_run, out, name="tiny", loaded=tiny_loaded_run, quantize="int8",
               calibration_items=CALIBRATION_ITEMS, manifest=manifest, ood_items=0, exporter="torchscript")
    return out, manifest


def _gate_items(loaded, manifest, descriptor):
    from training.export import parity_inputs

    arrays, _ = parity_inputs(loaded, 6 + CALIBRATION_ITEMS + 64, manifest)
    gate = descriptor["quantized"]["int8"]["gate"]
    assert not gate["overlaps_calibration"]
    items = slice(CALIBRATION_ITEMS, None)
    assert len(arrays["oct"][items]) == gate["items"]
    return arrays, items


def test_a_quantised_model_passes_the_gate(gated_package, tiny_loaded_run):
    """The int8 OCT encoder passes on every backend although its exact top-5 order differs from fp32's
    for more than the 2 % the gate allows: the differences are ties."""
    from training.export import GATE_MIN_COSINE, GATE_MIN_TOP5_AGREEMENT

    package, _ = gated_package
    q = json.loads((package / "retina.json").read_text())["quantized"]["int8"]
    assert q["gate"]["items"] >= 32 and "tie-aware" in q["gate"]["agreement"]
    gates = q["encoders"]["oct"]["gate"]
    assert "onnxruntime" in gates
    for g in gates.values():
        assert g["passed"], g
        assert g["min_cosine"] >= GATE_MIN_COSINE and g["top5_agreement"] >= GATE_MIN_TOP5_AGREEMENT
        assert g["exact_top5_agreement"] < GATE_MIN_TOP5_AGREEMENT  # the strict measure would reject it
        assert g["tie_tolerance"] > 0
    for modality in ("fundus", "oct"):  # every recorded verdict is the rule applied to its numbers
        for g in q["encoders"][modality]["gate"].values():
            assert g["passed"] == (g["min_cosine"] >= GATE_MIN_COSINE
                                   and g["top5_agreement"] >= GATE_MIN_TOP5_AGREEMENT)


def damage_weight_scales(src, dst, relative_noise: float, seed: int = 0) -> int:
    """Copy an int8 QDQ graph with each per-channel weight scale multiplied by exp(N(0, noise)): the
    kind of damage a wrong calibration or a bad scale export does. Returns the scales touched."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    initializers = {i.name: i for i in model.graph.initializer}
    rng = np.random.default_rng(seed)
    touched = 0
    for node in model.graph.node:
        weights = initializers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if weights is None or numpy_helper.to_array(weights).dtype != np.int8:
            continue
        scale = initializers[node.input[1]]
        values = numpy_helper.to_array(scale)
        noisy = (values * np.exp(relative_noise * rng.normal(size=values.shape))).astype(values.dtype)
        scale.CopyFrom(numpy_helper.from_array(noisy, scale.name))
        touched += 1
    onnx.save(model, str(dst))
    return touched


def test_a_damaged_int8_model_is_rejected(gated_package, tiny_loaded_run, tmp_path):
    """Noise on the int8 weight scales, three draws each: 10 % is rejected (its cosines fall below the
    floor); 20 % is rejected by each criterion alone. The tie tolerance comes from fp32 only."""
    from training.export import GATE_MIN_COSINE, GATE_MIN_TOP5_AGREEMENT, int8_gate
    from training.export.quantize import _int8_backends, _run_batched

    package, manifest = gated_package
    descriptor = json.loads((package / "retina.json").read_text())
    arrays, items = _gate_items(tiny_loaded_run, manifest, descriptor)
    reference = tiny_loaded_run.model.encode("oct", arrays["oct"][items], batch_size=8)
    other = tiny_loaded_run.model.encode("fundus", arrays["fundus"][items], batch_size=8)
    eyes = list(arrays["eyes"][items])
    run = _int8_backends()["onnxruntime"]

    intact = int8_gate(reference, _run_batched(run(package / "oct_encoder.int8.onnx", "oct"),
                                               arrays["oct"][items]), other, eyes)
    recorded = descriptor["quantized"]["int8"]["encoders"]["oct"]["gate"]["onnxruntime"]
    assert intact["passed"] and intact["top5_agreement"] == pytest.approx(recorded["top5_agreement"])

    for noise in (0.1, 0.2):
        for seed in (0, 1, 2):
            damaged = tmp_path / f"oct_damaged_{noise}_{seed}.onnx"
            assert damage_weight_scales(package / "oct_encoder.int8.onnx", damaged, noise, seed) > 10
            got = _run_batched(run(damaged, "oct"), arrays["oct"][items])
            gate = int8_gate(reference, got, other, eyes)
            assert not gate["passed"], gate
            assert gate["min_cosine"] < GATE_MIN_COSINE, gate
            assert gate["exact_top5_agreement"] < intact["exact_top5_agreement"]
            if noise == 0.2:
                assert gate["top5_agreement"] < GATE_MIN_TOP5_AGREEMENT, gate
            assert gate["tie_tolerance"] == intact["tie_tolerance"]  # damage cannot widen the ties
