"""The images install kubetune with ``pip install .``: the wheel it builds must hold every module of the product,
and nothing that only tests and benchmarks use."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
PRODUCT = {"kubetune_api": REPO / "api", "kubetune_operator": REPO / "operator", "kubetune_trainer": REPO / "trainer"}


def image_context(target: Path) -> Path:
    """What the Dockerfiles copy into the image before ``pip install .``: a fresh tree, so no earlier build is reused."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, target / name)
    for package, folder in PRODUCT.items():
        shutil.copytree(folder / package, target / folder.name / package, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def test_the_wheel_holds_every_module_of_the_product(tmp_path: Path) -> None:
    (tmp_path / "context").mkdir()
    source = image_context(tmp_path / "context")
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(wheels), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("kubetune-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    expected = {
        path.relative_to(folder).as_posix()
        for package, folder in PRODUCT.items()
        for path in (folder / package).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert expected - shipped == set(), "pip install . (the operator and trainer images) would leave these out"
    assert not {name for name in shipped if name.split("/")[0] not in PRODUCT}, "only the product's packages belong in the wheel"
