"""The bad-input corpus (tests/bad_inputs.py) through the readers, `retina inspect --json` and
`retina embed`: every kind has its defined outcome, the good files mixed in are all read, the exit
code follows the policy (docs/reliability.md) and nothing prints a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bad_inputs import OCT_AS_FUNDUS_REASON, Case, build_corpus
from fixtures_packages import make_toy_package

from retinacli.errors import EXIT_NOTHING_DONE, EXIT_OK, ReadError
from retinacli.readers import read_fundus, read_item, read_oct, scan
from retinacli.store import EmbeddingStore, read_errors

TESTS = Path(__file__).resolve().parent

CLI_WITH_SIMULATION = (
    f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n"
    "from bad_inputs import SIMULATION\nexec(SIMULATION)\n"
    "from retinacli.cli import app\napp(sys.argv[1:])\n"
)


def retina(*args, timeout=300):
    """The CLI in a fresh interpreter with the corpus's simulated environment (see bad_inputs.py).
    The timeout only guards against a hang (e.g. a FIFO opened for reading); no assertion uses time."""
    return subprocess.run([sys.executable, "-c", CLI_WITH_SIMULATION, *map(str, args)], capture_output=True,
                          text=True, errors="surrogateescape", timeout=timeout,
                          env={**os.environ, "RETINA_MODEL": "", "PYTHONIOENCODING": "utf-8:strict"})


def assert_clean(result) -> None:
    """No traceback, no Python warning lines: every problem is a one-line report."""
    assert "Traceback" not in result.stderr, result.stderr
    assert "Warning:" not in result.stderr, result.stderr


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[Case]]:
    root = tmp_path_factory.mktemp("bad_inputs") / "corpus"
    return root, build_corpus(root)


def by_outcome(cases: list[Case], outcome: str) -> list[Case]:
    return [case for case in cases if case.outcome == outcome]


def test_the_corpus_has_at_least_30_kinds(corpus):
    _, cases = corpus
    bad = [case for case in cases if not case.kind.startswith("good ")]
    assert len({case.kind for case in bad}) >= 30
    assert {case.outcome for case in cases} == {"read", "error", "ignored", "skipped"}


def test_inspect_json_gives_every_kind_its_outcome(corpus):
    root, cases = corpus
    result = retina("inspect", root, "--json")
    assert_clean(result)
    assert result.returncode == EXIT_OK  # good files were read; the failures are listed
    payload = json.loads(result.stdout)
    items = {record["path"]: record for record in payload["items"]}
    errors = {record["path"]: record["error"] for record in payload["errors"]}
    ignored = {record["path"]: record["reason"] for record in payload["ignored_files"]}
    assert payload["ignored"] == len(ignored)
    for case in cases:
        path = (Path(root.name) / case.path).as_posix()  # outputs are relative to the PATH's folder
        if case.outcome == "read":
            assert path in items, (case.kind, errors.get(path))
            record = items.pop(path)
            assert (record["modality"], tuple(record["shape"]), record["dtype"]) == (
                case.modality, case.shape, case.dtype), case.kind
        elif case.outcome == "error":
            assert path in errors, (case.kind, items.get(path))
            reason = errors.pop(path)
            assert reason.startswith(case.reason), (case.kind, reason)
            assert "\n" not in reason and len(reason) < 200, (case.kind, reason)
        elif case.outcome == "ignored":
            assert ignored.pop(path, "").startswith(case.reason), case.kind
        else:
            reported = (*items, *errors, *ignored)
            assert not any(p == path or p.startswith(path + os.sep) for p in reported), case.kind
    # Nothing else was reported: the folder symlink loop did not duplicate anything.
    assert not items and not errors and not ignored, (items, errors, ignored)


def test_readers_return_the_exact_pixels_of_odd_encodings(corpus):
    root, cases = corpus
    checked = 0
    for case in cases:
        if case.pixels is None:
            continue
        item = read_item(root / case.path)
        assert item.pixels.dtype == np.dtype(case.dtype), case.kind
        np.testing.assert_array_equal(item.pixels, case.pixels, err_msg=case.kind)
        checked += 1
    assert checked >= 6


def test_each_error_is_a_read_error_naming_the_file(corpus):
    """The Python API gives the same one-line reasons: ReadError whose str is 'path: reason'."""
    root, cases = corpus
    for case in by_outcome(cases, "error"):
        if case.path.startswith(("unreadable", "j2k")):
            continue  # need the simulated environment: covered through the CLI above
        with pytest.raises(ReadError) as caught:
            read_item(root / case.path)
        assert caught.value.reason.startswith(case.reason), (case.kind, caught.value.reason)
        assert str(caught.value) == f"{root / case.path}: {caught.value.reason}"


def test_oct_where_a_fundus_is_expected_and_the_reverse(corpus):
    root, _ = corpus
    with pytest.raises(ReadError, match=OCT_AS_FUNDUS_REASON):
        read_fundus(root / "good_oct.dcm")
    with pytest.raises(ReadError, match="is a fundus image, not an OCT volume"):
        read_oct(root / "good_photo.png")
    assert read_oct(root / "good_oct.dcm").pixels.shape == (4, 32, 32)


def test_embed_over_the_corpus_embeds_every_good_item_and_reports_the_rest(corpus, tmp_path):
    root, cases = corpus
    package = make_toy_package(tmp_path / "toy")
    store = tmp_path / "store"
    result = retina("embed", root, "--model", package, "--store", store, "--json")
    assert_clean(result)
    assert result.returncode == EXIT_OK
    summary = json.loads(result.stdout)
    readable = by_outcome(cases, "read")
    embeddable = [case for case in readable if not case.embed_fails]
    assert summary["embedded"] == len(embeddable) == summary["rows"]
    rows = EmbeddingStore.open(store).metadata()
    stored = {(r["path"], r["modality"]) for r in rows}
    for case in embeddable:
        path = (Path(root.name) / case.path).as_posix()  # relative to the folder holding the root
        path = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        assert (path, case.modality) in stored, case.kind
    def shown(case):
        return (Path(root.name) / case.path).as_posix()

    expected_errors = {shown(c): c.reason for c in by_outcome(cases, "error")}
    expected_errors |= {shown(c): c.embed_fails for c in readable if c.embed_fails}
    reported = {e["path"]: e["error"] for e in summary["errors"]}
    assert reported.keys() == expected_errors.keys()
    for path, reason in expected_errors.items():
        assert reported[path].startswith(reason), (path, reported[path])
    assert len(read_errors(store)) == len(expected_errors)  # errors.csv lists the same failures
    # Every failure is on stderr as one line "failed: path: reason" (the first 20 of them).
    failed_lines = [line for line in result.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failed_lines) == min(20, len(expected_errors))
    # A re-run embeds nothing new, retries the failures, and still exits 0.
    again = retina("embed", root, "--model", package, "--store", store, "--json")
    assert_clean(again)
    assert again.returncode == EXIT_OK
    summary = json.loads(again.stdout)
    counts = (summary["embedded"], summary["skipped"], summary["failed"])
    assert counts == (0, len(embeddable), len(expected_errors))


def test_embed_modality_fundus_leaves_the_volumes_out(corpus, tmp_path):
    root, cases = corpus
    package = make_toy_package(tmp_path / "toy")
    result = retina("embed", root, "--model", package, "--store", tmp_path / "store", "--modality", "fundus",
                    "--json")
    assert_clean(result)
    assert result.returncode == EXIT_OK
    rows = EmbeddingStore.open(tmp_path / "store").metadata()
    fundus = [c for c in by_outcome(cases, "read") if c.modality == "fundus" and not c.embed_fails]
    assert {r["modality"] for r in rows} == {"fundus"} and len(rows) == len(fundus)


def test_only_bad_files_exit_1_with_one_line_reasons(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "zero.dcm").write_bytes(b"")
    (root / "text.png").write_text("not an image")
    (root / "objects.npy").write_bytes(b"\x93NUMPY")
    inspect = retina("inspect", root)
    assert_clean(inspect)
    assert inspect.returncode == EXIT_NOTHING_DONE
    assert "no readable OCT volume or fundus image found" in inspect.stderr
    assert "3 unreadable" in inspect.stderr  # the table of the three files with their reasons
    package = make_toy_package(tmp_path / "toy")
    embed = retina("embed", root, "--model", package, "--store", tmp_path / "store", "--json")
    assert_clean(embed)
    assert embed.returncode == EXIT_NOTHING_DONE
    assert json.loads(embed.stdout)["failed"] == 3


def test_a_named_fifo_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "scan.dcm"
    os.mkfifo(fifo)
    found = scan([fifo])
    assert [str(e) for e in found.errors] == [f"{fifo}: not a regular file (FIFO, socket or device)"]
    result = retina("inspect", fifo, "--json", timeout=120)
    assert result.returncode == EXIT_NOTHING_DONE
    assert json.loads(result.stdout)["errors"][0]["error"].startswith("not a regular file")


def test_non_utf8_names_in_table_output(corpus):
    """A strict UTF-8 stdout (a normal terminal) does not crash on a file name that is not UTF-8."""
    root, _ = corpus
    result = retina("inspect", root)
    assert_clean(result)
    assert result.returncode == EXIT_OK
    assert "fundus_" in result.stdout


def test_pair_keeps_a_non_utf8_file_name_as_its_bytes(tmp_path):
    from test_readers_support import ramp_volume, write_op, write_opt

    export = tmp_path / "export"
    export.mkdir()
    odd = export / os.fsdecode(b"oct_\xff.dcm")
    write_opt(odd, ramp_volume(3, 16, 16), when="20240102103000")
    write_op(export / "photo.dcm", np.zeros((16, 16, 3), np.uint8), when="20240102102900")
    result = retina("pair", export, "--out", tmp_path / "manifest.csv")
    assert_clean(result)
    assert result.returncode == EXIT_OK
    manifest = (tmp_path / "manifest.csv").read_bytes()
    assert b"oct_\xff.dcm" in manifest  # the file's own name, so the row still names the file
