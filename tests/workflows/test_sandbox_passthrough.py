"""The modules the control worker's sandbox shares between workflow runs hold nothing a run could change."""

from __future__ import annotations

import importlib
import types
from enum import Enum

import pytest
from temporalio.common import SearchAttributeKey

from activities.worker import SANDBOX_PASSTHROUGH_MODULES

# Values a workflow run can neither mutate nor use to leak state into another run.
_IMMUTABLE = (str, int, float, bool, bytes, frozenset, type(None), Enum, SearchAttributeKey)


def _immutable(value: object) -> bool:
    if isinstance(value, tuple):
        return all(_immutable(item) for item in value)
    # Classes (dataclasses and enums included) and functions are definitions, rebound by no workflow code.
    return isinstance(value, (type, types.FunctionType, types.ModuleType, *_IMMUTABLE))


@pytest.mark.parametrize("name", SANDBOX_PASSTHROUGH_MODULES)
def test_passed_through_module_holds_only_immutable_values(name: str) -> None:
    module = importlib.import_module(name)
    mutable = {
        key: type(value).__name__
        for key, value in vars(module).items()
        if not key.startswith("__") and not _immutable(value) and not _typing_construct(value)
    }
    assert not mutable, f"{name} has module-level state a passed-through module may not hold: {mutable}"


def _typing_construct(value: object) -> bool:
    return type(value).__module__ in {"typing", "__future__"}


def test_a_mutable_value_is_caught() -> None:
    assert not _immutable([1]) and not _immutable({"a": 1}) and not _immutable((1, {2}))
    assert _immutable(("a", frozenset({1})))
