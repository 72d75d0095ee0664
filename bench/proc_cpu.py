"""CPU time used by process groups, read from /proc: who burns the cores during a benchmark.

Each service of a local deployment runs in its own process group (infra.process.spawn), so a group's CPU
is the sum of its live members' user + system time, plus what they have reaped from their own children.
Linux only (the benchmarks' platform).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

_CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _stat_fields(stat: str) -> list[str]:
    """A /proc stat line's fields from `state` on: the command name (field 2) may hold spaces or ')', the
    fields after its last ')' are fixed (index 0 = state, 2 = pgrp, 11/12 = utime/stime, 13/14 =
    cutime/cstime)."""
    return stat.rsplit(")", 1)[1].split()


def pid_cpu_s(pids: Sequence[int], proc: Path = Path("/proc")) -> float:
    """CPU seconds (user + system) the given processes have used so far; an ended one counts 0."""
    ticks = 0
    for pid in pids:
        try:
            fields = _stat_fields((proc / str(pid) / "stat").read_text())
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / _CLOCK_TICKS_PER_S


def group_cpu_s(groups: Mapping[str, int], proc: Path = Path("/proc")) -> dict[str, float]:
    """CPU seconds used so far by each named process group (`name -> pgid`); a group with no live member
    reads 0. One pass over `proc`."""
    by_pgid = {pgid: name for name, pgid in groups.items()}
    ticks = dict.fromkeys(groups, 0)
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # ended between the listing and the read
        fields = _stat_fields(stat)
        name = by_pgid.get(int(fields[2]))
        if name is None:
            continue
        ticks[name] += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return {name: count / _CLOCK_TICKS_PER_S for name, count in ticks.items()}


def cpu_delta_s(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """CPU seconds each group used between two readings (rounded to 10 ms: the kernel's tick)."""
    return {name: round(max(0.0, after.get(name, 0.0) - used), 2) for name, used in before.items()}


def thread_cpu_s(pgid: int, proc: Path = Path("/proc")) -> dict[str, float]:
    """CPU seconds so far of one process group's threads, summed by thread name (`comm`): e.g. a Python
    process's main thread (its event loop, GIL-bound) apart from the native threads of its extensions."""
    ticks: dict[str, int] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int(_stat_fields((entry / "stat").read_text())[2]) != pgid:
                continue
            tasks = list((entry / "task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = _stat_fields(stat)
            ticks[name] = ticks.get(name, 0) + int(fields[11]) + int(fields[12])  # utime + stime
    return {name: count / _CLOCK_TICKS_PER_S for name, count in ticks.items()}
