"""Every module says what it exports, and exports what it defines."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import handlers
import listener

MODULES = sorted(
    info.name
    for package in (listener, handlers)
    for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")
)


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist_and_cover_public_definitions(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    for attribute in exported:
        assert hasattr(module, attribute), f"{name}.__all__ names missing {attribute}"
    defined_here = {
        attribute
        for attribute, value in vars(module).items()
        if not attribute.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and value.__module__ == name
    }
    assert defined_here <= set(exported), f"{name} defines but does not export {defined_here}"
