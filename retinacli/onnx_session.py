"""The one place that builds an onnxruntime ``InferenceSession`` (engine, backends, export checks).

Every session gets the same options: ``threads`` intra-op threads (onnxruntime's default when
None or 0), one inter-op thread, warnings and errors only in the log, and no busy-waiting: idle worker
threads would otherwise spin after each run, taking the cores from the reader threads and from the
other encoder's engine (OpenVINO ran 1.8x slower right after an onnxruntime call); onnxruntime's
own speed is unchanged without it.

onnxruntime is imported when a session is built (``retinacli`` imports cheaply and never imports torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)
NO_SPINNING = {"session.intra_op.allow_spinning": "0"}


def session_options(threads: int | None = None) -> Any:
    """The ``onnxruntime.SessionOptions`` every retina session uses (see the module docstring)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None and int(threads) < 0:
        raise ValueError(f"threads must be >= 0 (0: onnxruntime's default), got {threads}")
    if threads:
        options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    for key, value in NO_SPINNING.items():
        options.add_session_config_entry(key, value)
    return options


def create_session(
    model: str | Path | bytes,
    providers: list[str] | tuple[str, ...] | None = None,
    threads: int | None = None,
    optimize: bool = True,
) -> Any:
    """An ``onnxruntime.InferenceSession`` of a graph file or its bytes, with :func:`session_options`.

    ``providers``: execution providers in preference order (default the CPU one). ``optimize=False``
    skips graph optimisation: a session that only reads the graph's inputs and outputs (package
    checks) is built faster.
    """
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    options = session_options(threads)
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(source, options, providers=list(providers or DEFAULT_PROVIDERS))
