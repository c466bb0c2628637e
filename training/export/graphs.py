"""torch -> ONNX: the encoder graphs (torch.onnx.export) and the task-head graphs (onnx.helper).

Exporter: the dynamo-based ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript) at
opset 18. For resnet18 and r3d_18 it produces a compact graph (batch norm folded into the
convolutions, Conv3d as plain ``Conv``) with a symbolic batch axis, and it is the exporter torch
maintains; the TorchScript exporter is deprecated. ``--exporter torchscript`` remains available
as a fallback; the choice is recorded in retina.json.

The embedding is L2-normalised inside the encoder graphs. Heads are tiny affine graphs written
with ``onnx.helper`` (exactly ``embedding @ weight + bias``, then ``Sigmoid`` for binary tasks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_OPSET = 18
EXPORTERS = ("dynamo", "torchscript")
ENCODER_FILES = {"fundus": "fundus_encoder.onnx", "oct": "oct_encoder.onnx"}
HEAD_OUTPUTS = {"regression": "value", "binary": "probability"}


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

    module = _encoder_module(model.cpu(), modality)  # the example input is a CPU tensor
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
