"""Inference on an exported model package with onnxruntime (no torch).

    engine = Engine.load()                      # default package (see retinacli.package)
    x = engine.preprocess(item)                 # the package's own preprocessing spec
    emb = engine.embed("oct", x[None])          # (B, D) float32, L2-normalised
    engine.predict("cst", emb)                  # [{"task": "cst", "value": 312.4, "units": "µm"}]

Every file's sha256 is checked when the package is loaded, and sessions are built from the very
bytes that were checked.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from retinacli.backends import Variant, choose_variant, make_runner
from retinacli.errors import ModelPackageError, UsageError
from retinacli.package import check_graphs, model_ids_for, resolve_package, verify_package
from retinacli.preprocess import preprocess as _preprocess
from retinacli.preprocess import spec_hash, validate_spec

MODALITIES = ("fundus", "oct")


def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads do not help onnxruntime much)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores: set[tuple[str, str]] = set()
    try:
        physical_id = core_id = None
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    physical_id = value.strip()
                elif key == "core id":
                    core_id = value.strip()
                elif not key and physical_id is not None and core_id is not None:
                    cores.add((physical_id, core_id))
                    physical_id = core_id = None
            if physical_id is not None and core_id is not None:
                cores.add((physical_id, core_id))
    except OSError:
        pass
    return max(1, min(logical, len(cores) or logical))


DEVICES = ("auto", "cpu", "cuda")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
CUDA_INSTALL = "pip uninstall onnxruntime && pip install onnxruntime-gpu"


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def choose_providers(
    providers: str | list[str] | None, backend: str = "auto", available: list[str] | None = None
) -> list[str]:
    """The onnxruntime providers to ask for, from ``--device``.

    ``None``/``"cpu"`` -> CPU; ``"cuda"`` -> CUDA then CPU (a UsageError saying how to install
    onnxruntime-gpu when this onnxruntime has no CUDA provider); ``"auto"`` -> CUDA when the provider
    is available and the engine is not pinned to OpenVINO (a CPU runtime), else CPU. A list of
    onnxruntime provider names is used as given (unknown ones are an error). ``available``: the
    providers this onnxruntime offers (default: asked from onnxruntime; tests pass their own).
    """
    available = available_providers() if available is None else list(available)
    if providers is None or providers == "cpu":
        return [CPU]
    if providers == "auto":
        return [CUDA, CPU] if CUDA in available and backend != "openvino" else [CPU]
    if providers == "cuda":
        if CUDA not in available:
            raise UsageError(
                f"--device cuda: this onnxruntime has no {CUDA} (available: {', '.join(available)}); "
                f"install the GPU build ({CUDA_INSTALL}) or use --device cpu"
            )
        return [CUDA, CPU]
    if isinstance(providers, str):
        raise UsageError(f"unknown device {providers!r} (use {', '.join(DEVICES)})")
    missing = [p for p in providers if p not in available]
    if missing:
        raise UsageError(f"onnxruntime providers not available: {', '.join(missing)}")
    return list(providers)


def check_cuda_used(used: list[str], where: Path | str) -> None:
    """``--device cuda`` asked for the GPU: a session that fell back to the CPU is an error, not a
    silent slow run (onnxruntime drops a provider it cannot start, e.g. without CUDA/cuDNN libraries
    or a visible GPU)."""
    if CUDA not in used:
        raise UsageError(
            f"--device cuda: onnxruntime could not start CUDA for {where} and fell back to "
            f"{', '.join(used) or 'nothing'} (no GPU visible, or the CUDA/cuDNN libraries onnxruntime-gpu "
            "needs are missing); use --device cpu or auto"
        )


class Engine:
    """A verified model package with lazily created onnxruntime sessions."""

    def __init__(
        self,
        path: Path,
        descriptor: dict[str, Any],
        blobs: dict[str, bytes],
        providers: list[str],
        threads: int,
        backend: str = "auto",
        precision: str = "auto",
        device: str | None = None,
    ):
        self.path = Path(path)
        self.descriptor = descriptor
        self.providers = providers  # asked for; the ones really used: providers_used()
        self.device = device  # "cuda": a session that falls back to the CPU is an error
        self.threads = threads
        self._blobs = blobs
        self._sessions: dict[str, Any] = {}
        self._runners: dict[str, Any] = {}
        self.backend_request, self.precision_request = backend, precision
        gpu = any(p != CPU for p in providers)
        # Chosen now (cheap, no session built) so that bad requests fail before any work starts.
        self.variants: dict[str, Variant] = {
            m: choose_variant(descriptor, m, backend, precision, gpu=gpu) for m in MODALITIES
        }
        self._lock = threading.Lock()  # sessions are created lazily, possibly from worker threads
        self.name: str = descriptor["name"]
        self.version: str = descriptor["version"]
        # legacy: the id under the older rule (retinacli.package.model_ids_for), which stores made
        # before it record; adopt_model_id names this engine's vectors as such a store does
        self.model_id, self.legacy_model_id = model_ids_for(descriptor)
        self.spec: dict[str, Any] = descriptor["preprocessing"]
        self.spec_hash: str = spec_hash(self.spec)
        self.embed_dim: int = int(descriptor["embed_dim"])
        self.tasks: tuple[str, ...] = tuple(sorted(descriptor["heads"]))

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        name_or_path: str | os.PathLike | None = None,
        providers: str | list[str] | None = None,
        threads: int | None = None,
        backend: str = "auto",
        precision: str = "auto",
    ) -> Engine:
        """Resolve, verify (schema + sha256 of every file) and open a package.

        ``providers``: the device, None/"cpu", "cuda", "auto" (CUDA when onnxruntime has it, else
        the CPU), or a list of onnxruntime provider names. With CUDA the encoders run on onnxruntime.
        ``threads``: intra-op threads per session (default: physical cores).
        ``backend`` (onnxruntime, openvino, auto) and ``precision`` (fp32, int8, auto) choose how
        the encoders run; ``auto`` is the fastest installed variant that passed the package's
        accuracy gate (retinacli.backends).
        """
        path = resolve_package(name_or_path)
        descriptor, blobs = verify_package(path)
        try:
            validate_spec(descriptor["preprocessing"])
        except ValueError as exc:
            raise ModelPackageError(f"{path / 'retina.json'}: preprocessing: {exc}") from None
        if threads is not None and int(threads) < 1:
            raise UsageError(f"threads must be >= 1, got {threads}")
        device = providers if isinstance(providers, str) else None
        return cls(path, descriptor, blobs, choose_providers(providers, backend),
                   int(threads or physical_cores()), backend, precision, device)

    def _session(self, file_name: str):
        with self._lock:
            return self._session_locked(file_name)

    def _session_locked(self, file_name: str):
        session = self._sessions.get(file_name)
        if session is None:
            from retinacli.onnx_session import create_session

            try:
                session = create_session(self._blobs[file_name], self.providers, self.threads)
            except Exception as exc:  # onnxruntime raises its own exception types
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                where = self.path / file_name
                raise ModelPackageError(f"{where}: onnxruntime cannot load it ({first})") from None
            if self.device == "cuda":
                check_cuda_used(session.get_providers(), self.path / file_name)
            self._sessions[file_name] = session
        return session

    def variant(self, modality: str) -> Variant:
        """How ``modality``'s encoder runs (backend, precision, file)."""
        return self.variants[self._check_modality(modality)]

    def _runner(self, modality: str):
        with self._lock:
            runner = self._runners.get(modality)
            if runner is None:
                variant, spec = self.variants[modality], self.descriptor["inputs"][modality]
                try:
                    runner = make_runner(variant, self._blobs[variant.file], spec["input_name"],
                                         spec["output_name"], self.threads, self.providers)
                except Exception as exc:  # the runtimes raise their own exception types
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    where = self.path / variant.file
                    raise ModelPackageError(f"{where}: {variant.backend} cannot load it ({first})") from None
                if self.device == "cuda":
                    check_cuda_used(runner.providers, self.path / variant.file)
                self._runners[modality] = runner
        return runner

    def providers_used(self, modalities: tuple[str, ...] | list[str] | None = None) -> dict[str, list[str]]:
        """The providers each encoder really runs on, from its built session (``get_providers()``;
        OpenVINO: ``OpenVINO CPU``). ``modalities``: build those encoders' runners first (a
        ``--device cuda`` that cannot start CUDA fails here); None: only the runners built so far."""
        for modality in modalities or ():
            self._runner(self._check_modality(modality))
        with self._lock:
            built = dict(self._runners)
        return {m: list(getattr(r, "providers", [])) for m, r in sorted(built.items())}

    def check_graphs(self) -> None:
        """Check every graph (fp32 and int8 encoders, heads) against the descriptor: input/output
        names, shapes and embedding size (retinacli.package.graph_errors; load already did)."""
        check_graphs(self.path, self.descriptor, self._blobs)

    @property
    def ood(self):
        """The package's out-of-distribution reference (retinacli.ood.OodReference), or None when the
        package records none (exported before retina had it). Parsed from the verified bytes."""
        if not hasattr(self, "_ood"):
            entry = self.descriptor.get("ood")
            if entry is None:
                self._ood = None
            else:
                from retinacli.ood import parse_reference

                try:
                    self._ood = parse_reference(self._blobs[entry["file"]], self.descriptor)
                except (KeyError, ValueError) as exc:  # load verified it; a caller-built engine may not
                    raise ModelPackageError(f"{self.path / entry['file']}: {exc}") from None
        return self._ood

    @property
    def model_ids(self) -> tuple[str, ...]:
        """Every id this package's vectors are known by: (current, legacy)."""
        return (self.model_id, self.legacy_model_id)

    def adopt_model_id(self, store_model_id: str) -> bool:
        """Use a store's model id for this engine when it is this package's older-rule id (a store
        made before the current id rule); True when the engine's vectors are the store's model."""
        if store_model_id == self.legacy_model_id:
            self.model_id = store_model_id
        return store_model_id == self.model_id

    # --- inference ------------------------------------------------------------------------------

    def preprocess(self, item: Any) -> np.ndarray:
        """An OctVolume / FundusImage -> the float32 array the encoder expects (no batch axis)."""
        return _preprocess(item.modality, item.pixels, self.spec)

    def input_shape(self, modality: str) -> tuple[int, ...]:
        """Shape of one preprocessed item for ``modality`` (without the batch axis)."""
        return tuple(int(s) for s in self.descriptor["inputs"][self._check_modality(modality)]["shape"][1:])

    def _check_modality(self, modality: str) -> str:
        if modality not in MODALITIES:
            raise UsageError(f"unknown modality {modality!r} (use fundus or oct)")
        return modality

    def embed(self, modality: str, batch: np.ndarray) -> np.ndarray:
        """Preprocessed batch (B, *input_shape) -> embeddings (B, D) float32, L2-normalised."""
        self._check_modality(modality)
        x = np.ascontiguousarray(batch, dtype=np.float32)
        expected = self.input_shape(modality)
        if x.ndim == len(expected):
            x = x[None]
        if tuple(x.shape[1:]) != expected:
            raise UsageError(f"{modality} batch must be (B, {', '.join(map(str, expected))}), got {x.shape}")
        if x.shape[0] == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return np.asarray(self._runner(modality).run(x), dtype=np.float32)

    def head(self, task: str) -> dict[str, Any]:
        if task not in self.descriptor["heads"]:
            have = ", ".join(self.tasks) or "none"
            raise UsageError(f"model {self.name}@{self.version} has no '{task}' head (heads: {have})")
        return self.descriptor["heads"][task]

    def predict_raw(self, task: str, embeddings: np.ndarray) -> np.ndarray:
        """Head output (N,): the value in the head's units, or the probability of label 1."""
        head = self.head(task)
        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.embed_dim:
            raise UsageError(f"embeddings must be (N, {self.embed_dim}), got {x.shape}")
        if x.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        (out,) = self._session(head["file"]).run([head["output_name"]], {head["input_name"]: x})
        return np.asarray(out, dtype=np.float32).reshape(-1)

    def predict(self, task: str, embeddings: np.ndarray) -> list[dict[str, Any]]:
        """One record per embedding row.

        regression tasks (e.g. cst): ``{"task", "value", "units"}``; binary tasks: ``{"task", "probability",
        "label", "threshold", "label_meaning"}`` with ``label = probability >= threshold``.
        """
        head = self.head(task)
        raw = self.predict_raw(task, embeddings)
        if head["kind"] == "regression":
            return [{"task": task, "value": float(v), "units": head["units"]} for v in raw]
        threshold = float(head["threshold"] if head["threshold"] is not None else 0.5)
        return [
            {
                "task": task,
                "probability": float(p),
                "label": int(p >= threshold),
                "threshold": threshold,
                "label_meaning": head["label_meaning"],
            }
            for p in raw
        ]

    def describe(self) -> dict[str, Any]:
        """A short JSON-able summary (for `retina models show` and command outputs)."""
        return {
            "name": self.name,
            "version": self.version,
            "model_id": self.model_id,
            "path": str(self.path),
            "embed_dim": self.embed_dim,
            "tasks": list(self.tasks),
            "device": self.device or "cpu",
            "providers_requested": self.providers,
            "providers": self.providers_used(),  # encoders built so far, as their sessions report
            "encoders": {m: v.label for m, v in self.variants.items()},
            "threads": self.threads,
            "spec_hash": self.spec_hash,
        }


def engine_line(engine: Any, modalities: tuple[str, ...] | list[str]) -> str:
    """``oct openvino/fp32 on OpenVINO CPU, ...``: how each encoder runs, with the providers its built
    session really uses (building it now). Empty for an engine without variants (a stand-in)."""
    variants = getattr(engine, "variants", None) or {}
    used_of = getattr(engine, "providers_used", None)
    wanted = [m for m in modalities if m in variants]
    used = used_of(wanted) if used_of is not None else {}
    asked_cuda = CUDA in (getattr(engine, "providers", None) or [])
    parts = []
    for m in wanted:
        where = f" on {', '.join(used[m])}" if used.get(m) else ""
        if asked_cuda and variants[m].backend == "onnxruntime" and CUDA not in used.get(m, [CUDA]):
            where += " (CUDA asked for but could not start)"  # the silent fall-back, made visible
        parts.append(f"{m} {variants[m].label}{where}")
    return ", ".join(parts)
