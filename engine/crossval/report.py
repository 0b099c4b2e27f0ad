"""results/crossval_report.md and its plots, from the pooled numbers (engine.crossval.pool).

Plots (matplotlib, Agg): each method's pooled NLL with its 95% interval
(``plots/crossval_nll.png``) and the paired NLL differences against few-shot as a forest plot
(``plots/crossval_paired.png``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.eval import evaluation as ev
from engine.eval.paired import PAIRED_METRICS
from engine.eval.paired import markdown as paired_markdown
from engine.eval.report import PLOTS_DIR, _plt
from engine.store.atomic import atomic_write_text
from engine.store.workspace import Workspace

REPORT_FILE = "crossval_report.md"
NLL_PLOT = "crossval_nll.png"
PAIRED_PLOT = "crossval_paired.png"


def plot_pooled_nll(data: dict[str, Any], path: Path) -> Path | None:
    rows = [(m, d["nll"]) for m, d in data["methods"].items() if d["nll"].get("mean") is not None]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(rows) + 1), 3.4), dpi=110)
    xs = list(range(len(rows)))
    means = [d["mean"] for _, d in rows]
    err = [
        [d["mean"] - d["low"] if d.get("low") is not None else 0 for _, d in rows],
        [d["high"] - d["mean"] if d.get("high") is not None else 0 for _, d in rows],
    ]
    ax.errorbar(xs, means, yerr=err, fmt="o", capsize=5, color="#4C72B0")
    ax.set_xticks(xs, [ev.method_label(m) for m, _ in rows], rotation=20)
    ax.set_ylabel("NLL per token (lower = more like you)")
    ax.set_title(f"Every demonstration held out once (n = {data['n_demonstrations']})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_paired_forest(data: dict[str, Any], path: Path) -> Path | None:
    per = data["paired"]["by_reference"].get("few-shot", {})
    rows = [(m, d["nll"]) for m, d in per.items() if d.get("nll", {}).get("diff") is not None]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 1.0 + 0.5 * len(rows)), dpi=110)
    for y, (_m, d) in enumerate(rows):
        if d.get("ci"):
            ax.plot(d["ci"], [y, y], color="#4C72B0", linewidth=2)
        ax.plot([d["diff"]], [y], "o", color="#C44E52" if d["excludes_zero"] else "#4C72B0")
    ax.axvline(0.0, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(list(range(len(rows))), [ev.method_label(m) for m, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel("NLL per token minus few-shot's (left of 0 = closer to you)")
    ax.set_title("Paired differences against few-shot, 95% bootstrap intervals")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _ci(d: dict[str, Any], digits: int = 3) -> str:
    if d.get("mean") is None:
        return "–"
    text = f"{d['mean']:.{digits}f}"
    if d.get("low") is not None and d.get("high") is not None:
        text += f" [{d['low']:.{digits}f}–{d['high']:.{digits}f}]"
    return text + f" n={d.get('n', 0)}"


def render(data: dict[str, Any], plots: dict[str, str]) -> str:
    n, k = data["n_demonstrations"], data["folds"]
    out = [
        "# Persona cross-validated report: every demonstration held out once\n",
        f"{k} folds (seed {data['seed']}) over your {n} demonstrations: each fold retrained "
        "every method without its held-out slice, so each demonstration below was measured by "
        "models that never saw it. Fold held-out sets (demonstration numbers): "
        + "; ".join(
            f"fold {i}: {', '.join(map(str, f))}"
            for i, f in enumerate(data["fold_holdout"], start=1)
        )
        + f". Backend {data.get('backend')}, policy `{data.get('policy_model')}`, "
        f"{data.get('samples_per_request')} sample(s) per request. Folds and their runs: "
        f"`runs/{data['run']}/`; every number: `crossval.json`.\n",
    ]
    if data.get("methods_missing"):
        out.append(
            "Not measured (no results in any fold): "
            + ", ".join(ev.method_label(m) for m in data["methods_missing"])
            + ".\n"
        )
    out += [
        "## Pooled over every demonstration\n",
        "| method | " + " | ".join(PAIRED_METRICS[m][0] for m in PAIRED_METRICS) + " |",
        "|---|" + "---|" * len(PAIRED_METRICS),
    ]
    digits = {"nll": 3, "judge": 2}
    for d in data["methods"].values():
        cells = [_ci(d[metric], digits.get(metric, 2)) for metric in PAIRED_METRICS]
        out.append(f"| {d['label']} | " + " | ".join(cells) + " |")
    out.append(
        "\nNLL: mean negative log-likelihood per token of your own text under the method, "
        "pooled over tokens (lower = closer); style distance in units of your own spread "
        "(0 = your average); MiniLM similarity to your text for the same request; judge win "
        "score: wins + half the ties against the other methods on the same request. Brackets: "
        "95% intervals over demonstrations; n = demonstrations. Overlapping intervals of two "
        "methods are not a comparison: the paired differences below are.\n"
    )
    if plots:
        out.append("## Plots\n")
        for key, title in (("nll", "Pooled NLL per method"), ("paired", "Paired vs few-shot")):
            if key in plots:
                out.append(f"![{title}]({plots[key]})\n")
    out += paired_markdown(data.get("paired"))
    out.append("## Time per fold (seconds, every attempt of a stage counted)\n")
    stages = list(dict.fromkeys(s for f in data["fold_wall_s"] for s in f))
    out.append("| fold | " + " | ".join(stages) + " |")
    out.append("|---|" + "---|" * len(stages))
    labels = (["shared"] if len(data["fold_wall_s"]) > k else []) + [
        str(i) for i in range(1, k + 1)
    ]
    for label, f in zip(labels, data["fold_wall_s"], strict=True):
        out.append(
            f"| {label} | " + " | ".join(f"{f[s]:.0f}" if s in f else "" for s in stages) + " |"
        )
    return "\n".join(out).rstrip() + "\n"


def write_crossval_report(ws: Workspace, data: dict[str, Any]) -> list[Path]:
    plots_dir = ws.results_dir / PLOTS_DIR
    plots_dir.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path] = {}
    for key, fn, name in (
        ("nll", plot_pooled_nll, NLL_PLOT),
        ("paired", plot_paired_forest, PAIRED_PLOT),
    ):
        p = fn(data, plots_dir / name)
        if p:
            plots[key] = p
    text = render(data, {k: f"{PLOTS_DIR}/{p.name}" for k, p in plots.items()})
    return [atomic_write_text(ws.result(REPORT_FILE), text), *plots.values()]
