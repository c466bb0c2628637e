"""Inference backends for the encoders, and the choice of backend + precision per encoder.

Two backends read the package's ONNX files: onnxruntime (always installed) and the OpenVINO runtime
(Apache-2.0; a base dependency on x86-64, where it is the fastest, and optional elsewhere: without it
``auto`` runs onnxruntime). Each encoder may exist in two precisions: the fp32
graph and, when the package was exported with ``--quantize int8``, a statically quantised int8 graph
(QDQ) with the accuracy gate measured at export (``retina.json`` -> ``quantized``).

Which one is fastest depends on the graph and the CPU (benchmarks/RESULTS.md): on an AVX-512/VNNI
EPYC/Xeon OpenVINO runs the int8 graphs 3-5x faster than onnxruntime fp32, while onnxruntime's int8
3D convolutions are no faster than its fp32 ones. ``auto`` therefore takes the first variant of
``PREFERENCE`` that is installed and, for int8, passed the gate *on that backend*.

numpy-free at import; the runtimes are imported when a runner is built.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from retinacli.errors import ModelPackageError, UsageError

BACKENDS = ("onnxruntime", "openvino")
PRECISIONS = ("fp32", "int8")
# Fastest first, as measured by benchmarks/run.py (both encoders, batch 2-16, 2-core AVX-512 VNNI).
PREFERENCE: tuple[tuple[str, str], ...] = (
    ("openvino", "int8"),
    ("openvino", "fp32"),
    ("onnxruntime", "fp32"),
    ("onnxruntime", "int8"),
)


@dataclass(frozen=True)
class Variant:
    """One way to run one encoder: which backend, which precision, which file of the package."""

    modality: str
    backend: str
    precision: str
    file: str
    gate_passed: bool | None = None  # int8 only: the export-time accuracy gate on this backend

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.precision}"


def backend_installed(backend: str) -> bool:
    module = {"onnxruntime": "onnxruntime", "openvino": "openvino"}[backend]
    return importlib.util.find_spec(module) is not None


def int8_entry(descriptor: dict[str, Any], modality: str) -> dict[str, Any] | None:
    """The descriptor's int8 record for one encoder (file + gate per backend), or None."""
    return ((descriptor.get("quantized") or {}).get("int8") or {}).get("encoders", {}).get(modality)


def variants(descriptor: dict[str, Any], modality: str) -> list[Variant]:
    """Every (backend, precision) the package offers for this encoder, in PREFERENCE order."""
    fp32_file = descriptor["inputs"][modality]["file"]
    entry = int8_entry(descriptor, modality)
    found = []
    for backend, precision in PREFERENCE:
        if precision == "fp32":
            found.append(Variant(modality, backend, "fp32", fp32_file))
        elif entry and entry.get("file"):
            gate = (entry.get("gate") or {}).get(backend)
            passed = None if gate is None else bool(gate.get("passed"))
            found.append(Variant(modality, backend, "int8", entry["file"], passed))
    return found


def choose_variant(
    descriptor: dict[str, Any],
    modality: str,
    backend: str = "auto",
    precision: str = "auto",
    installed: dict[str, bool] | None = None,
    gpu: bool = False,
) -> Variant:
    """The variant to run: the first of PREFERENCE that matches the request, is installed and,
    when int8 is chosen by ``auto``, passed the accuracy gate on that backend.

    An explicit ``precision="int8"`` uses the int8 graph even when its gate failed or was not
    measured on that backend (the caller asked for it); a missing int8 graph is an error.
    ``gpu``: onnxruntime with CUDA was asked for, which only the onnxruntime backend can use.
    """
    if backend not in ("auto", *BACKENDS):
        raise UsageError(f"unknown engine {backend!r} (use auto, {', '.join(BACKENDS)})")
    if precision not in ("auto", *PRECISIONS):
        raise UsageError(f"unknown precision {precision!r} (use auto, {', '.join(PRECISIONS)})")
    installed = installed if installed is not None else {b: backend_installed(b) for b in BACKENDS}
    if gpu:
        if backend == "openvino":
            raise UsageError("--engine openvino runs on the CPU; use --engine onnxruntime with --device cuda")
        backend = "onnxruntime"
    if backend != "auto" and not installed.get(backend):
        extra = " (pip install openvino; installed with retina on x86-64)" if backend == "openvino" else ""
        raise UsageError(f"engine {backend} is not installed{extra}")
    options = variants(descriptor, modality)
    if precision == "int8" and not any(v.precision == "int8" for v in options):
        raise ModelPackageError(
            f"model {descriptor['name']}@{descriptor['version']} has no int8 {modality} encoder "
            "(export it with 'retina export --quantize int8')"
        )
    for v in options:
        if not installed.get(v.backend) or (backend != "auto" and v.backend != backend):
            continue
        if precision != "auto" and v.precision != precision:
            continue
        if precision == "auto" and v.precision == "int8" and not v.gate_passed:
            continue
        if gpu and precision == "auto" and v.precision == "int8":
            continue  # fp32 on the GPU: int8 QDQ graphs gain nothing there
        return v
    raise UsageError(f"no {backend} engine with {precision} precision for the {modality} encoder")


