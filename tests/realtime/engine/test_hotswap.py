"""Serving on a quick variant while a faster one is built in the background (`realtime.engine.hotswap`)."""

from __future__ import annotations

import logging
import threading

import pytest

from realtime.engine.hotswap import ServingState, VariantSwap

WAIT_S = 30.0  # generous: only a hang fails these waits


def test_the_built_variant_is_installed_on_the_build_thread_and_then_serves() -> None:
    release = threading.Event()
    installed: list[tuple[str, str]] = []
    swap: VariantSwap[str] = VariantSwap("eager-graphs")
    assert swap.state() == ServingState("eager-graphs")

    def build() -> str:
        assert release.wait(WAIT_S)
        return "compiled graphs"

    swap.start(
        "compiled-graphs", build, lambda built: installed.append((built, threading.current_thread().name))
    )
    building = swap.state()
    assert (building.variant, building.building) == ("eager-graphs", "compiled-graphs")
    assert building.describe() == "serving eager-graphs; building compiled-graphs in the background"
    assert not swap.wait(0.01)  # still building: the caller serves on
    with pytest.raises(RuntimeError, match="already under way"):
        swap.start("other", lambda: "x", lambda built: None)
    release.set()
    assert swap.wait(WAIT_S)
    assert installed == [("compiled graphs", "build-compiled-graphs")]
    done = swap.state()
    assert (done.variant, done.building, done.error) == ("compiled-graphs", "", "")
    assert done.swapped_at_s is not None and done.swapped_at_s >= 0.0
    assert done.describe() == "serving compiled-graphs"


def test_a_failed_build_keeps_the_current_variant_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    installed: list[str] = []
    swap: VariantSwap[str] = VariantSwap("eager-graphs")

    def build() -> str:
        raise RuntimeError("inductor ran out of shared memory")

    with caplog.at_level(logging.ERROR, logger="realtime.engine.hotswap"):
        swap.start("compiled-graphs", build, installed.append)
        assert swap.wait(WAIT_S)
    state = swap.state()
    assert installed == []
    assert (state.variant, state.building) == ("eager-graphs", "")
    assert state.error == "RuntimeError: inductor ran out of shared memory"
    assert state.describe() == (
        "serving eager-graphs; background build failed: RuntimeError: inductor ran out of shared memory"
    )
    (record,) = [r for r in caplog.records if getattr(r, "code", "") == "engine_variant_build_failed"]
    assert record.variant == "compiled-graphs"  # type: ignore[attr-defined]


def test_an_install_that_fails_is_a_failed_build_too() -> None:
    swap: VariantSwap[int] = VariantSwap("eager-graphs")

    def install(built: int) -> None:
        raise ValueError(f"cannot install {built}")

    swap.start("compiled-graphs", lambda: 7, install)
    assert swap.wait(WAIT_S)
    assert swap.state() == ServingState("eager-graphs", error="ValueError: cannot install 7")
    # The engine may try again (e.g. once the cause is fixed): a new build starts from the current variant.
    swap.start("compiled-graphs", lambda: 8, lambda built: None)
    assert swap.wait(WAIT_S)
    assert swap.state().variant == "compiled-graphs"
