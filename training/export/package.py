"""Assembling the model package folder and its retina.json (docs/model-package.md).

``export_run`` exports the graphs (:mod:`training.export.graphs`), checks them against torch
(:mod:`training.export.parity`), optionally adds int8 encoders (:mod:`training.export.quantize`),
and writes retina.json. Everything is written to a staging folder beside the target that replaces
it only when complete (:func:`retinacli.fsutil.building_dir`), so a failed export never leaves a
half-written package.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from retinacli.fsutil import atomic_write_bytes, atomic_write_json, building_dir
from retinacli.ood import REFERENCE_FILE, reference_json
from retinacli.package import sha256_file
from training.export import graphs, parity
from training.export.graphs import DEFAULT_OPSET, ENCODER_FILES, EXPORTERS, HEAD_OUTPUTS, export_head
from training.export.ood import DEFAULT_OOD_ITEMS
from training.export.ood import build_reference as build_ood_reference
from training.export.parity import DEFAULT_PARITY_ITEMS, DEFAULT_TOLERANCE, ExportError
from training.export.quantize import DEFAULT_CALIBRATION_ITEMS, DEFAULT_GATE_ITEMS, QUANTIZE_CHOICES
from training.export.quantize import quantize_package as write_int8_encoders

DESCRIPTOR_FILE = "retina.json"
SCHEMA_VERSION = 1


@dataclass
class ExportResult:
    package_dir: Path
    descriptor: dict[str, Any]
    seconds: float


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
            # regression: training label range and plausible output range (training.heads.label_range)
            **({"training_range": head.training_range} if head.training_range else {}),
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


def export_model(model):
    """The model as exported: float32, eval mode, on the CPU (moved in place). A model trained or loaded
    on a GPU is traced, compared with onnxruntime and turned into numpy arrays on the CPU."""
    return model.cpu().float().eval()


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
    ood_items: int = DEFAULT_OOD_ITEMS,
    card: dict[str, Any] | None = None,
) -> ExportResult:
    """Export a training run (and its heads from ``retina probe``) to a model package at ``out_dir``.

    ``loaded``: an already loaded run (``training.model.load_run``) to reuse.
    ``quantize="int8"``: also write calibrated int8 encoders and record their accuracy gate.
    ``ood_items``: cohort items embedded for the out-of-distribution reference (0: none).
    ``card``: the model card (retinacli.modelcard.assemble_card), recorded as ``card``; not part of the id.
    """
    import torch

    from retinacli.descriptor_schema import validate_descriptor
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
    model = export_model(run.model)
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
    all_arrays, cohort_source = parity.parity_inputs(run, wanted, manifest)
    arrays = {m: a[:parity_items] for m, a in all_arrays.items()}
    inputs_source = cohort_source if not quantize else f"the first {len(arrays['oct'])} of {cohort_source}"
    with building_dir(out_dir) as staging:
        checks: dict[str, Any] = {"tolerance_abs": tolerance, "inputs": inputs_source}
        embeddings: dict[str, np.ndarray] = {}
        for modality in ("fundus", "oct"):
            say(f"exporting the {modality} encoder ({exporter}, opset {opset})")
            path = staging / ENCODER_FILES[modality]
            # through the module so tests can substitute the (slow) graph export
            graphs.export_encoder(model, modality, arrays[modality], path, opset, exporter)
            result, embeddings[modality] = parity.encoder_parity(model, modality, arrays[modality], path)
            checks[modality] = result
        head_entries: dict[str, Any] = {}
        checks["heads"] = {}
        for head in heads:
            path = staging / f"head_{head.task}.onnx"
            export_head(head, path, opset)
            checks["heads"][head.task] = parity.head_parity(head, embeddings[head.input_modality], path)
            head_entries[head.task] = _head_entry(head)
        parity.check_parity(checks, tolerance)
        quantized = None
        if quantize == "int8":
            quantized = write_int8_encoders(model, staging, all_arrays, cohort_source, calibration_items, say)
        ood = build_ood_reference(model, run, manifest, ood_items, say) if ood_items > 0 else None
        if ood is not None:
            atomic_write_bytes(staging / REFERENCE_FILE, reference_json(ood[1]))

        files = sorted(p for p in staging.iterdir() if p.is_file())
        unexpected = [p.name for p in files if p.suffix != ".onnx" and p.name != REFERENCE_FILE]
        if unexpected:  # e.g. external weight files: the package must stay self-contained
            raise ExportError(f"exporter wrote unexpected files: {', '.join(unexpected)}")
        epochs = _epochs_trained(run)
        seconds = time.perf_counter() - started
        objective = run.config.get("objective")
        default_changelog = f"Exported from run {run_dir.resolve().name} ({objective}, {epochs} epochs)."
        descriptor = {
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
            "parity": checks,
            **({"quantized": quantized} if quantized else {}),
            **({"ood": ood[0]} if ood is not None else {}),
            **({"card": card} if card else {}),
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
        validate_descriptor(descriptor)
        atomic_write_json(staging / DESCRIPTOR_FILE, descriptor)
    return ExportResult(out_dir, descriptor, seconds)
