"""The terminal cannot be forged: file names are shown, never interpreted (issue 13, "The terminal").

Files and folders are named with Rich markup (`[/]`, `[link=...]`, `[bold red]error:[/] forged`), a
newline followed by `error: forged`, a carriage return, and raw escape sequences (a screen clear, an
OSC 8 hyperlink). Every command that prints them (inspect, embed, retrieve, predict, pair; human and
--json) must exit as usual, render no markup, emit no escape sequence or hyperlink, let no line start
with the forged `error:`, and show the name with its control characters as backslash escapes.
The stdout cases (ascii encoding, a closed pipe, a full disk) run the real entry point in a subprocess.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_readers_support import ramp_volume, write_op, write_opt
from typer.testing import CliRunner

from retinacli import console
from retinacli.cli import app
from retinacli.errors import EXIT_BROKEN_PIPE, EXIT_NOTHING_DONE, EXIT_OK
from retinacli.store import read_errors

runner = CliRunner()

# Path components (a '/' cannot be in a name, so '[/]' spans two folders: 'a[' / ']b').
MARKUP_CLOSE = ("a[", "]b")
LINK = "[link=http:evil.example]click"
FORGED_STYLE = ("[bold red]error:[", "] forged")
NEWLINE = "nl\nerror: forged"
CLEAR = "esc\x1b[2Jx"
OSC8 = "\x1b]8;;http:evil.example\x07osc\x1b]8;;\x07"
CR = "cr\rerror: forged"
FORGED_LINE = re.compile(r"^\W*error: forged", re.MULTILINE)


@pytest.fixture(autouse=True)
def wide_consoles(monkeypatch):
    """Wide consoles, so a table never folds a name across lines (the assertions look for whole names)."""
    monkeypatch.setattr(console.out, "_width", 1000)
    monkeypatch.setattr(console.err, "_width", 1000)


def _png(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(path)
    return path


def _bscans(folder: Path, value: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(100 + value)
    for j in range(3):
        Image.fromarray(rng.integers(0, 255, (24, 20), dtype=np.uint8)).save(folder / f"bscan_{j}.png")
    return folder


@pytest.fixture
def hostile(tmp_path) -> Path:
    """Fundus PNGs, B-scan-folder OCT volumes and two broken files, all under hostile names."""
    root = tmp_path / "data"
    _png(root / MARKUP_CLOSE[0] / MARKUP_CLOSE[1] / "fundus.png", 1)
    _png(root / f"{LINK}.png", 2)
    _png(root / FORGED_STYLE[0] / f"{FORGED_STYLE[1]}.png", 3)
    _png(root / f"{NEWLINE}.png", 4)
    _png(root / f"{CLEAR}.png", 5)
    _png(root / f"{OSC8}.png", 6)
    _png(root / f"{CR}.png", 7)
    _png(root / "µm→.png", 8)
    _bscans(root / f"oct {NEWLINE}", 1)
    _bscans(root / f"oct {CLEAR}", 2)
    _bscans(root / f"oct {LINK}", 3)
    (root / f"broken {NEWLINE}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (root / MARKUP_CLOSE[0] / MARKUP_CLOSE[1] / f"broken {OSC8}.png").write_bytes(b"not an image")
    return root


def _invoke(*args) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    # A Rich MarkupError (or any other crash) would surface here, after the work was done.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.stdout, result.stderr


def assert_not_forged(text: str) -> None:
    """No escape sequence at all (the consoles are not terminals here, so Rich adds none), no OSC 8
    hyperlink, no carriage return, no line that starts with the forged error."""
    assert "\x1b" not in text and "\x1b]8;" not in text and "\r" not in text and "\x07" not in text
    assert not FORGED_LINE.search(text), text


def assert_shown_escaped(text: str) -> None:
    """The hostile names appear, markup as typed and control characters as backslash escapes."""
    for shown in ("a[/]b", LINK, "[bold red]error:[/] forged", "nl\\nerror: forged", "esc\\x1b[2Jx",
                  "\\x1b]8;;http:evil.example\\x07osc\\x1b]8;;\\x07"):
        assert shown in text, (shown, text)


# --- the helper ------------------------------------------------------------------------------------


def test_safe_escapes_control_characters_and_keeps_the_rest():
    assert console.safe("a\nb\rc\td\x1be\x07f\x9bg") == "a\\nb\\rc\\td\\x1be\\x07f\\x9bg"
    assert console.safe("bidi\u202eevil\u2028") == "bidi\\u202eevil\\u2028"
    assert console.safe("[bold]µm→ 名前[/]") == "[bold]µm→ 名前[/]"  # printable text is left as is
    assert console.safe_markup("[/]\n") == "\\[/]\\n"
    assert console.safe(Path("x\n")) == "x\\n"


def test_consoles_render_markup_emoji_and_escapes_as_text():
    buffer = io.StringIO()
    probe = console.SafeConsole(file=buffer, markup=False, emoji=False, width=200)
    probe.print(f"{LINK} [/] :smile: {CLEAR} {OSC8}")  # even without safe(): no crash, no escape
    probe.print(console.styled(("error:", "bold red"), " ", NEWLINE))
    text = buffer.getvalue()
    assert f"{LINK} [/] :smile: esc\\x1b[2Jx" in text and "error: nl\\nerror: forged" in text
    assert_not_forged(text)


# --- commands, in process --------------------------------------------------------------------------


def test_inspect_human_and_json(hostile):
    code, stdout, stderr = _invoke("inspect", hostile)
    assert code == EXIT_OK
    for text in (stdout, stderr):
        assert_not_forged(text)
    assert_shown_escaped(stdout)
    assert "broken nl\\nerror: forged.png" in stderr and "a[/]b/broken \\x1b]8;;" in stderr  # unreadable
    code, stdout, _ = _invoke("inspect", hostile, "--json")
    assert code == EXIT_OK
    payload = json.loads(stdout)  # JSON carries the exact names (json.dumps escapes them)
    names = {Path(item["path"]).name for item in payload["items"]}
    assert {f"{NEWLINE}.png", f"{CLEAR}.png", f"{OSC8}.png", f"{LINK}.png"} <= names
    assert "\x1b" not in stdout and "\n" + "error: forged" not in stdout


def test_inspect_nothing_readable_error_line_is_one_line(tmp_path):
    folder = tmp_path / f"only {NEWLINE}"
    folder.mkdir()
    (folder / f"{OSC8}.png").write_bytes(b"not an image")
    code, stdout, stderr = _invoke("inspect", folder)
    assert code == EXIT_NOTHING_DONE
    assert_not_forged(stdout + stderr)
    assert "error: no readable OCT volume or fundus image found" in stderr.splitlines()


def test_error_messages_naming_a_hostile_path_stay_one_line(tmp_path):
    code, stdout, stderr = _invoke("retrieve", tmp_path / f"{NEWLINE} {OSC8} [/]", "--store",
                                   tmp_path / f"store {NEWLINE} {LINK} {OSC8}")
    assert code != EXIT_OK
    assert_not_forged(stdout + stderr)
    error_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "store nl\\nerror: forged" in error_lines[0] and LINK in error_lines[0]


def test_embed_retrieve_predict(hostile, toy_package, tmp_path):
    store = tmp_path / f"store {CLEAR} [/]"
    code, stdout, stderr = _invoke("embed", hostile, "--model", toy_package, "--store", store)
    assert code == EXIT_OK, stderr
    assert_not_forged(stdout + stderr)
    assert "failed:" in stderr and "nl\\nerror: forged" in stderr  # the failure lines name the file
    failures = read_errors(store)  # errors.csv stays valid CSV: one row per failed input, names intact
    assert len(failures) == 2
    with open(store / "errors.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert len(rows) == 3 and any(NEWLINE in row[0] for row in rows[1:])

    code, stdout, stderr = _invoke("embed", hostile, "--model", toy_package, "--store", store, "--json")
    assert code == EXIT_OK and json.loads(stdout)["skipped"] > 0
    assert_not_forged(stdout + stderr)

    query = hostile / f"{NEWLINE}.png"
    code, stdout, stderr = _invoke("retrieve", query, "--store", store, "--top", "3")
    assert code == EXIT_OK, stderr
    assert_not_forged(stdout + stderr)
    assert "nl\\nerror: forged" in stdout  # the table title names the query
    assert "oct " in stdout  # the hits are the hostile OCT folders, shown escaped
    code, stdout, stderr = _invoke("retrieve", query, "--store", store, "--top", "3", "--json")
    assert code == EXIT_OK and len(json.loads(stdout)["results"]) == 3
    assert_not_forged(stdout + stderr)

    for fmt in ((), ("--json",), ("--csv",)):
        code, stdout, stderr = _invoke("predict", "--task", "cst", "--store", store, *fmt)
        assert code == EXIT_OK, stderr
        assert_not_forged(stderr)
        if not fmt:
            assert_not_forged(stdout)
            assert "oct nl\\nerror: forged" in stdout and "oct esc\\x1b[2Jx" in stdout
        elif fmt == ("--csv",):
            rows = list(csv.DictReader(io.StringIO(stdout)))  # newlines stay inside quoted fields
            assert len(rows) == 3 and any(NEWLINE in row["path"] for row in rows)
    code, stdout, stderr = _invoke("predict", hostile / f"oct {CLEAR}", hostile / f"broken {NEWLINE}.png",
                                   "--task", "cst", "--model", toy_package, "--modality", "oct")
    assert code == EXIT_OK, stderr
    assert_not_forged(stdout + stderr)
    assert "oct esc\\x1b[2Jx" in stdout


def test_pair_human_and_json(tmp_path):
    export = tmp_path / f"export {NEWLINE}" / MARKUP_CLOSE[0] / MARKUP_CLOSE[1]
    export.mkdir(parents=True)
    op = write_op(export / f"{CLEAR}.dcm", np.zeros((20, 24, 3), np.uint8), "SYN000042", "OD")
    write_opt(export / f"{LINK}.dcm", ramp_volume(4, 32, 32), "SYN000042", "OD",
              localizer_uid=op.SOPInstanceUID)
    _png(export / f"lonely {OSC8}.png")  # no header: stays unpaired, listed with its path
    (export / f"{FORGED_STYLE[1]}.dcm").write_bytes(b"")  # unreadable: the error table
    out = tmp_path / f"out {CLEAR}" / "manifest.csv"
    code, stdout, stderr = _invoke("pair", tmp_path / f"export {NEWLINE}", "--out", out)
    assert code == EXIT_OK, stderr
    assert_not_forged(stdout + stderr)
    assert "wrote 1 pair(s)" in stdout and "esc\\x1b[2Jx" in stdout  # the manifest path
    assert "lonely \\x1b]8;;http:evil.example\\x07osc" in stderr  # the unpaired table
    code, stdout, stderr = _invoke("pair", tmp_path / f"export {NEWLINE}", "--out", out, "--json")
    assert code == EXIT_OK and json.loads(stdout)["pairs"] == 1
    assert_not_forged(stdout + stderr)


def test_models_list_shows_package_fields_as_text(tmp_path, monkeypatch):
    """A package's retina.json (name, version) and folder name are file-controlled too."""
    monkeypatch.setenv("RETINA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RETINA_MODEL", raising=False)
    package = tmp_path / "home" / "models" / f"pkg {CLEAR} {LINK}"
    package.mkdir(parents=True)
    (package / "retina.json").write_text(json.dumps({"name": f"{LINK} [/] {NEWLINE}", "version": OSC8}))
    code, stdout, stderr = _invoke("models", "list")
    assert code == EXIT_OK
    assert_not_forged(stdout + stderr)
    assert f"{LINK} [/] nl\\nerror: forged" in stdout and "pkg esc\\x1b[2Jx" in stdout


