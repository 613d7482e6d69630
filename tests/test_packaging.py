"""Packaging: the wheel ships exactly the source tree, the backend never imports Textual, the
folders are not importable on their own, and the `corral` command works."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from support import clean_env

REPO = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = ("backend", "console", "themes")
DATA_SUFFIXES = (".tcss",)
BUILD_JUNK = {".venv", ".git", "build", "dist", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}


def run_python(code: str, cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=clean_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def source_files() -> set[str]:
    """Every module (and data file) of the three package folders, as its path inside the wheel."""
    found: set[str] = set()
    for folder in PACKAGE_DIRS:
        for path in (REPO / folder).rglob("*"):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            if path.suffix == ".py" or path.suffix in DATA_SUFFIXES:
                found.add("corral/" + path.relative_to(REPO).as_posix())
    return found


def _ignore(directory: str, names: list[str]) -> set[str]:
    return {n for n in names if n in BUILD_JUNK or n.endswith(".egg-info") or n.endswith(".pyc")}


# --- the wheel ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """Build the wheel from a copy of the repository (so no build/ or egg-info lands in the
    shared checkout), with a stray root module added to prove root files do not leak."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=_ignore)
    (src / "stray_root_module.py").write_text("raise RuntimeError('must not be packaged')\n")
    out = root / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-q", "-w", str(out), str(src)],
        cwd=root, env=clean_env(), capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, f"wheel build failed:\n{proc.stdout}\n{proc.stderr}"
    wheels = list(out.glob("corral-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as archive:
        yield archive


@pytest.mark.timeout(300)
def test_wheel_modules_match_the_source_tree(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    shipped = {n for n in names if n.startswith("corral/") and (n.endswith(".py") or n.endswith(DATA_SUFFIXES))}
    expected = source_files()
    assert {"corral/backend/__init__.py", "corral/console/cli.py"} <= expected  # sanity of the scan
    missing = sorted(expected - shipped)
    extra = sorted(shipped - expected)
    assert not missing, f"in the source tree but not in the wheel (add them to [tool.setuptools]): {missing}"
    assert not extra, f"in the wheel but not in the source tree: {extra}"


@pytest.mark.timeout(300)
def test_nothing_from_the_repo_root_leaks_into_the_wheel(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    top = {n.split("/", 1)[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert len(dist_info) == 1
    assert top - dist_info == {"corral"}, f"unexpected top-level entries: {sorted(top - dist_info)}"
    assert "corral/__init__.py" not in names  # corral is a namespace package
    for name in names:
        parts = name.split("/")
        assert not (len(parts) > 1 and parts[1] in ("tests", "stray_root_module.py")), name
        assert "conftest" not in name and "ggufs" not in name, name
        assert "__pycache__" not in name and not name.endswith(".pyc"), name
    root_modules = {p.name for p in REPO.glob("*.py")} | {"stray_root_module.py"}
    for module in root_modules:
        assert not any(n.endswith("/" + module) and n.count("/") == 1 for n in names), module


@pytest.mark.timeout(300)
def test_wheel_declares_the_console_script(wheel: zipfile.ZipFile) -> None:
    entry_points = next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))
    text = wheel.read(entry_points).decode()
    assert "[console_scripts]" in text
    assert any(line.replace(" ", "") == "corral=corral.console.cli:main" for line in text.splitlines())


# --- imports --------------------------------------------------------------------------------


def test_backend_import_does_not_load_textual(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "import corral.backend\n"
        "from corral.backend import LocalBackend\n"
        "import corral.backend.config, corral.backend.events, corral.backend.chat\n"
        "loaded = sorted(m for m in sys.modules if m == 'textual' or m.startswith('textual.'))\n"
        "print('TEXTUAL:', loaded)\n"
        "assert LocalBackend is not None\n"
    )
    proc = run_python(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "TEXTUAL: []" in proc.stdout, proc.stdout


def test_cli_import_does_not_load_textual(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "import corral.console.cli\n"
        "print('TEXTUAL:', sorted(m for m in sys.modules if m.split('.')[0] == 'textual'))\n"
    )
    proc = run_python(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "TEXTUAL: []" in proc.stdout, proc.stdout


def test_the_control_case_textual_is_detectable(tmp_path: Path) -> None:
    """Guards the check above: importing textual does show up in sys.modules."""
    proc = run_python("import sys, textual; print('textual' in sys.modules)", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"


@pytest.mark.parametrize("name", PACKAGE_DIRS)
def test_folders_are_not_importable_by_their_own_names(tmp_path: Path, name: str) -> None:
    proc = run_python(f"import {name}", cwd=tmp_path)
    assert proc.returncode != 0
    assert "ModuleNotFoundError" in proc.stderr and repr(name) in proc.stderr


def test_corral_is_a_namespace_package_spanning_the_folders(tmp_path: Path) -> None:
    code = (
        "import corral, corral.backend, corral.console, corral.themes, pathlib\n"
        "print(getattr(corral, '__file__', None))\n"
        "for m in (corral.backend, corral.console, corral.themes):\n"
        "    print(pathlib.Path(m.__file__).resolve().parent.name)\n"
    )
    proc = run_python(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    assert lines[0] == "None"
    assert lines[1:] == list(PACKAGE_DIRS)


# --- the command ----------------------------------------------------------------------------


def corral_script() -> Path:
    bindir = Path(sys.executable).parent
    script = bindir / ("corral.exe" if os.name == "nt" else "corral")
    return script


def test_console_script_exists_and_help_works(tmp_path: Path) -> None:
    script = corral_script()
    assert script.is_file(), f"{script} missing: reinstall the project (pip install -e .)"
    assert os.access(script, os.X_OK)
    proc = subprocess.run([str(script), "--help"], cwd=tmp_path, env=clean_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "models" in proc.stdout
    assert "run" in proc.stdout
    assert proc.stdout.startswith("usage: corral")


def test_models_json_with_no_models_prints_an_empty_list(tmp_path: Path) -> None:
    empty = tmp_path / "no-models-here"
    empty.mkdir()
    config = tmp_path / "corral.toml"
    config.write_text(f"include_default_model = false\nmodel_dirs = [{json.dumps(str(empty))}]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "corral.console.cli", "models", "--json"],
        cwd=tmp_path, env=clean_env(CORRAL_CONFIG=str(config), XDG_CONFIG_HOME=str(tmp_path / "xdg")),
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
    assert proc.stdout.strip() == "[]"


def test_models_with_a_bad_config_exits_1_with_the_message(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[defaults]\nn_parallel = 0\n")
    proc = subprocess.run(
        [sys.executable, "-m", "corral.console.cli", "models", "--json"],
        cwd=tmp_path, env=clean_env(CORRAL_CONFIG=str(config)), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert "defaults.n_parallel" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""
