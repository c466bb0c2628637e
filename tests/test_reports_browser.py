"""The HTML reports of `retina retrieve --html` and `retina predict --html`, opened in headless Chromium.

A demo-like folder (as `retina demo` lays it out: ./oct_dir of OCT volumes, ./fundus.png exported from a
fundus DICOM, ./.retina/store) is built from the synthetic DICOM cohort and the torch-free toy package,
installed in a private $RETINA_HOME so the card commands run exactly as typed. The reports are checked
for what the browser really shows: a non-blank screenshot, the number of images that decoded, the DOM
contract (query-block / figure.result / tr.prediction and their data attributes), the same-eye markers,
placeholders instead of broken images, and no external URL or console error. The commands run in fresh
interpreters, as a user runs them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from browser import (
    assert_not_blank,
    broken_images,
    console_errors,
    data_attributes,
    external_text,
    external_urls,
    images,
    loaded_images,
    open_page,
    screenshot,
)
from fixtures_packages import make_toy_package

CSP_META = ("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">")
SAME_EYE = {True: "true", False: "false", None: "unknown"}


def retina(cwd: Path, home: Path, *args, check: bool = True) -> subprocess.CompletedProcess:
    """`retina ARGS` in a fresh interpreter in `cwd`, with a private $RETINA_HOME and no store/model set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETINA_")}
    env.update(RETINA_HOME=str(home), COLUMNS="250", NO_COLOR="1")
    result = subprocess.run([sys.executable, "-m", "retinacli.cli", *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, text=True)
    if check:
        assert result.returncode == 0, f"retina {' '.join(map(str, args))}:\n{result.stderr[-3000:]}"
    return result


def _lay_out(tiny_cohort: Path, workdir: Path, rows: list[dict]) -> dict:
    """oct_dir/ (the rows' OCT volumes, copied flat as `retina demo` does) and fundus.png + fundus.dcm
    from the first row's visit."""
    from PIL import Image

    from retinacli.readers import read_fundus

    oct_dir = workdir / "oct_dir"
    oct_dir.mkdir(parents=True)
    for row in rows:
        source = tiny_cohort / row["oct_path"]
        shutil.copy2(source, oct_dir / f"{source.parent.name}_{source.name}")
    query = rows[0]
    pixels = read_fundus(tiny_cohort / query["fundus_path"]).pixels
    Image.fromarray(pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels).save(
        workdir / "fundus.png")
    shutil.copy2(tiny_cohort / query["fundus_path"], workdir / "fundus.dcm")
    return query


def _manifest(tiny_cohort: Path) -> list[dict]:
    import csv

    with open(tiny_cohort / "manifest.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _identifiers(tiny_cohort: Path, rows: list[dict]) -> set[str]:
    """The patient names, IDs, birth dates and accession numbers planted in the cohort's headers."""
    import pydicom

    found = set()
    for row in rows:
        for column in ("oct_path", "fundus_path"):
            ds = pydicom.dcmread(tiny_cohort / row[column], stop_before_pixels=True)
            for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"):
                value = str(ds.get(keyword, "") or "")
                if value:
                    found |= {value, *value.split("^")} - {"SYNTH"}
    return found


@pytest.fixture(scope="module")
def demo(tiny_cohort, tmp_path_factory):
    """(workdir, home, volumes, planted identifiers): every OCT of the tiny cohort (16: 8 eyes x 2 visits)
    embedded from ./oct_dir with the toy package (installed in home/models), fundus.png and fundus.dcm of
    one visit."""
    root = tmp_path_factory.mktemp("report_demo")
    home, workdir = root / "home", root / "retina-demo"
    (home / "models").mkdir(parents=True)
    make_toy_package(home / "models" / "toy")
    rows = _manifest(tiny_cohort)
    _lay_out(tiny_cohort, workdir, rows)
    retina(workdir, home, "embed", "./oct_dir", "--model", home / "models" / "toy")
    return workdir, home, len(rows), _identifiers(tiny_cohort, rows)


def _check_self_contained(html: str) -> None:
    assert CSP_META in html
    assert external_text(html) == []
    assert "<script" not in html.lower()


def _numbers(text: str) -> list[float]:
    return [float(m) for m in re.findall(r"-?\d+\.\d+", text)]


def _figure_texts(browser, selector: str) -> list[str]:
    return browser.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.textContent);", selector)


def _visible_texts(browser, selector: str) -> list[str]:
    return browser.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.innerText);", selector)


