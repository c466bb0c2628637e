"""`retina embed --ray`: the embedding run on Ray Data (retinacli.distributed) against the local run.

One local Ray per session (tests/fixtures_ray.py, 2 CPUs); the toy package and the tiny DICOM cohort keep
each Ray run to a few seconds. What is promised: the same item ids and vectors as the local run, a bad
file reported exactly as the local run reports it, a worker killed mid-job loses nothing, and the
store's secret never reaches a Ray task or actor.
"""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fixtures_cli import run_cli

from retinacli.store import EmbeddingStore

pytest.importorskip("ray")


def stored(store: Path) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """{id: vector} and {id: metadata row} of a store (ids must be unique)."""
    opened = EmbeddingStore.open(store)
    rows, vectors = opened.metadata(), opened.vectors()
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)), "an item stored twice"
    return dict(zip(ids, vectors, strict=True)), {row["id"]: row for row in rows}


def same_key(store: Path, like: Path) -> Path:
    """A new store that will use `like`'s key: ids are keyed hashes, equal only under one key."""
    store.mkdir()
    shutil.copy(like / "secret.key", store / "secret.key")
    return store


def embed(*args) -> tuple[int, dict, str]:
    code, out, err = run_cli("embed", *args, "--json")
    return code, (json.loads(out) if out.strip() else {}), err


