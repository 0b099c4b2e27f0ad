"""Preference-Collection rows (prometheus-eval's pairwise training set) from a local file.

The file is the dataset's own format, parquet or JSON Lines, with its own columns:
``orig_instruction``, ``orig_response_A``, ``orig_response_B``, ``orig_criteria``,
``orig_reference_answer``, ``orig_preference`` ("A"/"B"), ``orig_feedback`` (``instruction``
and ``output`` are the rendered prompt and target; Persona re-renders from the ``orig_*``
columns through engine.llm.judge so every judge prompt has one format). Read with pyarrow, only
the columns needed, so the 700 MB parquet file loads in seconds.

The first ``heldout`` rows are kept aside for the verdict-accuracy metric (as the course
notebook held out its first 1,024); ``max_examples`` training rows are drawn (seeded) from
the rest.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import PersonaError
from engine.llm.judge import PREFER_A, PREFER_B, Comparison

COLUMNS = (
    "orig_instruction",
    "orig_response_A",
    "orig_response_B",
    "orig_criteria",
    "orig_reference_answer",
    "orig_preference",
    "orig_feedback",
)
REQUIRED = ("orig_instruction", "orig_response_A", "orig_response_B", "orig_preference")


class PreferenceDataError(PersonaError):
    """The Preference-Collection file is missing, unreadable or lacks columns."""


@dataclass(frozen=True)
class JudgeExample:
    """One comparison with its known preference (engine.llm.judge's sign) and optional feedback."""

    comparison: Comparison
    preference: int
    feedback: str | None = None
    source: str = "dataset"
    group: str = ""  # examples of one group are held out together


def _read_table(path: Path) -> Any:
    import pyarrow as pa

    suffix = "".join(path.suffixes[-2:]).lower()
    try:
        if suffix.endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            names = set(pq.read_schema(path).names)
            return pq.read_table(path, columns=[c for c in COLUMNS if c in names])
        if suffix.endswith((".jsonl", ".json", ".jsonl.gz")):
            import pyarrow.json as pj

            return pj.read_json(path)
    except (pa.ArrowException, OSError) as e:
        raise PreferenceDataError(f"{path}: cannot read it as {suffix or 'data'} ({e})") from e
    raise PreferenceDataError(
        f"{path}: unknown format; reward_model.dataset takes a .parquet or .jsonl file"
    )


def _text(v: Any) -> str:
    return "" if v is None else str(v)


def row_example(row: dict[str, Any], index: int) -> JudgeExample | None:
    """A Preference-Collection row as a JudgeExample; None when its preference is not A/B."""
    pref = _text(row.get("orig_preference")).strip().upper().removeprefix("RESPONSE ").strip()
    if pref not in ("A", "B"):
        return None
    reference = _text(row.get("orig_reference_answer")).strip() or None
    comparison = Comparison(
        prompt_conversation=[{"role": "user", "content": _text(row.get("orig_instruction"))}],
        completion_a=_text(row.get("orig_response_A")),
        completion_b=_text(row.get("orig_response_B")),
        rubric=_text(row.get("orig_criteria")),
        reference=reference,
    )
    return JudgeExample(
        comparison=comparison,
        preference=PREFER_A if pref == "A" else PREFER_B,
        feedback=_text(row.get("orig_feedback")).strip() or None,
        source="dataset",
        group=f"row-{index}",
    )


def load_preference_collection(
    path: str | Path, *, max_examples: int, heldout: int, seed: int = 0
) -> tuple[list[JudgeExample], list[JudgeExample]]:
    """(train, held-out) examples from a Preference-Collection file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise PreferenceDataError(
            f"reward_model.dataset = {str(path)!r}: no such file. Point it at a local "
            'Preference-Collection parquet or jsonl file, or set it to "" to train on your own pairs.'
        )
    table = _read_table(path)
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise PreferenceDataError(
            f"{path}: missing column(s) {', '.join(missing)}; expected the Preference-Collection "
            f"columns {', '.join(COLUMNS)}"
        )
    n = table.num_rows
    n_held = min(heldout, n)
    held_rows = table.slice(0, n_held).to_pylist()
    rest = list(range(n_held, n))
    rng = random.Random(seed)
    take = sorted(rng.sample(rest, min(max_examples, len(rest)))) if max_examples else []
    train_rows = table.take(take).to_pylist() if take else []
    held = [e for i, r in enumerate(held_rows) if (e := row_example(r, i)) is not None]
    train = [
        e for i, r in zip(take, train_rows, strict=True) if (e := row_example(r, i)) is not None
    ]
    return train, held