# --- runners ------------------------------------------------------------------------------------


class OnnxRuntimeRunner:
    """An onnxruntime session for one graph: ``run(x) -> first output``."""

    def __init__(self, blob: bytes, input_name: str, output_name: str, threads: int, providers: list[str]):
        from retinacli.onnx_session import create_session

        self.session = create_session(blob, providers, threads)  # no busy-waiting between runs
        self.input_name, self.output_name = input_name, output_name

    @property
    def providers(self) -> list[str]:
        """The execution providers the session really uses (onnxruntime falls back to the CPU
        silently when a requested provider cannot start)."""
        return list(self.session.get_providers())

    def run(self, x):
        return self.session.run([self.output_name], {self.input_name: x})[0]


def import_openvino() -> Any:
    """``import openvino`` (the runtime) without its model converter ``openvino.tools.ovc``.

    Importing the converter sends a usage event to Google Analytics and writes a client id under
    ~/intel unless the user has opted out (openvino-telemetry; opt-out, not opt-in, for that import),
    and retina does not need it: it reads the package's ONNX bytes with ``Core.read_model``. The block
    is lifted once the runtime is imported, so code that imports the converter itself later still can.
    """
    import sys

    if "openvino" in sys.modules:
        return sys.modules["openvino"]
    converter = "openvino.tools.ovc"
    block = converter not in sys.modules
    if block:
        sys.modules[converter] = None  # type: ignore[assignment]  # openvino skips it on ImportError
    try:
        import openvino
    finally:
        if block and converter in sys.modules and sys.modules[converter] is None:
            del sys.modules[converter]
    return openvino


class OpenVinoRunner:
    """An OpenVINO CPU model compiled from the package's ONNX bytes.

    fp32 graphs run with ``INFERENCE_PRECISION_HINT=f32`` (OpenVINO would otherwise use bf16 on
    CPUs that have it, which is not the fp32 embedding); int8 QDQ graphs run as int8.
    """

    def __init__(self, blob: bytes, input_name: str, output_name: str, threads: int):
        import threading

        ov = import_openvino()
        core = ov.Core()
        config = {
            "INFERENCE_NUM_THREADS": int(threads),
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",
        }
        self.compiled = core.compile_model(core.read_model(blob), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self._lock = threading.Lock()  # one infer request: calls are serialised
        self.input_name, self.output_name = input_name, output_name

    @property
    def providers(self) -> list[str]:
        """The devices the compiled model runs on, as ``OpenVINO <device>`` (e.g. ``OpenVINO CPU``)."""
        try:
            devices = list(self.compiled.get_property("EXECUTION_DEVICES"))
        except RuntimeError:  # a runtime without the property: compile_model was given "CPU"
            devices = ["CPU"]
        return [f"OpenVINO {d}" for d in devices]

    def run(self, x):
        import numpy as np

        with self._lock:
            result = self.request.infer({self.input_name: x})
            return np.array(result[self.compiled.output(self.output_name)], dtype=np.float32, copy=True)


def make_runner(variant: Variant, blob: bytes, input_name: str, output_name: str, threads: int,
                providers: list[str]):
    if variant.backend == "openvino":
        return OpenVinoRunner(blob, input_name, output_name, threads)
    return OnnxRuntimeRunner(blob, input_name, output_name, threads, providers)
