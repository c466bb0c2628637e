"""Cohort manifest -> preprocessed pairs (on-disk cache) -> patient-level train/val split -> batches.

Every pair is read and preprocessed once with the run's spec (retinacli.preprocess, the same code
the exported model uses) into the on-disk cache of :mod:`training.cache`; training streams each
rank's part of every global batch from it through a torch ``DataLoader`` (:func:`make_loader`), so
host memory does not grow with the cohort. A row that cannot be read is skipped with a one-line
reason; it never stops the run. The manifest is read by
:func:`retinacli.cohort_manifest.read_cohort_manifest` (one reader for training and evaluation).
Small sets (export parity, evaluation) use :func:`load_pairs`, which keeps the arrays in memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retinacli.errors import ReadError
from retinacli.preprocess import preprocess_fundus, preprocess_oct
from training.cache import CachedArray, PairCache, build_or_open


def _readers() -> tuple[Callable, Callable]:
    """retinacli's readers (DICOM, .vol, images, folders, ...)."""
    from retinacli.readers import read_fundus, read_oct

    return read_oct, read_fundus


@dataclass
class PairArrays:
    """Preprocessed pairs: fundus (N, C, s, s) and oct (N, 1, S, H, W), float32, with their rows."""

    fundus: np.ndarray
    oct: np.ndarray
    rows: list[dict[str, str]]
    errors: list[str] = field(default_factory=list)

    @property
    def patients(self) -> list[str]:
        return [r["patient_id"] for r in self.rows]

    def subset(self, patients: set[str]) -> PairArrays:
        keep = [i for i, r in enumerate(self.rows) if r["patient_id"] in patients]
        return PairArrays(self.fundus[keep], self.oct[keep], [self.rows[i] for i in keep])


