"""SVG snapshots of the main tabs at 80x24 (pytest-textual-snapshot).

Update after an intended change with: pytest tests/test_tui_snapshots.py --snapshot-update
"""

from __future__ import annotations

from tui_helpers import until, write_method_outputs, write_past_run, write_synthetic

from engine.store.workspace import Workspace
from tui.app import create_app
from tui.train import MetricChart


def app_for(ws: Workspace, theme: str = "textual-dark"):
    app = create_app(ws, compare_seed=0, theme=theme)
    app.sub_title = "workspace"  # the temporary path differs on every run
    return app


def test_snapshot_demos(ws: Workspace, snap_compare):
    assert snap_compare(app_for(ws), terminal_size=(80, 24))


def test_snapshot_synthetic_light(ws: Workspace, snap_compare):
    write_synthetic(ws, 40)
    assert snap_compare(
        app_for(ws, "textual-light"), press=["f3", "a", "r", "ctrl+s"], terminal_size=(80, 24)
    )


def test_snapshot_train_replay(ws: Workspace, snap_compare):
    write_past_run(ws, "sft", steps=8)

    async def replay(pilot):
        await pilot.app.wait_ready()
        await pilot.press("f4")
        await pilot.pause()
        names = [s.name for s in pilot.app.train.statuses]
        pilot.app.query_one("#stage-table").move_cursor(row=names.index("sft"))
        await pilot.press("r")
        await pilot.app.workers.wait_for_complete()
        charts = list(pilot.app.query(MetricChart))

        def drawn() -> bool:  # the replayed points are on the charts, and drawn
            return any(c.points for c in charts) and not any(c._dirty for c in charts)

        await until(pilot, drawn)
        await pilot.pause()

    assert snap_compare(app_for(ws), run_before=replay, terminal_size=(80, 24))


def test_snapshot_compare_blind(ws: Workspace, snap_compare):
    write_method_outputs(ws)
    assert snap_compare(app_for(ws), press=["f5", "b"], terminal_size=(80, 24))


def test_snapshot_compare_report(ws: Workspace, snap_compare):
    from test_tui_report import write_small_evaluation

    write_small_evaluation(ws)
    assert snap_compare(app_for(ws), press=["f5", "p"], terminal_size=(80, 24))
