"""Checking and repairing an embedding store's files (`retina store verify` / `repair`, docs/store.md).

Two depths: :func:`quick_problems` reads only ``store.json``, the ``.npy`` headers, the file sizes and
the parquet footers, so every command that opens a store can afford it (``EmbeddingStore.open``
refuses a damaged store with exit code 5 before any shard is read); :func:`verify` also reads every
vector and metadata row. :func:`repair` drops the shards that fail, never a good one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

DAMAGED_HINT = "store damaged: run `retina store verify`"
DAMAGED_DIR = "damaged"  # repair moves a dropped shard's files here (it never deletes a vector)
REQUIRED_COLUMNS = ("id", "source_key", "modality")


@dataclass
class Problem:
    """One thing wrong: `where` is ``store.json``, ``shard N``, ``secret.key``, ``ann/<backend>/<modality>``
    (a search index; ``ann/<modality>``: an earlier retina's) or a stray file; `damaged` False for
    harmless leftovers the next writer removes anyway."""

    where: str
    problem: str
    shard: int | None = None
    damaged: bool = True
    files: list[str] = field(default_factory=list)

    def line(self) -> str:
        return f"{self.where}: {self.problem}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _inside(rel: Any, folder: str) -> bool:
    """A shard file named relative to the store, under `folder`, without `..` (no escape)."""
    if not isinstance(rel, str) or not rel:
        return False
    parts = PurePosixPath(rel).parts
    return len(parts) == 2 and parts[0] == folder and parts[1] not in ("", ".", "..")


def index_problems(index: Any) -> list[Problem]:
    """Problems of store.json's own fields (types, missing keys, totals); no file is read."""
    if not isinstance(index, dict):
        return [Problem("store.json", "is not a JSON object")]
    found: list[Problem] = []
    if not isinstance(index.get("model_id"), str) or not index.get("model_id"):
        found.append(Problem("store.json", f"model_id {index.get('model_id')!r} is not a model id"))
    dim = index.get("embed_dim")
    if not _is_int(dim) or dim < 1:
        found.append(Problem("store.json", f"embed_dim {dim!r} is not a positive integer"))
    if "package" in index and index["package"] is not None and not isinstance(index["package"], dict):
        found.append(Problem("store.json", "package is not an object or null"))
    if "roots" in index and not isinstance(index["roots"], list):
        found.append(Problem("store.json", f"roots {index['roots']!r:.40} is not a list"))
    shards = index.get("shards")
    if not isinstance(shards, list):
        found.append(Problem("store.json", f"shards {shards!r:.40} is not a list"))
        return found
    seen: set[int] = set()
    total = 0
    for position, entry in enumerate(shards):
        number = entry.get("index") if isinstance(entry, dict) else None
        where = f"shard {number}" if _is_int(number) else f"shards[{position}]"
        bad = _entry_problem(entry, seen)
        if bad:
            found.append(Problem(where, bad, number if _is_int(number) else None))
            continue
        seen.add(number)
        total += entry["rows"]
    rows = index.get("rows")
    if rows is not None and (not _is_int(rows) or rows != total) and not any(p.where != "store.json"
                                                                               for p in found):
        found.append(Problem("store.json", f"rows is {rows!r}, its shards hold {total}"))
    return found


def _entry_problem(entry: Any, seen: set[int]) -> str | None:
    if not isinstance(entry, dict):
        return "the entry is not an object"
    number, rows = entry.get("index"), entry.get("rows")
    if not _is_int(number) or number < 0:
        return f"index {number!r} is not a shard number"
    if number in seen:
        return "listed twice"
    if not _is_int(rows) or rows < 1:
        return f"rows {rows!r} is not a positive integer"
    if not _inside(entry.get("embeddings"), "embeddings"):
        return f"embeddings {entry.get('embeddings')!r} is not a file in embeddings/"
    if not _inside(entry.get("metadata"), "metadata"):
        return f"metadata {entry.get('metadata')!r} is not a file in metadata/"
    return None


def sound_entries(index: dict[str, Any]) -> list[dict[str, Any]]:
    """The shard entries whose own fields are sound (the ones whose files may be opened): a bad
    entry, one with a bad index or a path outside the store, never reaches a file check."""
    seen: set[int] = set()
    sound = []
    for entry in index["shards"]:
        if _entry_problem(entry, seen) is None:
            seen.add(entry["index"])
            sound.append(entry)
    return sound


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran order, data offset) from an .npy file's header, without its data."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        return tuple(shape), np.dtype(dtype), bool(fortran), fh.tell()