def pair_reader(rows: list[dict[str, str]]) -> Callable[[dict[str, str], dict[str, Any]], Any]:
    """``read(row, spec)``: the row's preprocessed ``(fundus, oct)`` arrays, or its one-line error."""
    read_oct, read_fundus = _readers()
    # Messages name files as every output does: relative to the cohort's folder, without a path
    # component that names the file's patient (retinacli.redaction).
    paths = _redactor(rows)

    def read(row: dict[str, str], spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | str:
        try:
            try:
                oct_item = read_oct(row["oct_path"])
                paths.learn(oct_item.meta)
                oct_arr = preprocess_oct(oct_item.pixels, spec)
            except ValueError as exc:
                raise ReadError(row["oct_path"], str(exc)) from None
            try:
                fundus_item = read_fundus(row["fundus_path"])
                paths.learn(fundus_item.meta)
                fundus_arr = preprocess_fundus(fundus_item.pixels, spec)
            except ValueError as exc:
                raise ReadError(row["fundus_path"], str(exc)) from None
        except ReadError as exc:
            return ": ".join(paths.error(exc.path, exc.reason))
        except OSError as exc:
            shown, reason = paths.error(exc.filename or row["oct_path"], str(exc.strerror or exc))
            return f"{shown}: {reason}"
        return fundus_arr, oct_arr

    return read


def load_pairs(
    rows: list[dict[str, str]],
    spec: dict[str, Any],
    on_progress: Callable[[], None] | None = None,
) -> PairArrays:
    """Read and preprocess every row once into memory; unreadable rows are skipped and reported in `errors`.

    For the small sets of export parity, the OOD reference and evaluation; training streams from
    the on-disk cache instead (:func:`open_cache`)."""
    read = pair_reader(rows)
    fundus_list, oct_list, kept, errors = [], [], [], []
    for row in rows:
        got = read(row, spec)
        if isinstance(got, str):
            errors.append(got)
        else:
            fundus_list.append(got[0])
            oct_list.append(got[1])
            kept.append(row)
        if on_progress is not None:
            on_progress()
    if not kept:
        raise ValueError("no readable pairs in the manifest: " + "; ".join(errors[:3]))
    return PairArrays(np.stack(fundus_list), np.stack(oct_list), kept, errors)


def _redactor(rows: list[dict[str, str]]):
    """A PathRedactor rooted at the folder that holds every file of `rows`."""
    import os

    from retinacli.redaction import PathRedactor

    files = [row[key] for row in rows for key in ("oct_path", "fundus_path")]
    common = Path(os.path.commonpath(files)) if files else Path.cwd()
    return PathRedactor.for_paths([common if common.is_dir() else common.parent])


@dataclass
class CachedPairs:
    """Pairs in the on-disk cache: ``fundus`` / ``oct`` read rows from disk when indexed
    (:class:`training.cache.CachedArray`), so any number of pairs costs no memory."""

    cache: PairCache
    index: np.ndarray  # cache rows
    rows: list[dict[str, str]]
    errors: list[str] = field(default_factory=list)

    @property
    def fundus(self) -> CachedArray:
        return self.cache.view("fundus", self.index)

    @property
    def oct(self) -> CachedArray:
        return self.cache.view("oct", self.index)

    @property
    def patients(self) -> list[str]:
        return [r["patient_id"] for r in self.rows]

    def subset(self, patients: set[str]) -> CachedPairs:
        keep = [i for i, r in enumerate(self.rows) if r["patient_id"] in patients]
        return CachedPairs(self.cache, self.index[keep], [self.rows[i] for i in keep])


def open_cache(
    rows: list[dict[str, str]],
    spec: dict[str, Any],
    manifest_sha256: str,
    cache_dir: str | Path | None = None,
    **build: Any,
) -> CachedPairs:
    """The cohort's pairs from the training cache, built first if needed (training.cache.build_or_open)."""
    cache = build_or_open(rows, spec, manifest_sha256, cache_dir, pair_reader(rows), **build)
    kept = [rows[i] for i in cache.manifest_rows.tolist()]
    return CachedPairs(cache, np.arange(len(cache)), kept, list(cache.errors))


_LAST_LOADED: dict[tuple[str, str], PairArrays | CachedPairs] = {}


def load_pairs_once(
    manifest_sha256: str, spec: dict[str, Any], load: Callable[[], PairArrays]
) -> PairArrays:
    """`load()`, unless this process last loaded the same manifest (by sha256) with the same spec.

    `retina demo` trains two objectives on one cohort and probes both: later steps reuse the arrays.
    Only the last cohort is kept, so memory stays that of one cohort.
    """
    key = (manifest_sha256, json.dumps(spec, sort_keys=True))
    if key not in _LAST_LOADED:
        remember_pairs(manifest_sha256, spec, load())
    return _LAST_LOADED[key]


def remember_pairs(manifest_sha256: str, spec: dict[str, Any], pairs: PairArrays | CachedPairs) -> None:
    """What :func:`load_pairs_once` returns for this manifest and spec from now on (training's cache)."""
    _LAST_LOADED.clear()
    _LAST_LOADED[(manifest_sha256, json.dumps(spec, sort_keys=True))] = pairs


def split_patients(patients: list[str], val_fraction: float, seed: int) -> dict[str, Any]:
    """Held-out patients for validation: a seeded shuffle of the sorted unique ids."""
    unique = sorted(set(patients))
    if len(unique) < 2:
        raise ValueError("need at least 2 patients to hold some out for validation")
    n_val = min(max(1, round(val_fraction * len(unique))), len(unique) - 1)
    order = np.random.default_rng(seed).permutation(len(unique))
    val = sorted(unique[i] for i in order[:n_val])
    train = sorted(unique[i] for i in order[n_val:])
    return {"seed": seed, "val_fraction": val_fraction, "train": train, "val": val}


def save_split(split: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(split, indent=2) + "\n")


BATCH_COMPOSITIONS = ("random", "eyes_together")


def epoch_batches(
    n: int, batch_size: int, seed: int, epoch: int, groups: np.ndarray | None = None
) -> list[np.ndarray]:
    """The epoch's shuffled batches of indices (the last incomplete batch is dropped).

    ``groups`` (one eye code per index) keeps the visits of an eye next to each other in a shuffled
    order of eyes, so they share a batch and are each other's hardest negatives ("eyes_together"):
    telling them apart needs what changed between visits (fluid, lesions), not only who the eye is.
    The order depends only on (seed, epoch), so a resumed run sees exactly the same batches.
    """
    rng = np.random.default_rng([seed, epoch, 1])
    order = rng.permutation(n)
    if groups is not None:
        groups = np.asarray(groups)
        eye_rank = rng.permutation(int(groups.max()) + 1 if len(groups) else 0)
        order = order[np.argsort(eye_rank[groups[order]], kind="stable")]
    steps = n // batch_size
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


# --- streaming batches ------------------------------------------------------------------------


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample: a function of (run seed, epoch, cache row) only, so the
    augmented tensors do not depend on the world size, the loader workers or the batch."""
    return int(np.random.SeedSequence([seed, epoch, int(index)]).generate_state(1, np.uint64)[0] >> 1)


class RankBatches:
    """Batch sampler of one rank: its slice of each global batch of the epoch (:func:`epoch_batches`)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 groups: np.ndarray | None = None):
        self.n, self.batch_size, self.seed, self.groups = n, batch_size, seed, groups
        self.local = batch_size // world_size
        self.part = slice(rank * self.local, (rank + 1) * self.local)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self):
        for batch in epoch_batches(self.n, self.batch_size, self.seed, self.epoch, self.groups):
            yield self.epoch, batch[self.part]


