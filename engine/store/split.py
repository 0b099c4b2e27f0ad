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
held-out request edited or deleted by hand) is an error naming it: the held-out set never silently
shrinks, and an edited held-out text never silently becomes training data. The
Demonstrations tab can set the record by hand (``set_holdout``), and when it saves edited
demonstrations it keeps the record naming the same ones (``follow_demo_edits``).
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


# The stages whose results depend on which demonstrations are held out.
SPLIT_STAGES = ("sft", "reward-model", "rlaif", "ditto", "evaluate")


@dataclass(frozen=True)
class HoldoutUpdate:
    """What saving edited demonstrations did to data/holdout.json (``follow_demo_edits``).
    Positions are 0-based in the demonstrations as saved now."""

    edited: list[tuple[int, str]] = field(default_factory=list)  # (position, old request)
    deleted: list[str] = field(default_factory=list)  # requests of deleted held-out demos
    held: list[int] = field(default_factory=list)  # every position held out now
    filled: list[int] = field(default_factory=list)  # of those, held out in a deleted one's place
    path: str = f"data/{HOLDOUT_FILE}"

    @property
    def changed(self) -> bool:
        return bool(self.edited or self.deleted)

    def message(self) -> str:
        """The change in words, short enough for a notice at 80x24 ("" when nothing changed)."""
        if not self.changed:
            return ""
        parts = [f"demonstration {i + 1} edited, still held out" for i, _old in self.edited]
        parts += [f'"{_short(t, 30)}" deleted' for t in self.deleted]
        now = ", ".join(str(i + 1) for i in self.held) or "none"
        if self.filled:
            now += f" ({', '.join(str(i + 1) for i in self.filled)} new)"
        stages = ", ".join(SPLIT_STAGES[:-2]) + f" and {SPLIT_STAGES[-2]}"
        return (
            f"{self.path}: {'; '.join(parts)}. Held out now: {now}. {stages} train again "
            "from the start; evaluate uses the new split."
        )


def follow_demo_edits(
    data_dir: str | Path,
    before: list[dict[str, str]],
    after: list[dict[str, str]],
    moved_to: list[int | None],
    setting: int,
    seed: int,
) -> HoldoutUpdate:
    """Keep data/holdout.json naming the same demonstrations after the person edited them.

    ``before``: the demonstrations as saved until now; ``after``: as saved now; ``moved_to[i]``:
    where ``before[i]`` is in ``after`` (None: deleted). A held-out demonstration whose request
    was edited stays held out under its new request; a deleted one leaves the record, and the
    seeded rule holds out another in its place (unless the record was chosen by hand, which
    then holds out one fewer). Nothing is written unless a held-out request changed. A record
    that cannot be read, or already names a request no demonstration has, raises
    (PersonaError): it is left as it is for the person to fix.
    """
    record = read_record(data_dir)
    old = split_demos(before, setting, seed, record)
    index = {_norm(d["input"]): i for i, d in enumerate(before)}
    edited: list[tuple[int, str]] = []
    deleted: list[str] = []
    kept: list[int] = []  # positions in ``after`` of the held-out demonstrations still there
    for d in old.holdout:
        j = moved_to[index[_norm(d["input"])]]
        if j is None:
            deleted.append(d["input"])
            continue
        kept.append(j)
        if _norm(after[j]["input"]) != _norm(d["input"]):
            edited.append((j, d["input"]))
    path = f"{Path(data_dir).name}/{HOLDOUT_FILE}"
    if not edited and not deleted:
        return HoldoutUpdate(path=path)
    manual = bool(record and record.manual)
    now = Record([after[j]["input"] for j in kept], manual, path)
    new = split_demos(after, setting, seed, now)
    write_record(data_dir, [d["input"] for d in new.holdout], manual=manual)
    held = sorted(new.holdout_index)
    return HoldoutUpdate(edited, deleted, held, [j for j in held if j not in kept], path)


def split_fingerprint(split: Split) -> str:
    """A short hash of the held-out requests (normalised, sorted): training stages record it
    with their checkpoint, and evaluate compares it with the current split to tell whether a
    method may have trained on what it is measured on."""
    text = "\0".join(sorted(_norm(d["input"]) for d in split.holdout))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
