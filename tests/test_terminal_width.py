"""Readable terminal output (issue 17): every table fits an 80-column terminal without splitting a word.

Realistic exports (deep relative folders, long file names, 17-character ids, long error reasons) go
through each table-printing command at COLUMNS=80: no output line may be wider than 80 cells, every
file name and every word of a reason must appear whole on one line (a path too long for its column
is cut in the middle, keeping its file name), and every date is YYYY-MM-DD.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from fixtures_packages import make_toy_package
from rich.cells import cell_len
from test_readers_support import ramp_volume, write_op, write_opt
from typer.testing import CliRunner

from retinacli import console
from retinacli.cli import app
from retinacli.console import ELLIPSIS, middle_truncate, print_table

WIDTH = 80
DEEP = Path("exports") / "2024" / "clinic_alpha_moorfields_satellite" / "glaucoma_study_cohort_b" / "visit_02"
OCT_NAMES = [f"macular_cube_512x128_OD_{n:04d}.dcm" for n in range(3)]
FUNDUS_NAME = "colour_fundus_45deg_OD_0001.dcm"
BROKEN_NAME = "truncated_export_from_the_old_workstation.dcm"
BOX = "│┃┆┊"

runner = CliRunner()


@pytest.fixture
def narrow(tmp_path, monkeypatch):
    """An 80-column terminal, a private $RETINA_HOME, and a working folder holding a deep export."""
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    monkeypatch.setattr(console.out, "_width", None)  # follow $COLUMNS, as a terminal would
    monkeypatch.setattr(console.err, "_width", None)
    monkeypatch.setenv("RETINA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RETINA_MODEL", raising=False)
    monkeypatch.delenv("RETINA_STORE", raising=False)
    work = tmp_path / "work"
    export = work / DEEP
    (export / "OD").mkdir(parents=True)
    for n, name in enumerate(OCT_NAMES):
        write_opt(export / "OD" / name, ramp_volume(4, 32, 32), f"SYN0000{n}", "OD", when="20240102103000")
    write_op(export / "OD" / FUNDUS_NAME, np.full((20, 24, 3), 90, np.uint8), "SYN00000", "OD",
             when="20240102102900")
    (export / "OD" / BROKEN_NAME).write_bytes(b"DICM" + b"\0" * 40)
    monkeypatch.chdir(work)
    assert console.out.width == WIDTH and console.err.width == WIDTH
    return work


def _invoke(*args) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.stdout, result.stderr


def _tokens(text: str) -> set[str]:
    return set(re.sub(f"[{BOX}]", " ", text).split())


def assert_readable(text: str, whole: list[str]) -> None:
    """No line wider than the terminal; each of `whole` (file names, ids, words) on one line; ISO dates."""
    lines = text.splitlines()
    assert lines, "nothing printed"
    wide = [line for line in lines if cell_len(line) > WIDTH]
    assert not wide, "\n".join(wide)
    tokens = _tokens(text)
    for word in whole:
        assert any(word in token for token in tokens), f"{word!r} is not whole on one line:\n{text}"
    assert not re.search(r"(?<!\d)(19|20)\d{6}(?!\d)", text), text  # no YYYYMMDD
    assert not re.search(r"\d{1,2}[/.]\d{1,2}[/.]\d{2,4}", text), text  # no 02/01/2024 or 2.1.2024


def test_middle_truncate_keeps_the_start_and_the_file_name():
    path = str(DEEP / "OD" / OCT_NAMES[0])
    assert middle_truncate(path, 200) == path
    short = middle_truncate(path, 50)
    assert cell_len(short) == 50 and short.startswith("exports/2024/") and short.endswith("/" + OCT_NAMES[0])
    assert ELLIPSIS in short
    name = middle_truncate("a_file_name_far_too_long_for_any_column_at_all_0001.dcm", 24)
    assert cell_len(name) == 24 and name.startswith("a_file_name") and name.endswith("0001.dcm")
    wide = middle_truncate("眼底/" * 20 + "写真.png", 30)  # wide characters count as two cells
    assert cell_len(wide) <= 30 and wide.endswith("/写真.png")


def test_print_table_fits_or_turns_vertical():
    buffer = io.StringIO()
    narrow_console = console.SafeConsole(file=buffer, width=WIDTH, markup=False, emoji=False, soft_wrap=True)
    reason = "the header cannot be parsed: the preamble ends before the group length element " * 2
    path = str(DEEP / "OD" / BROKEN_NAME)
    print_table(narrow_console, [("path", "path"), ("error", "text")], [[path, reason]], title="1 unreadable")
    table = buffer.getvalue()
    assert_readable(table, [BROKEN_NAME, *reason.split()])
    assert "┃ path" in table  # still a table: the path is cut and the reason wraps between words
    buffer.seek(0), buffer.truncate()
    columns = [(f"column {n}", "short") for n in range(8)]
    print_table(narrow_console, columns, [[f"value-{n}-0123456789" for n in range(8)]], title="many columns")
    vertical = buffer.getvalue()
    assert_readable(vertical, [f"value-{n}-0123456789" for n in range(8)])
    assert "┃" not in vertical and re.search(r"column 7\s+value-7-0123456789", vertical)


def test_inspect_at_80_columns(narrow):
    code, stdout, stderr = _invoke("inspect", "exports")
    assert code == 0, stderr
    assert_readable(stdout, [*OCT_NAMES, FUNDUS_NAME, "2024-01-02"])
    assert_readable(stderr, [BROKEN_NAME])  # the unreadable table
    json_out = json.loads(_invoke("inspect", "exports", "--json")[1])
    assert {item["study_date"] for item in json_out["items"]} == {"2024-01-02"}


def test_embed_retrieve_predict_at_80_columns(narrow, tmp_path):
    package = make_toy_package(tmp_path / "toy")
    code, stdout, stderr = _invoke("embed", "exports", "--model", package, "--store", "store")
    assert code == 0, stderr
    assert BROKEN_NAME in stderr  # embed prints progress lines, no table: the terminal wraps them
    results = json.loads(_invoke("retrieve", DEEP / "OD" / FUNDUS_NAME, "--store", "store", "--json")[1])
    ids = {r["id"] for r in results["results"]}
    assert len(ids) == 3 and all(len(i) == 17 for i in ids)
    assert {r["date"] for r in results["results"]} == {"2024-01-02"} == {results["query"]["date"]}

    code, stdout, stderr = _invoke("retrieve", DEEP / "OD" / FUNDUS_NAME, "--store", "store", "--top", "3")
    assert code == 0, stderr
    assert_readable(stdout, [*OCT_NAMES, *ids, "2024-01-02", FUNDUS_NAME])

    for task in ("cst", "tn"):
        code, stdout, stderr = _invoke("predict", "--task", task, "--store", "store")
        assert code == 0, stderr
        assert_readable(stdout, [*OCT_NAMES, *ids, "2024-01-02"])
        payload = json.loads(_invoke("predict", "--task", task, "--store", "store", "--json")[1])
        assert {p["date"] for p in payload["predictions"]} == {"2024-01-02"}
        csv_text = _invoke("predict", "--task", task, "--store", "store", "--csv")[1]
        assert "2024-01-02" in csv_text and not re.search(r"(?<!\d)20240102(?!\d)", csv_text)


def test_pair_unpaired_table_at_80_columns(narrow):
    lonely = narrow / DEEP / "OS" / "widefield_photo_OS_0001.dcm"
    lonely.parent.mkdir()
    write_op(lonely, np.full((20, 24, 3), 40, np.uint8), "SYN00099", "OS", when="20240305101500")
    code, stdout, stderr = _invoke("pair", "exports", "--out", "manifest.csv")
    assert code == 0, stderr
    assert_readable(stdout, ["manifest.csv"])  # "wrote 1 pair(s) to manifest.csv (1 by time)"
    reasons = [r["reason"] for r in json.loads(_invoke("pair", "exports", "--out", "m2.csv", "--json")[1])
               ["unpaired"]]
    assert len(reasons) == 3
    assert_readable(stderr, [lonely.name, *OCT_NAMES[1:], BROKEN_NAME, *" ".join(reasons).split()])
    assert "reason" in stderr and "┃ path" in stderr  # a table still: the reasons wrap between words


def test_models_list_at_80_columns(narrow, tmp_path):
    models = tmp_path / "home" / "models"
    for n in range(2):
        make_toy_package(models / f"glaucoma_progression_model_from_clinic_alpha_{n}", version=f"1.{n}.0")
    shutil.copytree(models / "glaucoma_progression_model_from_clinic_alpha_0", models / "broken_copy")
    (models / "broken_copy" / "retina.json").write_text("{ not json", encoding="utf-8")
    code, stdout, stderr = _invoke("models", "list")
    assert code == 0, stderr
    assert_readable(stdout, ["1.0.0", "1.1.0", "2026-01-01"])
    assert "2026-01-01T" not in stdout  # created shows as a date, like every date


def test_info_store_info_and_models_show_at_80_columns(narrow, tmp_path):
    package = make_toy_package(tmp_path / "home" / "models" / "toy")
    assert _invoke("embed", "exports", "--model", package, "--store", "store")[0] == 0
    code, stdout, stderr = _invoke("store", "info", "--store", "store")
    assert code == 0, stderr
    assert_readable(stdout, ["store:", "created:", "toy@1.0.0+248663d55935"])
    assert re.search(r"^created:\s+\d{4}-\d{2}-\d{2}T", stdout, re.MULTILINE)
    code, stdout, stderr = _invoke("models", "show", package)
    assert code == 0, stderr
    heads = json.loads((package / "retina.json").read_text())["heads"]
    words = " ".join(head["label_meaning"] for head in heads.values()).split()
    assert_readable(stdout, ["toy@1.0.0", *words])
    assert re.search(r"^\s+head cst\s+regression", stdout, re.MULTILINE)  # the hanging indent keeps keys
    code, stdout, stderr = _invoke("info")
    assert code == 0, stderr
    assert_readable(stdout, ["RETINA_MODEL", "RETINA_HOME", "providers"])
    assert re.search(r"embedding store  \S+/store$", stdout, re.MULTILINE)  # a cut path keeps its end
