"""Compare tab, side by side: a request, the person's text beside one method's answer at a
time (←/→ step through the methods; a wider terminal shows more methods at once), the
method's name, place and evaluated scores in the column title."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from tui.text import one_line, plain

COLUMN_MIN = 26  # characters: a column narrower than this is hard to read
REQUEST_LIST = 26  # the request list's width (persona.tcss #request-list)


def methods_that_fit(width: int) -> int:
    """How many method columns fit beside "Your text" in ``width`` characters (at least one)."""
    return max(1, width // (COLUMN_MIN + 4) - 1)


class SideBySide(Horizontal):
    """Requests on the left; the request, "Your text" and method columns on the right."""

    BINDINGS = [
        Binding(
            "right,]",
            "step(1)",
            "Next method",
            id="compare.next_method",
            tooltip="Side by side: show the next method's answer beside your text",
        ),
        Binding(
            "left,[",
            "step(-1)",
            "Prev method",
            id="compare.prev_method",
            tooltip="Side by side: show the previous method's answer beside your text",
        ),
    ]

    class Shown(Message):
        """The request or methods on screen changed (the pane's status line follows)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.requests: list[dict[str, Any]] = []
        self.outputs: dict[str, dict[str, str]] = {}
        self.scores: dict[str, str] = {}  # method -> its evaluated scores, one line
        self.first = 0  # the first method column shown
        self._columns = 0  # how many method columns the last layout had

    def compose(self) -> ComposeResult:
        yield OptionList(id="request-list")
        with Vertical(id="side-right"):
            with VerticalScroll(id="side-request-box"):
                yield Static(id="side-request")
            yield Horizontal(id="side-columns")

    # -- state down --------------------------------------------------------------
    def set_data(
        self,
        requests: list[dict[str, Any]],
        outputs: dict[str, dict[str, str]],
        scores: dict[str, str],
    ) -> None:
        self.requests, self.outputs, self.scores = requests, outputs, scores
        self.first = min(self.first, max(0, len(outputs) - 1))
        ol = self.query_one("#request-list", OptionList)
        old = ol.highlighted
        ol.clear_options()
        ol.add_options(
            [
                Option(Text(("· " if r["kind"] == "demo" else "◦ ") + one_line(r["input"], 22)))
                for r in requests
            ]
        )
        if requests:
            ol.highlighted = old if old is not None and old < len(requests) else 0
        self.show()

    @property
    def methods(self) -> list[str]:
        return list(self.outputs)

    @property
    def columns(self) -> int:
        width = self.size.width - REQUEST_LIST if self.size.width else 80 - REQUEST_LIST
        return min(max(1, len(self.outputs)), methods_that_fit(width))

    def shown_methods(self) -> list[str]:
        names = self.methods
        if not names:
            return []
        return [names[(self.first + k) % len(names)] for k in range(self.columns)]

    def on_resize(self) -> None:
        if self.columns != self._columns:
            self.show()

    def action_step(self, delta: int) -> None:
        if len(self.outputs) > 1:
            self.first = (self.first + delta) % len(self.outputs)
            self.show()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "step":
            return len(self.outputs) > self.columns
        return True

    # -- view ----------------------------------------------------------------
    @on(OptionList.OptionHighlighted, "#request-list")
    def show(self) -> None:
        req_box = self.query_one("#side-request", Static)
        cols = self.query_one("#side-columns", Horizontal)
        cols.remove_children()
        self._columns = self.columns
        i = self.query_one("#request-list", OptionList).highlighted
        if i is None or not 0 <= i < len(self.requests):
            req_box.update(Text("No requests yet: add demonstrations and run stages.", style="dim"))
            self.post_message(self.Shown())
            return
        r = self.requests[i]
        t = Text("Request", style="bold")
        if r["kind"] != "demo":
            t.append("  (held out)", style="magenta")
        t.append("\n")
        t.append_text(plain(r["input"]))
        req_box.update(t)
        widgets = [self._column(Text("Your text", style="bold green"), r["expected"] or "(none)")]
        names = self.methods
        for m in self.shown_methods():
            title = Text(m, style="bold cyan")
            if len(names) > 1:
                title.append(f"  {names.index(m) + 1}/{len(names)}", style="dim")
            if m in self.scores:
                title.append("\n" + self.scores[m], style="dim")
            widgets.append(self._column(title, self.outputs[m].get(r["input"], "")))
        if not names:
            widgets.append(
                self._column(Text("No method yet", style="dim"), "", "run baseline or prompting")
            )
        cols.mount_all(widgets)
        self.refresh_bindings()
        self.post_message(self.Shown())

    @staticmethod
    def _column(title: Text, text: str, missing: str = "no output for this request") -> Vertical:
        body = plain(text) if text else Text(f"({missing})", style="dim")
        return Vertical(
            Static(title, classes="side-title"),
            VerticalScroll(Static(body), classes="side-body"),
            classes="side-col",
        )

    def default_focus(self):
        return self.query_one("#request-list", OptionList)
