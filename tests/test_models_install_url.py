"""`retina models install URL`: packages served by a real http.server on 127.0.0.1 (started here)."""

from __future__ import annotations

import hashlib
import io
import json
import stat
import tarfile
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fixtures_cli import run_cli as run
from fixtures_packages import make_toy_package

pytest.importorskip("onnx")


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@pytest.fixture
def served(tmp_path):
    """(folder, base URL): every file put in the folder is served over HTTP on 127.0.0.1."""
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def home(private_home, monkeypatch):
    for env in ("RETINA_INSTALL_MAX_DOWNLOAD_BYTES", "RETINA_INSTALL_MAX_EXTRACT_BYTES",
                "RETINA_INSTALL_MAX_ENTRIES"):
        monkeypatch.delenv(env, raising=False)
    return private_home / "home"


def snapshot(home: Path) -> list[str]:
    """Everything under $RETINA_HOME (temp downloads and staging folders included)."""
    return sorted(str(p.relative_to(home)) for p in home.rglob("*")) if home.exists() else []


def tar_gz(folder: Path, dest: Path, top: str | None = "toy") -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=f"{top}/{path.name}" if top else path.name)
    return dest


def zip_of(folder: Path, dest: Path, top: str | None = None) -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, f"{top}/{path.name}" if top else path.name)
    return dest


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error_line(stderr: str, url: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert url in lines[0]
    return lines[0]


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_pinned_archive_installs_a_verified_package(home, served, tmp_path, kind):
    root, base = served
    package = make_toy_package(tmp_path / "src" / "toy", version="2.0.0")
    archive = tar_gz(package, root / "toy.tar.gz") if kind == "tar.gz" else zip_of(package, root / "toy.zip")
    url = f"{base}/{archive.name}"
    code, stdout, stderr = run("models", "install", url, "--sha256", sha(archive).upper(), "--json")
    assert code == 0, stderr
    target = home / "models" / "toy-2.0.0"
    assert json.loads(stdout) == {"installed": str(target)}
    assert "warning" not in stderr
    # the installed files are byte for byte the published ones, nothing else was left in $RETINA_HOME
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in package.iterdir())
    assert all((target / p.name).read_bytes() == p.read_bytes() for p in package.iterdir())
    assert snapshot(home) == ["models", "models/toy-2.0.0"] + [f"models/toy-2.0.0/{p.name}"
                                                             for p in sorted(package.iterdir())]
    code, stdout, _ = run("models", "list", "--json")
    assert [(p["name"], p["version"]) for p in json.loads(stdout)["packages"]] == [("toy", "2.0.0")]
    from retinacli.engine import Engine

    engine = Engine.load("toy@2.0.0", threads=1)
    assert engine.model_id.startswith("toy@2.0.0+")
    assert run("models", "verify", "toy@2.0.0")[0] == 0


def test_model_id_pin_and_no_pin_warning(home, served, tmp_path):
    root, base = served
    package = make_toy_package(tmp_path / "src" / "toy")
    from retinacli.package import model_id_for, read_descriptor

    model_id = model_id_for(read_descriptor(package))
    url = f"{base}/{tar_gz(package, root / 'toy.tar.gz', top=None).name}"  # package at the archive's top
    code, _, stderr = run("models", "install", url, "--model-id", model_id)
    assert code == 0, stderr
    assert "warning" not in stderr and (home / "models" / "toy-1.0.0" / "retina.json").is_file()
    # no pin: installs, with the warning on stderr
    code, stdout, stderr = run("models", "install", url, "--force")
    assert code == 0, stderr
    assert "no --sha256 or --model-id pin" in stderr and "swapped archive" in " ".join(stderr.split())
    assert "installed" in stdout
    # --model-id pins a local folder too
    wrong = "toy@1.0.0+000000000000"
    code, _, stderr = run("models", "install", str(package), "--force", "--model-id", wrong)
    assert code == 3 and "differs from the pinned --model-id" in stderr


def test_wrong_pins_and_a_tampered_archive_are_refused(home, served, tmp_path):
    root, base = served
    package = make_toy_package(tmp_path / "src" / "toy")
    archive = tar_gz(package, root / "toy.tar.gz")
    url = f"{base}/toy.tar.gz"
    before = snapshot(home)
    code, _, stderr = run("models", "install", url, "--sha256", "0" * 64)
    assert code == 3
    assert f"archive sha256 {sha(archive)} differs" in one_error_line(stderr, url)
    code, _, stderr = run("models", "install", url, "--model-id", "toy@1.0.0+000000000000")
    assert code == 3
    assert "differs from the pinned --model-id toy@1.0.0+000000000000" in one_error_line(stderr, url)
    # one byte of an onnx changed after the descriptor was written: the descriptor check refuses it
    onnx = package / "head_cst.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    tampered = tar_gz(package, root / "tampered.tar.gz")
    turl = f"{base}/tampered.tar.gz"
    code, _, stderr = run("models", "install", turl, "--sha256", sha(tampered))  # pinned to the tampered one
    assert code == 3
    assert "head_cst.onnx: sha256 mismatch with the descriptor" in one_error_line(stderr, turl)
    assert snapshot(home) == before == []
    # a bad sha256 value and --sha256 with a folder are usage errors
    assert run("models", "install", url, "--sha256", "xyz")[0] == 2
    assert run("models", "install", str(package), "--sha256", "0" * 64)[0] == 2


