"""What a real install carries: the wheel and sdist built from this tree, and the files the Slicer extension's CMake
lists install (CI installs editable, which reads the tree itself and so would not notice a file left out)."""

import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"SpineLabelLib": ROOT / "SpineLabel", "SpineLabelTrainingLib": ROOT / "SpineLabelTraining"}


def _source_files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The sdist built from a copy of the tree, and the wheel built from that sdist, as pip builds it."""
    try:
        if int(version("setuptools").split(".")[0]) < 77:
            pytest.skip("setuptools 77 or later is needed to build (pyproject.toml's build-system)")
    except PackageNotFoundError:
        pytest.skip("setuptools is not installed")
    work = tmp_path_factory.mktemp("build")
    ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.pyc", "*.egg-info", "build", "out", "demo",
                                    ".pytest_cache")
    shutil.copytree(ROOT, work / "src", ignore=ignore)

    def build(kind: str, source: Path) -> Path:
        code = f"from setuptools import build_meta; print(build_meta.build_{kind}({str(work / 'dist')!r}))"
        run = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True, check=False)
        assert run.returncode == 0, run.stderr[-3000:]
        return work / "dist" / run.stdout.strip().splitlines()[-1]

    sdist = build("sdist", work / "src")
    with tarfile.open(sdist) as tar:  # the filter where this Python has it (3.12, and backported to 3.10.12)
        tar.extractall(work / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (unpacked,) = (work / "unpacked").iterdir()
    return sdist, build("wheel", unpacked)


def test_the_wheel_holds_every_file_of_the_packages_and_nothing_else(built):
    """Every module and the default model (weights and card, which labelling reads beside models.py) is installed;
    no test, cache or other file comes along."""
    _, wheel = built
    with zipfile.ZipFile(wheel) as whl:
        names = {n for n in whl.namelist() if ".dist-info/" not in n}
    expected = {f"{package}/{f}" for package, folder in PACKAGES.items() for f in _source_files(folder / package)}
    assert names == expected
    assert {"SpineLabelLib/weights/spinelabel-default.pt", "SpineLabelLib/weights/spinelabel-default.json"} <= names


def test_the_sdist_holds_what_its_tests_and_the_readme_install_need(built):
    """From an unpacked sdist a packager runs README's install (``-c constraints.txt``) and ``python -m pytest``:
    the tests read the Slicer modules and their CMake lists as well as the packages."""
    sdist, _ = built
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = {"constraints.txt", "CMakeLists.txt", "pyproject.toml", "README.md", "LICENSE"}
    for folder in ("SpineLabel", "SpineLabelTraining", "Testing"):
        needed |= {f"{folder}/{f}" for f in _source_files(ROOT / folder)}
    assert needed - names == set()
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def _cmake_list(module: str, variable: str) -> set[str]:
    """A ``set(VARIABLE ...)`` of a module's CMakeLists.txt, ``${MODULE_NAME}`` and its globs expanded."""
    folder = ROOT / module
    cmake = (folder / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", module)
    entries = re.search(rf"set\({variable}(.*?)\)", cmake, re.S).group(1).split()
    files = set()
    for entry in entries:
        glob = re.fullmatch(r"\$\{(\w+)\}", entry)
        if glob:  # file(GLOB VAR RELATIVE ${CMAKE_CURRENT_SOURCE_DIR} CONFIGURE_DEPENDS pattern ...)
            patterns = re.search(rf"file\(GLOB {glob.group(1)}(.*?)\)", cmake, re.S).group(1).split()
            for pattern in patterns:
                if pattern.startswith("${CMAKE_CURRENT_SOURCE_DIR}/"):
                    files |= {str(p.relative_to(folder))
                              for p in folder.glob(pattern.removeprefix("${CMAKE_CURRENT_SOURCE_DIR}/"))}
        else:
            files.add(entry)
    return files


@pytest.mark.parametrize("module", ["SpineLabel", "SpineLabelTraining"])
def test_the_cmake_lists_install_every_file_of_the_module(module):
    """Slicer installs only the files in MODULE_PYTHON_SCRIPTS and MODULE_PYTHON_RESOURCES, each at its path under
    the module folder: a module, panel, icon or model file left out works from the clone and fails in the built
    extension alone."""
    listed = _cmake_list(module, "MODULE_PYTHON_SCRIPTS") | _cmake_list(module, "MODULE_PYTHON_RESOURCES")
    assert listed == _source_files(ROOT / module) - {"CMakeLists.txt"}
