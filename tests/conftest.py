"""Shared test fixtures. Real vendor samples live in ../shared/samples (never copied into the repo)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_SAMPLES = REPO.parent / "shared" / "samples"


@pytest.fixture(scope="session")
def shared_samples() -> Path:
    if not SHARED_SAMPLES.is_dir():
        pytest.skip(f"shared samples not found at {SHARED_SAMPLES}")
    return SHARED_SAMPLES


# Session fixtures that build data and models once (synthetic cohort, tiny trained run, tiny package).
from browser import browser  # noqa: E402, F401  (headless Chromium, tests/browser.py)
from fixtures_cohort import *  # noqa: E402, F403
from fixtures_models import *  # noqa: E402, F403
from fixtures_packages import *  # noqa: E402, F403
from fixtures_ray import *  # noqa: E402, F403


@pytest.fixture(scope="session", autouse=True)
def _training_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Training caches of the session's runs go to a temp folder, not the user's ~/.retina."""
    import os

    os.environ.setdefault("RETINA_TRAIN_CACHE", str(tmp_path_factory.mktemp("train_cache")))


@pytest.fixture
def private_home(monkeypatch, tmp_path) -> Path:
    """A private $RETINA_HOME (tmp/home: nothing installed, no default model), no $RETINA_MODEL, and an
    empty working folder tmp/work; returns tmp_path. $RETINA_STORE is left to the test."""
    monkeypatch.setenv("RETINA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RETINA_MODEL", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path


@pytest.fixture
def isolated_cli(monkeypatch, tmp_path):
    """No $RETINA_STORE / $RETINA_MODEL, wide tables, and an empty working folder tmp/work."""
    monkeypatch.delenv("RETINA_STORE", raising=False)
    monkeypatch.delenv("RETINA_MODEL", raising=False)
    monkeypatch.setenv("COLUMNS", "250")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work
