"""Layering: the operator never loads torch or the trainer, the trainer never loads kopf, the shared contract loads neither."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.unit


def modules_loaded_after_importing(package: str, *, only: tuple[str, ...] = ()) -> set[str]:
    """Import every module of a package (or just ``only``) in a fresh interpreter and list what got loaded."""
    code = textwrap.dedent(
        f"""
        import importlib, pkgutil, sys
        package = importlib.import_module({package!r})
        names = {list(only)!r} or [m.name for m in pkgutil.walk_packages(package.__path__, {package!r} + ".")]
        for name in names:
            if not name.endswith("__main__"):
                importlib.import_module(name)
        print("\\n".join(sorted({{m.split(".")[0] for m in sys.modules}})))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(out.split())


def test_operator_never_imports_torch() -> None:
    loaded = modules_loaded_after_importing("kubetune_operator")
    assert "kubetune_operator" in loaded
    assert not loaded & {"torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets"}


def test_operator_never_imports_the_trainer() -> None:
    """What both sides share comes from the contract package; the operator image need not ship the trainer."""
    loaded = modules_loaded_after_importing("kubetune_operator", only=("kubetune_operator.__main__",))
    loaded |= modules_loaded_after_importing("kubetune_operator")
    assert "kubetune_api" in loaded
    assert "kubetune_trainer" not in loaded


def test_trainer_never_imports_kopf() -> None:
    loaded = modules_loaded_after_importing("kubetune_trainer")
    assert "kubetune_trainer" in loaded
    assert not loaded & {"kopf", "kubernetes", "kubetune_operator"}


def test_shared_contract_imports_neither() -> None:
    loaded = modules_loaded_after_importing("kubetune_api")
    assert "kubetune_api" in loaded
    assert not loaded & {"torch", "kopf", "kubernetes", "transformers", "kubetune_operator", "kubetune_trainer"}
