"""The stage registry: the study's stages in order (README's stage table)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.stages import (
    baseline,
    demos,
    ditto,
    evaluate,
    prompting,
    reward_model,
    rl_prompts,
    rlaif,
    sft,
    synth_inputs,
    synth_outputs,
)
from engine.store.workspace import RESULT_FILES, Workspace


@dataclass(frozen=True)
class StageSpec:
    name: str
    number: int
    title: str
    run: Callable[..., Any] | None
    outputs: tuple[str, ...] = ()  # workspace-relative
    trains: bool = False  # writes checkpoints; a rerun resumes

    def output_paths(self, ws: Workspace) -> list[Path]:
        return [ws.root / o for o in self.outputs]


def _result(stage: str) -> str:
    return f"results/{RESULT_FILES[stage]}"


_SPECS = [
    StageSpec("demos", 1, "Edit and validate the demonstrations", demos.run, ("data/data.json",)),
    StageSpec(
        "baseline",
        2,
        "Sample the base policy on each demo input",
        baseline.run,
        (_result("baseline"),),
    ),
    StageSpec(
        "prompting",
        3,
        "Sample the policy with the system prompt",
        prompting.run,
        (_result("prompting"),),
    ),
    StageSpec(
        "synth-inputs",
        4,
        "Teacher writes new requests per topic seed",
        synth_inputs.run,
        (_result("synth-inputs"),),
    ),
    StageSpec(
        "synth-outputs",
        5,
        "Teacher answers them in your style; you review",
        synth_outputs.run,
        (_result("synth-outputs"),),
    ),
    StageSpec(
        "sft",
        6,
        "LoRA SFT on the reviewed synthetic pairs",
        sft.run,
        (_result("sft"),),
        trains=True,
    ),
    StageSpec(
        "reward-model",
        7,
        "Rubric-grounded pairwise judge",
        reward_model.run,
        (_result("reward-model"),),
        trains=True,
    ),
    StageSpec(
        "rl-prompts",
        8,
        "Synthesize RL prompts, split train/dev",
        rl_prompts.run,
        (_result("rl-prompts"), "results/rl_dev_data.jsonl"),
    ),
    StageSpec(
        "rlaif",
        9,
        "RL from the judge's pairwise tournament",
        rlaif.run,
        (_result("rlaif"),),
        trains=True,
    ),
    StageSpec(
        "ditto",
        10,
        "DITTO: SFT on demos, then online DPO rounds",
        ditto.run,
        (_result("ditto"),),
        trains=True,
    ),
    StageSpec(
        "evaluate",
        11,
        "Compare every method on held-out requests",
        evaluate.run,
        (_result("evaluate"), "results/evaluation.json"),
    ),
]

STAGES: dict[str, StageSpec] = {s.name: s for s in _SPECS}
