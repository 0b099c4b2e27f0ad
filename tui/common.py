"""Small pieces shared by the tabs: the engine-event message, text helpers, dialogs."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static, TextArea


class EngineEvent(Message):
    """One engine event (engine.events.*), delivered to widgets as a Textual message."""

    bubble = False

    def __init__(self, event: Any, *, replay: bool = False) -> None:
        super().__init__()
        self.event = event
        self.replay = replay


def one_line(text: str, width: int = 60) -> str:
    """Collapse whitespace and cut to ``width`` characters (for table cells)."""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def plain(text: str, style: str = "") -> Text:
    """User text as a Rich Text: markup characters like ``[/b]`` show as written."""
    return Text(str(text), style=style)


def cell(text: str, width: int = 60, style: str = "") -> Text:
    return Text(one_line(text, width), style=style, no_wrap=True, overflow="ellipsis")


class ConfirmScreen(ModalScreen[str]):
    """Ask a question; dismiss with the id of the chosen button ("cancel" on escape)."""

    BINDINGS = [Binding("escape", "choose('cancel')", "Cancel")]

    def __init__(self, question: str, choices: list[tuple[str, str]]) -> None:
        super().__init__()
        self.question = question
        self.choices = choices  # (id, label)

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="dialog"):
            yield Label(plain(self.question), id="question")
            with Horizontal(classes="buttons"):
                for i, (cid, label) in enumerate(self.choices):
                    yield Button(
                        label, id=f"choice-{cid}", variant="primary" if i == 0 else "default"
                    )

    def on_mount(self) -> None:
        self.query(Button).first().focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss((event.button.id or "choice-cancel").removeprefix("choice-"))

    def action_choose(self, choice: str) -> None:
        self.dismiss(choice)


class PairEditScreen(ModalScreen["tuple[str, str] | None"]):
    """Edit an input/output pair in two text areas. ctrl+s keeps, escape cancels."""

    BINDINGS = [
        Binding("ctrl+s", "keep", "Keep", priority=True),
        Binding("escape", "cancel", "Cancel"),
    ]

    def __init__(
        self,
        title: str,
        first: str,
        second: str,
        labels: tuple[str, str] = ("Request (input)", "Your text (output)"),
        first_editable: bool = True,
    ) -> None:
        super().__init__()
        self.title_text = title
        self.first, self.second = first, second
        self.labels = labels
        self.first_editable = first_editable

    def compose(self) -> ComposeResult:
        with Vertical(id="pair-dialog", classes="dialog"):
            yield Label(plain(self.title_text), classes="dialog-title")
            yield Label(self.labels[0])
            yield TextArea(
                self.first, id="first", soft_wrap=True, read_only=not self.first_editable
            )
            yield Label(self.labels[1])
            yield TextArea(self.second, id="second", soft_wrap=True)
            yield Static(Text("ctrl+s keep · escape cancel", style="dim"), id="pair-error")

    def on_mount(self) -> None:
        self.query_one("#first" if self.first_editable else "#second", TextArea).focus()

    def action_keep(self) -> None:
        first = self.query_one("#first", TextArea).text
        second = self.query_one("#second", TextArea).text
        if not first.strip() or not second.strip():
            self.query_one("#pair-error", Static).update(
                Text("Neither text may be empty.", style="bold red")
            )
            return
        self.dismiss((first, second))

    def action_cancel(self) -> None:
        self.dismiss(None)
