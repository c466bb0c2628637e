"""Pseudonym keys and read-only commands (issue 13, "Pseudonym keys").

- A key (STORE/secret.key, or the manifest's key beside the CSV) that is empty, shorter than 16 bytes,
  not hex, or unreadable is refused with one line naming the file: `embed`, `retrieve`, `predict`, `pair`.
- A store with rows whose key is missing is refused for appending and left exactly as it was.
- `retrieve`, `predict`, `inspect` and `store info` write nothing into a store: no key, no lock, no
  temp file, no ANN index (file list, sizes, mtimes and bytes are compared).
- ANN indexes are built by `retina store index` or by `retina embed`, never by a query.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from fixtures_cli import one_error_line
from fixtures_packages import make_toy_package
from typer.testing import CliRunner

from retinacli.cli import app
from retinacli.privacy import (
    MIN_KEY_BYTES,
    SECRET_FILE,
    SecretKeyError,
    SecretKeyMissingError,
    create_secret,
    load_secret,
)
from retinacli.store import EmbeddingStore

runner = CliRunner()

# (file content, the reason the one-line error gives)
BAD_KEYS = {
    "empty": ("", "the key is 0 bytes, fewer than 16"),
    "short": ("ab" * (MIN_KEY_BYTES - 1), "the key is 15 bytes, fewer than 16"),
    "not hex": ("zz" * 32, "the key file is not hexadecimal"),
}


def cli(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root` (and `root` itself): kind, size, mtime and, for files, a content hash."""
    entries = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        entries[path.relative_to(root).as_posix()] = (path.is_dir(), st.st_size, st.st_mtime_ns, digest)
    return entries


# Writes attempted under a watched folder, seen by a Python audit hook: works as root, where file modes
# do not stop a write (the snapshot comparison also covers writes from C++, e.g. pyarrow or faiss).
_WATCH: dict = {"root": None, "writes": []}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_WRITE_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.chmod", "os.truncate", "os.utime",
                 "os.symlink", "os.link", "shutil.rmtree", "shutil.copyfile"}


def _audit(event: str, args: tuple) -> None:
    root = _WATCH["root"]
    if root is None:
        return
    if event == "open":
        path, mode, flags = [*args, None, None, None][:3]
        writing = any(c in str(mode or "") for c in "wax+") or bool((flags or 0) & _WRITE_FLAGS)
        paths = [path] if writing else []
    elif event in _WRITE_EVENTS:
        paths = list(args[:2])
    else:
        return
    for path in paths:
        if isinstance(path, (str, bytes, os.PathLike)):
            full = os.path.abspath(os.fsdecode(path))
            if full == root or full.startswith(root + os.sep):
                _WATCH["writes"].append((event, full))


sys.addaudithook(_audit)


@contextlib.contextmanager
def no_writes_under(root: Path):
    """Fail if the code inside opens for writing, creates, renames or removes anything under `root`."""
    _WATCH["root"], _WATCH["writes"] = str(root.resolve()), []
    try:
        yield
    finally:
        _WATCH["root"] = None
    assert _WATCH["writes"] == [], _WATCH["writes"]




pytestmark = pytest.mark.usefixtures("isolated_cli")  # tests/conftest.py


@pytest.fixture(scope="module")
def built(tiny_cohort, tmp_path_factory):
    """A toy package and a store holding the tiny DICOM cohort (copied per test before any change)."""
    root = tmp_path_factory.mktemp("keys")
    package = make_toy_package(root / "toy")
    store = root / "store"
    result = cli("embed", tiny_cohort, "--model", package, "--store", store)
    assert result.exit_code == 0, result.output
    return package, store, tiny_cohort


@pytest.fixture
def store_copy(built, tmp_path):
    package, store, cohort = built
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    return package, copy, cohort


def query_file(cohort: Path) -> Path:
    return next(p for p in sorted(cohort.rglob("*.dcm")) if "fundus" in p.name.lower())


def oct_file(cohort: Path) -> Path:
    return next(p for p in sorted(cohort.rglob("*.dcm")) if "oct" in p.name.lower())


# --- the key itself -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BAD_KEYS))
def test_load_secret_refuses_a_bad_key_naming_the_file(tmp_path, kind):
    content, reason = BAD_KEYS[kind]
    (tmp_path / SECRET_FILE).write_text(content)
    with pytest.raises(SecretKeyError, match=reason) as info:
        load_secret(tmp_path)
    assert str(tmp_path / SECRET_FILE) in str(info.value) and "\n" not in str(info.value)
    assert (tmp_path / SECRET_FILE).read_text() == content  # never replaced


