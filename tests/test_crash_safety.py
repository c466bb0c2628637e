"""Crash safety of `retina embed` with the real readers and a real (toy) ONNX package:

- SIGKILL at five deterministic points of a run (mid-read, after a shard's vectors but before its
  metadata, after the index's temp file but before its rename, right after a commit, while writing
  errors.csv): the store stays readable, and the restarted run ends with exactly the ids and vectors
  of an uninterrupted run, without duplicates;
- a full disk (ENOSPC) fails with a one-line error and exit 1, keeping every committed shard;
- a second writer is refused with exit 4 while the first holds the lock, and the store holds one
  copy of each item afterwards.

Kills happen from hooks inside the process (patched functions in a `-c` script), never from timers;
the writers synchronise through pipes, so no test depends on timing."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures_packages import make_toy_package
from typer.testing import CliRunner

from retinacli.cli import app
from retinacli.errors import EXIT_NOTHING_DONE, EXIT_STORE_BUSY
from retinacli.privacy import SECRET_FILE
from retinacli.store import EmbeddingStore

# The CLI with one kill hook, chosen by $KILL_AT = "<point>:<n>" (the n-th time the point is reached).
HOOKED_CLI = r"""
import os, signal, sys, threading
from retinacli import pipeline, store
from retinacli.cli import app

point, _, nth = os.environ.get("KILL_AT", ":").partition(":")
nth = int(nth or 1)
seen = {"n": 0}
lock = threading.Lock()

def reached():
    with lock:
        seen["n"] += 1
        if seen["n"] == nth:
            os.kill(os.getpid(), signal.SIGKILL)

if point == "mid-read":
    read = pipeline.read_with_readers
    def read_then_die(source, modality):
        reached()
        return read(source, modality)
    pipeline.read_with_readers = read_then_die
elif point in ("before-metadata", "before-index-rename", "before-errors"):
    write = store.atomic_write_bytes
    replace = os.replace
    def hooked_write(path, data):
        if point == "before-metadata" and path.name.startswith("meta_"):
            reached()
        if point == "before-errors" and path.name == "errors.csv":
            reached()
        return write(path, data)
    def hooked_replace(src, dst):
        if point == "before-index-rename" and os.path.basename(dst) == "store.json":
            reached()
        return replace(src, dst)
    store.atomic_write_bytes = hooked_write
    os.replace = hooked_replace
elif point == "after-commit":
    commit = store.StoreWriter.commit
    def commit_then_maybe_die(self):
        index = commit(self)
        if index is not None:
            reached()
        return index
    store.StoreWriter.commit = commit_then_maybe_die
elif point == "hold-lock":
    # Stop right after taking the store's lock until the test says go (pipes, not timers).
    open_for_model = store.StoreWriter.open_for_model.__func__
    def open_and_wait(cls, *args, **kwargs):
        writer = open_for_model(cls, *args, **kwargs)
        print("locked", flush=True)
        sys.stdin.readline()
        return writer
    store.StoreWriter.open_for_model = classmethod(open_and_wait)
app(sys.argv[1:])
"""

N_SOURCES = 10


def write_inputs(root: Path) -> Path:
    """Ten small sources: 4 fundus PNGs, 4 B-scan PNG folders, 2 .npy volumes."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / f"fundus{i}.png")
        volume = root / f"oct{i}"
        volume.mkdir(parents=True)
        for j in range(3):
            Image.fromarray(rng.integers(0, 255, (16, 20), dtype=np.uint8)).save(volume / f"bscan_{j}.png")
    for i in range(2):
        np.save(root / f"volume{i}.npy", rng.integers(0, 255, (3, 16, 16), dtype=np.uint8))
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Inputs, a package, and the uninterrupted run's store to compare against."""
    root = tmp_path_factory.mktemp("crash")
    data = write_inputs(root / "data")
    package = make_toy_package(root / "toy")
    full = root / "full"
    full.mkdir()
    (full / SECRET_FILE).write_text("ab" * 32)
    result = embed(data, package, full)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["embedded"] == N_SOURCES
    return data, package, full