def shard_problems(root: Path, entry: dict[str, Any], embed_dim: int | None, full: bool = False) -> list[str]:
    """What is wrong with one listed shard's two files (header, size, footer; `full`: every value)."""
    rows = entry["rows"]
    emb, meta = Path(root) / entry["embeddings"], Path(root) / entry["metadata"]
    found: list[str] = []
    if not emb.is_file():
        found.append(f"{entry['embeddings']} is missing")
    else:
        try:
            shape, dtype, fortran, offset = npy_header(emb)
        except (OSError, ValueError, SyntaxError) as exc:
            found.append(f"{entry['embeddings']}: unreadable .npy header ({_one_line(exc)})")
        else:
            size = emb.stat().st_size
            expected = (rows, embed_dim) if embed_dim else None
            if dtype != np.dtype("<f4") or fortran:
                found.append(f"{entry['embeddings']}: dtype {dtype}{' (Fortran order)' if fortran else ''}, "
                             "expected float32")
            elif len(shape) != 2 or (expected and shape[1] != embed_dim):
                found.append(f"{entry['embeddings']}: shape {shape}, expected embed dim {embed_dim}")
            elif shape[0] != rows:
                found.append(f"{entry['embeddings']}: {shape[0]} rows, store.json says {rows}")
            elif size != offset + rows * shape[1] * 4:
                found.append(f"{entry['embeddings']}: {size} bytes, expected {offset + rows * shape[1] * 4} "
                             "(truncated or appended to)")
            elif full:
                try:
                    values = np.load(emb, mmap_mode="r", allow_pickle=False)
                    if not all(np.isfinite(values[i:i + 65536]).all() for i in range(0, rows, 65536)):
                        found.append(f"{entry['embeddings']}: holds non-finite values")
                except (OSError, ValueError) as exc:
                    found.append(f"{entry['embeddings']}: unreadable ({_one_line(exc)})")
    if not meta.is_file():
        found.append(f"{entry['metadata']} is missing")
    else:
        found.extend(_parquet_problems(meta, entry["metadata"], rows, full))
    return found


def _parquet_problems(path: Path, name: str, rows: int, full: bool) -> list[str]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        count, columns = parquet.metadata.num_rows, set(parquet.schema_arrow.names)
        if full:
            count = pq.read_table(path).num_rows
    except Exception as exc:  # pyarrow raises many types for a damaged file
        return [f"{name}: unreadable parquet ({_one_line(exc)})"]
    found = []
    if count != rows:
        found.append(f"{name}: {count} rows, store.json says {rows}")
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        found.append(f"{name}: no {', '.join(missing)} column")
    return found


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def quick_problems(root: Path, index: dict[str, Any]) -> list[Problem]:
    """The cheap checks every command runs when it opens a store (see the module docstring)."""
    found = index_problems(index)
    if any(p.where == "store.json" and not is_total(p) for p in found):
        return found
    totals = [p for p in found if is_total(p)]  # reported after the shards: a shard is the likelier cause
    found = [p for p in found if not is_total(p)]
    dim = index["embed_dim"]
    for entry in sound_entries(index):
        if not any(p.shard == entry["index"] for p in found):
            for problem in shard_problems(root, entry, dim):
                found.append(Problem(f"shard {entry['index']}", problem, entry["index"]))
    return found + totals


