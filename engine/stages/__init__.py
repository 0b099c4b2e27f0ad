"""The stage registry: DESIGN.md's table, in order. ``run`` is None for stages not built yet."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.stages import baseline, demos, prompting, sft, synth_inputs, synth_outputs
from engine.workspace import Workspace


@dataclass(frozen=True)
class StageSpec:
    name: str
    number: int
    title: str
    run: Callable[..., Any] | None
    outputs: tuple[str, ...] = ()  # workspace-relative
    trains: bool = False  # writes checkpoints; a rerun resumes
    needs: tuple[str, ...] = field(default=())  # stages whose outputs it reads

    def output_paths(self, ws: Workspace) -> list[Path]:
        return [ws.root / o for o in self.outputs]


_SPECS = [
    StageSpec("demos", 1, "Edit and validate the demonstrations", demos.run, ("data/data.json",)),
    StageSpec(
        "baseline",
        2,
        "Sample the base policy on each demo input",
        baseline.run,
        ("results/baseline_results.json",),
        needs=("demos",),
    ),
    StageSpec(
        "prompting",
        3,
        "Sample the policy with the system prompt",
        prompting.run,
        ("results/prompt_engineering_results.json",),
        needs=("demos",),
    ),
    StageSpec(
        "synth-inputs",
        4,
        "Teacher writes new requests per topic seed",
        synth_inputs.run,
        ("results/synthetic_inputs.jsonl",),
        needs=("demos",),
    ),
    StageSpec(
        "synth-outputs",
        5,
        "Teacher answers them in your style; you review",
        synth_outputs.run,
        ("results/synthetic_personalized_data.jsonl",),
        needs=("synth-inputs",),
    ),
    StageSpec(
        "sft",
        6,
        "LoRA SFT on the reviewed synthetic pairs",
        sft.run,
        ("results/sft_model_outputs.json",),
        trains=True,
        needs=("synth-outputs",),
    ),
    StageSpec(
        "reward-model",
        7,
        "Rubric-grounded pairwise judge",
        None,
        ("results/rm_validation.json",),
        trains=True,
    ),
    StageSpec(
        "rl-prompts",
        8,
        "Synthesize RL prompts, split train/dev",
        None,
        ("results/rl_train_data.jsonl", "results/rl_dev_data.jsonl"),
    ),
    StageSpec(
        "rlaif",
        9,
        "RL from the judge's pairwise tournament",
        None,
        ("results/rl_model_outputs.json",),
        trains=True,
    ),
    StageSpec(
        "ditto",
        10,
        "DITTO: SFT on demos, then online DPO rounds",
        None,
        ("results/ditto_model_outputs.json",),
        trains=True,
    ),
    StageSpec(
        "evaluate",
        11,
        "Compare every method on held-out requests",
        None,
        ("results/report.md", "results/evaluation.json"),
    ),
]

STAGES: dict[str, StageSpec] = {s.name: s for s in _SPECS}
