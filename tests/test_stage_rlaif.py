"""rlaif on the tiny model: the rule judge's RL lowers sample length; the judge path writes
every file; resume continues from the checkpoint."""

from __future__ import annotations

import json

from conftest import needs_backend

from engine.pipeline.runner import Runner, list_runs, load_run_events
from engine.run.events import Metric, StageFinished
from engine.store.checkpoints import latest_checkpoint
from engine.store.results import read_method_outputs, rl_prompt_row
from engine.store.workspace import Workspace

pytestmark = needs_backend

REQUESTS = [
    "Email Sam Ortiz, the lab manager, to order two more pipette racks by Friday 5/2.",
    "Write to Prof. Kim to ask for a recommendation letter for the NSF fellowship due Oct 15.",
    "Tell Lena from facilities that the fume hood in room 310 has been beeping since Monday.",
    "Ask Dr. Patel's office whether my March 12 visit was billed to the right insurance plan.",
    "Reply to Jordan declining the invitation to chair the soil session on Tue 6/12.",
    "Let my co-author Wei know the revised figures will be two days late, now due Thu 11/6.",
]


def _write_prompts(ws: Workspace) -> None:
    rows = [
        rl_prompt_row(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": r}],
            "Shorter is better.",
        )
        for r in REQUESTS[:4]
    ]
    dev = [
        rl_prompt_row([{"role": "user", "content": r}], "Shorter is better.") for r in REQUESTS[4:]
    ]
    ws.result("rl_train_data.jsonl").parent.mkdir(parents=True, exist_ok=True)
    ws.result("rl_train_data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ws.result("rl_dev_data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev))


def _metrics(ws: Workspace, name: str) -> list[tuple[int, float]]:
    out = []
    for run in list_runs(ws, "rlaif"):
        out += [
            (e.step, e.value)
            for e in load_run_events(run)
            if isinstance(e, Metric) and e.name == name
        ]
    return sorted(out)


RULE_TOML = """
[rlaif]
judge = "shorter"
init = "base"
steps = {steps}
batch_size = 4
group_size = 4
lr = {lr}
rank = 4
max_tokens = 12
eval_every = 0
checkpoint_every = {ckpt}
sample_after = false
"""


async def test_rule_judge_rl_makes_samples_shorter(ws: Workspace):
    ws.config_path.write_text(
        ws.config_path.read_text() + RULE_TOML.format(steps=16, lr=0.05, ckpt=0) + "seed = 1\n"
    )
    _write_prompts(ws)
    final = await Runner(ws).run("rlaif")
    assert isinstance(final, StageFinished), final
    chars = [v for _, v in _metrics(ws, "rl/sample_chars")]
    assert len(chars) == 16
    first, last = sum(chars[:3]) / 3, sum(chars[-3:]) / 3
    # Seeded. RL at this scale is chaotic in detail: with the current sampler, rlaif.seed
    # 0-3 went from about 80 characters to 0.74 / 0.45 / 0.30 / 0.46 of that, so the bound
    # is loose; a policy that does not learn stays near 80.
    assert last < 0.7 * first, chars
    names = {
        e.name
        for run in list_runs(ws, "rlaif")
        for e in load_run_events(run)
        if isinstance(e, Metric)
    }
    assert {
        "rl/reward",
        "rl/tie_rate",
        "rl/unparsable_rate",
        "rl/kl_init",
        "time/sampling",
        "time/judging",
        "time/training",
    } <= names


JUDGE_TOML = """
[rlaif]
init = "sft"
steps = {steps}
batch_size = 2
group_size = 3
rank = 4
max_tokens = 8
eval_every = 2
dev_prompts = 2
checkpoint_every = 1
concurrency = 8
"""


async def test_judge_path_writes_every_file_and_resumes(ws: Workspace):
    """The real judge path (the tiny base judge in verdict mode), a cancel after the first
    checkpoint, then a rerun that resumes from it and finishes."""
    ws.config_path.write_text(ws.config_path.read_text() + JUDGE_TOML.format(steps=3))
    _write_prompts(ws)
    runner = Runner(ws)

    def stop_after_first_checkpoint(ev):
        if type(ev).__name__ == "CheckpointSaved":
            runner.cancel()

    runner.add_listener(stop_after_first_checkpoint)
    first = await runner.run("rlaif")
    assert not isinstance(first, StageFinished)
    entry = latest_checkpoint(ws.results_dir, "rlaif")
    assert entry and not entry["finished"] and 1 <= entry["step"] < 3

    final = await Runner(ws).run("rlaif")
    assert isinstance(final, StageFinished), final
    entry2 = latest_checkpoint(ws.results_dir, "rlaif")
    assert entry2["finished"] and entry2["step"] == 3
    steps = [s for s, _ in _metrics(ws, "rl/reward")]
    assert steps == sorted(set(steps)) and steps[-1] == 3  # no step trained twice
    # the dev evaluation ran; the random tiny judge decides (almost) nothing, and then the
    # log says so instead of showing a win rate of ties
    dev = [
        e.message
        for run in list_runs(ws, "rlaif")
        for e in load_run_events(run)
        if getattr(e, "message", "").startswith("dev @ step ")
    ]
    assert dev and dev[-1].split()[3].rstrip(":") in ("2", "3"), dev
    rates = _metrics(ws, "dev/win_rate")
    assert all("no win rate" in m for m in dev) if not rates else rates[-1][0] in (2, 3)
    rows = read_method_outputs(ws.result("rl_model_outputs.json")).rows
    assert len(rows) == len(ws.load_demos())
    assert set(rows[0]) == {"input", "expected_output", "output"}