def is_total(problem: Problem) -> bool:
    """store.json's `rows` disagrees with its shards: repair recomputes it."""
    return problem.where == "store.json" and problem.problem.startswith("rows is")


def damaged_message(root: Path, problem: Problem | str) -> str:
    text = problem.line() if isinstance(problem, Problem) else problem
    return f"{root}: {text}; {DAMAGED_HINT}"


def read_index(root: Path) -> tuple[dict[str, Any] | None, Problem | None]:
    """store.json as a dict, or the problem that stops it being read as one."""
    from retinacli.store import INDEX_FILE

    path = Path(root) / INDEX_FILE
    if not path.is_file():
        return None, Problem("store.json", "is missing")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, Problem("store.json", f"is not valid JSON ({_one_line(exc)})")
    if not isinstance(index, dict):
        return None, Problem("store.json", "is not a JSON object")
    return index, None


def verify(root: Path | str) -> dict[str, Any]:
    """Every problem of the store (full reads); ``healthy`` when none is damage."""
    from retinacli.store import STORE_FORMAT, STORE_FORMAT_VERSION

    root = Path(root)
    index, bad = read_index(root)
    problems: list[Problem] = [bad] if bad else []
    shards_ok: int | None = None  # None: store.json too damaged to check the shards against
    if index is not None:
        version = index.get("format_version")
        if index.get("format") != STORE_FORMAT:
            problems.append(Problem("store.json", f"format is {index.get('format')!r}, not {STORE_FORMAT!r}"))
        elif not _is_int(version) or version < 1 or version > STORE_FORMAT_VERSION:
            problems.append(Problem("store.json", f"format_version {version!r} is not one this retina reads "
                                                  f"(1 to {STORE_FORMAT_VERSION})"))
        problems.extend(index_problems(index))
        if not any(p.where == "store.json" and not is_total(p) for p in problems):
            shards_ok = 0
            for entry in sound_entries(index):
                if any(p.shard == entry["index"] for p in problems):
                    continue
                found = shard_problems(root, entry, index["embed_dim"], full=True)
                problems.extend(Problem(f"shard {entry['index']}", p, entry["index"],
                                        files=[entry["embeddings"], entry["metadata"]]) for p in found)
                shards_ok += not found
            problems.extend(_key_problems(root, index))
            problems.extend(_ann_problems(root, index, problems))
        for p in problems:
            if p.shard is not None and not p.files and isinstance(index.get("shards"), list):
                p.files = [str(e.get(k)) for e in index["shards"] if isinstance(e, dict)
                           and e.get("index") == p.shard for k in ("embeddings", "metadata") if e.get(k)]
    problems.extend(_stray_files(root, index))
    damaged = [p for p in problems if p.damaged]
    return {
        "store": str(root),
        "healthy": not damaged,
        "shards": len(index["shards"]) if isinstance((index or {}).get("shards"), list) else None,
        "shards_ok": shards_ok,
        "problems": [asdict(p) for p in problems],
    }


def _key_problems(root: Path, index: dict[str, Any]) -> list[Problem]:
    from retinacli.privacy import SECRET_FILE

    if index["shards"] and not (root / SECRET_FILE).is_file():
        rows = sum(s["rows"] for s in index["shards"] if isinstance(s, dict) and _is_int(s.get("rows")))
        return [Problem("secret.key", f"is missing but the store holds {rows} rows; "
                        "restore it from a backup (repair cannot recreate it)")]
    return []


