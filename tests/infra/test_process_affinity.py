"""infra.process.pin_threads / restore_threads: every thread of a process onto given cores, and back."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from infra.process import pin_threads, restore_threads


def thread_cores(pid: int) -> dict[int, set[int]]:
    return {
        int(task.name): os.sched_getaffinity(int(task.name)) for task in Path(f"/proc/{pid}/task").iterdir()
    }


def test_every_thread_is_pinned_new_threads_inherit_and_restore_undoes_it() -> None:
    everywhere = os.sched_getaffinity(0)
    core = min(everywhere)
    stop = threading.Event()
    before = threading.Thread(target=stop.wait)
    before.start()
    try:
        previous = pin_threads(os.getpid(), {core})
        assert previous and all(cores == everywhere for cores in previous.values())
        assert all(cores == {core} for cores in thread_cores(os.getpid()).values())
        seen: list[set[int]] = []
        started = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
        started.start()
        started.join()
        assert seen == [{core}]  # started after the pin, by a pinned thread
        restore_threads(os.getpid(), previous)
        assert all(cores == everywhere for cores in thread_cores(os.getpid()).values())
    finally:
        stop.set()
        before.join()
        os.sched_setaffinity(0, everywhere)
