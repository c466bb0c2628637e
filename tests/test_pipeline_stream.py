"""Streaming discovery and embedding: `discover.scan_iter` passes sources on as it finds them, and
`run_embedding` with a `StreamingPlan` starts inference before discovery has finished, with the same
store, report, errors, resume and ignored list as a plan made up front. Real readers, the real
onnxruntime engine of a toy package and real DICOM files; orders are asserted, never timings."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from retinacli import pipeline, readers
from retinacli.engine import Engine
from retinacli.errors import ReadError
from retinacli.preprocess import slice_indices
from retinacli.privacy import SECRET_FILE
from retinacli.readers import dicom as dicom_reader
from retinacli.readers.discover import Ignored, scan, scan_iter
from retinacli.store import EmbeddingStore, StoreWriter

GATE_AFTER = 8  # sources discovery passes on before it waits for the first model call
WAIT_S = 120  # only a guard against hanging: a run that does not stream fails the order assertion


def _open_store(root: Path, engine: Engine, secret_from: Path | None = None):
    if secret_from is not None:  # the same key, so both stores name every item alike
        root.mkdir(parents=True)
        shutil.copy(secret_from / SECRET_FILE, root / SECRET_FILE)
    return StoreWriter.open_for_model(root, model_id=engine.model_id, embed_dim=engine.embed_dim,
                                      shard_rows=5)


def _contents(root: Path) -> dict[str, tuple[dict, np.ndarray]]:
    store = EmbeddingStore.open(root)
    vectors = store.vectors()
    return {row["id"]: (row, vectors[i]) for i, row in enumerate(store.metadata())}


def _embed(root: Path, engine: Engine, folders: list[Path], *, stream: bool, secret_from: Path | None = None,
           **kwargs):
    with _open_store(root, engine, secret_from) as writer:
        done = writer.column_values("source_key")
        if stream:
            plan = pipeline.StreamingPlan(folders, writer.secret, done, exclude=root)
        else:
            plan = pipeline.plan_embedding(folders, writer.secret, done, exclude=root)
        report = pipeline.run_embedding(engine, plan, writer, batch_size=2, workers=2, **kwargs)
        writer.commit()
    return report, plan


@pytest.fixture
def cohort_copy(tiny_cohort, tmp_path) -> Path:
    """The tiny DICOM cohort plus a broken DICOM, a non-image file and a store-like folder."""
    data = tmp_path / "data"
    shutil.copytree(tiny_cohort / "dicom", data)
    first = sorted(data.iterdir())[0]
    (first / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff")
    (first / "notes.txt").write_text("not an image")
    (data / "old_store").mkdir()
    (data / "old_store" / "store.json").write_text("{}")
    return data


def test_scan_iter_passes_a_file_on_before_reading_the_next_header(cohort_copy, monkeypatch):
    reads: list[str] = []
    real = dicom_reader.read_header

    def counting(path, *args, **kwargs):
        reads.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(dicom_reader, "read_header", counting)
    stream = scan_iter([cohort_copy])
    head = []
    for found in stream:
        head.append(found)
        if isinstance(found, readers.Source):
            break
    first = head[-1]
    # out right after its own header was read (the broken file before it sorts first), not after all of them
    assert reads == ["broken.dcm", first.path.name]
    rest = head[:-1] + list(stream)
    n_dicom = len(list(cohort_copy.rglob("*.dcm")))
    assert len(reads) == n_dicom  # every header read once
    found = scan([cohort_copy])  # scan() is scan_iter collected
    later = [x.path for x in rest if isinstance(x, readers.Source)]
    assert [s.path for s in found.sources] == [first.path, *later]
    assert [e.path for e in found.errors] == [str(e.path) for e in rest if isinstance(e, ReadError)]
    assert [p for p, _ in found.ignored] == [x.path for x in rest if isinstance(x, Ignored)]
    assert len(found.sources) == n_dicom - 1 and len(found.errors) == 1
    assert {p.name for p, _ in found.ignored} >= {"notes.txt", "old_store"}


def test_scan_iter_yields_series_and_bscan_stacks_at_the_end_of_their_folder(tiny_cohort_png):
    events = list(scan_iter([tiny_cohort_png]))
    sources = [x for x in events if isinstance(x, readers.Source)]
    kinds = {s.kind for s in sources}
    assert kinds == {"image", "bscan-folder"}
    assert [s.path for s in sources] == [s.path for s in scan([tiny_cohort_png]).sources]
    stacks = [s for s in sources if s.kind == "bscan-folder"]
    assert stacks and all(len(s.members) == 8 for s in stacks)  # whole volumes, never partial stacks


def test_first_batch_reaches_the_engine_before_discovery_ends(cohort_copy, toy_package, tmp_path):
    engine = Engine.load(toy_package)
    events: list[str] = []
    called = threading.Event()
    embed = engine.embed

    def recording_embed(modality, batch):
        events.append(f"embed {modality} {len(batch)}")
        called.set()
        return embed(modality, batch)

    engine.embed = recording_embed

    def slow_discovery(paths):
        for n, found in enumerate(scan_iter(paths)):
            if n == GATE_AFTER:
                events.append("discovery waits")
                called.wait(WAIT_S)  # resumes once a batch ran (or, without streaming, never: fails below)
            yield found
        events.append("discovery done")

    def gated(paths):
        raise AssertionError("a StreamingPlan streams through .stream")

    gated.stream = slow_discovery
    found_totals: list[int] = []
    with _open_store(tmp_path / "store", engine) as writer:
        plan = pipeline.StreamingPlan([cohort_copy], writer.secret, set(), discover=gated,
                                      on_found=found_totals.append)
        report = pipeline.run_embedding(engine, plan, writer, batch_size=2, workers=2)
        writer.commit()
    first_embed = next(i for i, e in enumerate(events) if e.startswith("embed"))
    assert "discovery waits" in events and first_embed < events.index("discovery done")
    assert 0 <= report.first_batch_seconds < report.discovery_seconds <= report.seconds  # what --json shows
    n_good = len(list(cohort_copy.rglob("*.dcm"))) - 1
    assert report.embedded == n_good and report.failed == 1
    assert found_totals == list(range(1, n_good + 1))  # a progress total that grows source by source


def test_streaming_run_equals_the_planned_run(cohort_copy, toy_package, tmp_path):
    engine = Engine.load(toy_package)
    planned, plan_a = _embed(tmp_path / "a", engine, [cohort_copy], stream=False)
    streamed, plan_b = _embed(tmp_path / "b", engine, [cohort_copy], stream=True, secret_from=tmp_path / "a")
    n = len(list(cohort_copy.rglob("*.dcm"))) - 1  # all but the broken file
    assert (streamed.embedded, streamed.skipped, streamed.failed) == (planned.embedded, planned.skipped,
                                                                      planned.failed) == (n, 0, 1)
    assert [(e.path, e.reason) for e in streamed.errors] == [(e.path, e.reason) for e in planned.errors]
    assert plan_b.ignored == plan_a.ignored and len(plan_a.ignored) >= 2
    a, b = _contents(tmp_path / "a"), _contents(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) == n
    for key, (row, vector) in a.items():
        assert {**b[key][0], "embedded_at": None} == {**row, "embedded_at": None}  # the clock differs
        np.testing.assert_array_equal(b[key][1], vector)
    # resume: a second streamed run skips every source the store holds, as a planned one does
    again, plan_c = _embed(tmp_path / "b", engine, [cohort_copy], stream=True)
    assert (again.embedded, again.skipped, plan_c.skipped_sources, again.failed) == (0, n, n, 1)
    # --modality: only that modality's items, and only its sources are read and counted as found; a
    # source already in the store counts as skipped whatever its modality, as with a full plan
    n_oct = len(list(cohort_copy.rglob("*_oct.dcm")))
    with _open_store(tmp_path / "c", engine) as writer:
        plan = pipeline.StreamingPlan([cohort_copy], writer.secret, set(), modality="oct")
        only_oct = pipeline.run_embedding(engine, plan, writer, modality="oct", batch_size=2, workers=2)
    assert (only_oct.embedded, plan.found, only_oct.failed) == (n_oct, n_oct, 1)
    with _open_store(tmp_path / "b", engine) as writer:
        done = writer.column_values("source_key")
        oct_plan = pipeline.StreamingPlan([cohort_copy], writer.secret, done, modality="oct")
        streamed = pipeline.run_embedding(engine, oct_plan, writer, modality="oct")
        planned = pipeline.run_embedding(engine, pipeline.plan_embedding([cohort_copy], writer.secret, done),
                                         writer, modality="oct")
    assert (streamed.embedded, streamed.skipped) == (planned.embedded, planned.skipped) == (0, n)


def test_default_reader_decodes_only_the_sampled_bscans_with_the_same_vectors(cohort_copy, toy_package,
                                                                             tmp_path):
    engine = Engine.load(toy_package)
    slices = engine.spec["oct"]["slices"]
    frames = pipeline.oct_frames_for(engine)
    assert frames(49) == slice_indices(49, slices).tolist() and frames(8) == slice_indices(8, slices).tolist()
    asked: list[list[int]] = []

    held: list[tuple[int, int]] = []  # (B-scans decoded, B-scans in the file) per OCT item

    def reader_with_frames(source, modality, oct_frames=None):
        asked.append(oct_frames(8))
        items = list(pipeline.read_with_readers(source, modality, oct_frames=oct_frames))
        held.extend((len(item.pixels), item.meta.extra.get("bscans")) for item in items)
        return items

    def full_reader(source, modality):  # a custom two-argument reader: full decode, never given frames
        return readers.read_source(source, modality)

    selective, _ = _embed(tmp_path / "sel", engine, [cohort_copy], stream=True,
                          read_source=reader_with_frames, modality="oct")
    full, _ = _embed(tmp_path / "full", engine, [cohort_copy], stream=True, read_source=full_reader,
                     modality="oct", secret_from=tmp_path / "sel")
    assert selective.embedded == full.embedded == len(list(cohort_copy.rglob("*_oct.dcm")))
    assert len(asked) == len(list(cohort_copy.rglob("*.dcm"))) - 1  # every source read is asked for them
    assert all(frames == slice_indices(8, slices).tolist() for frames in asked)
    assert held == [(slices, 8)] * selective.embedded  # only the sampled B-scans were decoded
    a, b = _contents(tmp_path / "sel"), _contents(tmp_path / "full")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key][1], b[key][1])


def test_a_discovery_failure_ends_the_run_with_it_and_no_thread_left(cohort_copy, toy_package, tmp_path):
    engine = Engine.load(toy_package)

    def broken(paths):
        for n, found in enumerate(scan_iter(paths)):
            if n == 3:
                raise RuntimeError("discovery bug")
            yield found

    failing = lambda paths: ([], [])  # noqa: E731
    failing.stream = broken
    with _open_store(tmp_path / "store", engine) as writer:
        plan = pipeline.StreamingPlan([cohort_copy], writer.secret, set(), discover=failing)
        with pytest.raises(RuntimeError, match="discovery bug"):
            pipeline.run_embedding(engine, plan, writer, batch_size=2, workers=2)
    assert not [t for t in threading.enumerate() if t.name == "retina-discover"]


def test_a_list_discovery_is_planned_as_it_streams(tmp_path):
    """A discover callable without `.stream` (stand-ins, scripts): called once, then planned in turn."""
    from test_store import StandInEngine, make_folder, standin_discover, standin_read

    folder = make_folder(tmp_path / "data", n_pairs=3, bad=1)
    engine = StandInEngine()
    with StoreWriter.open_for_model(tmp_path / "store", model_id=engine.model_id,
                                    embed_dim=engine.embed_dim) as writer:
        plan = pipeline.StreamingPlan([folder], writer.secret, set(), discover=standin_discover)
        report = pipeline.run_embedding(engine, plan, writer, batch_size=4, read_source=standin_read)
    assert (report.embedded, report.failed, plan.found) == (6, 1, 7)


def test_retina_embed_streams_and_reports_when_discovery_ended(cohort_copy, toy_package, private_home):
    import json

    from typer.testing import CliRunner

    from retinacli.cli import app

    store = private_home / "store"
    result = CliRunner().invoke(app, ["embed", str(cohort_copy), "--model", str(toy_package), "--store",
                                      str(store), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    n = len(list(cohort_copy.rglob("*.dcm"))) - 1
    assert (summary["embedded"], summary["skipped"], summary["failed"]) == (n, 0, 1)
    assert summary["errors"][0]["path"].endswith("broken.dcm")
    assert {Path(i["path"]).name for i in summary["ignored"]} >= {"notes.txt", "old_store"}
    assert 0 <= summary["first_batch_seconds"] <= summary["seconds"]
    assert 0 <= summary["discovery_seconds"] <= summary["seconds"]
    assert "ignored folder" in result.stderr and "old_store" in result.stderr  # never silent
    again = json.loads(CliRunner().invoke(app, ["embed", str(cohort_copy), "--model", str(toy_package),
                                                "--store", str(store), "--json"]).stdout)
    assert (again["embedded"], again["skipped"], again["failed"]) == (0, n, 1)
    assert again["first_batch_seconds"] is None  # nothing left to embed: no model call
