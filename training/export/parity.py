"""onnxruntime vs torch: the parity check every exported graph passes before a package is published.

The torch model and onnxruntime run on the same real preprocessed items of the run's cohort
manifest (seeded noise when it cannot be read, and the package records which); the export fails
when any output differs by more than the tolerance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from retinacli.errors import RetinaError
from training.export.graphs import HEAD_OUTPUTS

DEFAULT_TOLERANCE = 1e-4
DEFAULT_PARITY_ITEMS = 6


class ExportError(RetinaError):
    """The export could not produce a package that matches the torch model."""


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity in float64."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return np.sum(a64 * b64, axis=1) / np.maximum(norms, 1e-12)


def encoder_parity(model, modality: str, arrays: np.ndarray, path: Path) -> tuple[dict[str, Any], np.ndarray]:
    """Torch vs onnxruntime on the same preprocessed batch; also checks a batch of one.

    Returns the numbers and the torch embeddings (reused for the heads' parity)."""
    from retinacli.onnx_session import create_session

    ref = model.encode(modality, arrays, batch_size=max(len(arrays), 1))
    session = create_session(path)
    got = session.run(["embedding"], {modality: arrays})[0]
    single = session.run(["embedding"], {modality: arrays[:1]})[0]
    diff = max(float(np.max(np.abs(got - ref))), float(np.max(np.abs(single - ref[:1]))))
    cos = cosines(got, ref)
    return {
        "n": len(arrays),
        "max_abs_diff": diff,
        "min_cosine": float(cos.min()),
        "max_norm_error": float(np.max(np.abs(np.linalg.norm(got.astype(np.float64), axis=1) - 1.0))),
    }, ref


def head_parity(head, embeddings: np.ndarray, path: Path) -> dict[str, Any]:
    from retinacli.onnx_session import create_session

    ref = head.predict(embeddings)
    got = create_session(path).run([HEAD_OUTPUTS[head.kind]], {"embedding": embeddings.astype(np.float32)})[0]
    # Regression heads output µm: compare relative to the value scale as well as absolutely.
    scale = max(1.0, float(np.max(np.abs(ref))))
    return {
        "n": len(embeddings),
        "max_abs_diff": float(np.max(np.abs(got - ref))),
        "max_rel_diff": float(np.max(np.abs(got - ref)) / scale),
        "min_cosine": None,
    }


def check_parity(parity: dict[str, Any], tolerance: float) -> None:
    """Raise ExportError naming every graph whose difference exceeds ``tolerance``."""
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


def parity_inputs(run, n_items: int, manifest: str | Path | None) -> tuple[dict[str, np.ndarray], str]:
    """Real preprocessed items from the run's cohort (falls back to seeded noise, and says so).

    From a cohort, ``arrays["eyes"]`` also holds each item's eye (patient id + laterality, in memory
    only) for the int8 gate's ties (training.export.quantize); seeded noise has none.
    """
    from retinacli.cohort_manifest import read_cohort_manifest
    from training.data import load_pairs
    from training.probe import resolve_manifest_path

    try:
        manifest_path = resolve_manifest_path(run.config, Path(run.run_dir), manifest)
        rows = read_cohort_manifest(manifest_path)
        # a few spare rows in case some do not read
        data = load_pairs(rows[: n_items + 4], run.spec)
        arrays = {"fundus": data.fundus[:n_items], "oct": data.oct[:n_items],
                  "eyes": np.array([f"{r['patient_id']}/{r['eye']}" for r in data.rows[:n_items]])}
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
