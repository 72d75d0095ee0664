"""A variant swapped in is frozen with the rest of the long-lived heap (`realtime.engine.hotswap`,
`realtime.heap`); a failed build freezes nothing."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from realtime.engine.hotswap import VariantSwap
from tests.support.heap_state import unfrozen_heap

WAIT_S = 30.0  # generous: only a hang fails these waits
BUILT_OBJECTS = 1_000


@pytest.fixture(autouse=True)
def _nothing_frozen() -> Iterator[None]:
    with unfrozen_heap():  # an earlier test's sidecar warm-up may have frozen the heap
        yield


def build_graphs() -> list[list[int]]:
    """Stands in for a compiled variant: many tracked objects that live as long as the process."""
    return [[index] for index in range(BUILT_OBJECTS)]


def test_the_installed_variant_is_frozen_once_swapped_in() -> None:
    installed: list[list[list[int]]] = []
    swap: VariantSwap[list[list[int]]] = VariantSwap("eager-graphs")
    assert gc.get_freeze_count() == 0

    swap.start("compiled-graphs", build_graphs, installed.append)

    assert swap.wait(WAIT_S)
    assert swap.state().variant == "compiled-graphs"
    assert gc.get_freeze_count() >= BUILT_OBJECTS
    (built,) = installed
    scanned = {id(obj) for obj in gc.get_objects()}  # every generation a collection scans
    assert id(built) not in scanned and not any(id(graph) in scanned for graph in built)


def test_a_failed_build_freezes_nothing() -> None:
    swap: VariantSwap[list[list[int]]] = VariantSwap("eager-graphs")

    def build() -> list[list[int]]:
        build_graphs()
        raise RuntimeError("inductor ran out of shared memory")

    swap.start("compiled-graphs", build, lambda built: None)

    assert swap.wait(WAIT_S)
    assert swap.state().error == "RuntimeError: inductor ran out of shared memory"
    assert gc.get_freeze_count() == 0


def test_a_failed_install_freezes_nothing() -> None:
    swap: VariantSwap[list[list[int]]] = VariantSwap("eager-graphs")

    def install(built: list[list[int]]) -> None:
        raise ValueError(f"cannot install {len(built)} graphs")

    swap.start("compiled-graphs", build_graphs, install)

    assert swap.wait(WAIT_S)
    assert swap.state().error == f"ValueError: cannot install {BUILT_OBJECTS} graphs"
    assert gc.get_freeze_count() == 0