def _ann_problems(root: Path, index: dict[str, Any], problems: list[Problem]) -> list[Problem]:
    """Search indexes (retinacli.vector_index) holding rows of shards the store no longer lists, or of
    damaged ones: damaged (removed rows must not stay in an index; repair updates it). One that only
    lacks newer shards is a note (retrieve searches exactly until it is updated)."""
    from retinacli.vector_index import BACKEND_NAMES

    folder = root / "ann"
    if not folder.is_dir():
        return []
    listed = {e["index"] for e in index["shards"]}
    bad_shards = {p.shard for p in problems if p.shard is not None}
    found = []
    described = [(f"ann/{b}/{p.stem}", p) for b in BACKEND_NAMES if (folder / b).is_dir()
                 for p in sorted((folder / b).glob("*.json"))]
    described += [(f"ann/{p.stem}", p) for p in sorted(folder.glob("*.json")) if p.name != "active.json"]
    for where, info_path in described:
        legacy = where.count("/") == 1
        kind = ("legacy index (an earlier retina's, never used for search; removed by the next 'retina "
                "store index' or embed)") if legacy else "index"
        try:
            info = json.loads(info_path.read_text())
            covered = {int(i) for i in info["shards"]}
        except (OSError, ValueError, KeyError, TypeError):
            found.append(Problem(where, f"unreadable {kind} description (rebuilt by the next "
                                 "'retina store index')", damaged=False))
            continue
        if info.get("model_id") != index["model_id"]:
            found.append(Problem(where, f"{kind} built with another model (ignored, rebuilt by the next "
                                 "'retina store index')", damaged=False))
        elif not covered <= listed or covered & bad_shards:
            stale = sorted((covered - listed) | (covered & bad_shards))
            found.append(Problem(where, f"{kind}: stale: covers shards {stale} that are not intact "
                                 "(it may hold removed rows; 'retina store repair' updates it)"))
        elif legacy:
            found.append(Problem(where, kind, damaged=False))
        elif covered != listed:
            found.append(Problem(where, f"index out of date: {len(listed - covered)} shards added since it "
                                 "was built (retrieve searches exactly until 'retina store index' updates "
                                 "it)", damaged=False))
    return found


def _stray_files(root: Path, index: dict[str, Any] | None) -> list[Problem]:
    """Temp files and unlisted shard files: debris of a killed run, removed by the next writer."""
    from retinacli.store import _SHARD_RE

    listed: set[str] | None = None  # unknown while store.json is unusable: only temp files are stray
    if index is not None and isinstance(index.get("shards"), list):
        listed = {str(e.get(k)) for e in index["shards"] if isinstance(e, dict)
                  for k in ("embeddings", "metadata")}
    found = []
    for folder in ("embeddings", "metadata"):
        if not (root / folder).is_dir():
            continue
        for path in sorted((root / folder).iterdir()):
            rel = f"{folder}/{path.name}"
            unlisted = listed is not None and _SHARD_RE.match(path.name) and rel not in listed
            if path.name.endswith(".tmp") or unlisted:
                found.append(Problem(rel, "stray file store.json does not list (a killed run's; removed by "
                                          "the next writer)", damaged=False, files=[rel]))
    found.extend(Problem(p.name, "stray temp file", damaged=False, files=[p.name])
                 for p in sorted(root.glob(".*.tmp")))
    return found


