"""Where the project keeps things: the models folder is configurable and never inside site-packages."""

from __future__ import annotations

import site
from pathlib import Path

from inspector import paths


def test_models_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("INSPECTOR_MODELS", str(tmp_path / "weights"))
    assert paths.models_dir() == tmp_path / "weights"


def test_models_dir_in_a_checkout_is_the_checkouts_models_folder(monkeypatch):
    monkeypatch.delenv("INSPECTOR_MODELS", raising=False)
    here = Path(__file__).resolve().parents[1]
    assert paths.models_dir() == here / "models"


def test_models_dir_of_an_installed_package_is_under_the_data_dir(monkeypatch, tmp_path):
    """A wheel install has no checkout around the package: weights go under the data dir, not into
    site-packages (where ``parents[2]/"models"`` used to land)."""
    monkeypatch.delenv("INSPECTOR_MODELS", raising=False)
    monkeypatch.setenv("INSPECTOR_DATA", str(tmp_path / "data"))
    fake_site = tmp_path / "site-packages"
    monkeypatch.setattr(paths, "_CHECKOUT", fake_site)  # as installed: <site-packages>/inspector/paths.py
    got = paths.models_dir()
    assert got == (tmp_path / "data").resolve() / "models"
    for sp in [*site.getsitepackages(), str(fake_site)]:
        assert not str(got).startswith(str(Path(sp).resolve()) + "/"), got


def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("INSPECTOR_DATA", str(tmp_path / "env"))
    assert paths.data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert paths.data_dir() == tmp_path / "env"
    monkeypatch.delenv("INSPECTOR_DATA")
    assert paths.data_dir() == Path("data")


def test_product_names_are_one_rule():
    assert paths.NAME_RE.fullmatch("brick-2_a.b")
    for bad in ("", "../etc", ".hidden", "a/b", "x" * 65, "na me"):
        assert not paths.NAME_RE.fullmatch(bad), bad
