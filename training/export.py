"""`retina export RUN --out PKG`: a self-contained ONNX model package (docs/model-package.md).

Exporter: the dynamo-based ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript) at
opset 18. For resnet18 and r3d_18 it produces a compact graph (batch norm folded into the
convolutions, Conv3d as plain ``Conv``) with a symbolic batch axis, and it is the exporter torch
maintains; the TorchScript exporter is deprecated. ``--exporter torchscript`` remains available
as a fallback; the choice is recorded in the manifest.

The embedding is L2-normalised inside the encoder graphs. Heads are tiny affine graphs written
with ``onnx.helper`` (exactly ``embedding @ weight + bias``, then ``Sigmoid`` for binary tasks).

Before the package is published, a parity check runs the torch model and onnxruntime on real
preprocessed items from the run's cohort manifest; the export fails when any output differs by
more than the tolerance. The package is written to a temporary folder and renamed into place, so
a failed export never leaves a half-written package.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from retinacli.errors import RetinaError
from retinacli.package import sha256_file

DEFAULT_OPSET = 18
DEFAULT_TOLERANCE = 1e-4
DEFAULT_PARITY_ITEMS = 6
EXPORTERS = ("dynamo", "torchscript")
MANIFEST_FILE = "retina.json"
SCHEMA_VERSION = 1
ENCODER_FILES = {"fundus": "fundus_encoder.onnx", "oct": "oct_encoder.onnx"}
INT8_FILES = {"fundus": "fundus_encoder.int8.onnx", "oct": "oct_encoder.int8.onnx"}
QUANTIZE_CHOICES = ("int8",)
DEFAULT_CALIBRATION_ITEMS = 32
DEFAULT_GATE_ITEMS = 64
# The accuracy gate an int8 encoder must pass to be chosen automatically (docs/performance.md).
GATE_MIN_COSINE = 0.995
GATE_MIN_TOP5_AGREEMENT = 0.98
HEAD_OUTPUTS = {"regression": "value", "binary": "probability"}


class ExportError(RetinaError):
    """The export could not produce a package that matches the torch model."""


@dataclass
class ExportResult:
    package_dir: Path
    manifest: dict[str, Any]
    seconds: float


# --- small helpers -----------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def canonical_sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def package_name_for(run_dir: Path) -> str:
    """A valid package name from a run folder name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", run_dir.resolve().name).strip("-._") or "retina-model"
    return name if name[0].isalnum() else f"m{name}"


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return np.sum(a64 * b64, axis=1) / np.maximum(norms, 1e-12)


# --- ONNX graphs -------------------------------------------------------------------------------------


def _encoder_module(model, modality: str):
    import torch

    class EncodeModality(torch.nn.Module):
        """``model.encode_<modality>``: the contract's normalised embedding, as its own module."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model.encode_oct(x) if modality == "oct" else self.model.encode_fundus(x)

    return EncodeModality().eval()


def export_encoder(
    model, modality: str, example: np.ndarray, path: Path, opset: int, exporter: str
) -> None:
    """Write one encoder graph: input ``modality`` (batch, ...) -> output ``embedding`` (batch, D)."""
    import contextlib
    import io
    import warnings

    import torch

    module = _encoder_module(model, modality)
    # Two examples so the exporter does not specialise the batch axis to 1.
    x = torch.from_numpy(np.ascontiguousarray(np.repeat(example[:1], 2, axis=0)))
    kwargs: dict[str, Any] = dict(input_names=[modality], output_names=["embedding"], opset_version=opset)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(
                module,
                (x,),
                str(path),
                dynamo=True,
                external_data=False,  # one self-contained file per graph
                optimize=True,
                verbose=False,
                dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
                **kwargs,
            )
        else:
            torch.onnx.export(
                module,
                (x,),
                str(path),
                dynamo=False,
                dynamic_axes={modality: {0: "batch"}, "embedding": {0: "batch"}},
                **kwargs,
            )


def export_head(head, path: Path, opset: int) -> None:
    """``embedding`` (batch, D) -> ``value`` (batch,) or ``probability`` (batch,)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out_name = HEAD_OUTPUTS[head.kind]
    weight = numpy_helper.from_array(head.weight.astype(np.float32).reshape(-1, 1), "weight")
    bias = numpy_helper.from_array(np.array([head.bias], dtype=np.float32), "bias")
    shape = numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat")
    nodes = [
        helper.make_node("MatMul", ["embedding", "weight"], ["projected"]),
        helper.make_node("Add", ["projected", "bias"], ["affine"]),
        helper.make_node("Reshape", ["affine", "flat"], ["logit" if head.kind == "binary" else out_name]),
    ]
    if head.kind == "binary":
        nodes.append(helper.make_node("Sigmoid", ["logit"], [out_name]))
    graph = helper.make_graph(
        nodes,
        f"head_{head.task}",
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", head.embed_dim])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch"])],
        initializer=[weight, bias, shape],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="retina.training.export"
    )
    model.doc_string = f"retina task head '{head.task}' ({head.kind}); {head.label_meaning}"
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