async def test_rerun_after_a_finished_training_only_samples(ws: Workspace):
    """A finished training of the same prompts and settings is reused: the rerun trains no
    step and writes the outputs from the recorded checkpoint. The entry records the context
    the policy trained in and the held-out set."""
    from engine.store.config import load_config
    from engine.store.split import split_fingerprint, workspace_split

    toml = RULE_TOML.format(steps=2, lr=0.01, ckpt=0).replace(
        "sample_after = false", "sample_after = true"
    )
    ws.config_path.write_text(ws.config_path.read_text() + toml)
    _write_prompts(ws)
    assert isinstance(await Runner(ws).run("rlaif", ["rlaif.sample_after=false"]), StageFinished)
    entry = latest_checkpoint(ws.results_dir, "rlaif")
    assert entry["finished"] and entry["step"] == 2
    assert entry["use_system_prompt"] is True  # the train rows carry the system prompt
    split = workspace_split(ws, load_config(ws.config_path).data, record=False)
    assert entry["holdout"] == split_fingerprint(split)
    (first,) = list_runs(ws, "rlaif")
    assert not ws.result("rl_model_outputs.json").exists()

    final = await Runner(ws).run("rlaif")
    assert isinstance(final, StageFinished), final
    assert "reused" in final.summary
    second = [r for r in list_runs(ws, "rlaif") if r != first][0]
    assert not [e for e in load_run_events(second) if isinstance(e, Metric)]
    assert latest_checkpoint(ws.results_dir, "rlaif")["sampler_path"] == entry["sampler_path"]
    rows = read_method_outputs(ws.result("rl_model_outputs.json")).rows
    assert len(rows) == len(ws.load_demos())


async def test_rule_judge_rl_learns_through_a_constant_slot_bias(ws: Workspace, monkeypatch):
    """The rule judge again, now answering "A" in both orders every time (a slot bias of 3
    nats above a 1-nat signal, like the small model judges): under the agreement rule every
    matchup would tie; with calibrated margins the policy still learns to be shorter."""
    import functools

    from engine.llm.judge import RuleJudge
    from engine.stages import rlaif

    monkeypatch.setattr(rlaif, "RuleJudge", functools.partial(RuleJudge, slot_bias=3.0))
    # no format penalty: the judge is the only source of reward (with the agreement rule
    # every step logs "every group tied; no update" and the length stays put)
    ws.config_path.write_text(
        ws.config_path.read_text()
        + RULE_TOML.format(steps=16, lr=0.05, ckpt=0)
        + "seed = 1\nformat_penalty = 0.0\n"
    )
    _write_prompts(ws)
    final = await Runner(ws).run("rlaif")
    assert isinstance(final, StageFinished), final
    chars = [v for _, v in _metrics(ws, "rl/sample_chars")]
    assert len(chars) == 16
    # seeded: 85 -> 23 characters here; under reward_model.combine = "agree" the same run
    # ties every matchup, trains no step and stays at 78-83
    assert sum(chars[-3:]) / 3 < 0.8 * sum(chars[:3]) / 3, chars
    assert {v for _, v in _metrics(ws, "rl/position_bias")} == {3.0}
    assert {v for _, v in _metrics(ws, "rl/position_consistency")} == {0.0}
    ties = [v for _, v in _metrics(ws, "rl/tie_rate")]
    # Only equal lengths tie: rarely while the samples' lengths vary (under the agreement
    # rule every matchup would); here every matchup ties once the policy has settled on one
    # short answer (from step 9).
    assert sum(ties[:6]) / 6 <= 0.25, ties


def test_no_dev_win_rate_when_the_judge_decided_nothing():
    from engine.llm.judge import TIE, make_record
    from engine.stages.rlaif import _dev_result

    ties = [make_record("[RESULT] A", "[RESULT] A", margin_ab=3.0, margin_ba=3.0)] * 8
    (line,) = _dev_result(4, ties)
    assert ties[0].preference == TIE
    assert "decided 0 of 8" in line.message and "no win rate" in line.message
    decided = [make_record("x", "y", margin_ab=3.5, margin_ba=2.5)] * 8  # s = 0.5: current
    events = _dev_result(4, decided)
    assert [e.name for e in events if isinstance(e, Metric)] == [
        "dev/win_rate", "dev/win_rate_low", "dev/win_rate_high"
    ]  # fmt: skip
    assert events[0].value == 1.0
