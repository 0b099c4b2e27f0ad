"""The report: markdown from a hand-made evaluation (best in bold, what the data cannot say,
reward-hacking candidates, a changed rubric), plots as PNG, and load_report's plain data."""

from __future__ import annotations

from engine.eval.report import load_report, render_markdown, write_report
from engine.store.results import write_evaluation, write_evaluation_rows


def _wr(w, lo, t):
    n = w + lo + t
    return {
        "wins": w,
        "losses": lo,
        "ties": t,
        "n": n,
        "rate": (w + t / 2) / n,
        "low": 0.1,
        "high": 0.9,
    }


def _data(rubric_sha="r1"):
    methods = ["baseline", "few-shot", "rlaif"]
    metrics = {
        m: {
            "nll": {"mean": v, "low": v - 0.1, "high": v + 0.1, "n": 2, "tokens": 40},
            "style_distance": {"mean": d, "low": d - 0.1, "high": d + 0.1, "n": 4},
            "embedding_similarity": {"mean": 0.5, "low": 0.4, "high": 0.6, "n": 4},
            "length_words": {"mean": 60.0, "n": 4},
            "judge_vs_all": _wr(*j),
            "cost": {"samples": 4, "sampled_tokens": 100, "data": "x", "training": {"seconds": s}},
        }
        for m, v, d, j, s in zip(
            methods,
            (3.0, 2.0, 2.5),
            (1.0, 0.5, 2.5),
            ((1, 3, 0), (2, 2, 0), (3, 1, 0)),
            (None, None, 12.0),
            strict=True,
        )
    }
    return {
        "created": "2026-01-01T00:00:00",
        "backend": "local",
        "policy_model": "tiny",
        "holdout": {"n": 2, "indices": [1, 4], "inputs": ["req A", "req B"]},
        "train_demos": 8,
        "samples_per_request": 2,
        "rubric_sha": rubric_sha,
        "methods": [{"name": m, "label": m, "run": None} for m in methods],
        "metrics": metrics,
        "person": {"style_distance": {"mean": 0.7, "n": 2}, "length_words": {"mean": 50.0, "n": 8}},
        "judge": {
            "used": True,
            "model": "tiny",
            "checkpoint": None,
            "mode": "verdict",
            "stats": {
                "comparisons": 12,
                "unparsable_rate": 0.0,
                "wins_a": 5,
                "wins_b": 5,
                "ties": 2,
                "decided_share": 10 / 12,
                "mean_position_bias": 0.4,
            },
            "accuracy": {
                "vs_base": {"value": 0.875, "n": 8, "ci": [0.53, 0.98]},
                "vs_few_shot": {"value": 0.5, "n": 8, "ci": [0.22, 0.78]},
            },
        },
        "judge_matrix": {
            "baseline": {"few-shot": _wr(0, 2, 0), "rlaif": _wr(1, 1, 0)},
            "few-shot": {"baseline": _wr(2, 0, 0), "rlaif": _wr(0, 2, 0)},
            "rlaif": {"baseline": _wr(1, 1, 0), "few-shot": _wr(2, 0, 0)},
        },
        "dev_win_rates": {},
        "human": {"n_picks": 0, "pairs": [], "per_method": {}, "agreement": {"n": 0}},
        "reward_hacking_candidates": [
            {
                "id": "rlaif/r0/s1",
                "method": "rlaif",
                "input": "req A",
                "output": "long",
                "judge_wins": 3,
                "judge_losses": 0,
                "reasons": ["length 300 words vs the person's 50 (+25.0 sd)"],
            }
        ],
        "wall_seconds": 5.0,
    }