def _tar_with(dest: Path, package: Path, extra: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        for path in sorted(package.iterdir()):
            tar.add(path, arcname=path.name)
        tar.addfile(extra, io.BytesIO(data) if data else None)
    return dest


def _info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, link
    return info


def _zip_with(dest: Path, package: Path, name: str, data: bytes, mode: int | None = None) -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(package.iterdir()):
            zf.write(path, path.name)
        info = zipfile.ZipInfo(name)
        info.compress_type = zipfile.ZIP_DEFLATED
        if mode is not None:
            info.external_attr = mode << 16
        zf.writestr(info, data)
    return dest


def test_unsafe_archive_entries_are_refused(home, served, tmp_path):
    root, base = served
    package = make_toy_package(tmp_path / "src" / "toy")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        "dotdot.tar.gz": (_tar_with(root / "dotdot.tar.gz", package, _info("../evil.onnx", size=4), b"evil"),
                          "'../evil.onnx' has '..' in its path"),
        "abs.tar.gz": (_tar_with(root / "abs.tar.gz", package, _info("/tmp/evil.onnx", size=4), b"evil"),
                       "'/tmp/evil.onnx' has an absolute path"),
        "sym.tar.gz": (_tar_with(root / "sym.tar.gz", package, _info("x.json", tarfile.SYMTYPE, link="/etc")),
                       "'x.json' is a link"),
        "hard.tar.gz": (_tar_with(root / "hard.tar.gz", package,
                                  _info("x.json", tarfile.LNKTYPE, link="retina.json")),
                        "'x.json' is a link"),
        "dev.tar.gz": (_tar_with(root / "dev.tar.gz", package, _info("null", tarfile.CHRTYPE)),
                       "'null' is a device, FIFO or special file"),
        "dup.tar.gz": (_tar_with(root / "dup.tar.gz", package, _info("./retina.json", size=2), b"{}"),
                       "'./retina.json' appears twice"),
        "dotdot.zip": (_zip_with(root / "dotdot.zip", package, "a/../../evil.onnx", b"evil"),
                       "'a/../../evil.onnx' has '..' in its path"),
        "abs.zip": (_zip_with(root / "abs.zip", package, "/evil.onnx", b"evil"),
                    "'/evil.onnx' has an absolute"),
        "sym.zip": (_zip_with(root / "sym.zip", package, "x.json", b"/etc/passwd", stat.S_IFLNK | 0o777),
                    "'x.json' is a link"),
        "nopkg.zip": (_zip_with(root / "nopkg.zip", empty, "readme.txt", b"hi"),
                      "no retina.json at the archive's top or in one top-level folder"),
    }
    before = snapshot(home)
    for name, (archive, reason) in cases.items():
        url = f"{base}/{name}"
        code, _, stderr = run("models", "install", url, "--sha256", sha(archive))
        assert code == 3, (name, stderr)
        assert reason in one_error_line(stderr, url), name
        assert snapshot(home) == before, name
    assert not (tmp_path / "evil.onnx").exists() and not (tmp_path / "www" / "evil.onnx").exists()


def test_size_caps_stop_bombs_and_oversize_downloads(home, served, tmp_path, monkeypatch):
    root, base = served
    package = make_toy_package(tmp_path / "src" / "toy")
    # 16 MiB of zeros deflates to a few KiB: a small archive that would extract far past the cap
    bomb = _zip_with(root / "bomb.zip", package, "zeros.json", bytes(16 << 20))
    assert bomb.stat().st_size < 200_000
    tar_bomb = _tar_with(root / "bomb.tar.gz", package, _info("zeros.json", size=16 << 20), bytes(16 << 20))
    monkeypatch.setenv("RETINA_INSTALL_MAX_EXTRACT_BYTES", str(1 << 20))
    for archive in (bomb, tar_bomb):
        url = f"{base}/{archive.name}"
        code, _, stderr = run("models", "install", url, "--sha256", sha(archive))
        assert code == 3, stderr
        assert "'zeros.json' (16777216 bytes) exceeds the 1048576-byte extraction cap" in one_error_line(
            stderr, url)
    monkeypatch.delenv("RETINA_INSTALL_MAX_EXTRACT_BYTES")
    monkeypatch.setenv("RETINA_INSTALL_MAX_ENTRIES", "3")
    url = f"{base}/{zip_of(package, root / 'many.zip').name}"
    code, _, stderr = run("models", "install", url, "--sha256", sha(root / "many.zip"))
    assert code == 3 and "over the 3 cap" in one_error_line(stderr, url)
    monkeypatch.delenv("RETINA_INSTALL_MAX_ENTRIES")
    monkeypatch.setenv("RETINA_INSTALL_MAX_DOWNLOAD_BYTES", "1000")
    code, _, stderr = run("models", "install", url, "--sha256", sha(root / "many.zip"))
    size = (root / "many.zip").stat().st_size
    assert code == 3
    assert f"archive is {size} bytes, over the 1000-byte download cap" in one_error_line(stderr, url)
    assert snapshot(home) == []


def test_unreachable_urls_are_usage_errors(home, served):
    _, base = served
    url = f"{base}/missing.tar.gz"
    code, _, stderr = run("models", "install", url, "--sha256", "0" * 64)
    assert code == 2
    assert "download failed: HTTP 404" in one_error_line(stderr, url)
    assert snapshot(home) == []
