"""The command line: init, run (exit codes, messages naming file and entry), --set, status, backends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, needs_backend
from test_workspace import BAD

from engine.cli import main
from engine.store.workspace import Workspace


def persona(
    *args: str, cwd: Path | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_init_then_status_in_a_subprocess(tmp_path: Path):
    r = persona("init", str(tmp_path / "w"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "w" / "data" / "data.json").exists()
    r = persona("status", "--json", cwd=tmp_path / "w")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert [s["name"] for s in st][:6] == [
        "demos",
        "baseline",
        "prompting",
        "synth-inputs",
        "synth-outputs",
        "sft",
    ]
    assert st[0]["state"] == "done" and st[5]["state"] == "not run"
    assert all(s["state"] in ("not run", "not implemented") for s in st[1:])
    # bad data: non-zero exit, the message names file and entry, the file is unchanged
    data = tmp_path / "w" / "data" / "data.json"
    data.write_text(
        '[{"input": "a", "output": "b"}, {"input": "c"}, {"input": "d", "output": "e"}]'
    )
    r = persona("run", "demos", cwd=tmp_path / "w")
    assert r.returncode == 1
    assert 'data/data.json: entry 2: missing field "output"' in r.stderr
    assert (
        data.read_text()
        == '[{"input": "a", "output": "b"}, {"input": "c"}, {"input": "d", "output": "e"}]'
    )


@pytest.mark.parametrize(("label", "text", "expected"), BAD, ids=[b[0] for b in BAD])
def test_bad_data_exits_nonzero_naming_file_and_entry(ws: Workspace, capsys, label, text, expected):
    ws.demos_path.write_text(text)
    for stage in ("demos", "baseline"):
        code = main(["-C", str(ws.root), "run", stage])
        err = capsys.readouterr().err
        assert code == 1
        assert "data/data.json" in " ".join(err.split()) and expected in " ".join(err.split())
    assert ws.demos_path.read_text() == text


def test_usage_errors(ws: Workspace, tmp_path: Path, capsys):
    assert main(["-C", str(ws.root), "run", "sft", "--set", "nonsense"]) == 2
    assert "section.key=value" in capsys.readouterr().err
    assert main(["-C", str(tmp_path / "empty"), "run", "baseline"]) == 2
    assert "persona init" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "no-such-stage"])
    # a stage whose inputs are missing is refused before a run folder exists
    assert main(["-C", str(ws.root), "run", "sft"]) == 1
    assert "persona run synth-outputs" in " ".join(capsys.readouterr().err.split())
    assert not ws.runs_dir.exists() or not any(ws.runs_dir.iterdir())


def test_status_table(ws: Workspace, capsys):
    assert main(["-C", str(ws.root), "status"]) == 0
    out = capsys.readouterr().out
    assert "synth-outputs" in out and "not run" in out


def _past_run(ws: Workspace, name: str, last, ts: float) -> None:
    """A run folder of stage ``name`` that ended with ``last`` at ``ts`` (newest by mtime)."""
    from engine.run.events import StageStarted, event_to_dict

    run = ws.runs_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(ts))}"
    run.mkdir(parents=True)
    events = [StageStarted(stage=name, run_dir=str(run), ts=ts - 1), last]
    (run / "events.jsonl").write_text("".join(json.dumps(event_to_dict(e)) + "\n" for e in events))
    os.utime(run / "events.jsonl", (ts, ts))
    os.utime(run, (ts, ts))


def test_status_keeps_a_finished_result_with_a_failed_rerun_as_a_note(ws: Workspace, capsys):
    """A failed rerun does not relabel finished work: `persona status` says done (!) and
    names the attempt with its message, as the Train tab does; --json carries the note."""
    from engine.run.events import StageFailed, StageFinished

    t = 1.9e9
    _past_run(ws, "baseline", StageFinished("baseline", summary="10 outputs", ts=t), t)
    key = "TINKER_API_KEY is not set"
    _past_run(ws, "baseline", StageFailed("baseline", message=key, ts=t + 100), t + 100)
    _past_run(ws, "sft", StageFailed("sft", message="stopped", cancelled=True, ts=t + 50), t + 50)
    # reward-model failed before prompting had ever finished; prompting finished since
    _past_run(ws, "reward-model", StageFailed("reward-model", message="no outputs", ts=t), t)
    _past_run(ws, "prompting", StageFinished("prompting", ts=t + 10), t + 10)
    assert main(["-C", str(ws.root), "status"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "baseline │ done !" in out
    when = time.strftime("%H:%M", time.localtime(t + 100))
    assert f"baseline: the last attempt at {when} failed: {key}" in out
    assert "sft: the last attempt" in out and "cancelled: stopped" in out
    assert "reward-model: the last attempt" in out and "(prompting ran since: try again)" in out
    assert main(["-C", str(ws.root), "status", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    base = rows["baseline"]
    assert base["state"] == "done" and base["message"] == "10 outputs"
    assert base["attempt"] == "failed" and key in base["note"] and base["attempt_at"] == t + 100
    assert rows["sft"]["state"] == "cancelled" and rows["sft"]["attempt"] == "cancelled"
    assert rows["prompting"]["note"] == "" and rows["prompting"]["attempt"] == ""


@needs_backend
def test_tinker_without_key_is_actionable(ws: Workspace, capsys, monkeypatch):
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    code = main(["-C", str(ws.root), "run", "baseline", "--backend", "tinker"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 1
    assert "TINKER_API_KEY" in err and ".env" in err


@needs_backend
def test_run_baseline_on_tiny_model(ws: Workspace, capsys):
    code = main(["-C", str(ws.root), "run", "baseline", "--set", "sampling.max_tokens=8"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "✓ baseline" in out and "results/baseline_results.json" in out
    rows = json.loads(ws.result("baseline_results.json").read_text())
    assert len(rows) == 10


# -- usage outside a workspace, status details, terminal safety, init's printed command ----------


def test_status_outside_a_workspace_is_a_usage_error(tmp_path: Path, capsys, monkeypatch):
    assert main(["-C", str(tmp_path / "missing"), "status"]) == 2
    assert "No folder" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert main(["status"]) == 2
    assert "persona init" in " ".join(capsys.readouterr().err.split())


def test_status_shows_backend_device_dtype_and_disk(ws: Workspace, capsys):
    assert main(["-C", str(ws.root), "status"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "backend local" in out and "device" in out and "dtype" in out
    assert "disk: runs" in out


def test_control_bytes_in_sample_lines_are_escaped():
    from rich.console import Console

    from engine.cli import CliView
    from engine.run.events import LogLine, SampleProduced

    console = Console(record=True, width=200, force_terminal=False)
    with CliView(console) as view:
        view(SampleProduced(input="hi\x1b[31m there\x00", output="out\x1b]0;title\x07", source="s"))
        view(LogLine("a\x1bc log"))
    text = console.export_text()
    assert "\x1b" not in text and "\x00" not in text and "\x07" not in text
    assert "\\x1b[31m" in text and "\\x00" in text and "a\\x1bc log" in text


def test_init_prints_a_command_that_works(tmp_path: Path, capsys):
    import shlex

    assert main(["init", str(tmp_path / "w")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    command = out.split(" && ", 1)[1].rsplit(" run baseline", 1)[0]
    exe = shlex.split(command)[0]
    assert exe == "persona" or Path(exe).exists() or exe == sys.executable, out
    if exe != "persona":
        r = subprocess.run(
            [*shlex.split(command), "--help"], capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0 and "persona" in r.stdout


def test_quiet_libraries_silences_transformers_progress(monkeypatch):
    from engine.backends import quiet_libraries

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    quiet_libraries()
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"


def test_a_misspelt_stage_gets_the_nearest_name(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "basline"])
    assert exit_.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "did you mean 'baseline'?" in err and "unknown stage 'basline'" in err


def test_help_says_plain_persona_opens_the_app_and_every_option_has_help(capsys):
    from engine.cli import build_parser

    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    assert "persona` opens the app" in " ".join(capsys.readouterr().out.split())
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            assert action.help, f"persona {name}: {action.dest} has no help text"


def test_init_writes_env_readable_by_its_owner_only(tmp_path: Path):
    assert main(["init", str(tmp_path / "w")]) == 0
    assert (tmp_path / "w" / ".env").stat().st_mode & 0o777 == 0o600


def test_loading_the_similarity_model_warns_nothing_with_hub_bars_off(monkeypatch):
    import importlib
    import warnings

    from engine.eval.metrics import embedding

    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")
    monkeypatch.setattr(hub_tqdm, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    embedding._load.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        embedding._load()
    assert not [w for w in caught if "progress bars" in str(w.message)]
