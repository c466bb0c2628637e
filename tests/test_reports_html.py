"""`retina retrieve --html` / `retina predict --html`: one self-contained report (retinacli/reports).

Real readers and the torch-free toy package on a copy of the synthetic DICOM cohort (planted PatientName,
PatientID, birth date, accession number), run in-process through the CLI. One patient's folder is renamed
to his PatientID (so the stored path has that component replaced by a pseudonym and cannot be located)
and one OCT file is deleted after embedding. The report is checked as text (no script, no URL, the CSP),
per DOM element (figures, rows, data attributes against the --json payload) and per image (every data
URI decodes as a PNG with content). The headless-browser checks of the same DOM are elsewhere."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fixtures_packages import make_toy_package
from PIL import Image
from test_phi import dicom_identifiers, leaks
from typer.testing import CliRunner

from retinacli.cli import app
from retinacli.errors import EXIT_USAGE
from retinacli.headinfo import RESEARCH_USE
from retinacli.reports.html import CSP, prediction_report, retrieval_report
from retinacli.reports.thumbnails import Locator, missing_reason, oct_thumbs, to_uint8

runner = CliRunner()
CSP_META = f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
DATA_URI = re.compile(r"data:image/png;base64,[A-Za-z0-9+/=]+")
RESULT = re.compile(r'<figure class="result" ([^>]*)>(.*?)</figure>', re.S)
QUERY = re.compile(r'<figure class="query">(.*?)</figure>', re.S)
BLOCK = re.compile(r'<section class="query-block" data-query="(\d+)">(.*?)</section>', re.S)
ROW = re.compile(r'<tr class="prediction" ([^>]*)>(.*?)</tr>', re.S)
IMG = re.compile(r'<img class="([^"]*)" src="([^"]*)"')
PLACEHOLDER = re.compile(r'<div class="placeholder" data-reason="([^"]*)">([^<]*)</div>')
NOT_FOUND = "source file not found (moved or deleted)"
REDACTED = "path redacted: the source file cannot be located"
FLAG = {True: "true", False: "false", None: "unknown"}


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def attrs(text: str) -> dict[str, str]:
    return dict(re.findall(r'([\w-]+)="([^"]*)"', text))


def assert_self_contained(text: str) -> None:
    """The CSP, no script, every image an embedded PNG, and no URL of any scheme outside the data URIs."""
    assert text.startswith("<!DOCTYPE html>") and CSP_META in text
    assert not re.search(r"<script|javascript:|@import|url\(", text, re.I)
    assert all(src.startswith("data:image/png;base64,") for _cls, src in IMG.findall(text))
    assert len(re.findall(r"<img ", text)) == len(IMG.findall(text))  # every img has a class and a src
    outside = DATA_URI.sub("", text)
    assert not re.search(r"https?:|file:|ftp:", outside, re.I)
    assert "//" not in outside


def decoded_png(uri: str) -> Image.Image:
    """The PNG of a data URI; it must have content (not one flat colour) and a sensible size."""
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1], validate=True)))
    assert image.format == "PNG"
    image.load()
    assert min(image.size) >= 16 and max(image.size) <= 256, image.size
    low, high = np.asarray(image.convert("L")).min(), np.asarray(image.convert("L")).max()
    assert high - low >= 32, (low, high)
    return image


@pytest.fixture(scope="module")
def site(tiny_cohort, tmp_path_factory):
    """A copy of the cohort (one patient's folder renamed to his PatientID), embedded with the toy
    package; then one OCT file deleted. Returns a dict of what the tests need."""
    root = tmp_path_factory.mktemp("reports")
    data = root / "data"
    shutil.copytree(tiny_cohort / "dicom", data / "dicom")
    identifiers, _patient_of = dicom_identifiers(tiny_cohort)
    identifiers = {v for v in identifiers if len(v) >= 6}
    folders = sorted(p for p in (data / "dicom").iterdir() if p.is_dir())
    named = folders[0]
    patient_id = str(pydicom.dcmread(next(named.glob("*.dcm")), stop_before_pixels=True).PatientID)
    renamed = named.rename(named.parent / f"{patient_id}_scans")
    package = make_toy_package(root / "toy")
    store = root / "store"
    embedded = run("embed", data, "--model", package, "--store", store, "--json")
    assert embedded.exit_code == 0, embedded.output
    deleted = next(folders[1].glob("*_oct.dcm"))
    deleted.unlink()
    query = next(p for p in sorted(folders[2].glob("*_fundus.dcm")))
    return {"root": root, "data": data, "store": store, "package": package, "identifiers": identifiers,
            "deleted": deleted.relative_to(root).as_posix(), "renamed": renamed, "query": query,
            "patient_id": patient_id}


def retrieve(site, *args):
    return run("retrieve", *args, "--store", site["store"], "--model", site["package"])


def test_retrieval_report_is_self_contained_with_two_png_thumbnails_per_oct_result(site, tmp_path):
    report = tmp_path / "report.html"
    plain = retrieve(site, site["query"], "--top", "100", "--json")
    result = retrieve(site, site["query"], "--top", "100", "--json", "--html", report)
    assert result.exit_code == 0, result.output
    assert f"wrote report: {report}" in result.stderr
    payload = json.loads(result.stdout)
    assert payload == json.loads(plain.stdout)  # --html adds a file, stdout is unchanged
    text = report.read_text(encoding="utf-8")
    assert_self_contained(text)
    blocks = BLOCK.findall(text)
    assert [n for n, _ in blocks] == ["0"]
    figures = RESULT.findall(text)
    results = payload["results"]
    assert len(figures) == len(results) >= 12  # every OCT item of the cohort
    shown = placeholders = 0
    for (head, body), record in zip(figures, results, strict=True):
        a = attrs(head)
        assert a["data-rank"] == str(record["rank"])
        assert a["data-same-eye"] == FLAG[record["same_eye"]]
        assert a["data-ood"] == FLAG[record["ood"]]
        assert record["id"] in body and f"{record['score']:.4f}" in body
        assert re.search(rf"\b{record['laterality']} · {record['date']}\b", body)  # YYYY-MM-DD
        imgs = IMG.findall(body)
        if imgs:
            assert [cls for cls, _ in imgs] == ["thumb bscan", "thumb enface"]
            bscan, enface = (decoded_png(uri) for _, uri in imgs)
            # the cohort's 8 x 64 x 64 volumes; the en-face view in the scan area's aspect, as wide/high
            assert bscan.size == (64, 64) and max(enface.size) == 64
            shown += 1
        else:
            placeholders += 1
            ((reason, visible),) = PLACEHOLDER.findall(body)
            assert reason == visible
    assert shown == len(results) - placeholders and placeholders >= 3  # one deleted + the renamed patient's
    (query,) = QUERY.findall(text)
    ((cls, uri),) = IMG.findall(query)
    assert cls == "thumb" and decoded_png(uri).mode == "RGB"  # the colour fundus photo
    assert payload["query"]["id"] in query


def test_same_eye_marker_only_on_results_of_the_query_patients_eye(site, tmp_path):
    report = tmp_path / "report.html"
    payload = json.loads(retrieve(site, site["query"], "--top", "100", "--json", "--html", report).stdout)
    same = [r["rank"] for r in payload["results"] if r["same_eye"] is True]
    assert same, "the cohort has the query eye's other visit"
    text = report.read_text(encoding="utf-8")
    marked = [int(attrs(head)["data-rank"]) for head, body in RESULT.findall(text)
              if '<span class="badge same-eye">same eye</span>' in body]
    assert marked == same
    flagged = [int(attrs(head)["data-rank"]) for head, _ in RESULT.findall(text)
               if attrs(head)["data-same-eye"] == "true"]
    assert flagged == same


def test_placeholders_name_the_reason_for_a_deleted_file_and_a_redacted_path(site, tmp_path):
    report = tmp_path / "report.html"
    payload = json.loads(retrieve(site, site["query"], "--top", "100", "--json", "--html", report).stdout)
    text = report.read_text(encoding="utf-8")
    reasons = {}
    for (_head, body), record in zip(RESULT.findall(text), payload["results"], strict=True):
        found = PLACEHOLDER.findall(body)
        if found:
            assert not IMG.findall(body)  # a placeholder instead of an image, never a broken one
            reasons[record["path"]] = found[0][0]
    deleted = site["deleted"]
    assert reasons.pop(deleted) == NOT_FOUND
    assert reasons and set(reasons.values()) == {REDACTED}  # the renamed patient's OCTs
    assert all(site["patient_id"] not in path for path in reasons)  # its stored path has a pseudonym
    assert site["patient_id"] not in text and site["renamed"].name not in text
    assert not leaks({"report": text.encode()}, site["identifiers"])


def test_batch_report_one_block_per_answered_query_and_the_failures(site, tmp_path):
    report = tmp_path / "batch.html"
    first = json.loads(retrieve(site, site["query"], "--top", "3", "--json").stdout)
    stored_id = first["results"][1]["id"]  # an OCT item of the store, queried by id
    result = retrieve(site, site["query"], stored_id, tmp_path / "missing.dcm", "--top", "3", "--json",
                      "--html", report)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert len(payload["queries"]) == 2 and len(payload["errors"]) == 1
    text = report.read_text(encoding="utf-8")
    assert_self_contained(text)
    blocks = BLOCK.findall(text)
    assert [n for n, _ in blocks] == ["0", "1"]
    for (_n, body), answer in zip(blocks, payload["queries"], strict=True):
        assert len(RESULT.findall(body)) == len(answer["results"]) == 3
        (query,) = QUERY.findall(body)
        assert answer["query"]["id"] in query
        kinds = [cls for cls, uri in IMG.findall(query) if decoded_png(uri)]
        oct_kinds = ["thumb bscan", "thumb enface"]
        assert kinds == (["thumb"] if answer["query"]["modality"] == "fundus" else oct_kinds)
    assert '<section class="errors">' in text and "missing.dcm" in text
    assert not leaks({"report": text.encode()}, site["identifiers"])


def test_prediction_report_rows_head_context_and_flags(site, tmp_path):
    for task in ("tn", "cst"):
        report = tmp_path / f"{task}.html"
        result = run("predict", "--task", task, "--store", site["store"], "--model", site["package"],
                     "--json", "--html", report)
        assert result.exit_code == 0, result.output
        assert f"wrote report: {report}" in result.stderr
        payload = json.loads(result.stdout)
        text = report.read_text(encoding="utf-8")
        assert_self_contained(text)
        head = payload["head"]
        (section,) = re.findall(r'<section class="head">(.*?)</section>', text, re.S)
        assert RESEARCH_USE in section and head["label_meaning"] in section
        assert ("reliable (" if head["reliable"] else "UNRELIABLE") in section
        assert ("cv AUROC" if task == "tn" else "cv MAE") in section
        if task == "tn":
            assert f"label 1 when probability &gt;= {head['threshold']:.3f}" in section
        rows = ROW.findall(text)
        preds = payload["predictions"]
        assert len(rows) == len(preds) >= 12
        thumbs = 0
        for (row_attrs, body), pred in zip(rows, preds, strict=True):
            a = attrs(row_attrs)
            assert a["data-ood"] == FLAG[pred["ood"]]
            assert a["data-plausible"] == FLAG[pred.get("plausible")]
            assert pred["id"] in body and pred["date"] in body
            value = f"{pred['probability']:.3f}" if task == "tn" else f"{pred['value']:.1f}"
            assert f">{value}" in body
            imgs = IMG.findall(body)
            if imgs:
                ((cls, uri),) = imgs
                assert cls == "thumb bscan" and max(decoded_png(uri).size) <= 96
                thumbs += 1
            else:
                assert PLACEHOLDER.findall(body)[0][0] in (NOT_FOUND, REDACTED)
        assert thumbs >= len(preds) - 3
        assert not leaks({"report": text.encode()}, site["identifiers"])


def test_prediction_report_on_files_finds_them_under_the_paths(site, tmp_path):
    report = tmp_path / "files.html"
    folder = site["query"].parent
    result = run("predict", folder, "--task", "cst", "--model", site["package"], "--store", site["store"],
                 "--json", "--html", report)
    assert result.exit_code == 0, result.output
    preds = json.loads(result.stdout)["predictions"]
    rows = ROW.findall(report.read_text(encoding="utf-8"))
    assert len(rows) == len(preds) == len(list(folder.glob("*_oct.dcm"))) >= 2
    assert all(len(IMG.findall(body)) == 1 for _a, body in rows)


def test_html_into_a_missing_folder_is_a_usage_error_before_any_work(site, tmp_path):
    target = tmp_path / "nope" / "report.html"
    result = retrieve(site, site["query"], "--html", target)
    assert result.exit_code == EXIT_USAGE
    assert "--html folder" in result.output and "searching" not in result.output
    assert not target.exists()
    predicted = run("predict", "--task", "cst", "--store", site["store"], "--html", tmp_path)
    assert predicted.exit_code == EXIT_USAGE and "names a folder" in predicted.output


def test_report_builders_escape_text_and_never_show_a_broken_image(tmp_path):
    """A payload whose paths hold markup and whose files are gone: escaped text, placeholders only."""
    evil = '<img src="http://x">"&'
    payload = {"model": "m", "store": str(tmp_path / "no-store"), "search": "exact", "target": "oct",
               "query": {"id": "iq", "path": evil, "modality": "fundus", "laterality": None, "date": None},
               "results": [{"rank": 1, "score": 0.5, "id": "i1", "root": None,
                            "path": str(tmp_path / "gone.dcm"), "modality": "oct", "laterality": "OD",
                            "date": "20240102", "same_eye": None,
                            "ood": True, "ood_score": 0.9}]}
    text = retrieval_report(payload)
    assert evil not in text and "&lt;img src=&quot;http" in text
    assert not IMG.findall(text)
    (head, body), = RESULT.findall(text)
    assert attrs(head)["data-ood"] == "true" and "out of distribution (0.900)" in body
    assert "OD · 2024-01-02" in body  # a 0.1.0 store's YYYYMMDD shown as YYYY-MM-DD
    assert PLACEHOLDER.findall(body) == [(NOT_FOUND, NOT_FOUND)]
    predictions = {"task": "cst", "model": "m", "source": "files", "head": {}, "errors": [],
                   "predictions": [{"id": "i1", "path": evil, "root": "r9", "modality": "oct", "value": 300.0,
                                    "plausible": False, "ood": None, "note": "outside the training range"}]}
    text = prediction_report(predictions, Locator())
    assert evil not in text and "(implausible)" in text
    ((row_attrs, body),) = ROW.findall(text)
    assert attrs(row_attrs) == {"data-ood": "unknown", "data-plausible": "false"}
    assert PLACEHOLDER.findall(body)[0][0] == "source not located (root r9 is not recorded)"


def test_thumbnail_maths():
    ramp = np.arange(1000, dtype=np.float32).reshape(10, 100)
    scaled = to_uint8(ramp)
    assert scaled.dtype == np.uint8 and scaled.min() == 0 and scaled.max() == 255
    assert np.array_equal(to_uint8(np.full((4, 4), 7.0)), np.full((4, 4), 128, np.uint8))
    volume = np.random.default_rng(0).normal(size=(49, 120, 200)).astype(np.float32)
    bscan, enface = oct_thumbs(volume)
    assert decoded_png(bscan.uri).size == (200, 120)
    assert decoded_png(enface.uri).size == (200, 200)  # no spacing: a square scan area
    # 49 B-scans 0.12 mm apart over 200 columns of 0.03 mm: 5.9 mm x 6 mm
    _b, enface = oct_thumbs(volume, spacing=(0.12, 0.004, 0.03))
    assert decoded_png(enface.uri).size == (200, 196)


def test_missing_reason_tells_a_redacted_component_from_a_deleted_file(tmp_path):
    (tmp_path / "p0123456789ab").mkdir()
    assert missing_reason(tmp_path / "p0123456789ab" / "oct.dcm") == NOT_FOUND  # a real folder so named
    assert missing_reason(tmp_path / "pabcdefabcdef" / "oct.dcm") == REDACTED
    assert missing_reason(tmp_path / "c0123456789" / "x.dcm") == REDACTED
    assert missing_reason(tmp_path / "DOE_JANE" / "oct.dcm") == NOT_FOUND


def test_a_0_1_0_store_with_absolute_paths_gets_placeholders(tmp_path, monkeypatch):
    """The frozen 0.1.0 store records absolute paths (of /tmp/c2fx/..., where it was made): a tile shows
    the file when it is there and says it is not found otherwise."""
    frozen = Path(__file__).parent / "fixtures" / "v0_1_0"
    store = tmp_path / "store"
    shutil.copytree(frozen / "store", store)
    monkeypatch.chdir(tmp_path)
    report = tmp_path / "old.html"
    result = run("retrieve", "ifb5823b2adc6556e", "--store", store, "--json", "--html", report)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert all(r["path"].startswith("/") for r in payload["results"])  # format 1: absolute
    text = report.read_text(encoding="utf-8")
    assert_self_contained(text)
    figures = RESULT.findall(text)
    assert len(figures) == len(payload["results"]) == 2
    for (_h, body), record in zip(figures, payload["results"], strict=True):
        if Path(record["path"]).exists():
            kinds = [cls for cls, uri in IMG.findall(body) if decoded_png(uri)]
            assert kinds == ["thumb bscan", "thumb enface"]
        else:
            assert PLACEHOLDER.findall(body) == [(NOT_FOUND, NOT_FOUND)] and not IMG.findall(body)
    (query,) = QUERY.findall(text)
    found = IMG.findall(query) if Path(payload["query"]["path"]).exists() else PLACEHOLDER.findall(query)
    assert len(found) == 1


def test_prediction_thumbnails_stop_after_the_first_200_items(tmp_path):
    """A store of thousands of items must not be read whole for a report: rows past 200 say why."""
    from retinacli.reports.html import PREDICTION_THUMBS

    records = [{"id": f"i{n}", "path": f"gone/{n}.dcm", "root": "r0", "modality": "oct", "probability": 0.5,
                "label": 0} for n in range(PREDICTION_THUMBS + 2)]
    payload = {"task": "tn", "model": "m", "source": "files", "head": {"kind": "binary"}, "errors": [],
               "predictions": records}
    text = prediction_report(payload, Locator.for_paths([tmp_path]))
    reasons = [PLACEHOLDER.findall(body)[0][0] for _a, body in ROW.findall(text)]
    assert len(reasons) == PREDICTION_THUMBS + 2 == 202
    assert set(reasons[:PREDICTION_THUMBS]) == {NOT_FOUND}
    assert reasons[PREDICTION_THUMBS:] == ["not shown: thumbnails of the first 200 items only"] * 2
