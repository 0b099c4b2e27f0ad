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

from textual import on
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, TabbedContent, TabPane

from engine.events import StageFailed
from engine.runner import Runner
from engine.workspace import Workspace, find_workspace
from tui.common import ConfirmScreen, EngineEvent
from tui.compare import ComparePane
from tui.demos import DemosPane
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


class PersonaApp(App[None]):
    CSS_PATH = "persona.tcss"
    TITLE = "Persona"
    BINDINGS = [
        Binding("f1,ctrl+o", "show_tab('demos')", "Demos", id="tab.demos", priority=True),
        Binding("f2,ctrl+r", "show_tab('prompts')", "Prompts", id="tab.prompts", priority=True),
        Binding("f3,ctrl+g", "show_tab('synthetic')", "Synthetic", id="tab.synthetic", priority=True),
        Binding("f4,ctrl+t", "show_tab('train')", "Train", id="tab.train", priority=True),
        Binding("f5,ctrl+b", "show_tab('compare')", "Compare", id="tab.compare", priority=True),
        Binding("ctrl+s", "save", "Save", id="app.save", priority=True),
        Binding("f9", "toggle_theme", "Theme", id="app.theme"),
        Binding("ctrl+q", "quit", "Quit", id="app.quit", priority=True),
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
        self.compare_seed = compare_seed
        self.running_stage: str | None = None
        self.last_final: Any = None
        self._stage_done = asyncio.Event()
        self._preloaded = asyncio.Event()
        self.preload_error = ""
        self.initial_theme = theme
        self.sub_title = str(workspace.root)

    # -- layout --------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header(icon="✎")
        with TabbedContent(initial="demos", id="tabs"):
            with TabPane("Demos F1", id="demos"):
                yield DemosPane(self.ws, id="demos-pane")
            with TabPane("Prompts F2", id="prompts"):
                yield PromptsPane(self.ws, id="prompts-pane")
            with TabPane("Synthetic F3", id="synthetic"):
                yield SyntheticPane(self.ws, id="synthetic-pane")
            with TabPane("Train F4", id="train"):
                yield TrainPane(self.ws, id="train-pane")
            with TabPane("Compare F5", id="compare"):
                yield ComparePane(self.ws, id="compare-pane", seed=self.compare_seed)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.theme = self.initial_theme
        self.call_after_refresh(self._focus_tab)
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
        tab = self.query_one("#tabs", TabbedContent).active
        if tab in TABS:
            self.query_one(self._pane(tab)).focus_default()

    @on(TabbedContent.TabActivated)
    def _tab_activated(self) -> None:
        # a hidden pane drops focus to nothing: move it into the new pane
        self.call_after_refresh(self._focus_tab)

    def action_show_tab(self, tab: str) -> None:
        if self.screen is not self.screen_stack[0]:
            return  # a dialog is open
        self.query_one("#tabs", TabbedContent).active = tab
        self.call_after_refresh(self._focus_tab)

    # -- command palette: every binding is a command ---------------------------
    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        seen = set()
        for key, active in screen.active_bindings.items():
            b = active.binding
            if not b.description or (b.action, id(active.node)) in seen:
                continue
            seen.add((b.action, id(active.node)))
            yield SystemCommand(
                f"{b.description} ({key})",
                b.tooltip or f"Run the {b.description.lower()} action ({b.action})",
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
            parts.append(f"{running} is running; quitting stops it (it resumes from its last checkpoint).")
        choices = [("save", "Save and quit")] if unsaved else []
        choices += [("discard", "Quit" if not unsaved else "Quit without saving"), ("cancel", "Cancel")]

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
                    self.runner.cancel()
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

    def action_toggle_theme(self) -> None:
        self.theme = LIGHT if self.theme == DARK else DARK

    # -- stages ----------------------------------------------------------------
    def launch_stage(
        self, name: str, overrides: list[str] | None = None, source: str = ""
    ) -> bool:
        """Start stage ``name`` in a worker; its events come back as EngineEvent messages."""
        if self.running_stage:
            self.notify_plain(f"{self.running_stage} is running; cancel it (x in Train) or wait.", severity="warning")
            return False
        if name == "demos" and self.demos.dirty:
            self.demos.save()
        self.synthetic.save()
        self.running_stage = name
        self._stage_done.clear()
        self.run_worker(
            self._drive(name, [*self.default_overrides, *(overrides or [])]),
            name=f"stage-{name}",
            group="stage",
            exit_on_error=False,
        )
        if source != "train":
            self.notify_plain(f"running {name} (see the Train tab)", timeout=3)
        return True

    async def _drive(self, name: str, overrides: list[str]) -> None:
        final = None
        try:
            await self._preloaded.wait()  # heavy imports happen off the event loop
            async for ev in self.runner.run_stage(name, overrides):
                final = ev
                self.dispatch_event(ev)
        except Exception as e:  # never let a stage take the app down
            final = StageFailed(stage=name, message=f"{name} failed: {type(e).__name__}: {e}")
            self.dispatch_event(final)
        finally:
            self.running_stage = None
            self.last_final = final
            self._stage_done.set()

    def dispatch_event(self, ev: Any, replay: bool = False) -> None:
        for pane in (self.train, self.synthetic, self.prompts, self.compare):
            pane.post_message(EngineEvent(ev, replay=replay))

    async def wait_for_stage(self, timeout: float | None = None) -> Any:
        """(For tests and scripts.) Wait until the running stage ends; return its final event."""
        if self.running_stage:
            await asyncio.wait_for(self._stage_done.wait(), timeout)
        return self.last_final

    def cancel_stage(self) -> None:
        if self.running_stage:
            self.runner.cancel()
            self.notify_plain(f"stopping {self.running_stage} after the current step…", timeout=3)
        else:
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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    create_app(workspace_path).run()
    return 0


def main(workspace_path: str | Path | None = None) -> int:
    return run_app(workspace_path)


__all__ = ["PersonaApp", "create_app", "run_app", "main"]
