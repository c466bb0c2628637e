"""Package fixtures (owned by the deployment work).

* ``tiny_package`` (session): the ``tiny_run`` fixture probed for every registry task and exported
  (``retina export``) -> the package folder. Needs torch.
* ``toy_package`` (function): a torch-free package built directly with ``onnx.helper`` in
  milliseconds (linear "encoders" + real heads), for engine / lookup / CLI tests. Needs only onnx.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from retinacli.preprocess import make_spec

TOY_SPEC = make_spec(oct_slices=2, oct_size=8, fundus_size=8, fundus_channels=3)
TOY_DIM = 4


@pytest.fixture(scope="session")
def tiny_package_run(tiny_run, tmp_path_factory) -> Path:
    """A copy of ``tiny_run`` to probe and export (probing writes heads.json: the shared run stays as is)."""
    pytest.importorskip("torch")
    run = tmp_path_factory.mktemp("tiny_package_run") / "run"
    shutil.copytree(tiny_run, run)
    return run


@pytest.fixture(scope="session")
def tiny_loaded_run(tiny_package_run):
    """``load_run(tiny_package_run)`` once per session (building the torch model is the slow part)."""
    from training.model import load_run

    return load_run(tiny_package_run)


@pytest.fixture(scope="session")
def tiny_package(tiny_package_run, tiny_loaded_run, tmp_path_factory) -> Path:
    """The tiny run with heads fitted on its cohort (retina probe), exported to an ONNX package."""
    from training.export import export_run
    from training.probe import probe_run

    run = tiny_package_run
    probe_run(run, loaded=tiny_loaded_run)  # every registry task (tests/test_tasks.py relies on it)
    out = tmp_path_factory.mktemp("tiny_package") / "tiny"
    export_run(run, out, name="tiny", version="0.1.0", loaded=tiny_loaded_run)
    return out


# --- a torch-free toy package -----------------------------------------------------------------------


@pytest.fixture
def toy_packages_home(private_home, monkeypatch) -> Path:
    """`private_home` (no $RETINA_STORE either) with toy 1.0.0 and 1.1.0 installed in $RETINA_HOME/models
    and ./exported/mine 0.1.0 in the working folder; returns tmp_path."""
    monkeypatch.delenv("RETINA_STORE", raising=False)
    make_toy_package(private_home / "home" / "models" / "toy-1.0.0", version="1.0.0")
    make_toy_package(private_home / "home" / "models" / "toy-1.1.0", version="1.1.0")
    make_toy_package(private_home / "work" / "exported" / "mine", name="mine", version="0.1.0")
    return private_home


def _linear_encoder(path: Path, input_name: str, in_shape: list, weight: np.ndarray, opset: int = 18) -> None:
    """x (batch, *in_shape) -> normalize(flatten(x) @ weight): the same contract as the real encoders."""
    from onnx import TensorProto, helper, numpy_helper, save

    nodes = [
        helper.make_node("Flatten", [input_name], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "weight"], ["raw"]),
        helper.make_node("ReduceL2", ["raw", "axes"], ["norm"], keepdims=1),
        helper.make_node("Max", ["norm", "eps"], ["safe"]),
        helper.make_node("Div", ["raw", "safe"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "toy_encoder",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", *in_shape])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", weight.shape[1]])],
        initializer=[
            numpy_helper.from_array(weight.astype(np.float32), "weight"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
            numpy_helper.from_array(np.array(1e-12, dtype=np.float32), "eps"),
        ],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@lru_cache(maxsize=4)
def _toy_heads(seed: int) -> tuple:
    """cst + tn heads on random unit embeddings (fitted once per seed: sklearn CV is the slow part)."""
    from training.heads import fit_linear_head

    rng = np.random.default_rng(seed + 1000)
    x = rng.normal(size=(60, TOY_DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return (
        fit_linear_head("cst", x, 300 + 80 * x[:, 0] + rng.normal(scale=2, size=60)),
        fit_linear_head("tn", x, (x[:, 1] + 0.2 * rng.normal(size=60) > 0).astype(float)),
    )


def make_toy_package(out: Path, name: str = "toy", version: str = "1.0.0", seed: int = 0) -> Path:
    """Write a small valid package (two linear encoders, cst + tn heads) and return its folder."""
    pytest.importorskip("onnx")
    from training.export import _head_entry, _input_spec, export_head

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shapes = {"fundus": [3, 8, 8], "oct": [1, 2, 8, 8]}
    for modality, shape in shapes.items():
        weight = rng.normal(size=(int(np.prod(shape)), TOY_DIM))
        _linear_encoder(out / f"{modality}_encoder.onnx", modality, shape, weight)
    heads = _toy_heads(seed)
    for head in heads:
        export_head(head, out / f"head_{head.task}.onnx", 18)
    files = sorted(p for p in out.iterdir() if p.suffix == ".onnx")
    descriptor = {
        "schema_version": 1,
        "format": "retina-model-package",
        "name": name,
        "version": version,
        "created": "2026-01-01T00:00:00Z",
        "changelog": "toy package for tests",
        "objective": "clip",
        "architectures": {"fundus": "linear", "oct": "linear"},
        "embed_dim": TOY_DIM,
        "inputs": {m: _input_spec(m, TOY_SPEC, TOY_DIM) for m in ("fundus", "oct")},
        "preprocessing": TOY_SPEC,
        "heads": {h.task: _head_entry(h) for h in heads},
        "training": {"config_sha256": "0" * 64, "data_manifest_sha256": None, "seed": 0, "epochs": 1},
        "files": [{"path": p.name, "sha256": _sha(p), "bytes": p.stat().st_size} for p in files],
        "parity": {
            "tolerance_abs": 1e-4,
            "fundus": {"n": 1, "max_abs_diff": 0.0, "min_cosine": 1.0},
            "oct": {"n": 1, "max_abs_diff": 0.0, "min_cosine": 1.0},
        },
        "packages": {"retina": "0", "torch": None, "onnx": "0", "onnxruntime": "0"},
        "export": {"exporter": "onnx.helper (test)", "opset": 18},
    }
    (out / "retina.json").write_text(json.dumps(descriptor, indent=2), encoding="utf-8")
    return out


@pytest.fixture
def toy_package(tmp_path) -> Path:
    return make_toy_package(tmp_path / "toy")
