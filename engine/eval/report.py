"""results/report.md and its plots (results/plots/*.png), from results/evaluation.json.

The evaluate stage calls :func:`write_report`; the Compare tab's Report view calls
:func:`load_report` for the same numbers as plain data (summary rows, the judge's win-rate
matrix, per-request answers of every method beside the person's text).

Plots are drawn with matplotlib's Agg backend (no display): the training curves of each
trained method (its run's ``metrics.jsonl``), the judge's win-rate matrix as a heatmap, and
the NLL of the person's held-out texts per method with 95% intervals.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.eval import evaluation as ev
from engine.eval import paired
from engine.store.atomic import atomic_write_text
from engine.store.workspace import RESULT_FILES, Workspace

REPORT_FILE = RESULT_FILES["evaluate"]
PLOTS_DIR = "plots"


# --------------------------------------------------------------------------- plain data


@dataclass
class ReportData:
    """What the Report view shows. ``rows``: one per method (see
    :func:`engine.eval.evaluation.summary_rows`: ``method``, ``label``, ``cells`` keyed by
    ``columns`` key with value/low/high/n, ``best``); ``columns``: (key, header, better);
    ``matrix``: ``{"methods": [...], "cells": {a: {b: {rate, low, high, n, wins, ...}}}}``;
    ``requests``: ``[{"input", "person", "answers": {method: [text, ...]}}]``."""

    rows: list[dict[str, Any]]
    columns: list[tuple[str, str, str]]
    matrix: dict[str, Any]
    requests: list[dict[str, Any]]
    created: str = ""
    notes: list[str] = field(default_factory=list)


def load_report(ws: Workspace) -> ReportData | None:
    """The last evaluation as plain data, or None when evaluate has not run."""
    data = ev.read_evaluation(ws.results_dir)
    if data is None:
        return None
    return report_data(data, ev.read_rows(ws.result(ev.SAMPLES_FILE)))


def report_data(data: dict[str, Any], sample_rows: list[dict[str, Any]]) -> ReportData:
    names = [m["name"] for m in data.get("methods", [])]
    return ReportData(
        rows=ev.summary_rows(data),
        columns=list(ev.COLUMNS),
        matrix={"methods": names, "cells": data.get("judge_matrix", {})},
        requests=per_request_answers(data, sample_rows),
        created=str(data.get("created", "")),
        notes=[str(n) for n in _notes(data)],
    )


def per_request_answers(
    data: dict[str, Any], sample_rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    inputs = data.get("holdout", {}).get("inputs", [])
    out = [
        {"input": x, "person": "", "answers": {m["name"]: [] for m in data.get("methods", [])}}
        for x in inputs
    ]
    for s in sample_rows:
        if s.get("kind") != "sample":
            continue
        r = s.get("request")
        if isinstance(r, int) and 0 <= r < len(out):
            out[r]["person"] = s.get("person_output", "")
            out[r]["answers"].setdefault(s["method"], []).append(s.get("output", ""))
    return out


def _notes(data: dict[str, Any]) -> list[str]:
    notes = []
    if not data.get("human", {}).get("n_picks"):
        notes.append("No blind A/B picks yet: make some in the Compare tab, then rerun evaluate.")
    if not data.get("judge", {}).get("used"):
        notes.append("The judge did not run (evaluate.judge, or no rubric).")
    return notes


# --------------------------------------------------------------------------- formatting


def _num(x: Any, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _ci(cell: dict[str, Any], digits: int = 2, pct: bool = False) -> str:
    v = cell.get("value")
    if v is None:
        return "–"
    f = (lambda x: f"{100 * x:.0f}%") if pct else (lambda x: f"{x:.{digits}f}")
    text = f(v)
    if cell.get("low") is not None and cell.get("high") is not None:
        text += f" [{f(cell['low'])}–{f(cell['high'])}]"
    if cell.get("n") is not None:
        text += f" n={cell['n']}"
    return text


def _quote(text: str) -> str:
    text = (text or "").strip() or "(empty)"
    return "\n".join("> " + line if line.strip() else ">" for line in text.splitlines())


def _cell_md(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------- plots


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_nll(data: dict[str, Any], path: Path) -> Path | None:
    methods = [m["name"] for m in data.get("methods", [])]
    nll = [
        (m, data["metrics"][m]["nll"])
        for m in methods
        if data["metrics"].get(m, {}).get("nll", {}).get("mean") is not None
    ]
    if not nll:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(nll) + 1), 3.4), dpi=110)
    xs = range(len(nll))
    means = [d["mean"] for _, d in nll]
    lows = [d["mean"] - d["low"] if d.get("low") is not None else 0 for _, d in nll]
    highs = [d["high"] - d["mean"] if d.get("high") is not None else 0 for _, d in nll]
    ax.bar(xs, means, yerr=[lows, highs], capsize=4, color="#4C72B0")
    ax.set_xticks(list(xs), [ev.method_label(m) for m, _ in nll], rotation=20)
    ax.set_ylabel("NLL per token (lower = more like you)")
    ax.set_title("Likelihood of your held-out texts")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_matrix(data: dict[str, Any], path: Path) -> Path | None:
    import numpy as np

    methods = [m["name"] for m in data.get("methods", [])]
    cells = data.get("judge_matrix", {})
    if len(methods) < 2 or not any(c.get("n") for row in cells.values() for c in row.values()):
        return None
    plt = _plt()
    grid = np.full((len(methods), len(methods)), np.nan)
    for i, a in enumerate(methods):
        for j, b in enumerate(methods):
            c = cells.get(a, {}).get(b)
            if c and c.get("n"):
                grid[i, j] = c["rate"]
    fig, ax = plt.subplots(figsize=(1.0 * len(methods) + 2.5, 0.8 * len(methods) + 1.8), dpi=110)
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdBu")
    labels = [ev.method_label(m) for m in methods]
    ax.set_xticks(range(len(methods)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(methods)), labels)
    for i in range(len(methods)):
        for j in range(len(methods)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("against")
    ax.set_ylabel("method")
    ax.set_title("Judge win rate (row vs column)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# The curves worth a panel, in order; each with the series drawn beside it. Scales differ
# (a summed log-probability next to a DPO loss hides the loss), so one panel per curve.
TRAINING_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("train/loss", ("val/loss",)),
    ("ditto/sft_loss", ("ditto/sft_stop_loss",)),
    ("ditto/dpo_loss", ()),
    ("ditto/pair_accuracy", ()),
    ("rl/reward", ()),
    ("dev/win_rate", ("dev/win_rate_low", "dev/win_rate_high")),
    ("rl/sample_chars", ()),
    ("rm/heldout_accuracy", ()),
)
MAX_PANELS = 4


def training_panels(curves: dict[str, list[tuple[int, float]]]) -> list[list[str]]:
    """Which series go in which panel: the known curves first, else the first few others."""
    panels = [[main, *(c for c in extra if c in curves)] for main, extra in TRAINING_PANELS]
    panels = [p for p in panels if p[0] in curves]
    if not panels:
        panels = [[name] for name in sorted(curves)]
    return panels[:MAX_PANELS]


RUN_NAME = re.compile(r"^(?P<stage>.+)-\d{8}-\d{6}(?:-\d+)?$")


def resumed_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """A run's curves with the steps of the runs it resumed from (the same stage's earlier
    run folders, newest first, each giving the steps before those already there), as the
    app's Train tab draws them: a checkpoint built across runs shows its whole curve."""
    curves = {k: list(v) for k, v in ev.training_curves(run_dir).items()}
    m = RUN_NAME.match(run_dir.name)
    steps = [s for v in curves.values() for s, _ in v]
    limit = min(steps) if steps else 0
    if m is None or limit <= 1 or not run_dir.parent.is_dir():
        return curves
    earlier = sorted(
        (p for p in run_dir.parent.iterdir() if p.is_dir() and p.name < run_dir.name),
        key=lambda p: p.name,
        reverse=True,
    )
    for run in earlier:
        other = RUN_NAME.match(run.name)
        if other is None or other["stage"] != m["stage"]:
            continue
        before = {
            k: [(s, x) for s, x in v if s < limit] for k, v in ev.training_curves(run).items()
        }
        before = {k: v for k, v in before.items() if v}
        if not before:
            continue
        for k, v in before.items():
            curves[k] = sorted(v + curves.get(k, []))
        limit = min(s for v in before.values() for s, _ in v)
        if limit <= 1:
            break
    return curves