def test_card_retrieve_report_shows_the_query_and_five_oct_results(demo, browser, tmp_path):
    """The issue's acceptance: `retina retrieve fundus.png --top 5 --html report.html` in the demo folder."""
    workdir, home, _, planted = demo
    retina(workdir, home, "retrieve", "fundus.png", "--top", "5", "--html", "report.html")
    expected = json.loads(retina(workdir, home, "retrieve", "fundus.png", "--top", "5", "--json").stdout)
    html = (workdir / "report.html").read_text(encoding="utf-8")
    _check_self_contained(html)
    assert not [p for p in planted if p in html]

    open_page(browser, workdir / "report.html")
    assert_not_blank(screenshot(browser, tmp_path / "report.png"))
    assert len(data_attributes(browser, "section.query-block")) == 1
    assert len(loaded_images(browser, "section.query-block figure.query img.thumb")) == 1
    figures = data_attributes(browser, "section.query-block figure.result")
    results = expected["results"]
    assert len(results) == 5 and all(r["modality"] == "oct" for r in results)
    assert [f["rank"] for f in figures] == ["1", "2", "3", "4", "5"]
    # fundus.png carries no header: its patient is unknown, so is every result's same eye
    assert [f["sameEye"] for f in figures] == [SAME_EYE[r["same_eye"]] for r in results] == ["unknown"] * 5
    assert all(f["ood"] in ("true", "false", "unknown") for f in figures)
    for rank in range(1, 6):
        figure = f"figure.result[data-rank='{rank}']"
        assert len(loaded_images(browser, f"{figure} img.thumb.bscan")) == 1, rank
        assert len(loaded_images(browser, f"{figure} img.thumb.enface")) == 1, rank
    assert len(loaded_images(browser)) == len(images(browser)) == 1 + 5 * 2
    assert broken_images(browser) == [] and data_attributes(browser, ".placeholder") == []
    for result, caption in zip(results, _figure_texts(browser, "figure.result"), strict=True):
        assert result["id"] in caption and result["laterality"] in caption
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", result["date"]) and result["date"] in caption
        assert any(abs(n - result["score"]) < 0.006 for n in _numbers(caption)), (caption, result["score"])
    assert external_urls(browser) == []
    assert console_errors(browser) == []


def test_same_eye_markers_for_a_dicom_query(demo, browser):
    """A DICOM query's pseudonymous patient and eye are known: its eye's two visits are marked."""
    workdir, home, volumes, planted = demo
    retina(workdir, home, "retrieve", "fundus.dcm", "--top", volumes, "--html", "same.html")
    expected = json.loads(retina(workdir, home, "retrieve", "fundus.dcm", "--top", volumes, "--json").stdout)
    html = (workdir / "same.html").read_text(encoding="utf-8")
    _check_self_contained(html)
    assert not [p for p in planted if p in html]
    open_page(browser, workdir / "same.html")
    figures = data_attributes(browser, "figure.result")
    assert len(figures) == len(expected["results"]) == volumes == 16  # the whole store
    marks = [f["sameEye"] for f in figures]
    assert marks == [SAME_EYE[r["same_eye"]] for r in expected["results"]]
    assert marks.count("true") == 2 and marks.count("false") == 14  # visits 0 and 1 of the query's eye
    for mark, text in zip(marks, _visible_texts(browser, "figure.result"), strict=True):
        assert ("same eye" in text.lower()) == (mark == "true"), (mark, text)
    assert len(loaded_images(browser)) == 1 + 16 * 2 and broken_images(browser) == []
    assert console_errors(browser) == []