def test_markdown_from_a_hand_made_evaluation():
    samples = [
        {
            "kind": "sample",
            "method": m,
            "request": 0,
            "input": "req A",
            "person_output": "Hi — mine",
            "output": f"{m} answer",
        }
        for m in ("baseline", "few-shot", "rlaif")
    ]
    md = render_markdown(_data(), samples, {"nll": "plots/nll.png"})
    row = next(line for line in md.splitlines() if line.startswith("| few-shot |"))
    assert "**2.000 [1.900–2.100] n=2**" in row and "**0.50 [0.40–0.60] n=4**" in row
    assert "**" not in next(line for line in md.splitlines() if line.startswith("| baseline |"))
    assert "No picks yet" in md and "Compare tab" in md
    assert "`rlaif/r0/s1`" in md and "length 300 words" in md
    assert "no earlier evaluation used another rubric" in md
    assert "> Hi — mine" in md and "> rlaif answer" in md
    assert "![NLL per method](plots/nll.png)" in md
    assert "DITTO has no checkpoint" in md and "SFT has no checkpoint" in md
    changed = render_markdown(_data("r2"), samples, {}, previous=_data("r1"))
    assert "The rubric changed since the evaluation" in changed


def test_write_and_load_report(ws):
    data = _data()
    write_evaluation(ws.results_dir, data)
    write_evaluation_rows(
        ws.result("evaluation_samples.jsonl"),
        [
            {
                "kind": "sample",
                "method": "rlaif",
                "request": 1,
                "input": "req B",
                "person_output": "mine",
                "output": "o",
            }
        ],
    )
    paths = write_report(ws)
    assert ws.result("report.md") in paths
    for name in ("nll.png", "win_rates.png"):
        assert (ws.results_dir / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    rep = load_report(ws)
    assert [r["method"] for r in rep.rows] == ["baseline", "few-shot", "rlaif"]
    assert rep.rows[1]["best"] == ["nll", "style_distance"] and rep.rows[2]["best"] == ["judge"]
    assert rep.matrix["cells"]["few-shot"]["baseline"]["wins"] == 2
    assert rep.requests[1] == {
        "input": "req B",
        "person": "mine",
        "answers": {"baseline": [], "few-shot": [], "rlaif": ["o"]},
    }
    assert any("No blind A/B picks" in n for n in rep.notes)


def test_load_report_before_evaluate(ws):
    assert load_report(ws) is None


def test_a_judge_that_decided_nothing_shows_no_win_rates():
    """Every comparison a tie: the report says so in words, the judge and dev columns and
    the matrix are empty, and the analysis states no win rate nor an all-clear on reward
    hacking."""
    data = _data()
    data["judge"]["stats"].update(wins_a=0, wins_b=0, ties=12, decided_share=0.0)
    data["judge"]["accuracy"] = {"vs_base": {"value": 0.5, "n": 8, "ci": [0.22, 0.78]}}
    data["dev_win_rates"] = {"rlaif": _wr(0, 0, 4)}
    data["reward_hacking_candidates"] = []
    md = render_markdown(data, [], {})
    assert "**The judge decided 0 of 12 comparisons; the rest are ties." in md
    assert "The judge cannot tell your writing from the base model's samples" in md
    assert "No win rates: the judge decided (almost) none of its comparisons" in md
    row = next(line for line in md.splitlines() if line.startswith("| rlaif |"))
    assert "%" not in row  # no judge or dev rate in the summary row
    assert "| row vs column |" not in md
    assert "prefers RLAIF to the base no result (the judge decided almost nothing)" in md
    assert "on the dev prompts: no result" in md
    assert "No sample the judge preferred was rejected" not in md
    assert "reward hacking cannot be checked" in md


def test_judge_statistics_and_accuracy_in_the_report():
    md = render_markdown(_data(), [], {})
    assert "83% decided (the rest ties), mean position bias +0.40 nats" in md
    assert "vs the base 88% [53%–98%] n=8; vs few-shot 50% [22%–78%] n=8" in md
    # few-shot accuracy's interval includes 0.5: said in plain words; the base's does not
    assert "cannot tell your writing from the few-shot samples" in md
    assert "cannot tell your writing from the base" not in md
    # a decided judge keeps its win rates, formatted by one helper
    assert "| base | – | 0% [10%–90%] n=2 | 50% [10%–90%] n=2 |" in md
