"""Prompts & Rubric tab: system prompt, rubric and topic seeds -> data/prompts.toml; f8 tries it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomli_w
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Label, Select, Static, TabbedContent, TabPane, TextArea

from engine.run.events import StageFailed, StageFinished
from engine.store.results import (
    JUDGE_ACCURACY_FILE,
    RM_VALIDATION_FILE,
    read_method_outputs,
    read_rm_validation,
)
from engine.store.templates import write_prompts
from engine.store.workspace import RESULT_FILES, Workspace, WorkspaceError
from tui.dialogs import focus_now
from tui.messages import EngineEvent, FilesChanged, LaunchRequested, RunState
from tui.text import one_line, plain, read_demos

PROMPTING_FILE = RESULT_FILES["prompting"]
SCRATCH = "scratch"  # results/scratch/: "try it" runs, never read as a stage's results


class ScratchWorkspace(Workspace):
    """The workspace as "try it" sees it: the same config and demonstrations, but the prompts
    being edited (results/scratch/prompts.toml) and results and runs under results/scratch/,
    so a try neither saves data/prompts.toml nor marks the prompting stage done."""

    @property
    def scratch_dir(self) -> Path:
        return self.root / "results" / SCRATCH

    @property
    def prompts_path(self) -> Path:
        return self.scratch_dir / "prompts.toml"

    @property
    def results_dir(self) -> Path:
        return self.scratch_dir

    @property
    def runs_dir(self) -> Path:
        return self.scratch_dir / "runs"


def judge_stats_line(summary: dict[str, Any]) -> str:
    """Decided share, mean position bias and consistency of a rubric check, in words."""
    decided, bias = summary.get("decided_share"), summary.get("mean_position_bias")
    cons = summary.get("position_consistency")
    return (
        f"decided {'–' if decided is None else f'{decided:.0%}'} · mean position bias "
        f"{'–' if bias is None else f'{bias:+.2f} nats'} · position consistency "
        f"{'–' if cons is None else f'{cons:.0%}'}"
    )


class RubricCheckWorkspace(Workspace):
    """The workspace as f10's rubric check sees it: every result and checkpoint of the real
    workspace is read, but what the check writes (its verdicts, its accuracy samples, its run
    folder) goes under results/scratch/: it neither replaces results/rm_validation.json nor
    adds a reward-model run."""

    WRITES = (RM_VALIDATION_FILE, JUDGE_ACCURACY_FILE)

    @property
    def scratch_dir(self) -> Path:
        return self.root / "results" / SCRATCH

    @property
    def runs_dir(self) -> Path:
        return self.scratch_dir / "runs"

    def result(self, name: str) -> Path:
        return self.scratch_dir / name if name in self.WRITES else super().result(name)


class PromptsPane(Vertical):
    BINDINGS = [
        Binding(
            "f10",  # f6/f7 belong to the text boxes (select line / all)
            "check_rubric",
            "Check rubric",
            id="prompts.check_rubric",
            tooltip="Let the judge compare baseline and SFT outputs with this rubric (unsaved edits too); shows each verdict beside your own pick",
        ),
        Binding(
            "f8",
            "try_it",
            "Try it",
            id="prompts.try",
            tooltip="Sample the policy with this system prompt (unsaved edits too) on the chosen demonstration; nothing is saved",
        ),
    ]

    def __init__(self, workspace: Workspace, **kw) -> None:
        super().__init__(**kw)
        self.ws = workspace
        self.prompts: dict[str, Any] = {}
        self.demos: list[dict[str, str]] = []  # for "try it", as data/data.json has them
        self.dirty = False
        self._loading = False
        self.trying = False
        self.checking = False

    def compose(self) -> ComposeResult:
        yield Static(id="prompts-status", classes="status-line")
        with Horizontal(id="prompts-body"):
            with TabbedContent(id="prompt-editors"):
                with TabPane("System prompt", id="ed-system"):
                    yield TextArea(id="system-prompt", soft_wrap=True)
                with TabPane("Rubric", id="ed-rubric"):
                    yield TextArea(id="rubric", soft_wrap=True)
                with TabPane("Topic seeds", id="ed-seeds"):
                    yield TextArea(id="seeds", soft_wrap=True)
            with Vertical(id="try-panel"):
                yield Label("f8 tries the prompt on:")
                yield Select([], id="try-demo", prompt="demonstration", allow_blank=True)
                with VerticalScroll(id="try-out"):
                    yield Static(id="try-result")

    def on_mount(self) -> None:
        self.load()

    def load(self) -> None:
        self._loading = True
        try:
            self.prompts = self.ws.load_prompts()
            error = ""
        except WorkspaceError as e:
            self.prompts = {"system_prompt": "", "rubric": "", "seeds": [], "templates": {}}
            error = str(e)
        self.query_one("#system-prompt", TextArea).text = str(self.prompts.get("system_prompt", ""))
        self.query_one("#rubric", TextArea).text = str(self.prompts.get("rubric", ""))
        self.query_one("#seeds", TextArea).text = "\n".join(self.prompts.get("seeds", []))
        self.dirty = False
        self._loading = False
        self.reload_demos()
        self.show_status(error)
        self.show_try()

    def reload_demos(self) -> None:
        demos, _error = read_demos(self.ws)  # the Demonstrations tab shows the error
        sel = self.query_one("#try-demo", Select)
        old = sel.value
        sel.set_options([(Text(one_line(d["input"], 26)), i) for i, d in enumerate(demos)])
        if demos:
            sel.value = old if isinstance(old, int) and old < len(demos) else 0
        self.demos = demos

    def show_status(self, error: str = "") -> None:
        t = Text(f"{self.ws.rel(self.ws.prompts_path)}")
        if self.dirty:
            t.append("  ● unsaved (ctrl+s)", style="bold yellow")
        if self.trying:
            t.append("  ⟳ trying…", style="cyan")
        if self.checking:
            t.append("  ⟳ judging…", style="cyan")
        if error:
            t.append("  " + error, style="red")
        self.query_one("#prompts-status", Static).update(t)

    @on(TextArea.Changed)
    def _changed(self) -> None:
        cur = self.current()
        dirty = any(cur[k] != self.prompts.get(k) for k in ("system_prompt", "rubric", "seeds"))
        if dirty != self.dirty:
            self.dirty = dirty
            self.show_status()

    def current(self) -> dict[str, Any]:
        seeds = [
            s.strip() for s in self.query_one("#seeds", TextArea).text.splitlines() if s.strip()
        ]
        out = dict(self.prompts)
        out["system_prompt"] = self.query_one("#system-prompt", TextArea).text
        out["rubric"] = self.query_one("#rubric", TextArea).text
        out["seeds"] = seeds
        return out

    def save(self) -> bool:
        data = self.current()
        if not data["seeds"]:
            self.app.notify_plain(
                "Add at least one topic seed (one per line).", title="Not saved", severity="error"
            )
            return False
        try:
            write_prompts(self.ws.prompts_path, data)
        except OSError as e:
            self.app.notify_plain(str(e), title="Not saved", severity="error")
            return False
        self.prompts = data
        self.dirty = False
        self.show_status()
        self.app.notify_plain(f"Saved {self.ws.rel(self.ws.prompts_path)}", timeout=2)
        return True

    def default_focus(self):
        return self.query_one("#system-prompt", TextArea)

    def focus_default(self) -> None:
        focus_now(self.default_focus())

    # -- try it --------------------------------------------------------------
    @property
    def scratch(self) -> ScratchWorkspace:
        return ScratchWorkspace(self.ws.root)

    @property
    def rubric_ws(self) -> RubricCheckWorkspace:
        return RubricCheckWorkspace(self.ws.root)

    def action_try_it(self) -> None:
        """Run the prompting stage on a scratch view of the workspace: the prompts as edited
        (saved or not) go to results/scratch/prompts.toml, the output to results/scratch/."""
        data = self.current()
        if not data["system_prompt"].strip():
            self.app.notify_plain("Write a system prompt first.", severity="warning")
            return
        scratch = self.scratch
        try:
            write_prompts(scratch.prompts_path, data)
        except OSError as e:
            self.app.notify_plain(str(e), title="Cannot try", severity="error")
            return
        sel = self.query_one("#try-demo", Select)
        only = [f"prompting.only=[{sel.value}]"] if isinstance(sel.value, int) else []
        self.post_message(LaunchRequested("prompting", only, source="prompts", workspace=scratch))

    # -- check the rubric (the reward-model stage's validation) --------------------
    def action_check_rubric(self) -> None:
        """Run the reward-model stage's validation only, with the rubric as edited: the judge
        (trained if there is one) compares baseline and SFT outputs on every request."""
        rubric = self.query_one("#rubric", TextArea).text.strip()
        if not rubric:
            self.app.notify_plain("Write a rubric first.", severity="warning")
            return
        # a TOML string (json.dumps would write emoji as surrogate pairs TOML refuses)
        value = tomli_w.dumps({"v": rubric}, multiline_strings=False)[len("v = ") :].strip()
        overrides = ["reward_model.validate_only=true", f"reward_model.rubric={value}"]
        self.post_message(
            LaunchRequested("reward-model", overrides, source="prompts", workspace=self.rubric_ws)
        )

    def on_run_state(self, message: RunState) -> None:
        """The app started what this tab asked for: say so here."""
        if message.source != "prompts" or message.running is None:
            return
        box = self.query_one("#try-result", Static)
        if message.running == "prompting" and not self.trying:
            self.trying = True
            box.update(Text("running the prompting stage…", style="dim"))
        elif message.running == "reward-model" and not self.checking:
            self.checking = True
            box.update(Text("the judge is comparing baseline and SFT outputs…", style="dim"))
        self.show_status()

    def show_rubric_check(self) -> None:
        from engine.eval.judge_trust import accuracy_lines  # not at import: it loads tinker

        records, summary = read_rm_validation(self.rubric_ws.result(RM_VALIDATION_FILE))
        t = Text()
        t.append("Judge check of this rubric\n", style="bold")
        if summary:
            t.append(
                f"baseline preferred {summary.get('baseline_wins', 0)} · SFT preferred "
                f"{summary.get('sft_wins', 0)} · ties {summary.get('ties', 0)} · unparsable "
                f"{summary.get('unparsable', 0)}\n",
                style="dim",
            )
            t.append(judge_stats_line(summary) + "\n", style="dim")
            for line in accuracy_lines(summary.get("accuracy") or {}):
                t.append(line + "\n", style="dim")
            for line in summary.get("warnings") or []:
                t.append(line + "\n", style="bold red")
            human = summary.get("human")
            human = human if isinstance(human, dict) else {}
            if human.get("count"):
                t.append(
                    f"agrees with your blind picks {human.get('agree', 0)}/{human['count']}\n",
                    style="dim",
                )
            else:
                t.append(str(human.get("note", "no blind picks yet")) + "\n", style="dim")
        names = {1: "baseline", -1: "SFT", 0: "tie"}
        for r in records:
            t.append("\n" + one_line(str(r.get("input", "")), 60) + "\n", style="bold")
            t.append("A baseline: ", style="cyan")
            t.append_text(plain(one_line(str(r.get("baseline_output", "")), 200)))
            t.append("\nB SFT: ", style="cyan")
            t.append_text(plain(one_line(str(r.get("sft_output", "")), 200)))
            pref = r.get("preference")
            verdict = names.get(pref, "?") if isinstance(pref, int) else "?"
            t.append(f"\njudge: {verdict}", style="yellow")
            pick = r.get("human_pick")
            if isinstance(pick, int):
                t.append(f" · you: {names.get(pick, '?')}", style="green")
            feedback = str(r.get("grader_response", "")).strip()
            if feedback:
                t.append("\n")
                t.append_text(plain(one_line(feedback, 200), "dim"))
            t.append("\n")
        if not records:
            t.append("No verdicts yet.", style="dim")
        self.query_one("#try-result", Static).update(t)

    @on(Select.Changed, "#try-demo")
    def show_try(self) -> None:
        box = self.query_one("#try-result", Static)
        sel = self.query_one("#try-demo", Select)
        demos = self.demos
        if not isinstance(sel.value, int) or sel.value >= len(demos):
            box.update(Text("No demonstration selected.", style="dim"))
            return
        rows: dict[str, Any] = {}
        for ws in (self.ws, self.scratch):  # a try (scratch) wins over the stage's own run
            rows.update(
                {r["input"]: r for r in read_method_outputs(ws.result(PROMPTING_FILE)).rows}
            )
        req = demos[sel.value]["input"].strip()  # the stage records inputs trimmed
        own = demos[sel.value]["output"]
        t = Text()
        t.append("Your text\n", style="bold")
        t.append_text(plain(own))
        t.append("\n\nWith the system prompt\n", style="bold")
        row = rows.get(req)
        if row is None:
            t.append("(not run yet: press f8)", style="dim")
        else:
            t.append_text(plain(str(row.get("output", ""))))
        box.update(t)

    def on_files_changed(self, message: FilesChanged) -> None:
        message.stop()
        if "demos" in message.what:
            self.reload_demos()
            self.show_try()

    def on_engine_event(self, message: EngineEvent) -> None:
        ev = message.event
        if isinstance(ev, StageFinished | StageFailed) and ev.stage == "reward-model":
            if self.checking:
                self.checking = False
                self.show_status()
                if isinstance(ev, StageFailed):
                    self.query_one("#try-result", Static).update(plain(ev.message, "red"))
                else:
                    self.show_rubric_check()
            return
        if isinstance(ev, StageFinished | StageFailed) and ev.stage == "prompting":
            self.trying = False
            self.show_status()
            self.show_try()
            if isinstance(ev, StageFailed):
                self.query_one("#try-result", Static).update(plain(ev.message, "red"))
