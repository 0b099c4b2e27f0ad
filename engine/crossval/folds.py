"""The folds of a cross-validation and the workspaces they run in.

Folds: each demonstration's rank is the seeded hash that engine.store.split uses for the held-out
split; dealing the ranked demonstrations round-robin into k folds gives disjoint held-out sets
that together cover every demonstration, sizes differing by at most one, the same for the same
seed and requests whatever their order in data/data.json.

Each fold is a workspace of its own, ``runs/crossval-<time>/fold-<i>/``: a copy of persona.toml
and data/ with that fold's held-out requests fixed in data/holdout.json (recorded as chosen by
hand, so the split rule keeps them), its own results/ and runs/. The person's ``.env`` is linked,
not copied. A file setting given relative to the person's workspace (``reward_model.dataset``,
in persona.toml or ``--set``) is written into the fold as the absolute path of the person's file,
so the fold reads that file and not one beside its own copy. The person's workspace is only read.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomli_w

from engine.errors import PersonaError
from engine.store.config import parse_override, read_toml_file
from engine.store.settings import path_settings
from engine.store.split import MIN_TRAIN, Split, _rank, read_record, split_demos, write_record
from engine.store.workspace import Workspace

DEFAULT_MAX_FOLDS = 5
SHARED_STAGES = ("baseline", "prompting")  # sample every demonstration: the split plays no part
# The stages a method needs in each fold, besides evaluate (which every fold runs last).
METHOD_STAGES: dict[str, tuple[str, ...]] = {
    "baseline": (),
    "prompting": (),
    "few-shot": (),
    "sft-demos": ("ditto",),  # DITTO's SFT initialisation, registered by the ditto stage
    "ditto": ("ditto",),
    "sft": ("synth-inputs", "synth-outputs", "sft"),
    "rlaif": (
        "baseline",
        "prompting",
        "synth-inputs",
        "synth-outputs",
        "sft",
        "reward-model",
        "rl-prompts",
        "rlaif",
    ),
}

# The names the report shows, accepted for the stage names behind them.
METHOD_ALIASES = {"base": "baseline", "prompted": "prompting"}


class CrossvalError(PersonaError):
    """A cross-validation that cannot run or be pooled as asked; the message says why."""


def fold_count(setting: int, n: int) -> int:
    """``crossval.folds``, or min(5, n) when it is 0."""
    return setting if setting > 0 else min(DEFAULT_MAX_FOLDS, n)


def check_folds(k: int, n: int) -> None:
    """Refuse fold counts that cannot hold every demonstration out once with enough left to
    train on."""
    if k < 2:
        raise CrossvalError(f"crossval.folds = {k}: cross-validation needs at least 2 folds")
    if k > n:
        raise CrossvalError(
            f"crossval.folds = {k} with {n} demonstrations: at most one fold per demonstration"
        )
    left = n - math.ceil(n / k)
    if left < MIN_TRAIN:
        raise CrossvalError(
            f"{n} demonstrations in {k} folds leave {left} for training in the largest fold; "
            f"at least {MIN_TRAIN} are needed: use more folds (crossval.folds) or add "
            "demonstrations"
        )


def deal_folds(demos: Sequence[dict[str, str]], k: int, seed: int) -> list[list[int]]:
    """The held-out positions (into ``demos``) of each of ``k`` folds, each list in data order."""
    check_folds(k, len(demos))
    order = sorted(range(len(demos)), key=lambda i: _rank(seed, demos[i]["input"]))
    return [sorted(order[f::k]) for f in range(k)]


def method_names(methods: Sequence[str]) -> list[str]:
    """``crossval.methods`` with the report's labels (base, prompted) read as the methods'
    names, duplicates dropped."""
    return list(dict.fromkeys(METHOD_ALIASES.get(m, m) for m in methods))


def stages_for(methods: Sequence[str]) -> list[str]:
    """The stages each fold runs for ``methods``, in the pipeline's order, evaluate last."""
    from engine.stages import STAGES

    unknown = [m for m in methods if m not in METHOD_STAGES]
    if unknown:
        raise CrossvalError(
            f"crossval.methods: unknown {', '.join(map(repr, unknown))}; choose from "
            + ", ".join(METHOD_STAGES)
        )
    if not methods:
        raise CrossvalError("crossval.methods is empty: name at least two methods")
    wanted = {s for m in methods for s in METHOD_STAGES[m]}
    return [s for s in STAGES if s in wanted] + ["evaluate"]


def data_sha(ws: Workspace) -> str:
    """What the folds were dealt from: data/data.json's content."""
    return hashlib.sha256(ws.demos_path.read_bytes()).hexdigest()[:16]


def _person_file(value: Any, person: Workspace) -> str | None:
    """The absolute path of the person's file a relative file setting names; None for any
    other value (absolute, empty, not a path)."""
    if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
        return None
    return str(person.setting_path(value))


def _relative_paths(table: dict, person: Workspace) -> dict:
    """``table`` (persona.toml as read) with each relative file setting made the absolute path
    of the person's file; the same object when there is none."""
    out = None
    for key in path_settings():
        *sections, name = key.split(".")
        node: Any = table
        for part in sections:
            node = node.get(part) if isinstance(node, dict) else None
        fixed = _person_file(node.get(name), person) if isinstance(node, dict) else None
        if fixed is not None:
            if out is None:
                out = copy.deepcopy(table)
            target = out
            for part in sections:
                target = target[part]
            target[name] = fixed
    return table if out is None else out


def absolute_path_overrides(overrides: Sequence[str], person: Workspace) -> list[str]:
    """``--set`` items with a relative file setting made the absolute path of the person's
    file (a fold runs in a folder of its own)."""
    keys = set(path_settings())
    out = []
    for item in overrides:
        parts, value = parse_override(item)
        key = ".".join(parts)
        fixed = _person_file(value, person) if key in keys else None
        out.append(item if fixed is None else f"{key}={json.dumps(fixed)}")
    return out


def _copy_config(person: Workspace, dst: Path) -> None:
    """persona.toml as it is (comments kept), or rewritten where a file setting is relative."""
    table = read_toml_file(person.config_path)
    fixed = _relative_paths(table, person)
    if fixed is table:
        shutil.copy2(person.config_path, dst)
    else:
        dst.write_text(tomli_w.dumps(fixed), encoding="utf-8")


def prepare_workspace(person: Workspace, root: Path, holdout: Sequence[str] | None) -> Workspace:
    """A workspace at ``root`` with the person's persona.toml and data/, and (for a fold) the
    held-out requests ``holdout`` fixed. Idempotent: an existing one is kept as it is."""
    ws = Workspace(root)
    if ws.config_path.exists():
        return ws
    tmp = root.with_name(root.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    _copy_config(person, tmp / "persona.toml")
    shutil.copytree(person.data_dir, tmp / "data", ignore=shutil.ignore_patterns("*.tmp"))
    for d in ("results", "runs"):
        (tmp / d).mkdir()
    if person.env_path.exists():  # linked: secrets are never copied into runs/
        os.symlink(person.env_path, tmp / ".env")
    if holdout is not None:
        write_record(tmp / "data", list(holdout), manual=True)
    tmp.rename(root)  # a fold folder exists only once it is complete
    return ws


def fold_split(ws: Workspace, holdout_seed: int = 0) -> Split:
    """The split a fold's stages see (what engine.run.context gives them), without writing."""
    return split_demos(ws.load_demos(), -1, holdout_seed, read_record(ws.data_dir))