def test_load_secret_refuses_binary_and_blank_keys(tmp_path):
    (tmp_path / SECRET_FILE).write_bytes(b"\xff\xfe" * 32)
    with pytest.raises(SecretKeyError, match="not hexadecimal"):
        load_secret(tmp_path)
    (tmp_path / SECRET_FILE).write_text(" \n\t\n")
    with pytest.raises(SecretKeyError, match="the key is 0 bytes"):
        load_secret(tmp_path)
    (tmp_path / SECRET_FILE).write_text("AB" * MIN_KEY_BYTES + "\n")  # 16 bytes, upper case, newline: fine
    assert load_secret(tmp_path) == bytes([0xAB]) * MIN_KEY_BYTES


def test_load_secret_never_creates_and_create_secret_is_owner_only(tmp_path):
    with pytest.raises(SecretKeyMissingError, match="no key file"):
        load_secret(tmp_path)
    assert not (tmp_path / SECRET_FILE).exists()
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / SECRET_FILE).mkdir()  # unreadable as a file
    with pytest.raises(SecretKeyError, match="unreadable key file"):
        load_secret(tmp_path / "dir")
    key = create_secret(tmp_path)
    assert len(key) == 32 and load_secret(tmp_path) == key
    if os.name == "posix":
        assert (tmp_path / SECRET_FILE).stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("kind", sorted(BAD_KEYS))
def test_bad_store_key_is_refused_by_embed_retrieve_and_predict(store_copy, kind):
    package, store, cohort = store_copy
    content, reason = BAD_KEYS[kind]
    (store / SECRET_FILE).write_text(content)
    before = snapshot(store)
    runs = {
        "embed": cli("embed", cohort, "--model", package, "--store", store),
        "retrieve": cli("retrieve", query_file(cohort), "--store", store, "--model", package),
        "predict": cli("predict", oct_file(cohort), "--task", "cst", "--model", package, "--store", store),
    }
    for name, result in runs.items():
        assert result.exit_code == 1, (name, result.output)
        line = one_error_line(result)
        assert str(store / SECRET_FILE) in line and reason in line, (name, line)
    assert snapshot(store) == before  # nothing written, the bad key not replaced


@pytest.mark.parametrize("kind", sorted(BAD_KEYS))
def test_bad_manifest_key_is_refused_by_pair(built, tmp_path, kind):
    _, _, cohort = built
    content, reason = BAD_KEYS[kind]
    out = tmp_path / "pairs"
    out.mkdir()
    (out / SECRET_FILE).write_text(content)
    result = cli("pair", cohort, "--out", out / "manifest.csv")
    assert result.exit_code == 1, result.output
    line = one_error_line(result)
    assert str(out / SECRET_FILE) in line and reason in line
    assert sorted(p.name for p in out.iterdir()) == [SECRET_FILE]  # no manifest written with it
    assert (out / SECRET_FILE).read_text() == content


def test_pair_creates_a_fresh_manifest_key_and_reuses_it(built, tmp_path):
    _, _, cohort = built
    out = tmp_path / "pairs"
    assert cli("pair", cohort, "--out", out / "a.csv").exit_code == 0
    key = load_secret(out)
    assert cli("pair", cohort, "--out", out / "b.csv").exit_code == 0
    assert load_secret(out) == key and (out / "a.csv").read_bytes() == (out / "b.csv").read_bytes()


# --- a store that lost its key --------------------------------------------------------------------


