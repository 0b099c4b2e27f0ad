"""The events a stage streams. Small, frozen, JSON-serializable.

A stage is an async generator of these. The runner appends each one to the run's
``events.jsonl`` (one ``to_dict()`` per line), so a finished or crashed run can be
replayed with ``event_from_dict`` into the same views.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any


def _now() -> float:
    return time.time()


@dataclass(frozen=True)
class StageStarted:
    stage: str
    run_dir: str = ""
    ts: float = field(default_factory=_now)


@dataclass(frozen=True)
class LogLine:
    message: str
    level: str = "info"  # "info" | "warning" | "error"
    ts: float = field(default_factory=_now)


@dataclass(frozen=True)
class Metric:
    name: str  # e.g. "train/loss", "val/loss", "rl/reward", "dev/win_rate"
    step: int
    value: float
    ts: float = field(default_factory=_now)


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    label: str = ""
    ts: float = field(default_factory=_now)


@dataclass(frozen=True)
class SampleProduced:
    input: str
    output: str
    source: str = ""  # which method or model produced it
    ts: float = field(default_factory=_now)


@dataclass(frozen=True)
class CheckpointSaved:
    name: str
    step: int
    sampler_path: str = ""
    state_path: str = ""
    ts: float = field(default_factory=_now)


@dataclass(frozen=True)
class StageFinished:
    stage: str
    outputs: tuple[str, ...] = ()
    summary: str = ""
    ts: float = field(default_factory=_now)


@dataclass(frozen=True)
class StageFailed:
    stage: str
    message: str  # what happened and what the person can do about it
    ts: float = field(default_factory=_now)
    cancelled: bool = False  # True when the person stopped it (not an error)


Event = (
    StageStarted
    | LogLine
    | Metric
    | Progress
    | SampleProduced
    | CheckpointSaved
    | StageFinished
    | StageFailed
)

EVENT_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        StageStarted,
        LogLine,
        Metric,
        Progress,
        SampleProduced,
        CheckpointSaved,
        StageFinished,
        StageFailed,
    )
}


def event_to_dict(event: Event) -> dict[str, Any]:
    data = dataclasses.asdict(event)
    data["type"] = type(event).__name__
    if isinstance(event, StageFinished):
        data["outputs"] = list(event.outputs)
    return data


def event_from_dict(data: dict[str, Any]) -> Event:
    data = dict(data)
    cls = EVENT_TYPES[data.pop("type")]
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in data.items() if k in names}
    if cls is StageFinished:
        kwargs["outputs"] = tuple(kwargs.get("outputs", ()))
    return cls(**kwargs)