def plot_training(method: str, run_dir: Path, path: Path) -> Path | None:
    curves = {k: v for k, v in resumed_curves(run_dir).items() if not k.startswith("eval/") and v}
    if not curves:
        return None
    panels = training_panels(curves)
    plt = _plt()
    fig, axes = plt.subplots(
        1, len(panels), figsize=(3.2 * len(panels), 3.0), dpi=110, squeeze=False
    )
    for ax, names in zip(axes[0], panels, strict=True):
        for name in names:
            points = sorted(curves[name])
            style = "--" if name != names[0] else "-"
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                style,
                marker="." if len(points) < 30 and name == names[0] else None,
                label=name,
            )
        ax.set_title(names[0], fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(names) > 1:
            ax.legend(fontsize=6)
    fig.suptitle(f"{ev.method_label(method)}: training curves", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- the report


def write_report(ws: Workspace, data: dict[str, Any] | None = None) -> list[Path]:
    """Write results/report.md and results/plots/*.png; returns the paths written."""
    data = data if data is not None else ev.read_evaluation(ws.results_dir)
    if data is None:
        raise FileNotFoundError(
            f"{ws.rel(ws.result(ev.EVALUATION_FILE))} not found: run evaluate first"
        )
    plots_dir = ws.results_dir / PLOTS_DIR
    plots_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    plots: dict[str, Path] = {}
    for key, fn in (("nll", plot_nll), ("win_rates", plot_matrix)):
        p = fn(data, plots_dir / f"{key}.png")
        if p:
            plots[key] = p
    for m in data.get("methods", []):
        if m.get("run"):
            p = plot_training(
                m["name"], ws.root / m["run"], plots_dir / f"training_{m['name']}.png"
            )
            if p:
                plots[f"training_{m['name']}"] = p
    written += plots.values()
    samples = ev.read_rows(ws.result(ev.SAMPLES_FILE))
    previous = _previous_rubric_run(ws, data)
    text = render_markdown(
        data, samples, {k: f"{PLOTS_DIR}/{p.name}" for k, p in plots.items()}, previous
    )
    text = paired.insert_section(text, data.get("paired"))  # after the summary
    written.insert(0, atomic_write_text(ws.result(REPORT_FILE), text))
    return written


def _previous_rubric_run(ws: Workspace, data: dict[str, Any]) -> dict[str, Any] | None:
    """The latest earlier evaluation (kept in its run folder) made under another rubric."""
    runs = sorted(
        ws.runs_dir.glob("evaluate-*/evaluation.json"),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for p in runs:
        try:
            old = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if (
            isinstance(old, dict)
            and old.get("rubric_sha")
            and old.get("rubric_sha") != data.get("rubric_sha")
        ):
            return old
    return None


def render_markdown(
    data: dict[str, Any],
    samples: list[dict[str, Any]],
    plots: dict[str, str],
    previous: dict[str, Any] | None = None,
) -> str:
    methods = [m["name"] for m in data.get("methods", [])]
    out: list[str] = ["# Persona report: which method writes most like you\n"]
    out += _intro(data)
    out += _judge_intro(data)
    out += _summary_table(data)
    out += _plots_section(plots)
    out += _matrix_section(data, methods)
    out += _human_section(data)
    out += _one_request(data, samples, methods)
    out += _cost_section(data, methods)
    out.append("## Analysis\n")
    out += analysis(data, previous)
    return "\n".join(out).rstrip() + "\n"


def _rate(cell: dict[str, Any], with_n: bool = True) -> str:
    """A win-rate dict (``rate``, ``low``, ``high``, ``n``) as "rate [low–high] n=" by _ci."""
    return _ci(
        {
            "value": cell.get("rate"),
            "low": cell.get("low"),
            "high": cell.get("high"),
            "n": cell.get("n") if with_n else None,
        },
        pct=True,
    )


def _intro(data: dict[str, Any]) -> list[str]:
    hold = data.get("holdout", {})
    return [
        f"Generated {data.get('created', '')} by `persona run evaluate` on the {data.get('backend')} backend, "
        f"policy `{data.get('policy_model')}`. Every method answered the **{hold.get('n', 0)} held-out "
        f"requests** (demonstrations {', '.join(str(i + 1) for i in hold.get('indices', []))}; no stage trained on them), "
        f"{data.get('samples_per_request')} sample(s) each; {data.get('train_demos')} demonstrations were for training. "
        "Per-sample texts behind every number: `evaluation_samples.jsonl`, the judge's answers: "
        "`evaluation_judgements.jsonl`, all numbers: `evaluation.json`.\n"
    ]


def _judge_intro(data: dict[str, Any]) -> list[str]:
    """Which judge, how it combined both orders, how much it decided, its bias, whether it
    can tell the person's text from a model's, and in words when not to trust it."""
    judge = data.get("judge", {})
    if not judge.get("used"):
        return []
    st = judge.get("stats", {})
    bias = st.get("mean_position_bias")
    out = [
        f"Judge: `{judge.get('model')}` "
        + (
            f"(reward-model checkpoint `{judge.get('checkpoint')}`)"
            if judge.get("checkpoint")
            else "(the base model, untrained)"
        )
        + f", {judge.get('mode')} mode, both orders; {st.get('comparisons', 0)} comparisons, "
        f"{_pct(st.get('decided_share'))} decided (the rest ties), mean position bias "
        + (f"{bias:+.2f} nats" if bias is not None else "not measured (sampled verdicts)")
        + f", position consistency {_pct(st.get('consistency_rate'))}, "
        f"{_pct(st.get('unparsable_rate'))} answers unparsable.\n"
    ]
    acc = judge.get("accuracy") or {}
    if acc:
        out.append(
            "Judge accuracy on the held-out demonstrations (how often it prefers your own text "
            "to a model's sample for the same request; 50% is chance): "
            + "; ".join(
                f"vs {'the base' if k == 'vs_base' else 'few-shot'} "
                + _ci({"value": c.get("value"), "low": c["ci"][0], "high": c["ci"][1], "n": c.get("n")}, pct=True)
                for k, c in acc.items()
                if c.get("n")
            )
            + ".\n"
        )  # fmt: skip
    for line in ev.judge_trust_notes(data):
        out.append(f"**{line}**\n")
    if (st.get("unparsable_rate") or 0) > 0.5:
        out.append(
            "**Most of the judge's answers were unparsable, so its win rates are mostly ties, not "
            "evidence.** Train the judge (reward-model stage) or use a stronger judge model.\n"
        )
    return out


def _summary_table(data: dict[str, Any]) -> list[str]:
    out = ["## Summary\n"]
    w = out.append
    w("| method | " + " | ".join(h for _, h, _ in ev.COLUMNS) + " |")
    w("|---|" + "---|" * len(ev.COLUMNS))
    for r in ev.summary_rows(data):
        cells = []
        for key, _h, _b in ev.COLUMNS:
            c = r["cells"][key]
            if key in ("judge", "dev", "human"):
                s = _ci(c, pct=True)
            elif key == "sampled_tokens":
                s = _num(c["value"])
            elif key == "train_seconds":
                s = _num(c["value"], 0) if c["value"] is not None else "–"
            else:
                s = _ci(c, digits=3 if key == "nll" else 2)
            cells.append(f"**{s}**" if key in r["best"] else s)
        w(f"| {r['label']} | " + " | ".join(cells) + " |")
    person = data.get("person", {})
    w(
        "\nHow to read it: NLL is the mean negative log-likelihood per token of *your own* held-out text "
        "under the method (lower = the method finds your writing more likely); style distance is the "
        "stylometric profile distance to your training texts in units of your own spread (0 = your average; "
        f"your own held-out texts score {_num(person.get('style_distance', {}).get('mean'))}); MiniLM similarity "
        "is the cosine similarity of each answer to your text for the same request; win rates count ties as "
        "half. Brackets are 95% intervals (t for means, Wilson for rates); n is the count behind each "
        "number (requests for NLL, samples for style, comparisons or picks for rates). Best per column in bold.\n"
    )
    if ev.judge_decided_nothing(data):
        w(
            "The judge and dev columns are empty: the judge decided (almost) none of its "
            "comparisons, so there is no win rate to show.\n"
        )
    return out


def _plots_section(plots: dict[str, str]) -> list[str]:
    if not plots:
        return []
    out = ["## Plots\n"]
    for key, title in (("nll", "NLL per method"), ("win_rates", "Judge win-rate matrix")):
        if key in plots:
            out.append(f"![{title}]({plots[key]})\n")
    for key, rel in plots.items():
        if key.startswith("training_"):
            out.append(f"![Training curves of {ev.method_label(key[len('training_') :])}]({rel})\n")
    return out


def _matrix_section(data: dict[str, Any], methods: list[str]) -> list[str]:
    out = ["## Judge win-rate matrix (held-out requests, your text as the reference)\n"]
    w = out.append
    if not data.get("judge", {}).get("used"):
        w(
            "The judge did not run (`evaluate.judge = false`, or the rubric in data/prompts.toml is empty).\n"
        )
        return out
    if ev.judge_decided_nothing(data):
        w(
            "No win rates: the judge decided (almost) none of its comparisons (every one a tie), "
            "so a matrix would read 50% everywhere without meaning it. See the judge's statistics "
            "above.\n"
        )
        return out
    cells = data.get("judge_matrix", {})
    labels = [ev.method_label(m) for m in methods]
    w("| row vs column | " + " | ".join(labels) + " |")
    w("|---|" + "---|" * len(labels))
    for a in methods:
        row = []
        for b in methods:
            c = cells.get(a, {}).get(b)
            row.append("–" if a == b or not c or not c.get("n") else _rate(c))
        w(f"| {ev.method_label(a)} | " + " | ".join(row) + " |")
    dev = data.get("dev_win_rates", {})
    if dev:
        w(
            "\nOn the RL dev prompts (no reference), against the base: "
            + "; ".join(f"{ev.method_label(m)} {_rate(d)}" for m, d in dev.items() if d.get("n"))
            + "."
        )
    w("")
    return out


def _human_section(data: dict[str, Any]) -> list[str]:
    human = data.get("human", {})
    out = ["## Your blind A/B picks\n"]
    w = out.append
    if not human.get("n_picks"):
        w(
            "No picks yet, so this report cannot say which method *you* prefer, nor whether the judge agrees "
            "with you. Open the Compare tab's blind A/B mode, pick between answers, then rerun `evaluate`.\n"
        )
        return out
    w("| A | B | A's win rate | wins / losses / ties |")
    w("|---|---|---|---|")
    for p in human.get("pairs", []):
        w(
            f"| {ev.method_label(p['a'])} | {ev.method_label(p['b'])} | {_rate(p)} | "
            f"{p['wins']} / {p['losses']} / {p['ties']} |"
        )
    ag = human.get("agreement", {})
    if ag.get("n"):
        w(
            f"\nThe judge agrees with you on {ag['agree']} of {ag['n']} picks ({_rate(ag, with_n=False)}; "
            f"{ag.get('by_request', 0)} compared on the same request, "
            f"{ag.get('by_pair', 0)} on the judge's overall verdict for the pair).\n"
        )
    else:
        w(
            "\nThe judge compared none of the pairs you picked, so its agreement with you is unknown.\n"
        )
    return out


def _one_request(
    data: dict[str, Any], samples: list[dict[str, Any]], methods: list[str]
) -> list[str]:
    reqs = per_request_answers(data, samples)
    if not reqs:
        return []
    r = reqs[0]
    out = ["## One held-out request, every method\n", f"**Request:** {_cell_md(r['input'])}\n"]
    out += ["**Your text:**\n", _quote(r["person"]) + "\n"]
    for m in methods:
        answers = r["answers"].get(m) or [""]
        out += [f"**{ev.method_label(m)}:**\n", _quote(answers[0]) + "\n"]
    return out


def _cost_section(data: dict[str, Any], methods: list[str]) -> list[str]:
    metrics = data.get("metrics", {})
    out = [
        "## Cost\n",
        "| method | data needed | sampling (s, overlapped) | tokens sampled | training (s) | steps | tokens trained |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        c = metrics.get(m, {}).get("cost", {})
        t = c.get("training") or {}
        out.append(
            f"| {ev.method_label(m)} | {c.get('data', '')} | {_num(c.get('sampling_seconds'), 1)} | {_num(c.get('sampled_tokens'))} | "
            f"{_num(t.get('seconds'), 0)} | {_num(t.get('steps'))} | {_num(t.get('tokens'), 0) if t.get('tokens') is not None else 'not logged'} |"
        )
    out.append(f"\nThe whole evaluation took {_num(data.get('wall_seconds'), 0)} s.\n")
    return out


def _pct(x: Any) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


# --------------------------------------------------------------------------- analysis


def _val(data: dict[str, Any], method: str, key: str, field_: str = "mean") -> float | None:
    d = data.get("metrics", {}).get(method, {}).get(key) or {}
    return d.get(field_) if d.get("n") else None


def _cmp(data: dict[str, Any], a: str, b: str, key: str, lower_better: bool) -> str:
    """'better/worse/about the same' with numbers, judging overlap of intervals."""
    da = data.get("metrics", {}).get(a, {}).get(key) or {}
    db = data.get("metrics", {}).get(b, {}).get(key) or {}
    va, vb = da.get("mean"), db.get("mean")
    if va is None or vb is None:
        return "unknown"
    better = va < vb if lower_better else va > vb
    overlap = (
        da.get("low") is None
        or db.get("low") is None
        or not (da["high"] < db["low"] or db["high"] < da["low"])
    )
    word = "better" if better else "worse"
    if va == vb:
        word = "the same"
    note = " (intervals overlap: not a clear difference)" if overlap and va != vb else ""
    return f"{word} ({va:.3f} vs {vb:.3f}){note}"


NO_DECISION = "no result (the judge decided almost nothing)"


def _judge_rate(data: dict[str, Any], a: str, b: str) -> str:
    c = data.get("judge_matrix", {}).get(a, {}).get(b)
    if not c or not c.get("n"):
        return "not judged"
    if ev.judge_decided_nothing(data):
        return NO_DECISION
    return _rate(c)


def analysis(data: dict[str, Any], previous: dict[str, Any] | None = None) -> list[str]:
    names = {m["name"] for m in data.get("methods", [])}
    out: list[str] = []
    w = out.append
    cost = {m: data["metrics"].get(m, {}).get("cost", {}) for m in names}

    w("### Prompting: pros and cons\n")
    if "prompting" in names:
        w(
            f"- Against the base policy, the system prompt makes your held-out text "
            f"{_cmp(data, 'prompting', 'baseline', 'nll', True)} in NLL, "
            f"{_cmp(data, 'prompting', 'baseline', 'style_distance', True)} in style distance, and the judge "
            f"prefers it to the base {_judge_rate(data, 'prompting', 'baseline')}."
        )
        if "few-shot" in names:
            w(
                f"- Against few-shot (your training demonstrations in context): NLL "
                f"{_cmp(data, 'prompting', 'few-shot', 'nll', True)}; judge {_judge_rate(data, 'prompting', 'few-shot')}."
            )
        w(
            "- Pros: no training, no data beyond a paragraph, instant to change and to undo. Cons: a small "
            "model follows a description of a style loosely; it describes your style instead of showing it, "
            "and the prompt costs context tokens on every request.\n"
        )
    else:
        w(
            "No system prompt, so prompting was not evaluated: write one in the Prompts & Rubric tab.\n"
        )

    w("### SFT on synthetic data\n")
    if "sft" in names:
        w(
            f"- Trained on {cost['sft'].get('data', '?')}; {_num((cost['sft'].get('training') or {}).get('seconds'), 0)} s of training. "
            f"NLL {_cmp(data, 'sft', 'baseline', 'nll', True)} against the base and "
            f"{_cmp(data, 'sft', 'few-shot', 'nll', True)} against few-shot; style distance "
            f"{_cmp(data, 'sft', 'baseline', 'style_distance', True)} against the base. The judge prefers it to the base "
            f"{_judge_rate(data, 'sft', 'baseline')} and to few-shot {_judge_rate(data, 'sft', 'few-shot')}."
        )
        w(
            "- Pros: many examples from a few demonstrations, no prompt at run time. Cons: it learns the "
            "teacher's imitation of you, not you: where SFT is worse than few-shot on your own held-out text, "
            "the synthetic data drifted from your style (review more rows, or tighten the system prompt the "
            "teacher writes with).\n"
        )
    else:
        w(
            "SFT has no checkpoint: run synth-inputs, synth-outputs (review the rows) and sft, then evaluate.\n"
        )

    w("### RLAIF: candidate reward hacking\n")
    hack = [h for h in data.get("reward_hacking_candidates", []) if h["method"] == "rlaif"]
    if "rlaif" in names:
        pl = data.get("person", {}).get("length_words", {})
        w(
            f"- The judge prefers RLAIF to the base {_judge_rate(data, 'rlaif', 'baseline')}"
            + (f" and to SFT {_judge_rate(data, 'rlaif', 'sft')}" if "sft" in names else "")
            + f"; on the dev prompts: {_dev(data, 'rlaif')}. Its answers average "
            f"{_num(_val(data, 'rlaif', 'length_words'), 0)} words against your {_num(pl.get('mean'), 0)}; style distance "
            f"{_num(_val(data, 'rlaif', 'style_distance'))}."
        )
        if hack:
            w(
                f"- {len(hack)} samples the judge preferred but that you rejected or that drift in length or style:"
            )
            for h in hack[:5]:
                w(
                    f"  - `{h['id']}` ({h['judge_wins']} wins, {h['judge_losses']} losses): {'; '.join(h['reasons'])}"
                )
        elif ev.judge_decided_nothing(data):
            w(
                "- The judge decided (almost) nothing, so it preferred no sample: reward hacking "
                "cannot be checked with it."
            )
        else:
            w("- No sample the judge preferred was rejected by you or drifted in length or style.")
        if not data.get("human", {}).get("n_picks"):
            w(
                "- Without your blind picks, rejection by you cannot be checked: make picks in the Compare tab."
            )
    else:
        w("RLAIF has no checkpoint: run reward-model, rl-prompts and rlaif, then evaluate.")
    other = [h for h in data.get("reward_hacking_candidates", []) if h["method"] != "rlaif"]
    if other:
        w(f"- Other trained methods have {len(other)} such samples too (see `evaluation.json`).")
    if previous:
        w(
            f"- The rubric changed since the evaluation of {previous.get('created')} (rubric {previous.get('rubric_sha')} → "
            f"{data.get('rubric_sha')}). Judge win rate against all, then → now: "
            + "; ".join(
                f"{ev.method_label(m)} {_pct((previous.get('metrics', {}).get(m, {}).get('judge_vs_all') or {}).get('rate'))} → "
                f"{_pct((data['metrics'].get(m, {}).get('judge_vs_all') or {}).get('rate'))}"
                for m in sorted(names)
            )
            + "."
        )
    else:
        w(
            "- What changed when the rubric changed: no earlier evaluation used another rubric. Edit the rubric "
            "(Prompts & Rubric tab), retrain reward-model and rlaif, and rerun evaluate to compare."
        )
    w("")

    w("### DITTO against the others\n")
    if "ditto" in names:
        ranks = _ranks(data)
        w(
            f"- Quality: NLL {_cmp(data, 'ditto', 'few-shot', 'nll', True)} against few-shot, "
            + (f"{_cmp(data, 'ditto', 'sft', 'nll', True)} against SFT; " if "sft" in names else "")
            + f"judge vs few-shot {_judge_rate(data, 'ditto', 'few-shot')}"
            + (f", vs RLAIF {_judge_rate(data, 'ditto', 'rlaif')}" if "rlaif" in names else "")
            + f". Rank by NLL: {ranks.get('ditto', '?')} of {len(ranks)}."
        )
        w(
            f"- Data: {cost['ditto'].get('data', '?')} (no teacher, no synthetic data, no judge)"
            + (f"; SFT needed {cost['sft'].get('data')}" if "sft" in names else "")
            + (f"; RLAIF {cost['rlaif'].get('data')}" if "rlaif" in names else "")
            + "."
        )
        times = {
            m: (cost[m].get("training") or {}).get("seconds")
            for m in ("sft", "rlaif", "ditto")
            if m in names
        }
        w(
            "- Time: "
            + ", ".join(f"{ev.method_label(m)} {_num(t, 0)} s" for m, t in times.items())
            + " of training.\n"
        )
    else:
        w("DITTO has no checkpoint: run ditto, then evaluate.\n")

    w("### What this data cannot tell\n")
    n = data.get("holdout", {}).get("n", 0)
    w(
        f"- With {n} held-out requests, intervals are wide: differences whose intervals overlap are not "
        "established. More demonstrations (and `data.holdout`) or more `evaluate.samples` narrow them."
    )
    if not data.get("human", {}).get("n_picks"):
        w("- Your own preference: no blind picks yet (Compare tab).")
    if not data.get("judge", {}).get("checkpoint"):
        w(
            "- The judge is the untrained base model: its verdicts are weak evidence. Train it (reward-model stage)."
        )
    return out


def _dev(data: dict[str, Any], m: str) -> str:
    d = data.get("dev_win_rates", {}).get(m)
    if not d or not d.get("n"):
        return "not measured (no results/rl_dev_data.jsonl)"
    if ev.judge_decided_nothing(data):
        return NO_DECISION
    return _rate(d)


def _ranks(data: dict[str, Any]) -> dict[str, int]:
    vals = [(m["name"], _val(data, m["name"], "nll")) for m in data.get("methods", [])]
    ordered = sorted((v, m) for m, v in vals if v is not None)
    return {m: i + 1 for i, (_v, m) in enumerate(ordered)}
