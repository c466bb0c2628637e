"""The preprocessed training cache on disk: sharded ``.npy`` arrays keyed by the cohort and the spec.

``retina train`` reads and preprocesses every pair of the cohort manifest once (the readers and
:mod:`retinacli.preprocess`, the code the exported model uses) into a cache folder, then streams
batches from it, so host memory does not grow with the cohort (docs/training.md, "Training data on
disk"). Layout of ``<cache dir>/<key>/``::

    shard-00000.fundus.npy   (n, C, s, s) float32   rows of manifest rows [0, R)
    shard-00000.oct.npy      (n, 1, S, H, W) float32
    shard-00000.json         the manifest row index of each cached row, and the skipped rows' reasons
    ...
    cache.json               written last: the cache is complete

The key is a hash of the manifest's sha256, the preprocessing spec and the resolved file paths, so
a changed manifest, spec or cohort location builds a new cache and two runs on the same cohort
(``retina demo``'s two objectives, a resumed run) share one. Crash safety: every file is written to a
temp file and renamed (:mod:`retinacli.fsutil`), a shard's ``.json`` after its arrays, and
``cache.json`` after every shard; a folder without ``cache.json`` is never read as a cache: its
finished shards are kept and the build resumes at the first missing one.

Every shard is a plain ``.npy`` (``np.load(path, mmap_mode="r")`` maps it). Training reads rows with
positioned reads into each batch's own buffer rather than through a long-lived map, so pages of the
cache never accumulate in the process: its resident memory stays that of the batches in flight.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retinacli.fsutil import atomic_path, atomic_write_json
from retinacli.preprocess import spec_hash

CACHE_FORMAT = 1
COMPLETE_FILE = "cache.json"
SHARD_BYTES = 256 << 20  # per shard, both modalities: also the most a build holds in memory at once


def default_cache_dir() -> Path:
    """``$RETINA_TRAIN_CACHE``, else ``$RETINA_HOME/cache/training`` (``~/.retina/cache/training``)."""
    from retinacli.package import retina_home

    if os.environ.get("RETINA_TRAIN_CACHE"):
        return Path(os.environ["RETINA_TRAIN_CACHE"]).expanduser()
    return retina_home() / "cache" / "training"


def row_shapes(spec: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of one preprocessed fundus and one OCT row for `spec`."""
    f, o = spec["fundus"], spec["oct"]
    return (int(f["channels"]), int(f["size"]), int(f["size"])), (1, int(o["slices"]), int(o["height"]),
                                                                   int(o["width"]))


