"""Builders shared by the TUI tests: synthetic rows, method outputs, a fake past run."""

from __future__ import annotations

import json
import time
from pathlib import Path

from engine.run.events import LogLine, Metric, Progress, StageFinished, StageStarted, event_to_dict
from engine.store.atomic import atomic_write_json, atomic_write_jsonl
from engine.store.workspace import Workspace

# A guard against a hang only: every wait is for a state, however long a busy machine takes.
HANG_GUARD_S = 600


async def until(pilot, predicate, tries: int = 500) -> None:
    """Let the app run until ``predicate()`` holds (a state, never a time). The first
    ``tries`` rounds only let the app process its messages; after them, for a state a worker
    thread reaches (a training step, a file written), each round also yields the processor
    briefly. It fails only when the app has not got there after HANG_GUARD_S."""
    for _ in range(tries):
        if predicate():
            return
        await pilot.pause()
    end = time.monotonic() + HANG_GUARD_S
    while not predicate():
        assert time.monotonic() < end, "the app never reached the state the test waits for"
        await pilot.pause(0.01)


SEEDS = ("turn down request", "social events", "cold emailing")


def synthetic_rows(n: int, status: str = "pending") -> list[dict]:
    rows = []
    for i in range(n):
        rows.append(
            {
                "id": f"in-{i + 1:04d}",
                "seed": SEEDS[i % len(SEEDS)],
                "status": status,
                "messages": [
                    {"role": "system", "content": "Write like Maya."},
                    {
                        "role": "user",
                        "content": f"Request {i + 1}: email Sam about [red]lunch[/red] #{i}",
                    },
                    {
                        "role": "assistant",
                        "content": f"Hi Sam — lunch Thu {i % 12 + 1}/6? [/b] — Maya",
                    },
                ],
            }
        )
    return rows


def write_synthetic(ws: Workspace, n: int, status: str = "pending") -> Path:
    return atomic_write_jsonl(
        ws.result("synthetic_personalized_data.jsonl"), synthetic_rows(n, status)
    )


def write_method_outputs(ws: Workspace, methods=("baseline", "prompting", "sft")) -> None:
    from engine.store.results import METHOD_FILES

    demos = json.loads(ws.demos_path.read_text(encoding="utf-8"))
    for m in methods:
        rows = [
            {
                "input": d["input"],
                "expected_output": d["output"],
                "output": f"{m} says [bold]hi[/] to #{i}",
            }
            for i, d in enumerate(demos)
        ]
        atomic_write_json(ws.result(METHOD_FILES[m]), rows)


def write_past_run(ws: Workspace, stage: str = "sft", steps: int = 5) -> Path:
    run = ws.runs_dir / f"{stage}-20250101-000000"
    run.mkdir(parents=True, exist_ok=True)
    events = [StageStarted(stage=stage, run_dir=str(run)), LogLine("replayed [/b] line")]
    for s in range(1, steps + 1):
        events += [
            Metric("train/loss", s, 3.0 / s),
            Metric("val/loss", s, 3.2 / s),
            Progress(s, steps, "sft: steps"),
        ]
    events.append(Metric("dev/win_rate", steps, 0.6))
    events.append(StageFinished(stage=stage, outputs=(), summary="5 steps"))
    (run / "events.jsonl").write_text(
        "".join(json.dumps(event_to_dict(e)) + "\n" for e in events), encoding="utf-8"
    )
    return run


def screen_text(app) -> str:
    """Every visible line of the screen as plain text (what a person sees)."""
    return "\n".join(
        "".join(seg.text for seg in strip) for strip in app.screen._compositor.render_strips()
    )


def type_burst(app, keys) -> None:
    """Post keys to the app back to back, as a terminal delivers keys typed quickly together
    (Pilot.press lets the app settle after each key, which hides what a burst loses)."""
    from textual import events

    for key in keys:
        app.post_message(events.Key(key, key if len(key) == 1 else None))


def toasts(app) -> str:
    """The words of the notices on screen, as a person reads them (only what is visible)."""
    from textual.widgets._toast import Toast

    lines = screen_text(app).splitlines()
    words = []
    for toast in app.screen.query(Toast):
        r = toast.region
        words += [lines[y][r.x : r.right] for y in range(r.y, min(r.bottom, len(lines)))]
    return " ".join(" ".join(words).replace("▌", " ").split())