def repair(root: Path | str) -> dict[str, Any]:
    """Drop damaged shards from store.json (their files move to STORE/damaged/), then delete their rows
    from the search indexes (retinacli.vector_index.after_rows_removed: updated, or deleted when that
    cannot be done) when anything was dropped or an index is stale; remove stray temp files.

    Takes the store's lock. store.json itself must be readable with a valid model_id and embed_dim:
    without them no shard can be trusted, and repair stops (exit 5) changing nothing."""
    from retinacli.errors import StoreDamagedError
    from retinacli.fsutil import atomic_write_bytes, fsync_dir
    from retinacli.store import INDEX_FILE, _index_bytes, _Lock

    root = Path(root)
    before = verify(root)
    index, bad = read_index(root)
    fatal = [q for q in (Problem(**p) for p in before["problems"])
             if q.where == "store.json" and not is_total(q)]
    if bad is not None or fatal:
        first = bad or fatal[0]
        raise StoreDamagedError(f"{root}: {first.line()}; repair cannot rebuild store.json: restore it "
                                "from a backup, or re-embed into a new store with --out")
    lock = _Lock(root)
    lock.acquire()
    try:
        before = verify(root)  # again under the lock: a writer may have committed meanwhile
        index, bad = read_index(root)
        if index is None:
            raise StoreDamagedError(damaged_message(root, bad or "store.json changed during repair"))
        dropped_numbers = {p["shard"] for p in before["problems"] if p["shard"] is not None and p["damaged"]}
        keep, dropped, moved = [], [], []
        stamp = _timestamp()
        # Files move aside before store.json drops them: a repair killed midway leaves a store that
        # still lists them as missing (repaired again), never unlisted files a writer would delete.
        for position, entry in enumerate(index["shards"]):
            number = entry.get("index") if isinstance(entry, dict) else None
            broken = number in dropped_numbers or any(
                p["where"] == f"shards[{position}]" for p in before["problems"])
            if not broken:
                keep.append(entry)
                continue
            dropped.append({"index": number, "rows": entry.get("rows") if isinstance(entry, dict) else None,
                            "problems": [p["problem"] for p in before["problems"]
                                         if p["shard"] == number or p["where"] == f"shards[{position}]"]})
            if isinstance(entry, dict):
                for key, folder in (("embeddings", "embeddings"), ("metadata", "metadata")):
                    rel = entry.get(key)
                    if _inside(rel, folder) and (root / rel).is_file():
                        target = root / DAMAGED_DIR / stamp / rel
                        target.parent.mkdir(parents=True, exist_ok=True)
                        os.replace(root / rel, target)
                        moved.append(f"{DAMAGED_DIR}/{stamp}/{rel}")
        removed: list[str] = []
        stale_ann = any(p["where"].startswith("ann/") and p["damaged"] for p in before["problems"])
        changed = bool(dropped)
        updated = dict(index)
        updated["shards"] = keep
        total = sum(e["rows"] for e in keep)
        if index.get("rows") != total:
            updated["rows"] = total
            changed = True
        if changed:
            atomic_write_bytes(root / INDEX_FILE, _index_bytes(updated))
        indexes: dict[str, str] = {}
        if (dropped or stale_ann) and (root / "ann").is_dir():
            # after store.json: index keys name shards, so an index updated now matches what is listed
            indexes = _repair_indexes(root, removed)
        for p in before["problems"]:
            if not p["damaged"] and p["files"] and p["files"][0].endswith(".tmp"):
                (root / p["files"][0]).unlink(missing_ok=True)
                removed.append(p["files"][0])
        if changed or removed:
            fsync_dir(root)
    finally:
        lock.release()
    after = verify(root)
    return {"store": str(root), "dropped": dropped, "moved": moved, "removed": removed, "indexes": indexes,
            "rows": sum(e["rows"] for e in keep), "changed": bool(changed or removed or indexes),
            "healthy": after["healthy"], "problems": after["problems"]}


def _repair_indexes(root: Path, removed: list[str]) -> dict[str, str]:
    """Bring every search index in line with the repaired store.json (or delete it); an ``ann/`` left
    empty goes, reported as removed."""
    from retinacli.store import EmbeddingStore
    from retinacli.vector_index import after_rows_removed, remove_legacy

    try:
        outcome = after_rows_removed(EmbeddingStore.open(root, check=False))
    except Exception:  # e.g. the key is missing: the indexes cannot be named, so they go
        removed.extend(remove_legacy(root))
        outcome = {}
        for sub in sorted(p for p in (root / "ann").iterdir() if p.is_dir()):
            shutil.rmtree(sub, ignore_errors=True)
            outcome[sub.name] = "dropped"
    folder = root / "ann"
    if folder.is_dir() and not [p for p in folder.iterdir() if p.name != "active.json"]:
        shutil.rmtree(folder, ignore_errors=True)
        removed.append("ann/")
    elif outcome.get("legacy"):
        removed.append("ann/ (legacy index)")
    return outcome


def _timestamp() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
