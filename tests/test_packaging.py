"""Packaging: the wheel's package list names every package folder, under non-generic names."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_installed_under_an_erstore_name():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = {folder: name for name, folder in config["package-dir"].items()}
    found = set()
    for init in [*ROOT.glob("erstore/**/__init__.py"), *ROOT.glob("consumers/**/__init__.py")]:
        parts = init.parent.relative_to(ROOT).parts
        top = mapping.get(parts[0], parts[0])
        found.add(".".join((top, *parts[1:])))
    assert set(config["packages"]) == found
    assert all(name.split(".")[0] in ("erstore", "erstore_consumers") for name in config["packages"])


def test_license_ships_and_build_requirements_suffice():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0" and "LICENSE" in project["project"]["license-files"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    # The string form of `license` needs setuptools >= 77 (70.x refuses it).
    assert project["build-system"]["requires"] == ["setuptools>=77"]
