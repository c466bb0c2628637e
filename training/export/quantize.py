"""int8 encoders and their accuracy gate (docs/performance.md).

Static int8 quantisation (QDQ, per-channel weights, MinMax calibration on real items) of the
convolutions; the gate compares each int8 encoder with the fp32 torch embeddings of the same items
on every installed backend (min cosine, and a tie-aware top-5 retrieval agreement: visits of one eye
are one result, and score gaps below the fp32 model's own test-retest noise are ties;
docs/performance.md says why).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from retinacli.ranking import cosine_scores, top_k_overlap
from training.export.graphs import ENCODER_FILES
from training.export.parity import cosines

INT8_FILES = {"fundus": "fundus_encoder.int8.onnx", "oct": "oct_encoder.int8.onnx"}
QUANTIZE_CHOICES = ("int8",)
DEFAULT_CALIBRATION_ITEMS = 32
DEFAULT_GATE_ITEMS = 64
# The accuracy gate an int8 encoder must pass to be chosen automatically (docs/performance.md).
GATE_MIN_COSINE = 0.995
GATE_MIN_TOP5_AGREEMENT = 0.98
GATE_AGREEMENT = (
    "tie-aware top-5 agreement: results are eyes (a gallery eye scores as its best visit; eye labels "
    "from the cohort manifest), and eyes whose fp32 scores differ by less than the fp32 model's "
    "test-retest noise (median spread of one query's fp32 scores over the visits of one gallery eye) "
    "are ties; the lower of the two search directions"
)
GATE_AGREEMENT_NO_EYES = "top-5 agreement of items (no eye labels: seeded-noise gate items), lower direction"


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
    return top_k_overlap(cosine_scores(queries, gallery_ref), cosine_scores(queries, gallery_new), k)


def eye_groups(eyes: Any, n: int) -> np.ndarray:
    """Group index of each of ``n`` gallery items: items of one eye share it (every item its own
    group when ``eyes`` is None, e.g. seeded-noise gate items without a manifest)."""
    if eyes is None:
        return np.arange(n)
    labels = list(eyes)
    if len(labels) != n:
        raise ValueError(f"{len(labels)} eye labels for {n} gate items")
    return np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)[1].reshape(-1)


def _eye_scores(scores: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """(queries, eyes): each gallery eye scores as its best visit (what a same-eye search returns)."""
    out = np.full((scores.shape[0], int(groups.max()) + 1 if groups.size else 0), -np.inf)
    np.maximum.at(out.T, groups, scores.T)
    return out


def retest_noise(scores: np.ndarray, groups: np.ndarray) -> float:
    """The fp32 model's own score noise: the median spread (max - min) of one query's scores over
    the visits of one gallery eye, over every query and every eye with two or more visits (0.0
    when no eye has two). Re-imaging an eye can undo a score gap smaller than this."""
    spreads = []
    for group in np.flatnonzero(np.bincount(groups) >= 2):
        visits = scores[:, groups == group]
        spreads.append(visits.max(axis=1) - visits.min(axis=1))
    return float(np.median(np.concatenate(spreads))) if spreads else 0.0


def tie_aware_top_k_agreement(
    scores_ref: np.ndarray, scores_new: np.ndarray, groups: np.ndarray, tolerance: float, k: int = 5
) -> float:
    """Agreement of each query's top-k *eyes* under ``scores_new`` with the fp32 ranking, up to ties.

    Per query, with f the fp32 eye scores, f_k and f_k+1 its k-th and (k+1)-th best: an eye with
    f >= f_k - tolerance may be in the top-k (allowed) and one with f > f_k+1 + tolerance must be
    (required). Agreement = 1 - max(#new top-k eyes not allowed, #required eyes missing) / k, the
    mean over queries. With one item per eye and tolerance 0 it is the plain top-k overlap
    (:func:`retinacli.ranking.top_k_overlap`); 1.0 when the gallery holds at most k eyes.
    """
    ref, new = _eye_scores(np.asarray(scores_ref, np.float64), groups), _eye_scores(
        np.asarray(scores_new, np.float64), groups)
    n_eyes = ref.shape[1]
    if len(ref) == 0 or n_eyes <= k:
        return 1.0
    ranked = -np.sort(-ref, axis=1)
    allowed = ref >= (ranked[:, k - 1] - tolerance)[:, None]
    required = ref > (ranked[:, k] + tolerance)[:, None]
    chosen = np.zeros_like(allowed)
    np.put_along_axis(chosen, np.argsort(-new, axis=1, kind="stable")[:, :k], True, axis=1)
    wrong = (chosen & ~allowed).sum(axis=1)
    missed = (required & ~chosen).sum(axis=1)
    return float(np.mean(1.0 - np.maximum(wrong, missed) / k))


def int8_gate(
    reference: np.ndarray, quantized: np.ndarray, other: np.ndarray, eyes: Any = None
) -> dict[str, Any]:
    """Gate numbers of one int8 encoder against the fp32 torch embeddings of the same items.

    ``other``: the fp32 embeddings of the paired items of the other modality; ``eyes``: each item's
    eye (e.g. patient id + laterality from the cohort manifest; None: every item its own eye). The
    tie-aware top-5 agreement (:func:`tie_aware_top_k_agreement`, ties = the fp32 test-retest noise
    of that direction) is measured both ways (other-modality queries against the int8 gallery, int8
    queries against the other modality) and the lower value is kept; ``exact_top5_agreement`` is the
    strict item-order overlap, recorded for comparison only.
    """
    cos = cosines(quantized, reference)
    groups = eye_groups(eyes, len(reference))
    directions = (
        (cosine_scores(other, reference), cosine_scores(other, quantized)),  # int8 gallery
        (cosine_scores(reference, other), cosine_scores(quantized, other)),  # int8 queries
    )
    agreement, exact, tolerance = 1.0, 1.0, 0.0
    for ref_scores, new_scores in directions:
        noise = retest_noise(ref_scores, groups)
        agreement = min(agreement, tie_aware_top_k_agreement(ref_scores, new_scores, groups, noise, 5))
        exact = min(exact, top_k_overlap(ref_scores, new_scores, 5))
        tolerance = max(tolerance, noise)
    passed = float(cos.min()) >= GATE_MIN_COSINE and agreement >= GATE_MIN_TOP5_AGREEMENT
    return {
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "top5_agreement": agreement,
        "exact_top5_agreement": exact,
        "tie_tolerance": tolerance,
        "passed": bool(passed),
    }


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
    items, and recorded as overlapping, when fewer than 8 would remain). ``arrays["eyes"]`` (from
    :func:`training.export.parity.parity_inputs`): each item's eye, for the gate's ties.
    """
    n = min(len(arrays["oct"]), len(arrays["fundus"]))
    n_cal = max(1, min(calibration_items, n // 2 if n >= 2 else n))
    held_out = n - n_cal >= 8
    gate_slice = slice(n_cal, n) if held_out else slice(0, n)
    reference = {m: model.encode(m, arrays[m][gate_slice], batch_size=8) for m in ("fundus", "oct")}
    eyes = arrays.get("eyes")
    eyes = None if eyes is None else list(eyes[:n][gate_slice])
    encoders: dict[str, Any] = {}
    for modality in ("fundus", "oct"):
        say(f"quantising the {modality} encoder to int8 ({n_cal} calibration items)")
        path = staging / INT8_FILES[modality]
        quantize_encoder(staging / ENCODER_FILES[modality], path, modality, arrays[modality][:n_cal])
        other = reference["oct" if modality == "fundus" else "fundus"]
        gates = {}
        for backend, make in _int8_backends().items():
            got = _run_batched(make(path, modality), arrays[modality][gate_slice])
            gates[backend] = int8_gate(reference[modality], got, other, eyes)
            g = gates[backend]
            say(f"  {backend} int8 {modality}: min cosine {g['min_cosine']:.5f}, top-5 agreement "
                f"{g['top5_agreement']:.3f} (exact order {g['exact_top5_agreement']:.3f}) -> "
                f"{'passed' if g['passed'] else 'FAILED'} the gate")
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
                "agreement": GATE_AGREEMENT if eyes is not None else GATE_AGREEMENT_NO_EYES,
                "reference": "fp32 torch embeddings of the same items",
                "items": gate_slice.stop - gate_slice.start,
                "overlaps_calibration": not held_out,
            },
            "encoders": encoders,
        }
    }
