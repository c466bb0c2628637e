"""The preprocessed training cache on disk (training/cache.py) and the streamed loader (training/data.py):
keyed by manifest + spec, built once, crash-safe, unreadable rows skipped with their reason, batches and
augmentation independent of loader workers and world size, host memory bounded whatever the cohort size."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from retinacli.cohort_manifest import read_cohort_manifest  # noqa: E402
from retinacli.package import sha256_file  # noqa: E402
from training import cache as cache_mod  # noqa: E402
from training.config import resolve_config  # noqa: E402
from training.data import (  # noqa: E402
    epoch_batches,
    load_pairs,
    make_loader,
    open_cache,
    pair_reader,
    sample_seed,
    set_loader_epoch,
)

REPO = Path(__file__).resolve().parents[1]


def write_cohort(folder: Path, n_pairs: int, fundus_px: int = 40, seed: int = 0, bad: int = 0) -> Path:
    """`n_pairs` pairs of small files (OCT .npy 6x24x24, fundus PNG), 2 pairs per patient; the last
    `bad` rows point at an OCT file that is not an image. Returns the manifest."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_pairs):
        oct_path, fundus_path = folder / f"oct_{i:04d}.npy", folder / f"fundus_{i:04d}.png"
        if i >= n_pairs - bad:
            oct_path = folder / f"broken_{i:04d}.npy"
            oct_path.write_bytes(b"not an array")
        else:
            np.save(oct_path, rng.integers(0, 255, (6, 24, 24), dtype=np.uint8))
        Image.fromarray(rng.integers(0, 255, (fundus_px, fundus_px, 3), dtype=np.uint8)).save(fundus_path)
        rows.append({"patient_id": f"P{i // 2:04d}", "eye": "OD", "visit": str(i % 2),
                     "oct_path": oct_path.name, "fundus_path": fundus_path.name})
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def spec_for(**overrides):
    return resolve_config("tiny", overrides=overrides).preprocess_spec


def cohort(manifest: Path):
    return read_cohort_manifest(manifest), sha256_file(manifest)


class CountingReader:
    """The real pair reader, counting the rows it reads (and failing at row `crash_at`, like a kill)."""

    def __init__(self, rows, crash_at: int | None = None):
        self.read, self.calls, self.crash_at = pair_reader(rows), 0, crash_at

    def __call__(self, row, spec):
        if self.calls == self.crash_at:
            raise KeyboardInterrupt
        self.calls += 1
        return self.read(row, spec)


def shard_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- the cache ------------------------------------------------------------------------------------------


def test_cache_holds_the_same_arrays_as_reading_the_files_and_is_reused(tmp_path):
    rows, sha = cohort(write_cohort(tmp_path / "c", 10))
    spec, logs = spec_for(), []
    pairs = open_cache(rows, spec, sha, tmp_path / "cache", log=logs.append)
    direct = load_pairs(rows, spec)
    np.testing.assert_array_equal(pairs.fundus[:], direct.fundus)
    np.testing.assert_array_equal(pairs.oct[np.arange(10)[::-1]], direct.oct[::-1])  # any order
    assert [r["oct_path"] for r in pairs.rows] == [r["oct_path"] for r in direct.rows]
    folder = pairs.cache.folder
    assert shard_files(folder) == ["cache.json", "shard-00000.fundus.npy", "shard-00000.json",
                                   "shard-00000.oct.npy"]
    assert np.load(folder / "shard-00000.fundus.npy", mmap_mode="r").shape == (10, 3, 32, 32)  # plain .npy
    record = json.loads((folder / "cache.json").read_text())
    assert (record["pairs"], record["bytes"]) == (10, 10 * 4 * (3 * 32 * 32 + 4 * 32 * 32))
    assert logs[0].startswith("preprocessing 10 pairs into the training cache")

    mtimes = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
    reader = CountingReader(rows)
    again = cache_mod.build_or_open(rows, spec, sha, tmp_path / "cache", reader, log=logs.append)
    assert reader.calls == 0 and logs[-1].startswith("using the training cache")
    assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    np.testing.assert_array_equal(again.read("oct", [3, 1]), direct.oct[[3, 1]])