def embed(data, package, store, kill_at="", **kwargs):
    args = [sys.executable, "-c", HOOKED_CLI, "embed", str(data), "--model", str(package),
            "--store", str(store), "--shard-size", "3", "--batch-size", "2", "--workers", "2", "--json"]
    env = {**os.environ, "KILL_AT": kill_at, "RETINA_MODEL": ""}
    if kwargs.get("popen"):
        return subprocess.Popen(args, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(args, env=env, capture_output=True, text=True)


def assert_readable(store_root: Path) -> int:
    """Every shard the index lists opens and matches its row count; returns the row count."""
    store = EmbeddingStore.open(store_root)
    vectors, rows = store.vectors(), store.metadata()
    assert len(vectors) == len(rows) == len(store)
    if len(vectors):
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    return len(store)


def assert_same_store(full_root: Path, other_root: Path) -> None:
    full, other = EmbeddingStore.open(full_root), EmbeddingStore.open(other_root)
    full_rows = {m["id"]: i for i, m in enumerate(full.metadata())}
    other_rows = {m["id"]: i for i, m in enumerate(other.metadata())}
    assert len(other_rows) == len(other) == len(full)  # no duplicates
    assert other_rows.keys() == full_rows.keys()
    fv, ov = full.vectors(), other.vectors()
    for item_id, i in full_rows.items():
        np.testing.assert_allclose(ov[other_rows[item_id]], fv[i], atol=1e-6)


@pytest.mark.parametrize("kill_at", [
    "mid-read:4",  # while decoding, before any shard: only the empty index exists
    "before-metadata:2",  # shard 1's vectors written, its metadata and index entry not
    "before-index-rename:3",  # shard 1 written and the new index in its temp file, not renamed
    "after-commit:2",  # right after shard 1 is committed
    "before-errors:1",  # every shard committed, errors.csv not yet rewritten
])
def test_sigkill_then_restart_ends_with_the_uninterrupted_store(setup, tmp_path, kill_at):
    data, package, full = setup
    store = tmp_path / "store"
    store.mkdir()
    (store / SECRET_FILE).write_text("ab" * 32)  # the same secret as the full run -> the same ids
    killed = embed(data, package, store, kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    before = assert_readable(store)  # never left unreadable
    assert before < N_SOURCES or kill_at.startswith("before-errors")
    resumed = embed(data, package, store)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert (summary["skipped"], summary["embedded"]) == (before, N_SOURCES - before)
    assert_same_store(full, store)
    leftovers = [p.name for p in store.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers  # the killed run's temp files were cleaned by the next writer


def test_full_disk_fails_cleanly_and_keeps_committed_shards(setup, tmp_path, monkeypatch):
    """ENOSPC while writing the second shard: one-line error, exit 1, the first shard intact."""
    from retinacli import store as store_module

    data, package, _ = setup
    root = tmp_path / "store"
    write = store_module.atomic_write_bytes
    shards = {"n": 0}

    def disk_full_after_first_shard(path, payload):
        if path.name.startswith("emb_"):
            shards["n"] += 1
        if shards["n"] >= 2:
            with open(path.with_name(f".{path.name}.tmp"), "wb") as fh:
                fh.write(payload[:10])  # a partial temp file, as a real full disk leaves
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write(path, payload)

    monkeypatch.setattr(store_module, "atomic_write_bytes", disk_full_after_first_shard)
    monkeypatch.setenv("RETINA_MODEL", "")
    result = CliRunner().invoke(app, ["embed", str(data), "--model", str(package), "--store", str(root),
                                      "--shard-size", "3", "--batch-size", "2", "--workers", "1"])
    assert result.exit_code == EXIT_NOTHING_DONE, result.output
    assert isinstance(result.exception, SystemExit)  # handled, not a traceback
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "No space left on device" in error_lines[0], result.stderr
    assert assert_readable(root) == 3  # the committed first shard, nothing else
    monkeypatch.setattr(store_module, "atomic_write_bytes", write)
    # Space again: the next run completes the store (and removes the partial temp file).
    again = CliRunner().invoke(app, ["embed", str(data), "--model", str(package), "--store", str(root)])
    assert again.exit_code == 0, again.output
    assert assert_readable(root) == N_SOURCES
    assert not [p for p in root.rglob("*.tmp")]


def test_second_writer_is_refused_while_the_first_holds_the_lock(setup, tmp_path):
    data, package, full = setup
    store = tmp_path / "store"
    store.mkdir()
    (store / SECRET_FILE).write_text("ab" * 32)
    first = embed(data, package, store, "hold-lock:1", popen=True)
    try:
        assert first.stdout.readline().strip() == "locked"
        second = embed(data, package, store)
        assert second.returncode == EXIT_STORE_BUSY
        error = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and f"being written by retina pid {first.pid}" in error[0], second.stderr
        assert assert_readable(store) == 0  # the refused writer wrote nothing
        first.stdin.write("go\n")
        first.stdin.flush()
        out, err = first.communicate()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err
    assert json.loads(out)["embedded"] == N_SOURCES
    assert_same_store(full, store)
    # The lock is released: a later writer gets it (and finds everything done).
    after = embed(data, package, store)
    assert after.returncode == 0 and json.loads(after.stdout)["skipped"] == N_SOURCES
