"""The held-out split: which demonstrations no stage may train on.

The evaluate stage measures every method on the held-out demonstrations, so none of them may
reach training (sft, reward-model pairs, rlaif, ditto), a teacher's examples (synth-inputs,
rl-prompts) or a few-shot prompt. ``split_demos`` is the one function that decides; every
stage asks it for ``train`` and never looks at ``data/data.json`` for training on its own.

The rule: each demonstration's rank is a seeded hash of its normalised request, and the
lowest ranks are held out. The choice is recorded in ``data/holdout.json`` (the requests as
written), so it stays put when demonstrations are added: a held-out demonstration stays held
out while its request is unchanged, and a gap (the count raised) is filled by the same rule
from the others. A recorded request that matches no demonstration (a typo in a hand edit, a
held-out request edited or deleted) is an error naming it: the held-out set never silently
shrinks, and an edited held-out text never silently becomes training data. The
Demonstrations tab can set the record by hand (``set_holdout``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import PersonaError
from engine.store.atomic import atomic_write_text

HOLDOUT_FILE = "holdout.json"
MIN_TRAIN = 3  # demonstrations that must stay for training


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def holdout_count(setting: int, n: int) -> int:
    """How many to hold out: ``setting`` (-1 = auto: 2 with 8+, 1 with 5-7, 0 below 5),
    never so many that fewer than ``MIN_TRAIN`` remain for training."""
    want = (2 if n >= 8 else 1 if n >= 5 else 0) if setting < 0 else setting
    return max(0, min(want, n - MIN_TRAIN))


def _rank(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}\0{_norm(text)}".encode()).hexdigest()


@dataclass(frozen=True)
class Split:
    train: list[dict[str, str]]
    holdout: list[dict[str, str]]
    holdout_index: frozenset[int]  # positions in data/data.json
    warning: str = ""
    changed: bool = field(default=False, compare=False)  # the record needs writing

    def is_held_out(self, i: int) -> bool:
        return i in self.holdout_index


def holdout_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / HOLDOUT_FILE


@dataclass(frozen=True)
class Record:
    inputs: list[str]
    manual: bool = False  # chosen by hand in the Demonstrations tab: its count wins
    path: str = f"data/{HOLDOUT_FILE}"  # how messages name the file


class HoldoutError(PersonaError, ValueError):
    """data/holdout.json names a request that no demonstration has."""


def _short(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def read_record(data_dir: str | Path) -> Record | None:
    """The recorded held-out requests, or None when there is no record yet."""
    path = holdout_path(data_dir)
    if not path.exists():
        return None
    try:
        raw: Any = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PersonaError(
            f"{path}: not a valid held-out record ({e}); delete it to choose again"
        ) from e
    inputs = raw.get("holdout") if isinstance(raw, dict) else None
    if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
        raise PersonaError(
            f'{path}: expected {{"holdout": ["request", ...]}}; delete it to choose again'
        )
    return Record(inputs, bool(raw.get("manual", False)), f"{path.parent.name}/{path.name}")


def write_record(data_dir: str | Path, inputs: list[str], *, manual: bool = False) -> Path:
    text = json.dumps(
        {
            "about": "Demonstrations held out for evaluation: no stage trains on them.",
            "holdout": inputs,
            "manual": manual,
        },
        indent=2,
        ensure_ascii=False,
    )
    return atomic_write_text(holdout_path(data_dir), text + "\n")


def split_demos(
    demos: list[dict[str, str]], setting: int, seed: int, record: Record | None
) -> Split:
    """Split ``demos`` by ``record`` (kept where it still matches), filled by the seeded rule.
    A record made by hand sets the count itself (still leaving ``MIN_TRAIN`` for training)."""
    n = len(demos)
    norms = [_norm(d["input"]) for d in demos]
    recorded = record.inputs if record else []
    unmatched = [t for t in recorded if _norm(t) not in norms]
    if record is not None and unmatched:
        shown = ", ".join(f'"{_short(t)}"' for t in unmatched)
        raise HoldoutError(
            f"{record.path}: held-out request {shown} matches no demonstration in "
            "data/data.json (edited, deleted or mistyped?). Write it as the demonstration's "
            "request, or remove it from the list (the rule then picks another), or delete "
            f"{record.path} to choose again; stages trained since should then be rerun."
        )
    if record is not None and record.manual:
        want = max(0, min(sum(_norm(t) in norms for t in recorded), n - MIN_TRAIN))
    else:
        want = holdout_count(setting, n)
    chosen: list[int] = []
    for text in recorded:
        if _norm(text) in norms and len(chosen) < want:
            i = norms.index(_norm(text))
            if i not in chosen:
                chosen.append(i)
    if len(chosen) < want:
        rest = sorted(
            (i for i in range(n) if i not in chosen), key=lambda i: _rank(seed, demos[i]["input"])
        )
        chosen += rest[: want - len(chosen)]
    held = frozenset(chosen)
    new_record = [demos[i]["input"] for i in chosen]
    warning = ""
    if want == 0:
        warning = (
            f"{n} demonstrations: none is held out, so no method can be measured fairly "
            "(add demonstrations: with 5 or more, one is held out)"
        )
    return Split(
        train=[d for i, d in enumerate(demos) if i not in held],
        holdout=[demos[i] for i in chosen],
        holdout_index=held,
        warning=warning,
        changed=record is None or [_norm(t) for t in recorded] != [_norm(t) for t in new_record],
    )


def workspace_split(ws: Any, data_cfg: Any, *, record: bool = True) -> Split:
    """The workspace's split (``ws``: a Workspace, ``data_cfg``: the [data] section). With
    ``record`` the choice is written to data/holdout.json when it is new or changed."""
    demos = ws.load_demos()
    split = split_demos(demos, data_cfg.holdout, data_cfg.holdout_seed, read_record(ws.data_dir))
    if record and split.changed:
        rec = read_record(ws.data_dir)
        write_record(
            ws.data_dir, [d["input"] for d in split.holdout], manual=bool(rec and rec.manual)
        )
    return split


def set_holdout(ws: Any, inputs: list[str]) -> Path:
    """Record these requests as the held-out ones (the Demonstrations tab's toggle)."""
    return write_record(ws.data_dir, inputs, manual=True)


def split_fingerprint(split: Split) -> str:
    """A short hash of the held-out requests (normalised, sorted): training stages record it
    with their checkpoint, and evaluate compares it with the current split to tell whether a
    method may have trained on what it is measured on."""
    text = "\0".join(sorted(_norm(d["input"]) for d in split.holdout))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
