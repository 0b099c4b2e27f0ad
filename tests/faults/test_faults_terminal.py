"""Closing the terminal during training (tmux kill-session) ended with rc 1 and
``OSError: [Errno 5] Input/output error`` from rich's console write, or the two SIGHUPs a closed
terminal delivers counted as a second interrupt and it quit without a cancel checkpoint. A
closed terminal is one cancel: the stage saves its checkpoint and ends as cancelled; output
to the dead terminal is dropped, never raised."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

from conftest import REPO, make_tiny_workspace, needs_backend

from engine.pipeline.runner import RUNNING_MARKER, list_runs, load_run_events
from engine.run.events import CheckpointSaved, LogLine, Metric, StageFailed
from engine.store import results

pytestmark = needs_backend

HANG_GUARD_S = 600  # a guard against a hang only: every wait is for a state

ROWS = [
    ("Email Sam about the racks due Fri 5/2.", "Hi Sam —\n\nTwo racks by Fri 5/2?\n\nThanks!"),
    ("Ask Prof. Kim for a letter by 10/15.", "Hi Prof. Kim —\n\nMy NSF letter?\n\nThanks!"),
    ("Tell Lena the hood in 310 beeps.", "Hi Lena —\n\nThe hood in 310 beeps.\n\nThanks!"),
]
ARGS = [
    "sft.steps=100000",  # never reached: the terminal closes first
    "sft.checkpoint_every=100000",  # the only checkpoint is the cancel one
    "sft.eval_every=100000",
    "sft.val_fraction=0",
    "sft.batch_size=2",
    "sft.sample_after=false",
]


def _controlling_tty() -> None:  # in the child, after setsid: the pty becomes its terminal
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _drain(master: int) -> None:
    """Read what the child wrote, so it never blocks on a full pty."""
    while select.select([master], [], [], 0)[0]:
        try:
            if not os.read(master, 65536):
                return
        except OSError:
            return


def test_a_closed_terminal_is_one_cancel_with_a_checkpoint(tmp_path: Path):
    ws = make_tiny_workspace(tmp_path / "ws")
    results.atomic_write_jsonl(
        ws.result("synthetic_personalized_data.jsonl"),
        [
            {
                "id": f"in-{i}",
                "status": "accepted",
                "messages": [{"role": "user", "content": a}, {"role": "assistant", "content": b}],
            }
            for i, (a, b) in enumerate(ROWS)
        ],
    )
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    cmd = [sys.executable, "-m", "engine.cli", "-C", str(ws.root), "run", "sft"]
    for a in ARGS:
        cmd += ["--set", a]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TERM": "xterm-256color"}
    env.pop("COLUMNS", None)
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err:
        proc = subprocess.Popen(  # noqa: PLW1509 - preexec_fn: the only way to take a pty as terminal
            cmd,
            stdin=slave,
            stdout=slave,
            stderr=err,
            env=env,
            start_new_session=True,
            preexec_fn=_controlling_tty,
        )
    os.close(slave)
    end = time.monotonic() + HANG_GUARD_S
    try:
        while True:  # wait for a state: a training step done
            _drain(master)
            runs = list_runs(ws, "sft")
            if runs and any(
                isinstance(e, Metric) and e.name == "train/loss" for e in load_run_events(runs[-1])
            ):
                break
            assert proc.poll() is None, stderr.read_text()[-3000:]
            assert time.monotonic() < end, "no training step"
            time.sleep(0.05)
        os.close(master)  # the window closes: the kernel hangs the terminal up (SIGHUP) ...
        master = -1
        proc.send_signal(signal.SIGHUP)  # ... and the shell or tmux sends its own
        code = proc.wait(HANG_GUARD_S)
    finally:
        if master >= 0:
            os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    said = stderr.read_text()
    assert code == 130, said[-3000:]
    assert "Traceback" not in said and "Input/output error" not in said, said[-3000:]
    (run,) = list_runs(ws, "sft")
    events = load_run_events(run)
    finals = [e for e in events if isinstance(e, StageFailed)]
    assert len(finals) == 1 and finals[0].cancelled, finals  # one cancel, not "quit now"
    assert "quit before the stage stopped" not in finals[0].message
    assert events[-1] is finals[0]
    saved = [e for e in events if isinstance(e, CheckpointSaved)]
    assert saved, "no cancel checkpoint"
    entry = results.latest_checkpoint(ws.results_dir, "sft")
    assert entry["step"] == saved[-1].step >= 1 and entry["finished"] is False
    errors = [e.message for e in events if isinstance(e, LogLine) and e.level == "error"]
    assert errors == [], errors
    assert not (run / RUNNING_MARKER).exists()
    assert json.loads((run / "events.jsonl").read_text().splitlines()[-1])["cancelled"] is True
