"""Appends, partial results, unwritable results/,
leftover temp files, file modes, message endings."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, FakeTeacher, needs_backend

from engine.pipeline.runner import Runner
from engine.run.events import StageFailed, StageFinished
from engine.store import atomic, results
from engine.store.workspace import Workspace


def test_append_after_a_torn_line_starts_on_a_fresh_line(tmp_path: Path):
    """A crash mid-append left half a record; the next pick must not be glued onto it."""
    path = tmp_path / "human_preferences.jsonl"
    first = results.preference_record("req 1", "sft", "baseline", "a")
    results.append_preference(tmp_path, first)
    with open(path, "ab") as f:
        f.write(b'{"input": "req 2", "a": "sft", "b": "base')  # torn: no newline
    pick = results.preference_record("req 3", "sft", "baseline", "b")
    results.append_preference(tmp_path, pick)
    seen = []
    assert results.read_preferences(tmp_path, on_bad=seen.append) == [first, pick]
    assert [b.line for b in seen] == [2]
    assert "human_preferences.jsonl: line 2: not valid JSON" in str(seen[0])
    # a torn line at the very end is reported as torn
    with open(path, "ab") as f:
        f.write(b'{"input": "req 4"')
    assert "torn last line" in str(results.read_preferences_checked(tmp_path).bad[-1])


def test_interrupted_atomic_write_leaves_a_temp_the_next_write_removes(tmp_path: Path):
    """Kill -9 between writing the temp file and renaming it; the next write cleans up."""
    path = tmp_path / "results" / "baseline_results.json"
    atomic.atomic_write_text(path, "old\n")
    code = (
        "import os, sys; import engine.store.atomic as a\n"
        "os.replace = lambda *x: os.kill(os.getpid(), 9)\n"
        f"a.atomic_write_text({str(path)!r}, 'new')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert proc.returncode == -9
    leftovers = [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and path.read_text() == "old\n"
    legacy = path.parent / ".baseline_results.json.ab12cd_z.tmp"  # mkstemp's form, before pids
    legacy.write_text("x")
    mine = path.parent / f".baseline_results.json.{os.getpid()}.feedbeef.tmp"  # a live writer's
    mine.write_text("x")
    atomic.atomic_write_text(path, "newer\n")
    left = sorted(p.name for p in path.parent.iterdir() if p.name.endswith(".tmp"))
    assert left == [mine.name] and path.read_text() == "newer\n"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_keep_the_mode_or_follow_the_umask(tmp_path: Path, umask: int):
    """Mkstemp made every file 0600; a new file follows the umask, a rewrite keeps the mode."""
    old = os.umask(umask)
    try:
        new = atomic.atomic_write_text(tmp_path / "new.json", "{}")
        assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~umask
        appended = results.append_jsonl(tmp_path / "appended.jsonl", {"a": 1})
        assert stat.S_IMODE(appended.stat().st_mode) == stat.S_IMODE(new.stat().st_mode)
        os.chmod(new, 0o640)
        atomic.atomic_write_text(new, "{}")
        assert stat.S_IMODE(new.stat().st_mode) == 0o640
    finally:
        os.umask(old)


def _no_space_under(folder: Path, monkeypatch):
    real_open = os.open

    def full_disk(path, flags, *a, **kw):
        if Path(path).parent == folder and flags & os.O_CREAT:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", full_disk)


def test_no_space_left_names_the_file(tmp_path: Path, monkeypatch):
    """A full disk ("No space left on device") names the file that could not be written."""
    path = tmp_path / "results" / "sft_model_outputs.json"
    path.parent.mkdir()
    _no_space_under(path.parent, monkeypatch)
    with pytest.raises(atomic.WriteError) as e:
        results.write_method_outputs(path, [])
    assert str(path) in str(e.value) and "No space left on device" in str(e.value)
    assert "free some disk space" in str(e.value) and isinstance(e.value, OSError)
    with pytest.raises(atomic.WriteError, match="results"):
        results.check_writable(path.parent)


@needs_backend
async def test_full_results_folder_fails_before_any_sampling(ws: Workspace, monkeypatch):
    """A results/ that cannot take a file is found before the work, not after it."""
    teacher = FakeTeacher(lambda p: "Hi —\n\nOK.\n\nThanks!")
    _no_space_under(ws.results_dir, monkeypatch)
    final = await Runner(ws, service_factory=teacher).run("baseline")
    assert isinstance(final, StageFailed), final
    assert "No space left on device" in final.message and "results" in final.message
    assert teacher.prompts == []  # nothing was sampled


@needs_backend
async def test_one_demo_that_cannot_be_sampled_keeps_the_others(ws: Workspace):
    """A demonstration longer than the model's context (passes validation: it fits
    bigger models) fails at once, by name; the other outputs are written."""
    demos = ws.load_demos()
    long_input = "Summarize this thread for the lab. " + "word " * 12_000
    data = [{"input": d["input"], "output": d["output"]} for d in demos]
    data.insert(1, {"input": long_input, "output": "Hi all —\n\nShort.\n\nThanks!"})
    ws.save_demos(data)
    teacher = FakeTeacher(lambda p: "Hi —\n\nSampled.\n\nThanks!")
    final = await Runner(ws, service_factory=teacher).run("baseline")
    assert isinstance(final, StageFailed), final
    assert "data/data.json entry 2" in final.message and "tokens" in final.message
    assert f"The other {len(demos)} outputs were written" in final.message
    rows = results.read_method_outputs(ws.result("baseline_results.json")).rows
    assert [r["input"] for r in rows] == [d["input"] for d in demos]
    assert all(long_input[:30] not in p for p in teacher.prompts)


@needs_backend
async def test_a_backend_error_on_one_demo_keeps_the_others(ws: Workspace):
    """An error sampling one entry names it; the previous output for it is kept."""
    demos = ws.load_demos()
    ok = await Runner(ws, service_factory=FakeTeacher(lambda p: "first")).run("baseline")
    assert isinstance(ok, StageFinished)

    def reply(prompt: str) -> str:
        if demos[2]["input"] in prompt:
            raise RuntimeError("the service dropped the request.")
        return "second"

    final = await Runner(ws, service_factory=FakeTeacher(reply)).run("baseline")
    assert isinstance(final, StageFailed)
    assert "data/data.json entry 3" in final.message and "dropped the request" in final.message
    assert ".." not in final.message  # #17
    rows = results.read_method_outputs(ws.result("baseline_results.json")).rows
    assert [r["output"] for r in rows] == ["second"] * 2 + ["first"] + ["second"] * (len(demos) - 3)


def test_no_message_ends_in_two_dots():
    """A reason that already ends in "." is not given a second one."""
    msg = str(atomic.WriteError("x.json", OSError(errno.ENOSPC, "No space left on device.")))
    assert ".." not in msg and msg.startswith("could not write x.json: No space left on device;")
