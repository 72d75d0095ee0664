"""The engine registry: every engine by name, with its factory, a description and its place in "auto".

Engine names are listed here and nowhere else: the sidecar's `--engine` choices, its settings'
validation, `lipsync render`, `lipsync models check` and the API's /debug/musetalk all read
them from this module. "auto" tries the engines that take part in it, in their `auto_rank`
order, and builds the first one whose probe says it is usable; a probe that raises (weights
present but broken) fails the choice instead of falling through to the next engine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from realtime.engine.errors import EngineError
from realtime.engine.musetalk.engine import ENGINE_NAME as MUSETALK
from realtime.engine.musetalk.select import DESCRIPTION as MUSETALK_DESCRIPTION
from realtime.engine.musetalk.select import build_musetalk, probe_musetalk
from realtime.engine.preview import ENGINE_NAME as PREVIEW
from realtime.engine.preview import PreviewEngine
from realtime.engine.protocol import Engine, EngineConfig, EngineProbe

logger = logging.getLogger(__name__)

AUTO = "auto"


class EngineUnknown(EngineError):
    code = "engine_unknown"


class EngineUnavailable(EngineError):
    code = "engine_unavailable"


@dataclass(frozen=True)
class EngineEntry:
    name: str
    description: str  # one line: what it is and what it needs (CLI help, /debug)
    build: Callable[[EngineConfig], Engine]
    probe: Callable[[EngineConfig], EngineProbe]  # cheap: reads files, loads nothing
    auto_rank: int | None = None  # "auto" tries lower ranks first; None: only when named


@dataclass(frozen=True)
class EngineSelection:
    engine: Engine
    name: str
    reason: str  # one sentence for logs, `lipsync` output and /debug: which engine and why


def _always_usable(config: EngineConfig) -> EngineProbe:
    return EngineProbe(usable=True, reason="it needs no weights")


_ENGINES: dict[str, EngineEntry] = {}


def register(entry: EngineEntry) -> None:
    """Add an engine; its name must be new (and not "auto")."""
    if entry.name == AUTO or entry.name in _ENGINES:
        raise ValueError(f"engine name {entry.name!r} is taken")
    _ENGINES[entry.name] = entry


def unregister(name: str) -> None:
    _ENGINES.pop(name, None)


def entries() -> tuple[EngineEntry, ...]:
    return tuple(_ENGINES.values())


def engine_names() -> tuple[str, ...]:
    return tuple(_ENGINES)


def engine_choices() -> tuple[str, ...]:
    """What an `--engine` option accepts: "auto" and every registered name."""
    return (AUTO, *_ENGINES)


def choices_help() -> str:
    ranked = sorted((e for e in _ENGINES.values() if e.auto_rank is not None), key=lambda e: e.auto_rank or 0)
    auto = " else ".join(e.name for e in ranked)
    described = "; ".join(f"{e.name}: {e.description}" for e in _ENGINES.values())
    return f"auto: the first usable of {auto}; {described}"


def entry(name: str) -> EngineEntry:
    try:
        return _ENGINES[name]
    except KeyError:
        raise EngineUnknown(f"unknown engine {name!r}; choose one of {', '.join(engine_choices())}") from None


def auto_choice(config: EngineConfig) -> tuple[EngineEntry, str]:
    """The engine "auto" picks for `config`, and why; raises the probe's error when one is broken."""
    skipped: list[str] = []
    ranked = sorted((e for e in _ENGINES.values() if e.auto_rank is not None), key=lambda e: e.auto_rank or 0)
    for candidate in ranked:
        probe = candidate.probe(config)
        if probe.usable:
            return candidate, "; ".join([*skipped, probe.reason])
        skipped.append(probe.reason)
    raise EngineUnavailable(f"no engine is usable for engine=auto: {'; '.join(skipped) or 'none registered'}")


def create_engine(config: EngineConfig) -> EngineSelection:
    """Build the configured engine (a registered name, or "auto")."""
    if config.engine == AUTO:
        chosen, why = auto_choice(config)
    else:
        chosen = entry(config.engine)
        probe = chosen.probe(config)
        if not probe.usable:
            raise probe.problem or EngineUnavailable(
                f"the {chosen.name} engine is not usable: {probe.reason}"
            )
        why = f"the {chosen.name} engine was requested ({probe.reason})"
    engine = chosen.build(config)
    reason = f"{why}: using {chosen.name}: {engine.info.detail}"
    logger.info("engine selected", extra={"engine": chosen.name, "reason": reason})
    return EngineSelection(engine, chosen.name, reason)


register(
    EngineEntry(
        name=MUSETALK,
        description=MUSETALK_DESCRIPTION,
        build=build_musetalk,
        probe=probe_musetalk,
        auto_rank=0,
    )
)
register(
    EngineEntry(
        name=PREVIEW,
        description="CPU preview engine (no weights): the real avatar's mouth opens with the audio level",
        build=PreviewEngine,
        probe=_always_usable,
        auto_rank=1,
    )
)