def errors_csv(store: Path) -> list[list[str]]:
    with open(store / "errors.csv", newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def test_ray_and_local_give_the_same_ids_vectors_and_rows_and_no_task_sees_the_secret(
        ray_local, tiny_cohort, toy_package, tmp_path, monkeypatch):
    from ray import cloudpickle
    from ray._private.serialization import SerializationContext

    # Everything the driver serialises for Ray (task arguments, actor constructors, blocks put in the
    # object store) is captured here, as pickled bytes.
    shipped: list[bytes] = []
    serialize = SerializationContext.serialize

    def spy(self, value):
        with contextlib.suppress(Exception):  # an object only Ray itself can serialise
            shipped.append(value if isinstance(value, bytes) else cloudpickle.dumps(value))
        return serialize(self, value)

    local_code, local, _ = embed(tiny_cohort, "--model", toy_package, "--store", tmp_path / "local")
    same_key(tmp_path / "ray", tmp_path / "local")
    monkeypatch.setattr(SerializationContext, "serialize", spy)
    ray_code, distributed, err = embed(tiny_cohort, "--model", toy_package, "--store", tmp_path / "ray",
                                       "--ray")
    monkeypatch.setattr(SerializationContext, "serialize", serialize)
    assert (local_code, ray_code) == (0, 0), err
    assert local["embedded"] == distributed["embedded"] == 32 and distributed["failed"] == 0
    assert "ray: " in err and "(sessions built in the Ray actors)" in err
    # the session's Ray was used as it was (and left running): 2 CPUs, one window of sources
    assert distributed["ray"] == {**distributed["ray"], "address": "local", "cpus": 2.0, "windows": 1,
                                  "started": False}

    a_vectors, a_rows = stored(tmp_path / "local")
    b_vectors, b_rows = stored(tmp_path / "ray")
    assert sorted(a_vectors) == sorted(b_vectors)
    for item in a_vectors:
        np.testing.assert_allclose(b_vectors[item], a_vectors[item], atol=1e-5, rtol=0)
        same = {k: v for k, v in a_rows[item].items() if k != "embedded_at"}  # a time stamp
        assert {k: b_rows[item][k] for k in same} == same

    secret = (tmp_path / "ray" / "secret.key").read_text(encoding="ascii").strip()
    payload = b"".join(shipped)
    # the capture saw the source records the tasks read (a pickled Path holds its parts, not one string)
    assert tiny_cohort.name.encode() in payload and tiny_cohort.parent.name.encode() in payload
    for form in (bytes.fromhex(secret), secret.encode(), secret.upper().encode()):
        assert form not in payload

    # a re-run with Ray embeds nothing: resume reads the same store the same way
    code, again, err = embed(tiny_cohort, "--model", toy_package, "--store", tmp_path / "ray", "--ray")
    assert code == 0 and again["embedded"] == 0 and again["skipped"] == 32, err


def bad_folder(tiny_cohort: Path, root: Path) -> Path:
    """Two good DICOM files, one truncated in its pixel data (fails in the reader, on a worker), one
    .npy volume with a NaN (fails in the preprocessing)."""
    folder = root / "bad"
    folder.mkdir()
    files = sorted((tiny_cohort / "dicom").rglob("*.dcm"))[:2]
    for n, file in enumerate(files):
        shutil.copy(file, folder / f"good{n}.dcm")
    oct_file = next(f for f in sorted((tiny_cohort / "dicom").rglob("*.dcm")) if f.stat().st_size > 20_000)
    (folder / "cut.dcm").write_bytes(oct_file.read_bytes()[:-700])
    volume = np.full((4, 16, 16), 0.5, np.float32)
    volume[1, 3, 3] = np.nan
    np.save(folder / "nan_oct.npy", volume)
    return folder


def test_a_bad_file_is_reported_as_the_local_run_reports_it(ray_local, tiny_cohort, toy_package, tmp_path):
    folder = bad_folder(tiny_cohort, tmp_path)
    results = {}
    for name, extra in (("local", ()), ("ray", ("--ray",))):
        if name == "ray":
            same_key(tmp_path / name, tmp_path / "local")
        code, summary, err = embed(folder, "--model", toy_package, "--store", tmp_path / name, *extra)
        results[name] = (code, summary["embedded"], summary["failed"], sorted(map(tuple, errors_csv(
            tmp_path / name))), sorted(line for line in err.splitlines() if line.startswith("failed:")))
    assert results["ray"] == results["local"]
    code, embedded, failed, rows, lines = results["ray"]
    assert (code, failed, len(lines)) == (0, 2, 2) and embedded >= 1
    reasons = " ".join(" ".join(row) for row in rows)
    assert "cut.dcm" in reasons and "nan_oct.npy" in reasons
    assert "preprocessing failed (OCT volume contains NaN or infinite values)" in reasons


def test_a_worker_killed_mid_job_loses_nothing(ray_local, tiny_cohort, toy_package, tmp_path, monkeypatch):
    from retinacli import distributed

    marker = tmp_path / "killed-once"
    monkeypatch.setenv(distributed.FAULT_ENV, str(marker))
    code, summary, err = embed(tiny_cohort, "--model", toy_package, "--store", tmp_path / "store", "--ray")
    assert marker.exists()  # a decode worker did exit hard
    assert code == 0 and summary["embedded"] == 32 and summary["failed"] == 0, err  # Ray retried its task
    vectors, _ = stored(tmp_path / "store")  # every item exactly once
    assert len(vectors) == 32
    monkeypatch.delenv(distributed.FAULT_ENV)
    code, again, err = embed(tiny_cohort, "--model", toy_package, "--store", tmp_path / "store", "--ray")
    assert code == 0 and again["embedded"] == 0 and again["skipped"] == 32, err
    assert len(stored(tmp_path / "store")[0]) == 32


def test_encoders_leave_cpus_to_the_decoders():
    from retinacli.distributed import DECODE_CPUS, actor_plan

    per_actor, most, threads = actor_plan(2.0)
    assert (per_actor, most, threads) == (1.0, 1, 1)
    assert (2.0 - most * per_actor) / DECODE_CPUS == 2  # two decode tasks beside the encoder on 2 cores
    assert actor_plan(64.0) == (2.0, 16, 2)


def test_without_the_ray_extra_embed_says_how_to_install_it_first(toy_package, tiny_cohort, tmp_path,
                                                                   monkeypatch):
    import importlib.util

    from fixtures_cli import one_error_line
    from typer.testing import CliRunner

    from retinacli.cli import app

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name.split(".")[0] == "ray" else find_spec(name, *args))
    result = CliRunner().invoke(app, ["embed", str(tiny_cohort), "--model", str(toy_package), "--store",
                                      str(tmp_path / "store"), "--ray-address", "auto"])
    assert result.exit_code == 1
    assert one_error_line(result) == ("error: retina embed --ray needs the optional 'ray' dependencies "
                                      "(ray is not installed). Install them with: pip install 'retina[ray]'")
    assert not (tmp_path / "store").exists()  # refused before the package was loaded or the store made


def test_an_address_nothing_answers_on_is_one_line_in_seconds():
    import socket

    from retinacli.distributed import _check_reachable
    from retinacli.errors import RetinaError

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(RetinaError, match=rf"^cannot reach the Ray cluster at {address} \(.+\); check"):
            _check_reachable(address, timeout=5)
    _check_reachable("auto")  # left to Ray: it finds the cluster itself


def test_decode_tasks_are_large_but_every_cpu_gets_several():
    """Few large tasks cost Ray less; a small window still gives each decoder work (no Ray needed)."""
    from retinacli.distributed import sources_per_task

    assert sources_per_task(10_000, 2) == 64  # the most per task
    assert sources_per_task(100, 2) == 12  # 100 // (4 tasks x 2 CPUs)
    assert sources_per_task(32, 2) == 8  # the fewest per task: 4 tasks for the 32-source test cohort
    assert sources_per_task(100_000, 64) == 64