def cache_key(manifest_sha256: str, spec: dict[str, Any], rows: list[dict[str, str]]) -> str:
    """Folder name of the cache for this manifest (bytes and resolved paths) and spec."""
    paths = hashlib.sha256("\n".join(f"{r['oct_path']}\t{r['fundus_path']}" for r in rows).encode())
    blob = json.dumps({"format": CACHE_FORMAT, "manifest_sha256": manifest_sha256,
                       "spec": spec_hash(spec), "paths": paths.hexdigest()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def _data_offset(path: Path) -> tuple[int, tuple[int, ...]]:
    """Byte offset of the array data in an .npy file, and its shape (float32, C order)."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(fh)
        if fortran or dtype != np.float32:
            raise ValueError(f"{path}: not a C-order float32 array")
        return fh.tell(), tuple(shape)


@dataclass
class _Shard:
    files: dict[str, Path]
    offsets: dict[str, int]
    start: int  # first cache row of the shard
    n: int


class PairCache:
    """A complete cache: reads rows of either modality by cache row index (any order, any process)."""

    def __init__(self, folder: Path, record: dict[str, Any]):
        self.folder = folder
        self.record = record
        self.row_shape = {"fundus": tuple(record["fundus_shape"]), "oct": tuple(record["oct_shape"])}
        self.row_bytes = {m: 4 * math.prod(s) for m, s in self.row_shape.items()}
        self.shards: list[_Shard] = []
        manifest_rows: list[int] = []
        self.errors: list[str] = []
        start = 0
        for k in range(int(record["shards"])):
            meta = json.loads((folder / f"{_shard_name(k)}.json").read_text())
            files = {m: folder / f"{_shard_name(k)}.{m}.npy" for m in ("fundus", "oct")}
            offsets = {}
            for m, path in files.items():
                offsets[m], shape = _data_offset(path)
                if shape[1:] != self.row_shape[m] or shape[0] < len(meta["rows"]):
                    raise ValueError(f"{path}: shape {shape} does not match the cache record")
            n = len(meta["rows"])
            self.shards.append(_Shard(files, offsets, start, n))
            manifest_rows.extend(meta["rows"])
            self.errors.extend(meta["errors"])
            start += n
        self.manifest_rows = np.asarray(manifest_rows, dtype=np.int64)
        self._starts = np.asarray([s.start for s in self.shards], dtype=np.int64)
        self._handles: dict[tuple[int, int, str], Any] = {}

    def __len__(self) -> int:
        return len(self.manifest_rows)

    @property
    def nbytes(self) -> int:
        return len(self) * (self.row_bytes["fundus"] + self.row_bytes["oct"])

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers open their own files
        return {**self.__dict__, "_handles": {}}

    def _handle(self, shard: int, modality: str):
        key = (os.getpid(), shard, modality)
        fh = self._handles.get(key)
        if fh is None:
            fh = self._handles[key] = open(self.shards[shard].files[modality], "rb", buffering=0)  # noqa: SIM115
        return fh

    def read(self, modality: str, index: np.ndarray | list[int]) -> np.ndarray:
        """Rows `index` (cache row numbers) as a new float32 array, in the order given."""
        index = np.asarray(index, dtype=np.int64)
        out = np.empty((len(index), *self.row_shape[modality]), dtype=np.float32)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"cache rows out of range 0..{len(self) - 1}")
        size = self.row_bytes[modality]
        shard_of = np.searchsorted(self._starts, index, side="right") - 1
        for pos in np.argsort(index, kind="stable"):  # ascending file offsets
            k = int(shard_of[pos])
            shard = self.shards[k]
            offset = shard.offsets[modality] + (int(index[pos]) - shard.start) * size
            view = memoryview(out[pos]).cast("B")
            fh = self._handle(k, modality)
            if hasattr(os, "preadv"):
                got = os.preadv(fh.fileno(), [view], offset)
            else:  # Windows, macOS before 11
                got = _seek_read(fh, view, offset)
            if got != size:
                raise OSError(f"{shard.files[modality]}: truncated (cache row {int(index[pos])})")
        return out

    def view(self, modality: str, index: np.ndarray | None = None) -> CachedArray:
        return CachedArray(self, modality, np.arange(len(self)) if index is None else np.asarray(index))

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()


def _seek_read(fh, view: memoryview, offset: int) -> int:
    fh.seek(offset)
    return fh.readinto(view)


class CachedArray:
    """A read-only array-like over some cache rows of one modality: ``len``, ``shape``, and indexing
    (an int, a slice or an index array) that reads just those rows from disk."""

    def __init__(self, cache: PairCache, modality: str, index: np.ndarray):
        self.cache, self.modality, self.index = cache, modality, np.asarray(index, dtype=np.int64)
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.cache.row_shape[self.modality])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self.cache.read(self.modality, self.index[[key]])[0]
        return self.cache.read(self.modality, self.index[key])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


# --- building ---------------------------------------------------------------------------------


def _complete_record(folder: Path, key: str) -> dict[str, Any] | None:
    path = folder / COMPLETE_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("format") != CACHE_FORMAT or record.get("key") != key:
        return None
    return record


def _shard_done(folder: Path, k: int, rows_in_shard: int, shapes: dict[str, tuple[int, ...]]) -> bool:
    """A shard whose record and both arrays are there and the right size (written by a finished build)."""
    try:
        meta = json.loads((folder / f"{_shard_name(k)}.json").read_text())
        if len(meta["rows"]) + len(meta["errors"]) != rows_in_shard:
            return False
        for m, shape in shapes.items():
            offset, got = _data_offset(folder / f"{_shard_name(k)}.{m}.npy")
            if got != (rows_in_shard, *shape):
                return False
            if (folder / f"{_shard_name(k)}.{m}.npy").stat().st_size < offset + 4 * math.prod(got):
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def _build_shard(folder: Path, k: int, rows: list[dict[str, str]], first: int, spec: dict[str, Any],
                 read_pair: Callable, shapes: dict[str, tuple[int, ...]], tick: Callable[[], None]) -> None:
    kept: list[int] = []
    errors: list[str] = []
    name = _shard_name(k)
    f_path, o_path = folder / f"{name}.fundus.npy", folder / f"{name}.oct.npy"
    # Rows are appended to the temp files one pair at a time (plain writes, no map, so the build holds
    # one pair in memory); rows of skipped pairs stay at the end as zeros, and the files are renamed
    # into place once full.
    with atomic_path(f_path) as f_tmp, atomic_path(o_path) as o_tmp, \
            open(f_tmp, "wb") as f_out, open(o_tmp, "wb") as o_out:
        for out, m in ((f_out, "fundus"), (o_out, "oct")):
            header = {"descr": "<f4", "fortran_order": False, "shape": (len(rows), *shapes[m])}
            np.lib.format.write_array_header_1_0(out, header)
        for offset, row in enumerate(rows):
            got = read_pair(row, spec)
            if isinstance(got, str):
                errors.append(got)
            else:
                for out, arr, m in ((f_out, got[0], "fundus"), (o_out, got[1], "oct")):
                    if arr.shape != shapes[m]:
                        raise ValueError(f"preprocessed {m} shape {arr.shape}, expected {shapes[m]}")
                    out.write(np.ascontiguousarray(arr, dtype="<f4").tobytes())
                kept.append(first + offset)
            tick()
        for out, m in ((f_out, "fundus"), (o_out, "oct")):
            out.truncate(out.tell() + 4 * math.prod(shapes[m]) * (len(rows) - len(kept)))
            out.flush()
    atomic_write_json(folder / f"{name}.json", {"rows": kept, "errors": errors})


def build_or_open(
    rows: list[dict[str, str]],
    spec: dict[str, Any],
    manifest_sha256: str,
    cache_dir: str | Path | None,
    read_pair: Callable[[dict[str, str], dict[str, Any]], Any],
    part: tuple[int, int] = (0, 1),
    progress: Callable[[int], Callable[[], None]] | None = None,
    barrier: Callable[[], None] = lambda: None,
    log: Callable[[str], None] = lambda _: None,
) -> PairCache:
    """The complete cache of `rows` under `spec`: opened if built before, else built (or resumed).

    ``read_pair(row, spec)`` returns ``(fundus, oct)`` arrays or the row's one-line error. ``part``
    = (i, n): this process builds shards i, i+n, ... (the processes of a node share the work);
    ``barrier`` waits for the others, and process 0 writes ``cache.json``. ``progress(n)``: called
    with the number of rows this process reads, returns the per-row tick.
    """
    shapes = dict(zip(("fundus", "oct"), row_shapes(spec), strict=True))
    key = cache_key(manifest_sha256, spec, rows)
    folder = Path(cache_dir if cache_dir else default_cache_dir()).expanduser() / key
    record = _complete_record(folder, key)
    index, count = part
    if record is None:
        folder.mkdir(parents=True, exist_ok=True)
        pair_bytes = 4 * (math.prod(shapes["fundus"]) + math.prod(shapes["oct"]))
        per_shard = max(1, SHARD_BYTES // pair_bytes)
        n_shards = max(1, math.ceil(len(rows) / per_shard))
        mine = range(index, n_shards, count)  # this process's shards
        shard_rows = {k: rows[k * per_shard:(k + 1) * per_shard] for k in mine}
        todo = [k for k in mine if not _shard_done(folder, k, len(shard_rows[k]), shapes)]
        resumed = ""
        if len(todo) < len(mine):
            resumed = f" (resuming: {len(mine) - len(todo)} of {len(mine)} shards built before)"
        log(f"preprocessing {len(rows)} pairs into the training cache {folder}{resumed}")
        tick = progress(sum(len(shard_rows[k]) for k in todo)) if progress else (lambda: None)
        for k in todo:
            _build_shard(folder, k, shard_rows[k], k * per_shard, spec, read_pair, shapes, tick)
        record = {"format": CACHE_FORMAT, "key": key, "manifest_sha256": manifest_sha256,
                  "spec_hash": spec_hash(spec), "manifest_rows": len(rows), "shards": n_shards,
                  "rows_per_shard": per_shard, "fundus_shape": list(shapes["fundus"]),
                  "oct_shape": list(shapes["oct"])}
    else:
        log(f"using the training cache {folder}")
    barrier()  # every process passes both barriers, built here or not, so none waits forever
    if index == 0 and _complete_record(folder, key) is None:
        cache = PairCache(folder, record)  # checks every shard before the cache is marked complete
        if len(cache):
            atomic_write_json(folder / COMPLETE_FILE, {**record, "pairs": len(cache), "bytes": cache.nbytes})
    barrier()
    cache = PairCache(folder, record)
    if not len(cache):
        raise ValueError("no readable pairs in the manifest: " + "; ".join(cache.errors[:3]))
    return cache