def test_missing_key_with_rows_refuses_embed_and_leaves_the_store_unchanged(store_copy, tmp_path):
    package, store, cohort = store_copy
    (store / SECRET_FILE).unlink()
    rows = len(EmbeddingStore.open(store))
    before = snapshot(store)
    new_source = tmp_path / "new"
    new_source.mkdir()
    shutil.copy(query_file(cohort), new_source / "copy.dcm")
    for inputs in (cohort, new_source):  # the same sources (would duplicate) and a new one
        result = cli("embed", inputs, "--model", package, "--store", store)
        assert result.exit_code == 1, result.output
        line = one_error_line(result)
        assert str(store / SECRET_FILE) in line and "key is missing" in line and f"{rows} rows" in line
        assert "cannot be recomputed" in line and "restore secret.key from a backup" in line.lower()
        assert "--out" in line
        assert snapshot(store) == before  # no key created, no lock, no shard, store.json untouched
    # a new store gets a fresh key, and appending to it with its key works
    fresh = tmp_path / "fresh"
    assert cli("embed", new_source, "--model", package, "--store", fresh).exit_code == 0
    key = load_secret(fresh)
    again = cli("embed", new_source, "--model", package, "--store", fresh, "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["skipped"] == 1
    assert load_secret(fresh) == key


def test_store_without_rows_and_key_gets_a_fresh_key(built, tmp_path):
    from retinacli.store import StoreWriter

    root = tmp_path / "empty"
    with StoreWriter.open_for_model(root, model_id="toy@0.1.0+000000000000", embed_dim=4):
        pass
    (root / SECRET_FILE).unlink()  # no rows: nothing to duplicate, so a new key is fine
    with StoreWriter.open_for_model(root, model_id="toy@0.1.0+000000000000", embed_dim=4) as writer:
        assert load_secret(root) == writer.secret


# --- read-only commands ---------------------------------------------------------------------------


def read_only_runs(package: Path, store: Path, cohort: Path) -> dict[str, list]:
    query = query_file(cohort)
    some_id = EmbeddingStore.open(store).metadata(["id"])[0]["id"]
    return {
        "retrieve file": ["retrieve", query, "--store", store, "--model", package, "--json"],
        "retrieve file auto": ["retrieve", query, "--store", store, "--search", "auto"],
        "retrieve id": ["retrieve", some_id, "--store", store, "--search", "exact"],
        "predict store": ["predict", "--task", "cst", "--store", store, "--json"],
        "predict files": ["predict", oct_file(cohort), "--task", "cst", "--store", store, "--model", package,
                          "--csv"],
        "inspect cohort": ["inspect", query],
        "inspect store": ["inspect", store, "--json"],
        "store info": ["store", "info", "--store", store],
        "store info json": ["store", "info", "--store", store, "--json"],
    }


@pytest.mark.parametrize("with_key", [True, False], ids=["key", "no key"])
def test_read_only_commands_leave_the_store_byte_for_byte_unchanged(store_copy, with_key):
    package, store, cohort = store_copy
    if not with_key:
        (store / SECRET_FILE).unlink()
    before = snapshot(store)
    env = {"RETINA_STORE": str(store)}  # the store is also the default store of every command
    for name, args in read_only_runs(package, store, cohort).items():
        with no_writes_under(store):
            result = cli(*args, env=env)
        assert result.exit_code in (0, 1), (name, result.output)
        assert "Traceback" not in result.output, (name, result.output)
        if name != "inspect store":  # the store's own files are no images: inspect exits 1
            assert result.exit_code == 0, (name, result.output)
        assert snapshot(store) == before, name
    assert (store / SECRET_FILE).exists() == with_key
    assert not (store / "ann").exists()


def test_without_a_key_the_query_id_is_none_and_said_so(store_copy):
    package, store, cohort = store_copy
    (store / SECRET_FILE).unlink()
    result = cli("retrieve", query_file(cohort), "--store", store, "--model", package, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["query"]["id"] is None and payload["results"]
    assert "has no secret.key, so the query's id cannot be computed" in result.stderr
    predicted = cli("predict", oct_file(cohort), "--task", "cst", "--store", store, "--model", package)
    assert predicted.exit_code == 0, predicted.output
    assert "has no secret.key; the ids below are this run's only" in predicted.stderr
    assert not (store / SECRET_FILE).exists()


def test_with_the_key_the_query_id_is_the_stores(store_copy):
    package, store, cohort = store_copy
    query = query_file(cohort)
    payload = json.loads(cli("retrieve", query, "--store", store, "--model", package, "--json").stdout)
    rows = EmbeddingStore.open(store).metadata(["id", "path"])
    assert payload["query"]["id"] in {r["id"] for r in rows}


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores file modes")
def test_read_only_commands_work_on_a_read_only_store(store_copy):
    package, store, cohort = store_copy
    modes = {p: p.stat().st_mode for p in [store, *store.rglob("*")]}
    for path in modes:
        path.chmod(modes[path] & ~0o222)
    try:
        for name, args in read_only_runs(package, store, cohort).items():
            result = cli(*args)
            assert "Traceback" not in result.output, (name, result.output)
            if name != "inspect store":
                assert result.exit_code == 0, (name, result.output)
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


# --- ANN indexes: built by writers, only read by queries ------------------------------------------


def test_store_index_builds_the_index_and_retrieve_ann_uses_it(store_copy, tmp_path):
    pytest.importorskip("faiss")
    package, store, cohort = store_copy
    query = query_file(cohort)
    base = ["retrieve", query, "--store", store, "--model", package, "--json"]
    before = snapshot(store)
    refused = cli(*base, "--search", "ann")
    assert refused.exit_code == 1
    line = one_error_line(refused)
    assert "no oct ANN index; build it with 'retina store index --store" in line
    # auto on a small store: exact, silently; nothing built by either query
    auto = cli(*base, "--search", "auto")
    assert auto.exit_code == 0 and json.loads(auto.stdout)["search"] == "exact"
    assert snapshot(store) == before and not (store / "ann").exists()

    built = cli("store", "index", "--store", store, "--backend", "faiss", "--json")
    assert built.exit_code == 0, built.output
    counts = EmbeddingStore.open(store).metadata(["modality"])
    expected = {m: sum(r["modality"] == m for r in counts) for m in ("fundus", "oct")}
    assert json.loads(built.stdout)["indexed"] == expected
    assert {p.name for p in (store / "ann").iterdir()} == {"active.json", "faiss"}
    assert {p.name for p in (store / "ann" / "faiss").glob("*.json")} == {"oct.json", "fundus.json"}
    indexed = snapshot(store)
    ann = json.loads(cli(*base, "--search", "ann").stdout)
    exact = json.loads(cli(*base, "--search", "exact").stdout)
    assert ann["search"] == "ann" and ann["results"][0]["id"] == exact["results"][0]["id"]
    assert snapshot(store) == indexed  # the query read the index, wrote nothing

    # a later embed extends the existing index with its new shard, so ann keeps working
    new_source = tmp_path / "new"
    new_source.mkdir()
    shutil.copy(oct_file(cohort), new_source / "copy.dcm")
    assert cli("embed", new_source, "--model", package, "--store", store).exit_code == 0
    shards = [s.index for s in EmbeddingStore.open(store).shards]
    assert json.loads((store / "ann" / "faiss" / "oct.json").read_text())["shards"] == shards
    again = cli(*base, "--search", "ann")
    assert again.exit_code == 0 and json.loads(again.stdout)["search"] == "ann"


def test_a_stale_index_is_refused_for_ann_and_auto_falls_back_with_a_note(store_copy):
    pytest.importorskip("faiss")
    from retinacli.store import StoreWriter

    package, store, cohort = store_copy
    assert cli("store", "index", "--store", store, "--backend", "faiss").exit_code == 0
    # a writer that does not update indexes (an older retina, or a killed embed) leaves it stale
    with StoreWriter.open_for_model(store, model_id=EmbeddingStore.open(store).model_id,
                                    embed_dim=EmbeddingStore.open(store).embed_dim) as writer:
        row = EmbeddingStore.open(store).metadata()[0]
        vector = EmbeddingStore.open(store).vectors()[:1]
        writer.add([{**row, "id": "iextra", "source_key": "sextra", "modality": "oct"}], vector)
    before = snapshot(store)
    base = ["retrieve", query_file(cohort), "--store", store, "--model", package]
    stale = cli(*base, "--search", "ann")
    assert stale.exit_code == 1 and "the faiss oct index is out of date" in one_error_line(stale)
    auto = cli(*base, "--search", "auto", "--json")
    assert auto.exit_code == 0 and json.loads(auto.stdout)["search"] == "exact"
    notes = [line for line in auto.stderr.splitlines() if line.startswith("note: ")]
    assert notes == ["note: the faiss oct index is out of date (the store changed since it was built: 1 "
                     "shards added, 0 removed), so the search is exact; 'retina store index' updates it"]
    assert snapshot(store) == before


def test_embed_builds_the_index_once_the_store_is_large_enough(built, tmp_path, monkeypatch):
    from retinacli import vector_index

    backend = vector_index.default_backend()
    if backend is None:
        pytest.skip("no index backend installed")
    package, _, cohort = built
    small, large = tmp_path / "small", tmp_path / "large"
    assert cli("embed", cohort, "--model", package, "--store", small).exit_code == 0
    assert not (small / "ann").exists()  # below the auto threshold: no index to keep
    monkeypatch.setattr(vector_index, "AUTO_MIN_ROWS", 10)  # as if the store were large
    assert cli("embed", cohort, "--model", package, "--store", large).exit_code == 0
    shards = [s.index for s in EmbeddingStore.open(large).shards]
    for modality in ("oct", "fundus"):  # the default backend's (lancedb when installed)
        assert json.loads((large / "ann" / backend / f"{modality}.json").read_text())["shards"] == shards
    before = snapshot(large)
    result = cli("retrieve", query_file(cohort), "--store", large, "--model", package, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["search"] == "ann"  # auto picks it
    assert snapshot(large) == before


def test_store_index_needs_a_store_and_says_so(tmp_path):
    result = cli("store", "index", "--store", tmp_path / "nowhere")
    assert result.exit_code == 2 and "no embedding store here" in one_error_line(result)
    assert not (tmp_path / "nowhere").exists()
