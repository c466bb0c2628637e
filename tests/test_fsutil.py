"""retinacli.fsutil: a failed write leaves the old file whole and no temp file behind; folders swap whole."""

from __future__ import annotations

import json
import os

import pytest

from retinacli import fsutil


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_writes_replace_the_file(tmp_path):
    target = tmp_path / "a.json"
    fsutil.atomic_write_bytes(target, b"old")
    assert target.read_bytes() == b"old"
    fsutil.atomic_write_text(target, "µ new\n")
    assert target.read_text(encoding="utf-8") == "µ new\n"
    fsutil.atomic_write_json(target, {"k": [1, 2], "µ": "ü"})
    assert json.loads(target.read_text(encoding="utf-8")) == {"k": [1, 2], "µ": "ü"}
    assert target.read_text(encoding="utf-8").endswith("}\n") and "ü" in target.read_text(encoding="utf-8")
    assert _leftovers(tmp_path) == []


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "heads.json"
    target.write_text("old contents")
    with pytest.raises(RuntimeError, match="writer died"), fsutil.atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("writer died")
    assert target.read_text() == "old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads.json"]


def test_a_value_that_cannot_be_serialised_keeps_the_old_file(tmp_path):
    target = tmp_path / "config.json"
    fsutil.atomic_write_json(target, {"default_model": "a"})
    with pytest.raises(TypeError):
        fsutil.atomic_write_json(target, {"default_model": object()})
    assert json.loads(target.read_text()) == {"default_model": "a"}
    assert _leftovers(tmp_path) == []


def test_atomic_path_gives_writers_a_file_name_beside_the_target(tmp_path):
    target = tmp_path / "last.pt"
    with fsutil.atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target and not target.exists()
        with open(tmp, "wb") as handle:  # as torch.save(obj, tmp) does
            handle.write(b"\x00" * 10)
    assert target.read_bytes() == b"\x00" * 10 and _leftovers(tmp_path) == []


def test_replace_dir_swaps_a_folder_whole(tmp_path):
    target = tmp_path / "pkg"
    target.mkdir()
    (target / "old.onnx").write_bytes(b"old")
    staging = fsutil.staging_dir(target)
    assert staging.parent == tmp_path and staging.name.startswith(".pkg.") and list(staging.iterdir()) == []
    (staging / "new.onnx").write_bytes(b"new")
    assert fsutil.replace_dir(staging, target) == target
    assert sorted(p.name for p in target.iterdir()) == ["new.onnx"]  # nothing of the old folder is left
    assert (target / "new.onnx").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]  # no staging or old folder left


def test_replace_dir_creates_a_new_folder(tmp_path):
    staging = fsutil.staging_dir(tmp_path / "sub" / "pkg")
    (staging / "f").write_text("x")
    fsutil.replace_dir(staging, tmp_path / "sub" / "pkg")
    assert (tmp_path / "sub" / "pkg" / "f").read_text() == "x"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["pkg"]


def test_building_dir_keeps_the_old_folder_when_building_fails(tmp_path):
    target = tmp_path / "pkg"
    target.mkdir()
    (target / "retina.json").write_text("{}")
    with pytest.raises(OSError, match="disk full"), fsutil.building_dir(target) as staging:
        (staging / "retina.json").write_text('{"half": ')
        raise OSError("disk full")
    assert sorted(p.name for p in target.iterdir()) == ["retina.json"]
    assert (target / "retina.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]
    with fsutil.building_dir(target) as staging:
        (staging / "retina.json").write_text('{"v": 2}')
    assert json.loads((target / "retina.json").read_text()) == {"v": 2}


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
def test_the_store_secret_is_owner_only_and_written_once(tmp_path):
    from retinacli.privacy import SECRET_FILE, load_or_create_secret

    key = load_or_create_secret(tmp_path / "store")
    path = tmp_path / "store" / SECRET_FILE
    assert len(key) == 32 and path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_secret(tmp_path / "store") == key
    assert sorted(p.name for p in path.parent.iterdir()) == [SECRET_FILE]


def test_the_default_model_setting_is_written_atomically(tmp_path, monkeypatch):
    from retinacli.package import get_default_model, set_default_model

    monkeypatch.setenv("RETINA_HOME", str(tmp_path / "home"))
    config = set_default_model("demo-clip")
    assert get_default_model() == "demo-clip"
    assert json.loads(config.read_text()) == {"default_model": "demo-clip"}
    set_default_model(None)
    assert get_default_model() is None and _leftovers(config.parent) == []
