"""Engine selection (retinacli.backends.choose_variant): no runtime is started, no timing involved."""

from __future__ import annotations

import pytest

from retinacli.backends import PREFERENCE, choose_variant, variants
from retinacli.errors import ModelPackageError, UsageError

BOTH = {"onnxruntime": True, "openvino": True}
ORT_ONLY = {"onnxruntime": True, "openvino": False}


def descriptor(int8_gates: dict[str, dict[str, bool]] | None = None) -> dict:
    """A descriptor skeleton; ``int8_gates``: modality -> backend -> gate passed."""
    doc = {
        "name": "m",
        "version": "0.1.0",
        "inputs": {"fundus": {"file": "fundus_encoder.onnx"}, "oct": {"file": "oct_encoder.onnx"}},
    }
    if int8_gates is not None:
        doc["quantized"] = {"int8": {"encoders": {
            m: {"file": f"{m}_encoder.int8.onnx", "gate": {b: {"passed": ok} for b, ok in gates.items()}}
            for m, gates in int8_gates.items()
        }}}
    return doc


def test_fp32_package_runs_fp32_on_the_fastest_installed_backend():
    assert choose_variant(descriptor(), "oct", installed=BOTH).label == "openvino/fp32"
    only_ort = choose_variant(descriptor(), "oct", installed=ORT_ONLY)
    assert (only_ort.label, only_ort.file) == ("onnxruntime/fp32", "oct_encoder.onnx")


def test_auto_uses_int8_only_where_the_gate_passed_on_that_backend():
    m = descriptor({
        "oct": {"onnxruntime": True, "openvino": True},
        "fundus": {"onnxruntime": True, "openvino": False},
    })
    oct_variant = choose_variant(m, "oct", installed=BOTH)
    assert (oct_variant.label, oct_variant.file) == ("openvino/int8", "oct_encoder.int8.onnx")
    assert choose_variant(m, "fundus", installed=BOTH).label == "openvino/fp32"  # gate failed there
    # onnxruntime's int8 is slower than its fp32 (benchmarks): auto keeps fp32 without OpenVINO
    assert choose_variant(m, "oct", installed=ORT_ONLY).label == "onnxruntime/fp32"


def test_gate_not_measured_on_a_backend_means_not_chosen_automatically():
    m = descriptor({"oct": {"onnxruntime": True}})  # exported without OpenVINO installed
    assert choose_variant(m, "oct", installed=BOTH).label == "openvino/fp32"


def test_explicit_choices_override_auto():
    m = descriptor({"oct": {"onnxruntime": False, "openvino": False}, "fundus": {"onnxruntime": True}})
    assert choose_variant(m, "oct", "onnxruntime", "fp32", installed=BOTH).label == "onnxruntime/fp32"
    # an explicit int8 request runs the int8 graph even where the gate failed
    assert choose_variant(m, "oct", "openvino", "int8", installed=BOTH).label == "openvino/int8"
    assert choose_variant(m, "oct", precision="int8", installed=BOTH).label == "openvino/int8"
    assert choose_variant(m, "fundus", "onnxruntime", "auto", installed=BOTH).label == "onnxruntime/fp32"


def test_impossible_requests_fail_with_one_clear_line():
    with pytest.raises(UsageError, match="openvino is not installed"):
        choose_variant(descriptor(), "oct", "openvino", installed=ORT_ONLY)
    with pytest.raises(ModelPackageError, match=r"no int8 oct encoder.*--quantize int8"):
        choose_variant(descriptor(), "oct", precision="int8", installed=BOTH)
    with pytest.raises(UsageError, match="unknown engine 'tensorrt'"):
        choose_variant(descriptor(), "oct", "tensorrt", installed=BOTH)
    with pytest.raises(UsageError, match="unknown precision 'fp16'"):
        choose_variant(descriptor(), "oct", precision="fp16", installed=BOTH)


def test_gpu_runs_fp32_on_onnxruntime():
    m = descriptor({"oct": {"onnxruntime": True, "openvino": True}})
    assert choose_variant(m, "oct", installed=BOTH, gpu=True).label == "onnxruntime/fp32"
    with pytest.raises(UsageError, match="runs on the CPU"):
        choose_variant(m, "oct", "openvino", installed=BOTH, gpu=True)


def test_variants_follow_the_preference_order():
    m = descriptor({"oct": {"onnxruntime": True, "openvino": True}})
    assert [(v.backend, v.precision) for v in variants(m, "oct")] == list(PREFERENCE)
    assert [v.precision for v in variants(m, "fundus")] == ["fp32", "fp32"]


def test_onnxruntime_workers_do_not_busy_wait_between_runs(tiny_package):
    """Spinning workers would take the cores from the readers and from the other encoder's engine."""
    from retinacli.backends import OnnxRuntimeRunner

    blob = (tiny_package / "oct_encoder.onnx").read_bytes()
    runner = OnnxRuntimeRunner(blob, "oct", "embedding", 2, ["CPUExecutionProvider"])
    options = runner.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