def test_a_changed_spec_or_manifest_builds_a_new_cache(tmp_path):
    manifest = write_cohort(tmp_path / "c", 6)
    rows, sha = cohort(manifest)
    first = open_cache(rows, spec_for(), sha, tmp_path / "cache").cache.folder
    assert open_cache(rows, spec_for(), sha, tmp_path / "cache").cache.folder == first
    bigger = open_cache(rows, spec_for(fundus_size=40), sha, tmp_path / "cache")
    assert bigger.cache.folder != first and bigger.fundus.shape == (6, 3, 40, 40)
    manifest.write_text(manifest.read_text() + "\n")  # same rows, other bytes: another manifest
    rows2, sha2 = cohort(manifest)
    other = open_cache(rows2, spec_for(), sha2, tmp_path / "cache").cache.folder
    assert other not in (first, bigger.cache.folder)
    assert len(list((tmp_path / "cache").iterdir())) == 3


def test_unreadable_rows_are_skipped_with_their_reason_and_the_reason_is_kept(tmp_path):
    rows, sha = cohort(write_cohort(tmp_path / "c", 8, bad=2))
    pairs = open_cache(rows, spec_for(), sha, tmp_path / "cache")
    assert len(pairs.rows) == 6 and pairs.fundus.shape[0] == 6
    assert [r["oct_path"] for r in pairs.rows] == [r["oct_path"] for r in rows[:6]]
    assert len(pairs.errors) == 2
    for message, name in zip(pairs.errors, ("broken_0006.npy", "broken_0007.npy"), strict=True):
        assert name in message and "\n" not in message
    assert pairs.errors == load_pairs(rows, spec_for()).errors  # the same one-line reasons as before
    assert open_cache(rows, spec_for(), sha, tmp_path / "cache").errors == pairs.errors  # and when reused


def test_a_crash_mid_build_is_never_read_as_a_cache_and_the_build_resumes(tmp_path, monkeypatch):
    rows, sha = cohort(write_cohort(tmp_path / "c", 10))
    spec = spec_for()
    pair_bytes = 4 * (3 * 32 * 32 + 4 * 32 * 32)
    monkeypatch.setattr(cache_mod, "SHARD_BYTES", 3 * pair_bytes)  # shards of 3 rows: 4 shards
    crash = CountingReader(rows, crash_at=7)  # killed while reading the 8th row (third shard)
    with pytest.raises(KeyboardInterrupt):
        cache_mod.build_or_open(rows, spec, sha, tmp_path / "cache", crash)
    (folder,) = (tmp_path / "cache").iterdir()
    # Two whole shards, nothing of the third (no temp file either), and no completion record.
    assert shard_files(folder) == [f"shard-0000{k}.{part}" for k in (0, 1) for part in ("fundus.npy", "json",
                                                                                          "oct.npy")]
    # A torn shard (its arrays cut short after its record was written) is rebuilt, not trusted.
    with open(folder / "shard-00001.oct.npy", "r+b") as handle:
        handle.truncate(handle.seek(0, 2) - 100)
    resume, logs = CountingReader(rows), []
    pairs = cache_mod.build_or_open(rows, spec, sha, tmp_path / "cache", resume, log=logs.append)
    assert resume.calls == 7  # shard 1 again (3 rows) and shards 2, 3 (4 rows); shard 0 kept
    assert "resuming: 1 of 4 shards built before" in logs[0]
    clean = load_pairs(rows, spec)
    np.testing.assert_array_equal(pairs.read("fundus", np.arange(10)), clean.fundus)
    np.testing.assert_array_equal(pairs.read("oct", np.arange(10)), clean.oct)
    assert (folder / "cache.json").is_file()