# --- parity ------------------------------------------------------------------------------------------


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def encoder_parity(model, modality: str, arrays: np.ndarray, path: Path) -> tuple[dict[str, Any], np.ndarray]:
    """Torch vs onnxruntime on the same preprocessed batch; also checks a batch of one."""
    import torch

    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(arrays))
        ref = (model.encode_oct(x) if modality == "oct" else model.encode_fundus(x)).float().numpy()
    session = _session(path)
    got = session.run(["embedding"], {modality: arrays})[0]
    single = session.run(["embedding"], {modality: arrays[:1]})[0]
    diff = max(float(np.max(np.abs(got - ref))), float(np.max(np.abs(single - ref[:1]))))
    cos = _cosines(got, ref)
    return {
        "n": len(arrays),
        "max_abs_diff": diff,
        "min_cosine": float(cos.min()),
        "max_norm_error": float(np.max(np.abs(np.linalg.norm(got.astype(np.float64), axis=1) - 1.0))),
    }, ref


def head_parity(head, embeddings: np.ndarray, path: Path) -> dict[str, Any]:
    ref = head.predict(embeddings)
    got = _session(path).run([HEAD_OUTPUTS[head.kind]], {"embedding": embeddings.astype(np.float32)})[0]
    # Regression heads output µm: compare relative to the value scale as well as absolutely.
    scale = max(1.0, float(np.max(np.abs(ref))))
    return {
        "n": len(embeddings),
        "max_abs_diff": float(np.max(np.abs(got - ref))),
        "max_rel_diff": float(np.max(np.abs(got - ref)) / scale),
        "min_cosine": None,
    }


def parity_inputs(run, n_items: int, manifest: str | Path | None) -> tuple[dict[str, np.ndarray], str]:
    """Real preprocessed items from the run's cohort (falls back to seeded noise, and says so)."""
    from training.data import load_pairs, read_manifest
    from training.probe import resolve_manifest_path

    try:
        manifest_path = resolve_manifest_path(run.config, Path(run.run_dir), manifest)
        rows = read_manifest(manifest_path)
        # a few spare rows in case some do not read
        data = load_pairs(rows[: n_items + 4], run.spec)
        arrays = {"fundus": data.fundus[:n_items], "oct": data.oct[:n_items]}
        return arrays, f"{len(arrays['oct'])} items of {manifest_path.name}"
    except (FileNotFoundError, ValueError) as exc:
        reason = str(exc)
    rng = np.random.default_rng(0)
    s, f = run.spec["oct"], run.spec["fundus"]
    arrays = {
        "oct": rng.normal(size=(n_items, 1, s["slices"], s["height"], s["width"])).astype(np.float32),
        "fundus": rng.normal(size=(n_items, f["channels"], f["size"], f["size"])).astype(np.float32),
    }
    return arrays, f"seeded noise ({reason})"


# --- int8 quantisation and its accuracy gate ---------------------------------------------------------


