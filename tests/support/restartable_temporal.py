"""A Temporal dev server that a test stops and starts again, its state kept in a database file (an outage)."""

from __future__ import annotations

from pathlib import Path

from infra import temporal
from infra.process import ManagedProcess


class RestartableTemporal:
    """A Temporal dev server on fixed ports with a database file: stopped and started again, its state
    survives."""

    def __init__(self, config: temporal.TemporalDevServerConfig, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.processes: list[ManagedProcess] = []

    def start(self) -> None:
        process = temporal.dev_server_process(self.config, self.log_path)
        self.processes.append(process)
        process.start()

    def stop(self) -> None:
        self.processes[-1].stop()

    def stop_all(self) -> None:
        for process in self.processes:
            process.stop()