def test_the_processes_of_a_machine_build_alternate_shards_and_share_the_cache(tmp_path, monkeypatch):
    import threading

    rows, sha = cohort(write_cohort(tmp_path / "c", 10))
    spec = spec_for()
    monkeypatch.setattr(cache_mod, "SHARD_BYTES", 3 * 4 * (3 * 32 * 32 + 4 * 32 * 32))  # 4 shards of <= 3
    wait = threading.Barrier(2).wait  # stands in for the process group's barrier: same contract
    readers, results = [CountingReader(rows), CountingReader(rows)], [None, None]

    def rank(i: int) -> None:
        results[i] = cache_mod.build_or_open(rows, spec, sha, tmp_path / "cache", readers[i], part=(i, 2),
                                             barrier=wait)

    threads = [threading.Thread(target=rank, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [r.calls for r in readers] == [6, 4]  # shards 0, 2 (rows 0-2, 6-8) and 1, 3 (rows 3-5, 9)
    clean = load_pairs(rows, spec)
    for got in results:
        assert got is not None and got.folder == results[0].folder
        np.testing.assert_array_equal(got.read("oct", np.arange(10)), clean.oct)
    assert json.loads((results[0].folder / "cache.json").read_text())["pairs"] == 10


# --- the loader -----------------------------------------------------------------------------------------


def _epoch(pairs, spec, workers: int, rank: int = 0, world: int = 1, epoch: int = 1):
    loader = make_loader(pairs, spec, batch_size=4, seed=5, augment=True, rank=rank, world_size=world,
                         workers=workers)
    set_loader_epoch(loader, epoch)
    return [(f.clone(), o.clone()) for f, o in loader]


WORKERS_SCRIPT = """
import json, sys
import numpy as np
from training.data import make_loader, open_cache, set_loader_epoch
rows, spec, sha, cache, out, workers = json.loads(sys.argv[1])
pairs = open_cache(rows, spec, sha, cache)
loader = make_loader(pairs, spec, batch_size=4, seed=5, augment=True, workers=workers)
set_loader_epoch(loader, 1)
batches = [(f.numpy().copy(), o.numpy().copy()) for f, o in loader]
np.savez(out, **{f"{k}{i}": b[j] for i, b in enumerate(batches) for j, k in enumerate("fo")})
"""


def _epoch_in_fresh_process(rows, spec, sha, tmp_path, workers: int):
    """The epoch read with loader workers, in a fresh interpreter. Known issue: a process that has
    run OpenVINO and then forks DataLoader workers crashes at exit (signal 11, after its work is done);
    the test process may have run OpenVINO by then."""
    out = tmp_path / "workers.npz"
    args = json.dumps([rows, spec, sha, str(tmp_path / "cache"), str(out), workers])
    done = subprocess.run([sys.executable, "-c", WORKERS_SCRIPT, args], capture_output=True, text=True,
                          cwd=REPO, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    got = np.load(out)
    batches = range(len(got.files) // 2)
    return [(torch.from_numpy(got[f"f{i}"]), torch.from_numpy(got[f"o{i}"])) for i in batches]


def test_batches_and_augmentation_do_not_depend_on_loader_workers_or_world_size(tmp_path):
    rows, sha = cohort(write_cohort(tmp_path / "c", 10))
    spec = spec_for()
    pairs = open_cache(rows, spec, sha, tmp_path / "cache")
    inline, workers = _epoch(pairs, spec, 0), _epoch_in_fresh_process(rows, spec, sha, tmp_path, 2)
    assert len(inline) == 2
    assert inline[0][0].shape == (4, 3, 32, 32) and inline[0][1].shape == (4, 1, 4, 32, 32)
    for (f0, o0), (f2, o2) in zip(inline, workers, strict=True):
        assert torch.equal(f0, f2) and torch.equal(o0, o2)
    # Two ranks each read their half of every global batch; together: the one-process batch exactly.
    halves = [_epoch(pairs, spec, 0, rank=r, world=2) for r in (0, 1)]
    for (f, o), (f_a, o_a), (f_b, o_b) in zip(inline, *halves, strict=True):
        assert f_a.shape[0] == 2
        assert torch.equal(torch.cat([f_a, f_b]), f) and torch.equal(torch.cat([o_a, o_b]), o)
    # Batches are the epoch's seeded order; each sample is augmented (differs from the cache).
    order = epoch_batches(10, 4, seed=5, epoch=1)
    raw = torch.from_numpy(pairs.fundus[order[0]])
    assert not torch.equal(inline[0][0], raw)
    assert torch.allclose(inline[0][0].mean(), raw.mean(), atol=0.5)
    # Another epoch: other batches and other augmentations.
    assert not torch.equal(_epoch(pairs, spec, 0, epoch=2)[0][0], inline[0][0])


def test_sample_augmentation_seed_depends_on_seed_epoch_and_sample_only():
    assert sample_seed(0, 1, 7) == sample_seed(0, 1, 7)
    seeds = {sample_seed(s, e, i) for s in (0, 1) for e in (0, 1) for i in (0, 1, 2)}
    assert len(seeds) == 12 and all(0 <= s < 2**63 for s in seeds)


def test_loader_workers_setting():
    from training.data import loader_workers

    assert loader_workers(3) == 3 and loader_workers(0) == 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert loader_workers("auto") == (0 if cores <= 2 else min(4, cores // 4))
    assert loader_workers("auto", local_world_size=cores) == 0  # one core per process: load inline
    for bad in (-1, "two", 1.5, True):
        with pytest.raises(ValueError, match="loader_workers must be auto or a whole number"):
            resolve_config("tiny", overrides={"loader_workers": bad})


# --- host memory ----------------------------------------------------------------------------------------

# Builds the cache of a cohort, then streams two epochs of training batches (augmented, as `retina train`
# reads them) and one pass of validation-sized slices through the loader, in a fresh process: returns
# the cache size and the growth of the process's peak RSS (ru_maxrss) during the build and during the
# streaming, after a first batch (torch's kernels and allocator set-up, the same for any cohort).
MEMORY_SCRIPT = """
import json, resource, sys
import torch
from retinacli.cohort_manifest import read_cohort_manifest
from retinacli.package import sha256_file
from training.config import resolve_config
from training.data import make_loader, open_cache, set_loader_epoch
manifest, cache, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
spec = resolve_config("tiny", overrides=dict(fundus_size=448)).preprocess_spec
rows = read_cohort_manifest(manifest)
before = peak()
pairs = open_cache(rows, spec, sha256_file(manifest), cache)
after_build = peak()
loader = make_loader(pairs, spec, batch_size=4, seed=0, augment=True, workers=workers)
total = float(next(iter(loader))[0].sum()) + float(pairs.fundus[0:8].sum())  # warm-up: torch's own buffers
warm = peak()
for epoch in (0, 1):
    set_loader_epoch(loader, epoch)
    for fundus, oct in loader:
        total += float(fundus.sum()) + float(oct.sum())
for start in range(0, len(pairs.rows), 8):
    total += float(pairs.fundus[start:start + 8].sum())
print(json.dumps({"cache_mb": pairs.cache.nbytes / 2**20, "build_growth_mb": after_build - before,
                  "warm_up_mb": warm - after_build, "growth_mb": peak() - warm, "finite": total == total}))
"""


def test_host_memory_stays_bounded_while_streaming_a_cache_larger_than_the_budget(tmp_path):
    """A 280 MB cache (120 pairs, fundus 448 px) is built, then streamed twice through the training
    loader (batches of 4) and once in validation slices (of 8 pairs, 19 MB): the process's peak RSS grows by
    less than a 64 MB budget in either phase (the previous loader held the whole cohort: 280 MB and more)."""
    manifest = write_cohort(tmp_path / "c", 120, fundus_px=32)
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(manifest), str(tmp_path / "cache"), "0"],
                          capture_output=True, text=True, cwd=REPO, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    budget_mb = 64
    assert got["cache_mb"] > 4 * budget_mb and got["finite"]
    assert got["build_growth_mb"] < budget_mb, got
    assert got["growth_mb"] < budget_mb, got


# --- command line ---------------------------------------------------------------------------------------


def test_cli_cache_dir_and_loader_workers_reach_the_run(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from retinacli.cli import app

    manifest = write_cohort(tmp_path / "c", 12)
    monkeypatch.chdir(tmp_path)
    bad = CliRunner().invoke(app, ["train", "--manifest", str(manifest), "--loader-workers", "two"])
    assert bad.exit_code == 2 and "--loader-workers two: use auto or a whole number >= 0" in bad.output
    args = ["train", "--manifest", str(manifest), "--out", "run", "--preset", "tiny", "--epochs", "1",
            "--threads", "2", "--cache-dir", "my-cache", "--loader-workers", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["cache_dir"] == str(tmp_path / "my-cache") and config["loader_workers"] == 0
    (record,) = (tmp_path / "my-cache").glob("*/cache.json")
    assert json.loads(record.read_text())["pairs"] == 12
    assert f"preprocessing 12 pairs into the training cache {record.parent}" in result.output
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["epoch"] == 1
