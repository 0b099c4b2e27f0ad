"""Local checkpoints: folders addressed by a path or ``local://<path>``.

A state checkpoint (``.../weights/<name>``) holds the adapter, the optimizer state and the
step; a sampler checkpoint (``.../sampler_weights/<name>``) holds the adapter only. Both
keep peft's adapter layout and a ``persona_checkpoint.json`` describing the run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from engine.errors import PersonaError

from .folders import publish_folder
from .lora import LoraSpec

SCHEME = "local://"
META_FILE = "persona_checkpoint.json"
ADAPTER_FILE = "adapter_model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


class CheckpointNotFoundError(FileNotFoundError, PersonaError):
    pass


def to_uri(path: Path) -> str:
    return SCHEME + str(path.resolve())


def resolve(path: str) -> Path:
    """The folder a checkpoint path names; a clear error if it is not a local checkpoint."""
    if path.startswith("tinker://"):
        raise CheckpointNotFoundError(
            f"{path} is a Tinker checkpoint; the local backend reads only local checkpoints "
            f"(a folder path or local://...). Run with --backend tinker to use it."
        )
    folder = Path(path[len(SCHEME) :] if path.startswith(SCHEME) else path).expanduser()
    if not (folder / META_FILE).is_file():
        raise CheckpointNotFoundError(
            f"No local checkpoint at {path} (expected {folder / META_FILE}): " + rerun_hint(folder)
        )
    return folder


_RUN = re.compile(r"^(?P<stage>[a-z][a-z-]*?)-\d{8}-\d{6}(-\d+)?$")


def rerun_hint(folder: Path) -> str:
    """What to do about a missing checkpoint folder: rerun the stage whose run made it
    (``runs/<stage>-<date>-<time>/checkpoints/...``)."""
    parts = folder.parts
    for parent, name in zip(parts, parts[1:], strict=False):
        m = _RUN.match(name)
        if parent == "runs" and m:
            stage = m.group("stage")
            return (
                f"the checkpoint run runs/{name} saved is gone (deleted or pruned); rerun "
                f"`persona run {stage}` to make a new one (it is recorded in "
                "results/checkpoints.toml)"
            )
    return (
        "the folder was deleted or moved; rerun the stage that made it (results/checkpoints.toml "
        "names the stage whose entry points here)"
    )


def read_meta(path: str) -> dict[str, Any]:
    return json.loads((resolve(path) / META_FILE).read_text())


def spec_from_meta(meta: dict[str, Any]) -> LoraSpec:
    return LoraSpec(
        rank=int(meta["rank"]), alpha=float(meta["alpha"]), targets=tuple(meta["targets"])
    )


def write(
    folder: Path,
    *,
    meta: dict[str, Any],
    adapter: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    overwrite: bool,
) -> None:
    """Write a checkpoint folder atomically."""
    if folder.exists() and not overwrite:
        raise FileExistsError(
            f"Checkpoint {folder} already exists; pass overwrite=True or choose another name."
        )

    def build(tmp: Path) -> None:
        save_file({k: v.float().cpu() for k, v in adapter.items()}, str(tmp / ADAPTER_FILE))
        (tmp / "adapter_config.json").write_text(json.dumps(_peft_config(meta), indent=2))
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))

    # durable: results/checkpoints.toml (fsynced) will point here
    publish_folder(folder, build, replace=True, durable=True)


def read_adapter(path: str) -> dict[str, torch.Tensor]:
    return load_file(str(resolve(path) / ADAPTER_FILE))


def read_optimizer(path: str) -> dict[str, Any] | None:
    file = resolve(path) / OPTIMIZER_FILE
    if not file.is_file():
        return None
    return torch.load(file, map_location="cpu", weights_only=True)


def _peft_config(meta: dict[str, Any]) -> dict[str, Any]:
    """An adapter_config.json that peft reads (its LoraConfig fields)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": meta["model_dir"],
        "r": meta["rank"],
        "lora_alpha": meta["alpha"],
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(meta["targets"]),
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