def test_predict_report_has_one_row_per_item_and_the_head(demo, browser, tmp_path):
    workdir, home, volumes, planted = demo
    retina(workdir, home, "predict", "--task", "cst", "--html", "p.html")
    expected = json.loads(retina(workdir, home, "predict", "--task", "cst", "--json").stdout)
    predictions = expected["predictions"]
    html = (workdir / "p.html").read_text(encoding="utf-8")
    _check_self_contained(html)
    assert not [p for p in planted if p in html]
    open_page(browser, workdir / "p.html")
    assert_not_blank(screenshot(browser, tmp_path / "predict.png"))
    head = _visible_texts(browser, "section.head")
    assert len(head) == 1 and "research use" in head[0].lower()
    rows = data_attributes(browser, "table.predictions tr.prediction")
    assert len(rows) == len(predictions) == volumes == 16
    texts = browser.execute_script(  # cell by cell: a row's textContent runs the cells together
        "return Array.from(document.querySelectorAll('table.predictions tr.prediction')).map("
        "r => Array.from(r.cells).map(c => c.textContent).join(' | '));")
    by_id = {p["id"]: p for p in predictions}
    seen = set()
    for row, text in zip(rows, texts, strict=True):
        (item,) = [p for i, p in by_id.items() if i in text]
        seen.add(item["id"])
        assert row["ood"] == SAME_EYE[item.get("ood")] and row["plausible"] == SAME_EYE[item.get("plausible")]
        assert any(abs(n - item["value"]) < 0.06 for n in _numbers(text)), (text, item["value"])
    assert seen == set(by_id)
    assert broken_images(browser) == [] and external_urls(browser) == [] and console_errors(browser) == []


def test_deleted_and_redacted_source_files_get_placeholders_not_broken_images(tiny_cohort, browser, tmp_path):
    """Of three stored volumes, one was deleted after embedding and one lies in a folder named after its
    patient ID (stored with the patient's pseudonym in its place, so it cannot be located): both get a
    placeholder tile with the reason, and no patient ID appears."""
    import pydicom

    home, workdir = tmp_path / "home", tmp_path / "work"
    (home / "models").mkdir(parents=True)
    make_toy_package(home / "models" / "toy")
    rows = _manifest(tiny_cohort)[:3]
    _lay_out(tiny_cohort, workdir, rows)
    first, second, _ = sorted((workdir / "oct_dir").iterdir())
    patient_id = str(pydicom.dcmread(second, stop_before_pixels=True).PatientID)
    (workdir / "oct_dir" / patient_id).mkdir()
    second.rename(workdir / "oct_dir" / patient_id / "volume.dcm")
    retina(workdir, home, "embed", "./oct_dir", "--model", home / "models" / "toy")
    first.unlink()
    retina(workdir, home, "retrieve", "fundus.png", "--top", "3", "--html", "report.html")
    html = (workdir / "report.html").read_text(encoding="utf-8")
    _check_self_contained(html)
    assert patient_id not in html
    open_page(browser, workdir / "report.html")
    assert_not_blank(screenshot(browser))
    assert len(data_attributes(browser, "figure.result")) == 3
    reasons = sorted(p["reason"].lower() for p in data_attributes(browser, "figure.result .placeholder"))
    assert len(reasons) == 2 and any("redact" in r for r in reasons), reasons
    assert any("not found" in r or "deleted" in r for r in reasons), reasons
    # the reason is shown, not only stored in data-reason
    assert all(t.strip() for t in _visible_texts(browser, "figure.result .placeholder"))
    assert browser.execute_script(
        "return document.querySelectorAll('figure.result:has(.placeholder) img').length") == 0
    assert broken_images(browser) == []
    assert len(loaded_images(browser)) == 1 + 2  # the query and the one volume still there (B-scan, en-face)
    assert console_errors(browser) == []