class BatchReader:
    """Map-style dataset: ``(epoch, positions)`` -> the (fundus, oct) tensors of those pairs, augmented
    per sample with a generator seeded by :func:`sample_seed` when `augment` is set."""

    def __init__(self, pairs: CachedPairs, spec: dict[str, Any], augment: bool, seed: int):
        self.pairs, self.spec, self.augment, self.seed = pairs, spec, augment, seed

    def __len__(self) -> int:
        return len(self.pairs.rows)

    def __getitem__(self, key: tuple[int, np.ndarray]):
        import torch

        from training.augment import augment_fundus, augment_oct

        epoch, positions = key
        rows = self.pairs.index[np.asarray(positions)]
        fundus = torch.from_numpy(self.pairs.cache.read("fundus", rows))
        oct = torch.from_numpy(self.pairs.cache.read("oct", rows))
        if self.augment:
            for i, row in enumerate(rows.tolist()):
                gen = torch.Generator().manual_seed(sample_seed(self.seed, epoch, row))
                fundus[i] = augment_fundus(fundus[i : i + 1], self.spec, gen)[0]
                oct[i] = augment_oct(oct[i : i + 1], self.spec, gen)[0]
        return fundus, oct


def make_loader(
    pairs: CachedPairs,
    spec: dict[str, Any],
    batch_size: int,
    seed: int,
    augment: bool,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    pin_memory: bool = False,
    batch_composition: str = "random",
):
    """A DataLoader over this rank's part of every global batch; ``loader.batch_sampler.set_epoch(e)``
    (via :func:`set_loader_epoch`) before iterating epoch e. Host memory: at most
    ``2 x workers`` batches in flight (``workers`` = 0: one)."""
    from torch.utils.data import DataLoader

    groups = eye_groups(pairs.rows) if batch_composition == "eyes_together" else None
    sampler = RankBatches(len(pairs.rows), batch_size, seed, rank, world_size, groups)
    # Workers end with each epoch (re-forking them is cheap): worker processes still alive when the
    # interpreter exits crashed it (signal 11) once OpenVINO had run in the same process (the demo).
    extra: dict[str, Any] = {"prefetch_factor": 2, "persistent_workers": False} if workers > 0 else {}
    return DataLoader(BatchReader(pairs, spec, augment, seed), batch_size=None, sampler=sampler,
                      num_workers=workers, pin_memory=pin_memory, **extra)


def eye_groups(rows: list[dict[str, str]]) -> np.ndarray:
    """One integer per row: the code of its eye (patient, laterality), in order of first appearance."""
    from retinacli.ranking import eye_key

    codes: dict[tuple[str, str], int] = {}
    return np.array([codes.setdefault(eye_key(r), len(codes)) for r in rows], dtype=np.int64)


def set_loader_epoch(loader: Any, epoch: int) -> None:
    loader.sampler.set_epoch(epoch)


def loader_workers(setting: int | str, local_world_size: int = 1) -> int:
    """DataLoader workers per rank. ``auto``: none with 2 cores or fewer per process (a cached batch
    is read in about a millisecond, and a worker would compete with the compute threads), else a
    quarter of the process's cores, at most 4 (they read and augment while the model computes)."""
    if setting != "auto":
        return int(setting)
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_process = cores // max(1, local_world_size)
    return 0 if per_process <= 2 else min(4, per_process // 4)
