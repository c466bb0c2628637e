"""`retina export RUN --out PKG`: a self-contained ONNX model package (docs/model-package.md).

Split by job:

- :mod:`training.export.graphs`: torch -> ONNX (encoder graphs with the dynamo exporter at opset 18,
  tiny affine head graphs);
- :mod:`training.export.parity`: onnxruntime vs torch on real preprocessed items of the run's cohort
  manifest; the export fails when any output differs by more than the tolerance;
- :mod:`training.export.quantize`: optional int8 encoders and their accuracy gate;
- :mod:`training.export.ood`: the out-of-distribution reference (training centroids, threshold);
- :mod:`training.export.package`: the package folder and its retina.json, built in a staging folder
  and swapped in only when complete, so a failed export never leaves a half-written package.

The names below are re-exported so ``from training.export import X`` keeps working.
"""

from __future__ import annotations

from training.export.graphs import (
    DEFAULT_OPSET,
    ENCODER_FILES,
    EXPORTERS,
    HEAD_OUTPUTS,
    export_encoder,
    export_head,
)
from training.export.package import (
    DESCRIPTOR_FILE,
    SCHEMA_VERSION,
    ExportResult,
    _head_entry,
    _input_spec,
    canonical_sha256,
    export_model,
    export_run,
    package_name_for,
)
from training.export.parity import (
    DEFAULT_PARITY_ITEMS,
    DEFAULT_TOLERANCE,
    ExportError,
    check_parity,
    encoder_parity,
    head_parity,
    parity_inputs,
)
from training.export.quantize import (
    DEFAULT_CALIBRATION_ITEMS,
    DEFAULT_GATE_ITEMS,
    GATE_MIN_COSINE,
    GATE_MIN_TOP5_AGREEMENT,
    INT8_FILES,
    QUANTIZE_CHOICES,
    embedding_head_nodes,
    int8_gate,
    quantize_encoder,
    quantize_package,
    top_k_agreement,
)

__all__ = [
    "DEFAULT_CALIBRATION_ITEMS",
    "DEFAULT_GATE_ITEMS",
    "DEFAULT_OPSET",
    "DEFAULT_PARITY_ITEMS",
    "DEFAULT_TOLERANCE",
    "DESCRIPTOR_FILE",
    "ENCODER_FILES",
    "EXPORTERS",
    "GATE_MIN_COSINE",
    "GATE_MIN_TOP5_AGREEMENT",
    "HEAD_OUTPUTS",
    "INT8_FILES",
    "QUANTIZE_CHOICES",
    "SCHEMA_VERSION",
    "ExportError",
    "ExportResult",
    "_head_entry",
    "_input_spec",
    "canonical_sha256",
    "check_parity",
    "embedding_head_nodes",
    "encoder_parity",
    "export_encoder",
    "export_head",
    "export_model",
    "export_run",
    "head_parity",
    "int8_gate",
    "package_name_for",
    "parity_inputs",
    "quantize_encoder",
    "quantize_package",
    "top_k_agreement",
]