def test_warnings_are_one_literal_line(monkeypatch):
    from retinacli.commands.options import warn

    buffer = io.StringIO()
    monkeypatch.setattr(console.err, "_file", buffer)  # `_file`: None again afterwards (follows sys.stderr)
    warn(f"{LINK} [/] {NEWLINE}")
    assert buffer.getvalue() == f"warning: {LINK} [/] nl\\nerror: forged\n"


# --- stdout: encodings, closed pipes, full disks (the real entry point, in a subprocess) -------------


def _retina(*args, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "retinacli.cli", *map(str, args)],
                          env={**os.environ, "COLUMNS": "300", **(env or {})}, **kwargs)


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_non_utf8_stdout_prints_escapes_not_unicode_errors(hostile, encoding):
    result = _retina("inspect", hostile, env={"PYTHONIOENCODING": encoding}, capture_output=True)
    assert result.returncode == EXIT_OK, result.stderr.decode(encoding)
    stdout, stderr = result.stdout.decode(encoding), result.stderr.decode(encoding)
    assert "Traceback" not in stderr and "UnicodeEncodeError" not in stderr
    assert_not_forged(stdout + stderr)
    assert "\\u2192" in stdout  # '→' does not exist in either encoding
    assert ("\\xb5m" if encoding == "ascii" else "µm") in stdout
    if encoding == "ascii":
        assert result.stdout.isascii() and result.stderr.isascii()
        assert "+-" in stdout  # the table is drawn with ASCII borders
    # The error line is a styled Text (not laid out by Rich's string path): the stream itself escapes.
    result = _retina("retrieve", hostile / "µm→ missing.png", "--store", hostile / "µm→ no store",
                     env={"PYTHONIOENCODING": encoding}, capture_output=True)
    stderr = result.stderr.decode(encoding)
    assert result.returncode not in (EXIT_OK, 120) and "Traceback" not in stderr
    error_lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and "\\u2192 no store" in error_lines[0]


