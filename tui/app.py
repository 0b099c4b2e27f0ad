"""The Persona application: five tabs over one workspace; stages run through the engine's Runner.

create_app(workspace, ...) -> PersonaApp     the one factory (tests reuse it)
run_app(path) / main(path)                   what `persona` (no arguments) calls
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

from textual import events, on
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, TabbedContent, TabPane

from engine.pipeline.runner import Runner
from engine.run.events import StageFailed
from engine.store.workspace import Workspace, find_workspace
from tui.compare import ComparePane
from tui.demos import DemosPane
from tui.dialogs import ConfirmScreen, focus_now
from tui.key_routing import KeyRouting
from tui.messages import (
    CancelRequested,
    EngineEvent,
    FilesChanged,
    LaunchRequested,
    RunState,
)
from tui.prompts import PromptsPane
from tui.synthetic import SyntheticPane
from tui.train import TrainPane

TABS = ("demos", "prompts", "synthetic", "train", "compare")
DARK, LIGHT = "textual-dark", "textual-light"
# torch, transformers and tinker load in a thread at startup: imported on the event loop they
# would freeze the screen for seconds (engine.stages pulls torch in through tinker.types).
HEAVY_IMPORTS = (
    "engine.stages",
    "engine.backends",
    "engine.backends.local",
    "engine.backends.renderers",
    "tinker_cookbook.renderers",
    "tinker_cookbook.supervised.common",
    "transformers.models.auto.tokenization_auto",
    "transformers.models.auto.modeling_auto",
    "transformers.models.llama.modeling_llama",
)


class Tabs(TabbedContent):
    """TabbedContent that ignores a stale "a widget in pane X got focus" message.

    TabbedContent switches to a pane when a widget inside it is focused. A focus that lands
    late (a busy machine: the person pressed F4 then F1 before the Train tab's focus message
    arrived) would switch back to the tab the person just left. Switch only when the focus
    is still inside that pane.
    """

    def _on_tab_pane_focused(self, event: TabPane.Focused) -> None:
        focused = self.screen.focused
        stale = focused is None or event.tab_pane not in focused.ancestors_with_self
        if stale or event.tab_pane.id != self.active:
            # Only the person switches tabs (keys, clicks). A focus that landed in another
            # pane is put back into the one on screen.
            event.stop()
            event.prevent_default()
            if not stale:
                self.call_later(self.app._focus_tab)


class PersonaApp(App[None]):
    CSS_PATH = "persona.tcss"
    TITLE = "Persona"
    BINDINGS = [
        Binding(
            "f1,ctrl+o",
            "show_tab('demos')",
            "Demos",
            id="tab.demos",
            priority=True,
            show=False,
            tooltip="Show the Demonstrations tab: your own requests and texts",
        ),
        Binding(
            "f2,ctrl+r",
            "show_tab('prompts')",
            "Prompts",
            id="tab.prompts",
            priority=True,
            show=False,
            tooltip="Show the Prompts & Rubric tab: system prompt, rubric, topic seeds",
        ),
        Binding(
            "f3,ctrl+g",
            "show_tab('synthetic')",
            "Synth",
            id="tab.synthetic",
            priority=True,
            show=False,
            tooltip="Show the Synthetic data tab: review the teacher's rows",
        ),
        Binding(
            "f4,ctrl+t",
            "show_tab('train')",
            "Train",
            id="tab.train",
            priority=True,
            show=False,
            tooltip="Show the Train tab: run, cancel and replay stages",
        ),
        Binding(
            "f5,ctrl+b",
            "show_tab('compare')",
            "Compare",
            id="tab.compare",
            priority=True,
            show=False,
            tooltip="Show the Compare tab: outputs side by side, blind A/B, the report",
        ),
        Binding(
            "ctrl+s",
            "save",
            "Save",
            id="app.save",
            priority=True,
            tooltip="Save demonstrations, prompts and synthetic reviews",
        ),
        Binding(
            "ctrl+k",
            "crossval",
            "Cross-validate",
            id="app.crossval",
            show=False,
            tooltip="Compare methods with every demonstration held out once (persona crossval)",
        ),
        Binding(
            "f9",
            "toggle_theme",
            "Light/dark",
            id="app.theme",
            show=False,
            tooltip="Switch between the light and the dark theme",
        ),
        Binding(
            "ctrl+q",
            "quit",
            "Quit",
            id="app.quit",
            priority=True,
            show=False,
            tooltip="Quit (asks first about unsaved changes or a running stage)",
        ),
    ]

    def __init__(
        self,
        workspace: Workspace,
        *,
        overrides: list[str] | None = None,
        runner: Runner | None = None,
        compare_seed: int | None = None,
        theme: str = DARK,
    ) -> None:
        super().__init__()
        self.ws = workspace
        self.default_overrides = list(overrides or [])
        self.runner = runner or Runner(workspace)
        self.active_runner = self.runner  # the one running now (a scratch try has its own)
        self.compare_seed = compare_seed
        self._stage_name: str | None = None  # the one place that says what is running
        self.stopping = False  # cancel asked, the stage has not ended yet
        self.running_source = ""  # the pane that asked for it
        self.last_final: Any = None
        self._stage_done = asyncio.Event()
        self._preloaded = asyncio.Event()
        self.preload_error = ""
        self.initial_theme = theme
        self.sub_title = str(workspace.root)
        self.key_routing = KeyRouting()

    async def on_event(self, event: events.Event) -> None:
        # a key typed in the same burst as `a` or `e` goes to the dialog they open (key_routing)
        if isinstance(event, events.Key) and self.key_routing.replayed(self, event):
            return
        await super().on_event(event)

    # -- layout --------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header(icon="✎")
        with Tabs(initial="demos", id="tabs"):
            with TabPane("Demos F1", id="demos"):
                yield DemosPane(self.ws, id="demos-pane")
            with TabPane("Prompts F2", id="prompts"):
                yield PromptsPane(self.ws, id="prompts-pane")
            with TabPane("Synthetic F3", id="synthetic"):
                yield SyntheticPane(self.ws, id="synthetic-pane")
            with TabPane("Train F4", id="train"):
                yield TrainPane(self.ws, self.default_overrides, id="train-pane")
            with TabPane("Compare F5", id="compare"):
                yield ComparePane(self.ws, id="compare-pane", seed=self.compare_seed)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.theme = self.initial_theme
        self._focus_tab()
        self.run_worker(self._preload, thread=True, name="preload", group="preload")

    def _preload(self) -> None:
        for mod in HEAVY_IMPORTS:
            try:
                importlib.import_module(mod)
            except Exception as e:  # a missing backend is reported by the stage when run
                if mod == "engine.stages":
                    self.preload_error = str(e)
                    break
        self.call_from_thread(self._preload_done)

    def _preload_done(self) -> None:
        self._preloaded.set()
        self.train.refresh_stages()
        from engine.store.checkpoints import check_registry

        registry_problem = check_registry(self.ws.results_dir)  # every tab reads it
        if registry_problem:
            self.notify_plain(registry_problem, severity="warning", timeout=30)

    async def wait_ready(self, timeout: float | None = 60) -> None:
        """Wait until the engine's heavy modules are loaded (the Train tab lists stages then)."""
        await asyncio.wait_for(self._preloaded.wait(), timeout)

    @property
    def demos(self) -> DemosPane:
        return self.query_one(DemosPane)

    @property
    def prompts(self) -> PromptsPane:
        return self.query_one(PromptsPane)

    @property
    def synthetic(self) -> SyntheticPane:
        return self.query_one(SyntheticPane)

    @property
    def train(self) -> TrainPane:
        return self.query_one(TrainPane)

    @property
    def compare(self) -> ComparePane:
        return self.query_one(ComparePane)

    def _pane(self, tab: str):
        return {
            "demos": DemosPane,
            "prompts": PromptsPane,
            "synthetic": SyntheticPane,
            "train": TrainPane,
            "compare": ComparePane,
        }[tab]

    def _focus_tab(self) -> None:
        """Focus the active pane's default widget now (not later: see Tabs)."""
        tab = self.query_one("#tabs", TabbedContent).active
        if tab not in TABS or self.screen is not self.screen_stack[0]:
            return
        pane = self.query_one(self._pane(tab))
        focused = self.screen.focused
        if focused is None or pane not in focused.ancestors_with_self:
            focus_now(pane.default_focus())

    @on(TabbedContent.TabActivated)
    def _tab_activated(self) -> None:
        # a tab clicked with the mouse: a hidden pane drops focus, move it into the new pane
        self._focus_tab()

    def action_show_tab(self, tab: str) -> None:
        if self.screen is not self.screen_stack[0]:
            return  # a dialog is open
        self.query_one("#tabs", TabbedContent).active = tab  # shows the pane at once
        self._focus_tab()

    # -- command palette: every binding is a command ---------------------------
    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        # Textual's own entries, less those our bindings already offer (Quit) and its theme
        # picker (f9 switches light/dark; two "Theme" entries confused people).
        for cmd in super().get_system_commands(screen):
            if cmd.title not in ("Quit", "Theme"):
                yield cmd
        seen = set()
        for key, active in screen.active_bindings.items():
            b = active.binding
            if not b.description or (b.action, id(active.node)) in seen:
                continue
            seen.add((b.action, id(active.node)))
            yield SystemCommand(
                f"{b.description} ({key})",
                b.tooltip or f"{b.description} (key {key})",
                partial(self.run_action, b.action, active.node),
            )

    # -- saving / quitting ---------------------------------------------------
    def unsaved(self) -> list[str]:
        out = []
        if self.demos.dirty:
            out.append("demonstrations")
        if self.prompts.dirty:
            out.append("prompts")
        return out

    def action_save(self) -> None:
        if self.screen is not self.screen_stack[0]:
            keep = getattr(self.screen, "action_keep", None)  # a dialog: ctrl+s keeps its edit
            if keep is not None:
                keep()
            return
        self.synthetic.save()
        if self.demos.dirty:
            self.demos.save()
        if self.prompts.dirty:
            self.prompts.save()

    async def action_quit(self) -> None:
        self.synthetic.save()
        unsaved = self.unsaved()
        running = self.running_stage
        if not unsaved and not running:
            self.exit()
            return
        parts = []
        if unsaved:
            parts.append(f"Unsaved changes: {', '.join(unsaved)}.")
        if running:
            parts.append(
                f"{running} is running; quitting stops it (it resumes from its last checkpoint)."
            )
        choices = [("save", "Save and quit")] if unsaved else []
        choices += [
            ("discard", "Quit" if not unsaved else "Quit without saving"),
            ("cancel", "Cancel"),
        ]

        def answer(choice: str | None) -> None:
            if choice == "save":
                ok = (not self.demos.dirty or self.demos.save()) and (
                    not self.prompts.dirty or self.prompts.save()
                )
                if not ok:
                    return
            if choice in ("save", "discard"):
                if self.running_stage:
                    # Let the stage stop at its step boundary and save its checkpoint first.
                    self.cancel_stage(quiet=True)
                    self.notify_plain(f"stopping {self.running_stage} and saving a checkpoint…")
                    self.run_worker(self._exit_when_stage_stops(), group="quit")
                    return
                self.exit()

        self.push_screen(ConfirmScreen(" ".join(parts), choices), answer)

    async def _exit_when_stage_stops(self, timeout: float = 120) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stage_done.wait(), timeout)
        self.exit()

    def notify_plain(self, message: str, **kw: Any) -> None:
        """notify() with markup off: messages may quote user text or paths."""
        self.notify(message, markup=False, **kw)

    def action_crossval(self) -> None:
        from tui.crossval import open_crossval

        open_crossval(self)

    def action_toggle_theme(self) -> None:
        self.theme = LIGHT if self.theme == DARK else DARK

    # -- stages ----------------------------------------------------------------
    @on(LaunchRequested)
    def _launch_requested(self, message: LaunchRequested) -> None:
        message.stop()
        self.launch_stage(message.stage, message.overrides, message.source, message.workspace)

    @on(FilesChanged)
    def _files_changed(self, message: FilesChanged) -> None:
        """A pane changed or re-read a file others show: pass it down to them."""
        message.stop()
        for pane in (self.prompts, self.compare, self.train):
            down = FilesChanged(*message.what)
            down.bubble = False  # down only: it must not come back up here
            pane.post_message(down)

    # -- what runs: state down ---------------------------------------------------
    @property
    def running_stage(self) -> str | None:
        return self._stage_name

    @running_stage.setter
    def running_stage(self, name: str | None) -> None:
        self._stage_name = name
        self.stopping = False
        self._tell_run_state()

    def _tell_run_state(self) -> None:
        with contextlib.suppress(Exception):  # the app may be closing
            for pane in (self.train, self.prompts):
                pane.post_message(RunState(self._stage_name, self.stopping, self.running_source))

    @on(CancelRequested)
    def _cancel_requested(self, message: CancelRequested) -> None:
        message.stop()
        self.cancel_stage()

    def launch_stage(
        self,
        name: str,
        overrides: list[str] | None = None,
        source: str = "",
        workspace: Workspace | None = None,
    ) -> bool:
        """Start stage ``name`` in a worker; its events come back as EngineEvent messages.
        ``workspace``: another view of the workspace (the Prompts tab's scratch "try it"),
        run with the same stages and service."""
        if self.running_stage:
            self.notify_plain(
                f"{self.running_stage} is running; cancel it (x in Train) or wait.",
                severity="warning",
            )
            return False
        if name == "demos" and self.demos.dirty:
            self.demos.save()
        self.synthetic.save()
        self.running_source = source
        self.running_stage = name
        self.active_runner = self.runner
        self._stage_done.clear()
        self.run_worker(
            self._drive(name, [*self.default_overrides, *(overrides or [])], workspace),
            name=f"stage-{name}",
            group="stage",
            exit_on_error=False,
        )
        if source != "train":
            self.notify_plain(f"running {name} (see the Train tab)", timeout=3)
        return True

    async def _drive(self, name: str, overrides: list[str], workspace: Workspace | None) -> None:
        final = None
        try:
            await self._preloaded.wait()  # heavy imports happen off the event loop
            if workspace is not None:  # the same stages and service, another view
                self.active_runner = Runner(
                    workspace,
                    listeners=self.runner.listeners,
                    service_factory=self.runner.service_factory,
                    stages=self.runner.stages,
                )
                if self.stopping:
                    self.active_runner.cancel()
            async for ev in self.active_runner.run_stage(name, overrides):
                final = ev
                self.dispatch_event(ev)
        except Exception as e:  # never let a stage take the app down
            final = StageFailed(stage=name, message=f"{name} failed: {type(e).__name__}: {e}")
            self.dispatch_event(final)
        finally:
            self.last_final = final
            self.running_stage = None  # the panes hear it (RunState) and read the rows again
            self._stage_done.set()

    def dispatch_event(self, ev: Any, replay: bool = False) -> None:
        for pane in (self.train, self.synthetic, self.prompts, self.compare):
            pane.post_message(EngineEvent(ev, replay=replay))

    async def wait_for_stage(self, timeout: float | None = None) -> Any:
        """(For tests and scripts.) Wait until the running stage ends; return its final event."""
        if self.running_stage:
            await asyncio.wait_for(self._stage_done.wait(), timeout)
        return self.last_final

    def cancel_stage(self, quiet: bool = False) -> None:
        if self.running_stage:
            self.active_runner.cancel()
            self.stopping = True
            self._tell_run_state()  # "stopping…" on the stage's row at once
            if not quiet:
                self.notify_plain(
                    f"stopping {self.running_stage}: it keeps what it has done…", timeout=3
                )
        elif not quiet:
            self.notify_plain("Nothing is running.", timeout=2)


def create_app(workspace: Workspace | str | Path | None = None, **kw: Any) -> PersonaApp:
    """The one way to build the app (``persona``, tests and the lag bench all use it)."""
    if workspace is None:
        ws = find_workspace()
    elif isinstance(workspace, Workspace):
        ws = workspace
    else:
        ws = Workspace(Path(workspace))
    return PersonaApp(ws, **kw)


def run_app(workspace_path: str | Path | None = None) -> int:
    """Open the app on a workspace (default: the nearest folder holding persona.toml)."""
    # Libraries must not draw progress bars over the screen, nor reach the network.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    create_app(workspace_path).run()
    return 0


def main(workspace_path: str | Path | None = None) -> int:
    return run_app(workspace_path)


__all__ = ["PersonaApp", "create_app", "run_app", "main"]
