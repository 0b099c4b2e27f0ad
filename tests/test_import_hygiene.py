"""The engine never imports the app; the app does not load torch until a stage needs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, needs_backend

from engine.store.workspace import Workspace


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_no_tui_import_anywhere_in_engine():
    offenders = [
        str(p.relative_to(REPO))
        for p in (REPO / "engine").rglob("*.py")
        if any(
            line.strip().startswith(("import tui", "from tui"))
            for line in p.read_text(encoding="utf-8").splitlines()
        )
    ]
    assert offenders == []


@needs_backend
def test_running_a_stage_leaves_textual_out(ws: Workspace):
    r = _python(
        "import sys\n"
        "from engine.cli import main\n"
        "code = main(['-C', sys.argv[1], 'run', 'baseline', '--set', 'sampling.max_tokens=4'])\n"
        "assert code == 0, code\n"
        "assert 'torch' in sys.modules  # the stage did run on the local backend\n"
        "bad = sorted(m for m in sys.modules if m == 'textual' or m.startswith(('textual.', 'tui')))\n"
        "print('LOADED', bad)\n",
        str(ws.root),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "LOADED []" in r.stdout


def test_the_app_does_not_load_torch_until_a_stage_needs_it(tmp_path: Path):
    r = _python(
        "import sys\n"
        "import persona_cli, tui.app\n"
        "app = tui.app.create_app(sys.argv[1])\n"
        "print('TORCH', 'torch' in sys.modules, 'transformers' in sys.modules)\n",
        str(tmp_path),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "TORCH False False" in r.stdout