def test_closed_pipe_exits_quietly(hostile):
    """`retina inspect DIR --json | head -0`: the reader is gone before the first write."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        for extra in (("--json",), ()):
            result = _retina("inspect", hostile, *extra, stdout=write_end, stderr=subprocess.PIPE)
            assert result.returncode == EXIT_BROKEN_PIPE == 141
            assert result.stderr == b""  # no traceback, no "Exception ignored ... BrokenPipeError"
        # `2>&1 | head`: stderr's reader gone too; the data on stdout is still written whole.
        result = _retina("inspect", hostile, stdout=subprocess.PIPE, stderr=write_end, text=True)
        assert result.returncode == EXIT_BROKEN_PIPE  # the unreadable table on stderr could not be written
        assert "11 item(s)" in result.stdout and "oct esc\\x1b[2Jx" in result.stdout
    finally:
        os.close(write_end)


def test_head_takes_the_first_line(hostile):
    shell = f"{sys.executable} -m retinacli.cli inspect \"$1\" --json | head -1"
    result = subprocess.run(["sh", "-c", shell, "sh", str(hostile)], capture_output=True, text=True)
    assert result.stdout == "{\n" and "Traceback" not in result.stderr and result.stderr == ""


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this system")
def test_full_disk_is_one_error_line(hostile):
    for extra in (("--json",), ()):
        with open("/dev/full", "w") as full:
            result = _retina("inspect", hostile, *extra, stdout=full, stderr=subprocess.PIPE, text=True)
        assert result.returncode == EXIT_NOTHING_DONE
        assert result.stderr.splitlines() == ["error: cannot write to stdout: No space left on device"]
