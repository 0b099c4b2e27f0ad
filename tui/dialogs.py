"""Dialogs shared by the tabs (a question with buttons, a pair editor) and focus_now."""

from __future__ import annotations

from rich.text import Text
from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Button, Label, Static, TextArea

from tui.text import plain


def focus_now(widget: Widget) -> None:
    """Focus ``widget`` at once (``Widget.focus`` defers it, and a deferred focus that lands
    after the person switched tabs would switch the tab back)."""
    try:
        widget.screen.set_focus(widget)
    except Exception:  # not mounted yet: fall back to the deferred form
        widget.focus()


class ConfirmScreen(ModalScreen[str]):
    """Ask a question; dismiss with the id of the chosen button ("cancel" on escape)."""

    # priority: handled when the key is routed, so keys typed after it go to the screen below
    BINDINGS = [Binding("escape", "choose('cancel')", "Cancel", priority=True)]

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
        focus_now(self.query(Button).first())

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss((event.button.id or "choice-cancel").removeprefix("choice-"))

    def action_choose(self, choice: str) -> None:
        self.dismiss(choice)


class PairEditScreen(ModalScreen["tuple[str, str] | None"]):
    """Edit an input/output pair. ctrl+s keeps, escape cancels.

    Focus starts in the box the person edits (a read-only first text is shown, not focusable,
    so Tab cannot lead into a box that ignores typing). Keys typed before the dialog has
    focused its box (a busy machine) still land in that box.
    """

    BINDINGS = [
        Binding("ctrl+s", "keep", "Keep", priority=True),
        # priority: handled when the key is routed, so keys typed after it go to the screen below
        Binding("escape", "cancel", "Cancel", priority=True),
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
            if self.first_editable:
                yield TextArea(self.first, id="first", soft_wrap=True)
            else:
                with VerticalScroll(id="first-box", can_focus=False):
                    yield Static(plain(self.first), id="first")
            yield Label(self.labels[1])
            yield TextArea(self.second, id="second", soft_wrap=True)
            yield Static(Text("ctrl+s keep · escape cancel", style="dim"), id="pair-error")

    @property
    def target(self) -> TextArea:
        return self.query_one("#first" if self.first_editable else "#second", TextArea)

    def on_mount(self) -> None:
        self._settle()

    def _settle(self) -> None:
        """Focus the box being edited; type into it what came before it existed."""
        try:
            box = self.target
        except NoMatches:  # children not mounted yet (a busy machine)
            self.call_after_refresh(self._settle)
            return
        focus_now(box)
        early, self._early = "".join(getattr(self, "_early", [])), []
        if early:
            box.insert(early)

    def on_key(self, event: events.Key) -> None:
        # A key that reached the screen itself while a box has (or should have) focus: it was
        # typed before the focus landed. Put it where the person is typing.
        if event.is_printable and event.character and not isinstance(self.focused, Button):
            if not self.query("#second") or getattr(self, "_early", None):
                self._early = [*getattr(self, "_early", []), event.character]  # not built yet
                event.stop()
                return
            box = self.focused if isinstance(self.focused, TextArea) else self.target
            if not box.read_only:
                focus_now(box)
                box.insert(event.character)
                event.stop()

    def values(self) -> tuple[str, str]:
        first = self.query_one("#first", TextArea).text if self.first_editable else self.first
        return first, self.query_one("#second", TextArea).text

    def action_keep(self) -> None:
        first, second = self.values()
        empty = [
            label
            for label, text in zip(self.labels, (first, second), strict=True)
            if not text.strip()
        ]
        if empty:
            self.query_one("#pair-error", Static).update(
                Text(
                    f"{' and '.join(empty)}: empty. Write something, or escape to cancel.",
                    style="bold red",
                )
            )
            first_empty = empty[0] == self.labels[0] and self.first_editable
            focus_now(self.query_one("#first" if first_empty else "#second", TextArea))
            return
        self.dismiss((first, second))

    def action_cancel(self) -> None:
        self.dismiss(None)
