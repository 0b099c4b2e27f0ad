"""Signals on the command line: SIGTERM and SIGHUP act as
Ctrl+C; a second interrupt quits at once with 130 and leaves the run's files consistent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from engine.pipeline.runner import RUNNING_MARKER, list_runs, load_run_events
from engine.store.workspace import Workspace

SCRIPT = r"""
import asyncio, dataclasses, sys
import engine.stages as st
from engine.cli import main
from engine.run.events import LogLine, StageFinished

MODE = sys.argv[2]

async def slow(ctx):
    yield LogLine("ready")
    while True:
        if MODE == "obeys":
            ctx.check_cancel()
        await asyncio.sleep(0.01)
    yield StageFinished(stage=ctx.stage)

st.STAGES["baseline"] = dataclasses.replace(st.STAGES["baseline"], run=slow)
sys.exit(main(["-C", sys.argv[1], "run", "baseline"]))
"""

DEADLINE = 600  # a guard against a hang only: every wait below is for a state


def _wait_for(check, what: str) -> None:
    end = time.monotonic() + DEADLINE
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _start(ws: Workspace, mode: str, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    f = out.open("w")
    p = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(ws.root), mode],
        stdout=f,
        stderr=subprocess.STDOUT,
        env=env,
    )

    def ready() -> bool:
        runs = list_runs(ws, "baseline")
        return bool(runs) and any(
            getattr(e, "message", "") == "ready" for e in load_run_events(runs[-1])
        )

    _wait_for(lambda: ready() or p.poll() is not None, "the stage to start")
    assert p.poll() is None, out.read_text()
    return p


def _last_event(ws: Workspace) -> dict:
    (run,) = list_runs(ws, "baseline")
    lines = (run / "events.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_term_and_hup_stop_like_ctrl_c(ws: Workspace, tmp_path: Path, sig):
    p = _start(ws, "obeys", tmp_path / "out.txt")
    p.send_signal(sig)
    code = p.wait(DEADLINE)
    assert code == 130, (tmp_path / "out.txt").read_text()
    last = _last_event(ws)
    assert last["type"] == "StageFailed" and last["cancelled"] is True
    (run,) = list_runs(ws, "baseline")
    assert not (run / RUNNING_MARKER).exists()


def test_second_interrupt_quits_at_once_with_130(ws: Workspace, tmp_path: Path):
    out = tmp_path / "out.txt"
    p = _start(ws, "ignores", out)  # a stage that does not stop by itself
    p.send_signal(signal.SIGINT)
    _wait_for(lambda: "stopping after the current step" in out.read_text(), "the first stop")
    p.send_signal(signal.SIGINT)
    code = p.wait(DEADLINE)
    assert code == 130, out.read_text()  # not 134 (SIGABRT), not a traceback
    assert "Traceback" not in out.read_text()
    last = _last_event(ws)
    assert last["type"] == "StageFailed" and last["cancelled"] is True
    assert "quit before the stage stopped" in last["message"]
    (run,) = list_runs(ws, "baseline")
    assert not (run / RUNNING_MARKER).exists()


def test_handler_counts_interrupts(ws: Workspace):
    from rich.console import Console

    from engine.cli import install_stop_signals
    from engine.pipeline.runner import Runner

    runner = Runner(ws)
    exits: list[int] = []
    handler = install_stop_signals(runner, Console(file=open(os.devnull, "w")), exits.append)  # noqa: SIM115
    handler(int(signal.SIGTERM))
    assert runner._cancel.is_set() and exits == []
    handler(int(signal.SIGINT))
    assert exits == [130]


def test_a_second_hangup_is_not_a_second_interrupt(ws: Workspace):
    """A closed terminal delivers SIGHUP twice (kernel, then shell or tmux)."""
    from rich.console import Console

    from engine.cli import install_stop_signals
    from engine.pipeline.runner import Runner

    runner = Runner(ws)
    exits: list[int] = []
    handler = install_stop_signals(runner, Console(file=open(os.devnull, "w")), exits.append)  # noqa: SIM115
    handler(int(signal.SIGHUP))
    handler(int(signal.SIGHUP))
    assert runner._cancel.is_set() and exits == []
    handler(int(signal.SIGTERM))  # a real second interrupt still quits
    assert exits == [130]


def test_output_to_a_dead_terminal_is_dropped_not_raised(tmp_path: Path):
    import errno

    from engine.cli import TerminalStream

    class Dead:
        writes = 0

        def write(self, text: str) -> int:
            self.writes += 1
            raise OSError(errno.EIO, "Input/output error")

        def flush(self) -> None:
            raise OSError(errno.EIO, "Input/output error")

        def isatty(self) -> bool:
            return True

        def fileno(self) -> int:
            raise OSError(errno.EBADF, "no fd")  # nothing of this process is redirected

    dead = Dead()
    stream = TerminalStream(dead)
    assert stream.write("stopping after the current step\n") == 32
    stream.flush()
    assert stream.write("more") == 4 and dead.writes == 1  # dropped from the first failure on
    assert stream.gone and not stream.isatty()
