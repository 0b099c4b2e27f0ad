"""The Train tab's curves: each metric goes to the chart of its kind (losses; rewards, win
rates and accuracies; everything else), every chart with a legend in the series' colours.

Where the charts with points do not fit the height (80x24 fits one), one shows at a time and
`c` steps through them; its title says which of how many. Live and replayed events take the
same path, so a replay draws the same charts.
"""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static
from textual_plotext import PlotextPlot

from engine.pipeline.runner import list_runs, load_run_events
from engine.run.events import Metric
from engine.store.workspace import Workspace

REDRAW_EVERY = 0.25  # seconds: charts redraw at most this often
CHART_MIN_HEIGHT = 8  # rows one chart needs to be read (plot, axes, title, legend)
# plotext colour, and the same colour in Rich for the legend
COLORS = (
    ("cyan", "cyan"),
    ("orange", "dark_orange"),
    ("green", "green"),
    ("magenta", "magenta"),
    ("red", "red"),
    ("blue", "blue"),
    ("yellow", "yellow"),
    ("gray", "grey50"),
)
CHARTS = {"loss": "loss", "rates": "reward / win rate", "other": "other metrics"}
RATE_WORDS = ("reward", "win_rate", "accuracy", "margin", "rate", "consistency")


def chart_of(name: str) -> str:
    """Which chart a metric belongs on: "loss", "rates" or "other"."""
    if name.endswith("loss"):
        return "loss"
    if any(w in name.rsplit("/", 1)[-1] for w in RATE_WORDS):
        return "rates"
    return "other"


def is_loss(name: str) -> bool:
    return chart_of(name) == "loss"


def earlier_loss_points(ws: Workspace, stage: str, run_dir: str, before_step: float) -> dict:
    """Loss points of the runs this one resumed from (the same stage's earlier runs, newest
    first, each contributing the steps before the ones already shown), so the chart shows the
    whole curve of a checkpoint built across several runs."""
    out: dict[str, list[tuple[float, float]]] = {}
    current = Path(run_dir).name if run_dir else ""
    limit = before_step
    for run in reversed(list_runs(ws, stage)):
        if current and run.name >= current:
            continue
        pts = [
            e
            for e in load_run_events(run)
            if isinstance(e, Metric) and is_loss(e.name) and e.step < limit
        ]
        if not pts:
            continue
        for e in pts:
            out.setdefault(e.name, []).append((e.step, e.value))
        limit = min(e.step for e in pts)
        if limit <= 1:
            break
    return {k: sorted(v) for k, v in out.items()}


class MetricChart(PlotextPlot):
    """A plotext chart fed point by point; redraws on a timer, only when something changed."""

    def __init__(self, title: str, **kw) -> None:
        super().__init__(**kw)
        self.title = title
        self.caption = title  # the title drawn (the panel adds "1/2 · c next")
        self.series: dict[str, list[tuple[float, float]]] = {}
        self._dirty = True

    def on_mount(self) -> None:
        super().on_mount()
        self.set_interval(REDRAW_EVERY, self._maybe_redraw)
        self._draw()

    def clear_series(self) -> None:
        self.series.clear()
        self._dirty = True

    def add_point(self, name: str, step: float, value: float) -> None:
        self.series.setdefault(name, []).append((step, value))
        self._dirty = True

    def prepend(self, points: dict[str, list[tuple[float, float]]]) -> None:
        for name, pts in points.items():
            self.series[name] = [*pts, *self.series.get(name, [])]
        self._dirty = True

    def set_caption(self, caption: str) -> None:
        if caption != self.caption:
            self.caption = caption
            self._dirty = True

    @property
    def points(self) -> int:
        return sum(len(v) for v in self.series.values())

    def legend(self) -> Text:
        t = Text(no_wrap=True, overflow="ellipsis")
        for i, name in enumerate(self.series):
            if t.plain:
                t.append("  ")
            t.append("━ ", style=COLORS[i % len(COLORS)][1])
            t.append(name)
        return t

    def _maybe_redraw(self) -> None:
        if self._dirty:
            self._draw()

    def _draw(self) -> None:
        self._dirty = False
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(self.caption)
        for i, (_name, pts) in enumerate(self.series.items()):
            if pts:
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                plt.plot(xs, ys, marker="braille", color=COLORS[i % len(COLORS)][0])
        if not self.series:
            plt.xlabel("no points yet")
        self.refresh()
        legend = self.parent.query(".chart-legend") if self.parent else []
        for box in legend:
            box.update(self.legend())


class ChartBox(Vertical):
    """One chart and its legend line."""

    def __init__(self, key: str, **kw) -> None:
        super().__init__(**kw)
        self.key = key

    def compose(self) -> ComposeResult:
        yield MetricChart(CHARTS[self.key], id=f"{self.key}-chart")
        yield Static(classes="chart-legend")

    @property
    def chart(self) -> MetricChart:
        return self.query_one(MetricChart)


class ChartPanel(Vertical):
    """The charts of the run on screen; those that fit show, `c` steps through the rest."""

    DEFAULT_CSS = """
    ChartPanel ChartBox { height: 1fr; min-height: 6; }
    ChartPanel MetricChart { height: 1fr; min-height: 5; }
    ChartPanel .chart-legend { height: 1; padding: 0 1; }
    """

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.selected = "loss"

    def compose(self) -> ComposeResult:
        for key in CHARTS:
            yield ChartBox(key, id=f"{key}-box")

    def on_mount(self) -> None:
        self.show_charts()

    def on_resize(self) -> None:
        self.show_charts()

    def chart(self, key: str) -> MetricChart:
        return self.query_one(f"#{key}-chart", MetricChart)

    @property
    def with_points(self) -> list[str]:
        return [k for k in CHARTS if self.chart(k).points] or ["loss"]

    @property
    def fits(self) -> int:
        return max(1, (self.size.height or CHART_MIN_HEIGHT) // CHART_MIN_HEIGHT)

    def shown(self) -> list[str]:
        keys = self.with_points
        if len(keys) <= self.fits:
            return keys
        if self.selected not in keys:
            self.selected = keys[0]
        return [self.selected]

    def show_charts(self) -> None:
        """Show the charts that fit; a title says which of how many when not all do."""
        keys, shown = self.with_points, self.shown()
        for key in CHARTS:
            box = self.query_one(f"#{key}-box", ChartBox)
            box.display = key in shown
            caption = CHARTS[key]
            if len(shown) < len(keys) and key in shown:
                caption += f"  ({keys.index(key) + 1}/{len(keys)} · c next)"
            box.chart.set_caption(caption)

    def cycle(self) -> None:
        keys = self.with_points
        if len(keys) > 1:
            i = keys.index(self.selected) if self.selected in keys else -1
            self.selected = keys[(i + 1) % len(keys)]
            self.show_charts()

    def clear(self) -> None:
        for key in CHARTS:
            self.chart(key).clear_series()
        self.selected = "loss"
        self.show_charts()

    def add(self, name: str, step: float, value: float) -> MetricChart:
        key = chart_of(name)
        chart = self.chart(key)
        new = not chart.points
        chart.add_point(name, step, value)
        if new:
            if not self.chart(self.selected).points:
                self.selected = key  # the first curve of a run shows at once
            self.show_charts()
        return chart
