"""Compare tab, blind A/B: two unlabelled answers to one request; the person picks the better.

Pairs come from every method with outputs for the same request; each pair is shown once (a
pair already picked in results/human_preferences.jsonl is not served again).
1/← left, 2/→ right, t tie, n skip, u undo, R serve every pair again.
"""

from __future__ import annotations

import random
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Static

from engine.store.results import (
    append_preference,
    preference_record,
    read_preferences,
    remove_preference,
)
from engine.store.workspace import Workspace
from tui.text import plain

Pair = tuple[str, str, str]  # (request, method shown left, method shown right)


def pair_key(request: str, a: str, b: str) -> tuple[str, frozenset[str]]:
    return (request.strip(), frozenset((a, b)))


class BlindAB(Vertical, can_focus=True):
    BINDINGS = [
        Binding("1,left", "pick('a')", "Left", id="compare.left", tooltip="Blind A/B: left wins"),
        Binding(
            "2,right", "pick('b')", "Right", id="compare.right", tooltip="Blind A/B: right wins"
        ),
        Binding("t", "pick('tie')", "Tie", id="compare.tie", tooltip="Blind A/B: a tie"),
        Binding(
            "n",
            "next_pair",
            "Skip",
            id="compare.skip",
            tooltip="Blind A/B: skip this pair (it comes back later)",
        ),
        Binding("u", "undo", "Undo", id="compare.undo", tooltip="Blind A/B: undo the last pick"),
        Binding(
            "R",
            "redo_all",
            "Redo",
            id="compare.redo",
            show=False,
            tooltip="Blind A/B: serve again the pairs already picked",
        ),
    ]

    class Changed(Message):
        """The pair on screen or the number of picks changed."""

    def __init__(self, workspace: Workspace, *, seed: int | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.ws = workspace
        self.rng = random.Random(seed)
        self.requests: list[dict[str, Any]] = []
        self.outputs: dict[str, dict[str, str]] = {}
        self.pair: Pair | None = None
        self.queue: list[Pair] = []  # pairs still to show
        self.picks: list[dict[str, Any]] = []  # made here, for undo
        self.labeled = 0

    def compose(self) -> ComposeResult:
        yield Static(id="blind-request", classes="detail")
        with Horizontal(id="blind-pair"):
            with VerticalScroll(id="blind-a-box", classes="blind-box"):
                yield Static(id="blind-a")
            with VerticalScroll(id="blind-b-box", classes="blind-box"):
                yield Static(id="blind-b")

    @property
    def left(self) -> int:
        return len(self.queue) + (self.pair is not None)

    # -- state down --------------------------------------------------------------
    def set_data(self, requests: list[dict[str, Any]], outputs: dict[str, dict[str, str]]) -> None:
        self.requests, self.outputs = requests, outputs
        self.labeled = len(read_preferences(self.ws.results_dir))
        self.build_queue()
        self.pair = None
        self.next_pair()

    def all_pairs(self) -> list[Pair]:
        """Every (request, method, method) pair with outputs from both, each once."""
        out = []
        names = list(self.outputs)
        for r in self.requests:
            have = [m for m in names if r["input"] in self.outputs[m]]
            for x in range(len(have)):
                for y in range(x + 1, len(have)):
                    out.append((r["input"], have[x], have[y]))
        return out

    def build_queue(self, redo: bool = False) -> None:
        done = set()
        if not redo:
            for p in read_preferences(self.ws.results_dir):
                done.add(pair_key(str(p.get("input", "")), str(p["a"]), str(p["b"])))
        pairs = [p for p in self.all_pairs() if pair_key(*p) not in done]
        self.rng.shuffle(pairs)
        self.queue = []
        for request, a, b in pairs:  # random sides
            self.queue.append((request, a, b) if self.rng.random() < 0.5 else (request, b, a))

    def next_pair(self) -> None:
        a_box, b_box = self.query_one("#blind-a", Static), self.query_one("#blind-b", Static)
        req_box = self.query_one("#blind-request", Static)
        if not self.queue:
            self.pair = None
            if len(self.outputs) < 2 or not self.all_pairs():
                msg = (
                    "Blind A/B needs two methods with outputs for the same request "
                    "(run baseline and prompting first)."
                )
            else:
                msg = (
                    f"No more pairs: every pair has a pick ({self.labeled} saved). "
                    "u undoes the last pick; R serves all pairs again."
                )
            req_box.update(Text(msg, style="bold"))
            a_box.update("")
            b_box.update("")
            self.post_message(self.Changed())
            return
        request, a, b = self.pair = self.queue.pop(0)
        t = Text("Request: ", style="bold")
        t.append_text(plain(request))
        t.append("\n1/← left · 2/→ right · t tie · n skip · u undo", style="dim")
        req_box.update(t)
        a_box.update(Text("Left\n", style="bold").append_text(plain(self.outputs[a][request])))
        b_box.update(Text("Right\n", style="bold").append_text(plain(self.outputs[b][request])))
        self.post_message(self.Changed())

    # -- actions -------------------------------------------------------------
    def action_pick(self, choice: str) -> None:
        if self.pair is None:
            return
        request, a, b = self.pair
        record = preference_record(request, a, b, choice)
        try:
            append_preference(self.ws.results_dir, record)
        except OSError as e:  # disk full, read-only folder: say so, keep the pair on screen
            self.app.notify(str(e), title="Pick not saved", severity="error", markup=False)
            return
        self.picks.append({"record": record, "pair": self.pair})
        self.labeled += 1
        self.next_pair()

    def action_next_pair(self) -> None:
        if self.pair is not None:
            if not self.queue:
                self.app.notify("That is the only pair left.", timeout=2)
                return
            self.queue.append(self.pair)  # skipped: it comes back after the others
        self.next_pair()

    def action_undo(self) -> None:
        if not self.picks:
            self.app.notify("No pick to undo here.", timeout=2)
            return
        last = self.picks.pop()
        if remove_preference(self.ws.results_dir, last["record"]):
            self.labeled = max(0, self.labeled - 1)
        if self.pair is not None:
            self.queue.insert(0, self.pair)
        self.queue.insert(0, last["pair"])
        self.app.notify("Last pick undone: pick again.", timeout=2)
        self.next_pair()

    def action_redo_all(self) -> None:
        self.build_queue(redo=True)
        self.next_pair()

    def default_focus(self):
        return self