def embedding_head_nodes(onnx_path: Path) -> list[str]:
    """Names of the nodes after the last convolution: pooling, projection and normalisation.

    They cost nothing next to the convolutions, but quantising the pooled features and the
    projection added ~40 % of the int8 error of the demo encoders (1 - mean cosine 2.1e-4 -> 1.2e-4
    with them in fp32; docs/performance.md), so they stay fp32.
    """
    import onnx

    nodes = onnx.load(str(onnx_path), load_external_data=False).graph.node  # topologically sorted
    convs = [i for i, node in enumerate(nodes) if node.op_type == "Conv"]
    return [node.name for node in nodes[convs[-1] + 1 :]] if convs else []


def quantize_encoder(fp32_path: Path, int8_path: Path, modality: str, calibration: np.ndarray) -> None:
    """Static int8 quantisation (QDQ, per-channel weights, MinMax calibration on real items) of the
    convolutions; the embedding head after them stays fp32 (``embedding_head_nodes``).

    QDQ keeps the graph a plain ONNX graph that both onnxruntime and OpenVINO run as int8.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Items(CalibrationDataReader):
        def __init__(self):
            self._items = iter(calibration[i : i + 1] for i in range(len(calibration)))

        def get_next(self):
            item = next(self._items, None)
            return None if item is None else {modality: np.ascontiguousarray(item, dtype=np.float32)}

    with tempfile.TemporaryDirectory(prefix="retina-quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Symbolic shape inference cannot follow the dynamo graph's Expand; onnx's is enough.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(int8_path),
            Items(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=embedding_head_nodes(prepared),
        )


def top_k_agreement(
    queries: np.ndarray, gallery_ref: np.ndarray, gallery_new: np.ndarray, k: int = 5
) -> float:
    """Mean share of each query's top-k gallery items that stay in the top-k when the gallery
    embeddings are replaced (1.0 when the gallery has at most k items)."""
    k = min(k, len(gallery_ref))
    if k == 0 or len(queries) == 0:
        return 1.0
    ref = np.argsort(-(queries @ gallery_ref.T), axis=1, kind="stable")[:, :k]
    new = np.argsort(-(queries @ gallery_new.T), axis=1, kind="stable")[:, :k]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ref, new, strict=True)]))


def int8_gate(reference: np.ndarray, quantized: np.ndarray, other: np.ndarray) -> dict[str, Any]:
    """Gate numbers of one int8 encoder against the fp32 torch embeddings of the same items.

    ``other``: the fp32 embeddings of the paired items of the other modality. Top-5 agreement is
    measured both ways (other-modality queries against the int8 gallery, int8 queries against the
    other modality) and the lower value is kept.
    """
    cos = _cosines(quantized, reference)
    ref64, new64, other64 = (a.astype(np.float64) for a in (reference, quantized, other))
    agreement = min(top_k_agreement(other64, ref64, new64), _query_agreement(ref64, new64, other64))
    passed = float(cos.min()) >= GATE_MIN_COSINE and agreement >= GATE_MIN_TOP5_AGREEMENT
    return {
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "top5_agreement": agreement,
        "passed": bool(passed),
    }


def _query_agreement(ref: np.ndarray, new: np.ndarray, gallery: np.ndarray, k: int = 5) -> float:
    """Top-k agreement when the queries (not the gallery) are the int8 embeddings."""
    k = min(k, len(gallery))
    if k == 0 or len(ref) == 0:
        return 1.0
    a = np.argsort(-(ref @ gallery.T), axis=1, kind="stable")[:, :k]
    b = np.argsort(-(new @ gallery.T), axis=1, kind="stable")[:, :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)]))


def _torch_embeddings(model, modality: str, arrays: np.ndarray, batch: int = 8) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(arrays), batch):
            x = torch.from_numpy(np.ascontiguousarray(arrays[start : start + batch]))
            out.append((model.encode_oct(x) if modality == "oct" else model.encode_fundus(x)).float().numpy())
    return np.concatenate(out)


def _int8_backends() -> dict[str, Callable[[Path, str], Callable[[np.ndarray], np.ndarray]]]:
    """The backends the gate is measured on: onnxruntime always, OpenVINO when installed
    (its int8 kernels round differently, so it is gated on its own numbers)."""
    from retinacli.backends import OnnxRuntimeRunner, OpenVinoRunner, backend_installed

    def ort(path: Path, modality: str):
        return OnnxRuntimeRunner(path.read_bytes(), modality, "embedding", 0, ["CPUExecutionProvider"]).run

    def openvino(path: Path, modality: str):
        import os

        return OpenVinoRunner(path.read_bytes(), modality, "embedding", os.cpu_count() or 1).run

    backends = {"onnxruntime": ort}
    if backend_installed("openvino"):
        backends["openvino"] = openvino
    return backends


def _run_batched(run: Callable[[np.ndarray], np.ndarray], arrays: np.ndarray, batch: int = 8) -> np.ndarray:
    chunks = [np.ascontiguousarray(arrays[i : i + batch]) for i in range(0, len(arrays), batch)]
    return np.concatenate([run(chunk) for chunk in chunks])


def quantize_package(
    model,
    staging: Path,
    arrays: dict[str, np.ndarray],
    source: str,
    calibration_items: int,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Write ``<modality>_encoder.int8.onnx`` for both encoders and measure the gate on each backend.

    The first ``calibration_items`` items calibrate; the gate is measured on the others (on all
    items, and recorded as overlapping, when fewer than 8 would remain).
    """
    n = min(len(arrays["oct"]), len(arrays["fundus"]))
    n_cal = max(1, min(calibration_items, n // 2 if n >= 2 else n))
    held_out = n - n_cal >= 8
    gate_slice = slice(n_cal, n) if held_out else slice(0, n)
    reference = {m: _torch_embeddings(model, m, arrays[m][gate_slice]) for m in ("fundus", "oct")}
    encoders: dict[str, Any] = {}
    for modality in ("fundus", "oct"):
        say(f"quantising the {modality} encoder to int8 ({n_cal} calibration items)")
        path = staging / INT8_FILES[modality]
        quantize_encoder(staging / ENCODER_FILES[modality], path, modality, arrays[modality][:n_cal])
        other = reference["oct" if modality == "fundus" else "fundus"]
        gates = {}
        for backend, make in _int8_backends().items():
            got = _run_batched(make(path, modality), arrays[modality][gate_slice])
            gates[backend] = int8_gate(reference[modality], got, other)
            g = gates[backend]
            say(f"  {backend} int8 {modality}: min cosine {g['min_cosine']:.5f}, top-5 agreement "
                f"{g['top5_agreement']:.3f} -> {'passed' if g['passed'] else 'FAILED'} the gate")
        encoders[modality] = {"file": INT8_FILES[modality], "gate": gates}
    return {
        "int8": {
            "method": "onnxruntime.quantization.quantize_static: QDQ, per-channel int8 weights, "
            "int8 activations, MinMax calibration; the nodes after the last convolution (pooling, "
            "projection, normalisation) kept in fp32",
            "calibration": {"items": n_cal, "source": source},
            "gate": {
                "min_cosine": GATE_MIN_COSINE,
                "min_top5_agreement": GATE_MIN_TOP5_AGREEMENT,
                "reference": "fp32 torch embeddings of the same items",
                "items": gate_slice.stop - gate_slice.start,
                "overlaps_calibration": not held_out,
            },
            "encoders": encoders,
        }
    }


# --- the package -----------------------------------------------------------------------------------


def _input_spec(modality: str, spec: dict[str, Any], embed_dim: int) -> dict[str, Any]:
    if modality == "oct":
        o = spec["oct"]
        shape = ["batch", 1, int(o["slices"]), int(o["height"]), int(o["width"])]
        value_range = (
            "per-volume percentile scaling to [0, 1] (p{}-p{}), then (x - {}) / {}; "
            "roughly [{:.1f}, {:.1f}]".format(
                *o["percentiles"], o["mean"], o["std"], -o["mean"] / o["std"], (1 - o["mean"]) / o["std"]
            )
        )
        channels = 1
    else:
        f = spec["fundus"]
        shape = ["batch", int(f["channels"]), int(f["size"]), int(f["size"])]
        value_range = "pixels scaled to [0, 1], then (x - mean) / std per channel (preprocessing.fundus)"
        channels = int(f["channels"])
    return {
        "file": ENCODER_FILES[modality],
        "input_name": modality,
        "output_name": "embedding",
        "modality": modality,
        "channels": channels,
        "shape": shape,
        "dtype": "float32",
        "value_range": value_range,
        "output_shape": ["batch", embed_dim],
        "l2_normalised": True,
    }


def _head_entry(head) -> dict[str, Any]:
    from training.heads import _json_safe

    return _json_safe(
        {
            "file": f"head_{head.task}.onnx",
            "task": head.task,
            "kind": head.kind,
            "input_modality": head.input_modality,
            "input_name": "embedding",
            "output_name": HEAD_OUTPUTS[head.kind],
            "units": head.units,
            "label_meaning": head.label_meaning,
            "threshold": head.threshold,
            "metrics": head.metrics,
            "n_train": head.n_train,
        }
    )


def _epochs_trained(run) -> int | None:
    metrics = Path(run.run_dir) / "metrics.jsonl"
    if metrics.is_file():
        lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
        if lines:
            try:
                return int(json.loads(lines[-1]).get("epoch", len(lines)))
            except (json.JSONDecodeError, TypeError, ValueError):
                return len(lines)
    epochs = run.config.get("epochs")
    return int(epochs) if epochs is not None else None


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    name: str | None = None,
    version: str = "0.1.0",
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    tolerance: float = DEFAULT_TOLERANCE,
    parity_items: int = DEFAULT_PARITY_ITEMS,
    manifest: str | Path | None = None,
    changelog: str | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    loaded: Any = None,
    quantize: str | None = None,
    calibration_items: int = DEFAULT_CALIBRATION_ITEMS,
) -> ExportResult:
    """Export a training run (and its heads from ``retina probe``) to a model package at ``out_dir``.

    ``loaded``: an already loaded run (``training.model.load_run``) to reuse.
    ``quantize="int8"``: also write calibrated int8 encoders and record their accuracy gate.
    """
    import torch

    from retinacli.manifest_schema import validate_manifest
    from retinacli.preprocess import validate_spec
    from training.heads import load_heads
    from training.model import CHECKPOINT_DIR, LAST_CHECKPOINT, load_run

    say = log or (lambda _msg: None)
    started = time.perf_counter()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r} (use {' or '.join(EXPORTERS)})")
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ExportError(f"unknown quantisation {quantize!r} (use {' or '.join(QUANTIZE_CHOICES)})")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir}: already exists and is not empty (use --force to replace it)")
    name = name or package_name_for(run_dir)
    try:
        run = loaded if loaded is not None else load_run(run_dir)
    except FileNotFoundError as exc:
        raise ExportError(str(exc)) from None
    validate_spec(run.spec)
    model = run.model.float().eval()
    heads = load_heads(run_dir)
    for head in heads:
        if head.embed_dim != model.embed_dim:
            raise ExportError(
                f"{run_dir / 'heads.json'}: head '{head.task}' expects {head.embed_dim}-d embeddings, "
                f"the model has {model.embed_dim}; re-run 'retina probe {run_dir}'"
            )
    checkpoint = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    stale = [h.task for h in heads if h.checkpoint_sha256 is not None]
    if stale and checkpoint.is_file():
        current = sha256_file(checkpoint)
        stale = [h.task for h in heads if h.checkpoint_sha256 not in (None, current)]
        if stale:
            raise ExportError(
                f"{run_dir / 'heads.json'}: head(s) {', '.join(stale)} were fitted on another checkpoint "
                f"than {checkpoint}; re-run 'retina probe {run_dir}'"
            )
    if not heads:
        say(f"no task heads in {run_dir} (run 'retina probe {run_dir}' first); exporting encoders only")

    wanted = parity_items + (calibration_items + DEFAULT_GATE_ITEMS if quantize else 0)
    all_arrays, cohort_source = parity_inputs(run, wanted, manifest)
    arrays = {m: a[:parity_items] for m, a in all_arrays.items()}
    inputs_source = cohort_source if not quantize else f"the first {len(arrays['oct'])} of {cohort_source}"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        parity: dict[str, Any] = {"tolerance_abs": tolerance, "inputs": inputs_source}
        oct_embeddings = fundus_embeddings = None
        for modality in ("fundus", "oct"):
            say(f"exporting the {modality} encoder ({exporter}, opset {opset})")
            path = staging / ENCODER_FILES[modality]
            export_encoder(model, modality, arrays[modality], path, opset, exporter)
            result, ref = encoder_parity(model, modality, arrays[modality], path)
            parity[modality] = result
            if modality == "oct":
                oct_embeddings = ref
            else:
                fundus_embeddings = ref
        head_entries: dict[str, Any] = {}
        parity["heads"] = {}
        for head in heads:
            path = staging / f"head_{head.task}.onnx"
            export_head(head, path, opset)
            emb = oct_embeddings if head.input_modality == "oct" else fundus_embeddings
            parity["heads"][head.task] = head_parity(head, emb, path)
            head_entries[head.task] = _head_entry(head)
        _check_parity(parity, tolerance)
        quantized = None
        if quantize == "int8":
            quantized = quantize_package(model, staging, all_arrays, cohort_source, calibration_items, say)

        files = sorted(p for p in staging.iterdir() if p.is_file())
        unexpected = [p.name for p in files if p.suffix != ".onnx"]
        if unexpected:  # e.g. external weight files: the package must stay self-contained
            raise ExportError(f"exporter wrote unexpected files: {', '.join(unexpected)}")
        epochs = _epochs_trained(run)
        seconds = time.perf_counter() - started
        objective = run.config.get("objective")
        default_changelog = f"Exported from run {run_dir.resolve().name} ({objective}, {epochs} epochs)."
        manifest_doc = {
            "schema_version": SCHEMA_VERSION,
            "format": "retina-model-package",
            "name": name,
            "version": version,
            "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "changelog": changelog or default_changelog,
            "objective": str(run.config.get("objective")),
            "architectures": {
                "fundus": str(run.config.get("fundus_arch")),
                "oct": str(run.config.get("oct_arch")),
            },
            "embed_dim": int(model.embed_dim),
            "inputs": {m: _input_spec(m, run.spec, int(model.embed_dim)) for m in ("fundus", "oct")},
            "preprocessing": run.spec,
            "heads": head_entries,
            "training": {
                "config_sha256": canonical_sha256(run.config),
                "data_manifest_sha256": run.config.get("manifest_sha256"),
                "seed": run.config.get("seed"),
                "epochs": epochs,
                "preset": run.config.get("preset"),
                "init": {"fundus": run.config.get("fundus_init"), "oct": run.config.get("oct_init")},
                "checkpoint": f"{CHECKPOINT_DIR}/{LAST_CHECKPOINT}",
            },
            "files": [{"path": p.name, "sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files],
            "parity": parity,
            **({"quantized": quantized} if quantized else {}),
            "packages": {
                "retina": _version("retina"),
                "torch": torch.__version__,
                "torchvision": _version("torchvision"),
                "onnx": _version("onnx"),
                "onnxscript": _version("onnxscript") if exporter == "dynamo" else None,
                "onnxruntime": _version("onnxruntime"),
                **({"openvino": _version("openvino")} if quantized and _version("openvino") else {}),
                "numpy": np.__version__,
            },
            "export": {
                "exporter": "torch.onnx.export(dynamo=True)"
                if exporter == "dynamo"
                else "torch.onnx.export(dynamo=False) (TorchScript)",
                "opset": int(opset),
                "seconds": round(seconds, 2),
            },
        }
        validate_manifest(manifest_doc)
        (staging / MANIFEST_FILE).write_text(
            json.dumps(manifest_doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(out_dir, manifest_doc, seconds)


def _check_parity(parity: dict[str, Any], tolerance: float) -> None:
    problems = []
    for modality in ("fundus", "oct"):
        if parity[modality]["max_abs_diff"] > tolerance:
            problems.append(f"{modality} encoder max |Δ| {parity[modality]['max_abs_diff']:.2e}")
    for task, result in parity["heads"].items():
        # heads in µm are compared relative to their scale; probabilities absolutely
        if min(result["max_abs_diff"], result["max_rel_diff"]) > tolerance:
            problems.append(f"head {task} max |Δ| {result['max_abs_diff']:.2e}")
    if problems:
        raise ExportError(
            f"parity check failed (onnxruntime vs torch, tolerance {tolerance:g}): {'; '.join(problems)}"
        )
