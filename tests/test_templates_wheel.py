"""Packaging: the card templates live in the top-level templates/ folder and ship as the package
`shipkit.templates` (pyproject.toml's [tool.setuptools.package-dir], setup.py's package list).

The project is copied to tmp_path and built there (pip, no build isolation, no index), so the
shared tree gets no build/ folder. A card is then rendered in a fresh interpreter from the
unpacked wheel (as pip installs it), from an editable install in a private prefix and from the
uninstalled copy, and must equal the card this checkout renders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from release_helpers import build_release_run

from shipkit.card import render_card

REPO_ROOT = Path(__file__).resolve().parent.parent
PROJECT_FILES = ("pyproject.toml", "setup.py", "README.md")
PROJECT_FOLDERS = ("shipkit", "templates")
REPO = "shipkit-org/tiny-code"
CARDS = ("README.md", "gguf/README.md")
# This interpreter's installed packages (shipkit's dependencies) without their .pth files: run
# with `python -S` on these, neither this checkout nor an editable install of it is importable.
INSTALLED_LIBS = list(dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]))
# Where shipkit, the `shipkit.templates` package and the card template come from, after a card
# rendered into the run folder argv[2]. argv[1]: a site folder whose .pth files to process first.
RENDER_SCRIPT = """
import importlib.util, json, site, sys
if sys.argv[1]:
    site.addsitedir(sys.argv[1])
import shipkit
from shipkit.card import card_environment, render_card
render_card(sys.argv[2], repo_id=sys.argv[3])
package = importlib.util.find_spec("shipkit.templates")
print(json.dumps({"shipkit": shipkit.__file__, "package": package and package.origin,
                  "template": card_environment()[0].get_template("model-card.md.j2").filename}))
"""


def _pip(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps", "--no-build-isolation", "--no-index",
                             "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the files a build reads (no bytecode, no build leftovers)."""
    root = tmp_path_factory.mktemp("project") / "shipkit-src"
    root.mkdir()
    for name in PROJECT_FILES:
        shutil.copy(REPO_ROOT / name, root / name)
    for name in PROJECT_FOLDERS:
        shutil.copytree(REPO_ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.fixture(scope="module")
def wheel(project, tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    _pip("wheel", "-w", str(dist), str(project))
    (built,) = dist.glob("shipkit-*.whl")
    return built


@pytest.fixture(scope="module")
def release_run(tiny_run_dir, tmp_path_factory) -> Path:
    return build_release_run(tiny_run_dir, tmp_path_factory.mktemp("release") / "run")


def _render_elsewhere(run_dir: Path, *, first_on_path: Path | None = None,
                     site_dir: Path | None = None) -> dict[str, Path | None]:
    """RENDER_SCRIPT in `python -S`, run from `run_dir`'s parent, with `first_on_path` before the
    installed libraries; the paths it reports, resolved."""
    path = ([str(first_on_path)] if first_on_path else []) + INSTALLED_LIBS
    result = subprocess.run([sys.executable, "-S", "-c", RENDER_SCRIPT, str(site_dir or ""), str(run_dir), REPO],
                            cwd=run_dir.parent, env={**os.environ, "PYTHONPATH": os.pathsep.join(path)},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    where = json.loads(result.stdout.splitlines()[-1])
    return {key: None if value is None else Path(value).resolve() for key, value in where.items()}


def _assert_same_cards(run_dir: Path, reference: Path) -> None:
    for card in CARDS:
        assert (run_dir / "release" / "card" / card).read_text() == (reference / "release" / "card" / card).read_text()


@pytest.fixture(scope="module")
def reference_run(release_run, tmp_path_factory) -> Path:
    """The release run's cards rendered by this checkout, for the installed copies to match."""
    run_dir = shutil.copytree(release_run, tmp_path_factory.mktemp("reference") / "run")
    render_card(run_dir, repo_id=REPO)
    return run_dir


def test_wheel_ships_every_card_template_in_the_shipkit_templates_package(project, wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = sorted(path.name for path in (project / "templates").glob("*.j2"))
    assert templates == ["_files.md.j2", "_parity.md.j2", "gguf-card.md.j2", "model-card.md.j2"]
    assert {f"shipkit/templates/{name}" for name in templates} | {"shipkit/templates/__init__.py"} <= names
    assert not [name for name in names if name.startswith("templates/")]


def test_wheel_ships_every_file_of_the_shipkit_package(project, wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    files = [path.relative_to(project).as_posix() for path in (project / "shipkit").rglob("*")
             if path.is_file() and "__pycache__" not in path.parts]
    assert files and not [name for name in files if name not in names]


def test_card_from_an_installed_wheel_uses_its_packaged_templates(wheel, release_run, reference_run, tmp_path):
    site = tmp_path / "site-packages"
    zipfile.ZipFile(wheel).extractall(site)
    run_dir = shutil.copytree(release_run, tmp_path / "run")
    package = site.resolve() / "shipkit"
    assert _render_elsewhere(run_dir, first_on_path=site) == {
        "shipkit": package / "__init__.py", "package": package / "templates" / "__init__.py",
        "template": package / "templates" / "model-card.md.j2"}
    _assert_same_cards(run_dir, reference_run)


def test_card_from_an_editable_install_uses_the_top_level_templates_folder(project, release_run, reference_run,
                                                                           tmp_path):
    prefix = tmp_path / "prefix"
    # --ignore-installed: without it pip first uninstalls the shipkit this interpreter has
    # installed, wherever the new one goes.
    _pip("install", "--ignore-installed", "--prefix", str(prefix), "-e", str(project))
    (pth,) = prefix.rglob("__editable__.shipkit-*.pth")
    run_dir = shutil.copytree(release_run, tmp_path / "run")
    root = project.resolve()
    # First on sys.path too: its finder module has the same name as that of an editable install of
    # this checkout among the installed libraries, and the first found is the one imported.
    assert _render_elsewhere(run_dir, first_on_path=pth.parent, site_dir=pth.parent) == {
        "shipkit": root / "shipkit" / "__init__.py", "package": root / "templates" / "__init__.py",
        "template": root / "templates" / "model-card.md.j2"}
    _assert_same_cards(run_dir, reference_run)


def test_card_from_an_uninstalled_checkout_uses_its_templates_folder(project, release_run, reference_run, tmp_path):
    run_dir = shutil.copytree(release_run, tmp_path / "run")
    root = project.resolve()
    assert _render_elsewhere(run_dir, first_on_path=project) == {
        "shipkit": root / "shipkit" / "__init__.py", "package": None,
        "template": root / "templates" / "model-card.md.j2"}
    _assert_same_cards(run_dir, reference_run)
