"""One onnxruntime session factory: the engine, the backends' runner and the export checks all get
the same options (no busy-waiting, one inter-op thread, quiet log)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fixtures_packages import make_toy_package

from retinacli.backends import OnnxRuntimeRunner
from retinacli.engine import Engine
from retinacli.onnx_session import create_session

ROOT = Path(__file__).resolve().parents[1]


def _options(session) -> tuple:
    o = session.get_session_options()
    return (o.get_session_config_entry("session.intra_op.allow_spinning"), o.inter_op_num_threads,
            o.intra_op_num_threads, o.log_severity_level)


def test_engine_runner_and_export_sessions_share_the_options(tmp_path):
    package = make_toy_package(tmp_path / "toy")
    head_file = next(p for p in sorted(package.iterdir()) if p.name.startswith("head_"))
    encoder_file = package / "oct_encoder.onnx"

    engine = Engine.load(str(package), threads=2)
    from_engine = engine._session(head_file.name)
    from_runner = OnnxRuntimeRunner(encoder_file.read_bytes(), "oct", "embedding", 2,
                                    ["CPUExecutionProvider"])
    from_factory = create_session(encoder_file, threads=2)  # what training/export/parity.py calls
    expected = ("0", 1, 2, 3)
    assert _options(from_engine) == expected
    assert _options(from_runner.session) == expected
    assert _options(from_factory) == expected


def test_default_threads_and_bad_threads(tmp_path):
    encoder_file = make_toy_package(tmp_path / "toy") / "oct_encoder.onnx"
    assert _options(create_session(encoder_file.read_bytes())) == ("0", 1, 0, 3)  # 0: onnxruntime's default
    with pytest.raises(ValueError, match="threads"):
        create_session(encoder_file, threads=-1)


def test_no_other_place_builds_a_session():
    pattern = re.compile(r"InferenceSession\(")
    found = []
    for folder in ("retinacli", "training", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if pattern.search(path.read_text(encoding="utf-8")):
                found.append(path.relative_to(ROOT).as_posix())
    assert found == ["retinacli/onnx_session.py"]
