"""The one owner of every file under results/ (and the run-folder files stages write).

Names, row shapes, readers and writers live here; stages and the TUI call these functions and
parse none of these files themselves.

Readers never crash on what a person (or a crash) left in a file: a line that is not JSON,
not UTF-8, torn by a crash mid-append, or of the wrong shape is skipped and reported as a
``BadLine`` naming the file and line. Strict callers (a stage about to train on the rows)
turn the first problem into a ``ResultsError``.

Writers are atomic (engine.store.atomic). The synthetic file has two writers, the review screen and
the synth-outputs stage; both go through ``save_review`` / ``write_synthetic_rows`` below,
which hold a lock and merge with what is on disk, so neither can lose the other's work.

Sections appended at the end of this file by other stages own their own new files.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from engine.errors import PersonaError
from engine.store.atomic import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_jsonl,
    check_writable,
)
from engine.store.atomic import file_lock as _file_lock
from engine.store.checkpoints import (  # the checkpoint registry, re-exported: results/checkpoints.toml
    REGISTRY,
    latest_checkpoint,
    read_registry,
    record_checkpoint,
    registry_path,
)

__all__ = [
    "CHECKPOINTS_FILE",
    "EVALUATION_FILE",
    "PREFERENCES_FILE",
    "REGISTRY",
    "RESULT_FILES",
    "RL_DEV_FILE",
    "TEACHER_REPLIES_FILE",
    "BadLine",
    "Loaded",
    "ResultsError",
    "append_jsonl",
    "append_preference",
    "check_writable",
    "latest_checkpoint",
    "preference_record",
    "read_method_outputs",
    "read_preferences",
    "read_registry",
    "read_synthetic_inputs",
    "read_synthetic_rows",
    "record_checkpoint",
    "registry_path",
    "save_review",
    "write_method_outputs",
    "write_synthetic_inputs",
    "write_synthetic_rows",
]

# -- names -------------------------------------------------------------------------------

RESULT_FILES = {
    "baseline": "baseline_results.json",
    "prompting": "prompt_engineering_results.json",
    "synth-inputs": "synthetic_inputs.jsonl",
    "synth-outputs": "synthetic_personalized_data.jsonl",
    "sft": "sft_model_outputs.json",
    "reward-model": "rm_validation.json",
    "rl-prompts": "rl_train_data.jsonl",
    "rlaif": "rl_model_outputs.json",
    "ditto": "ditto_model_outputs.json",
    "evaluate": "report.md",
}
METHODS = (
    "baseline",
    "prompting",
    "sft",
    "rlaif",
    "ditto",
)  # stages whose file is MethodOutput rows
METHOD_FILES = {m: RESULT_FILES[m] for m in METHODS}
PREFERENCES_FILE = "human_preferences.jsonl"  # results/: the person's blind A/B picks
CHECKPOINTS_FILE = REGISTRY  # results/checkpoints.toml
RL_DEV_FILE = "rl_dev_data.jsonl"  # results/: rl-prompts' held-back prompts
EVALUATION_FILE = "evaluation.json"  # results/: evaluate's machine-readable outputs
TEACHER_REPLIES_FILE = "teacher_replies.jsonl"  # runs/<run>/: synth-inputs' raw teacher replies

SYNTH_STATUSES = ("pending", "accepted", "rejected", "edited")
REVIEWED = ("accepted", "rejected", "edited")


# -- row shapes --------------------------------------------------------------------------


class MethodOutput(TypedDict):
    """One row of baseline/prompting/sft/rlaif/ditto outputs (a JSON list of these)."""

    input: str
    expected_output: str
    output: str


class SyntheticInput(TypedDict):
    """One line of results/synthetic_inputs.jsonl."""

    id: str
    seed: str
    input: str


class Message(TypedDict):
    role: str
    content: str


class SyntheticRow(TypedDict, total=False):
    """One line of results/synthetic_personalized_data.jsonl (cookbook conversation format)."""

    id: str
    seed: str
    status: str  # one of SYNTH_STATUSES
    messages: list[Message]
    fixups: list[str]
    draft: str
    reason: str  # set on rows rejected automatically (e.g. empty after fix-ups)


class Preference(TypedDict):
    """One line of results/human_preferences.jsonl."""

    ts: float
    input: str
    a: str
    b: str
    choice: str  # "a" | "b" | "tie"
    winner: str
    loser: str


# -- problems ----------------------------------------------------------------------------


class ResultsError(PersonaError):
    """A results file a stage needs is unreadable; the message names the file and line."""


@dataclass(frozen=True)
class BadLine:
    """A line (or entry) a reader skipped: where it is and why."""

    file: str
    line: int
    problem: str
    raw: bytes = b""
    unit: str = "line"  # "entry" for the items of a JSON list file

    def __str__(self) -> str:
        return f"{self.file}: {self.unit} {self.line}: {self.problem}"


@dataclass
class Loaded:
    """What a reader got: the good rows, and every line it skipped (with why)."""

    rows: list[Any] = field(default_factory=list)
    bad: list[BadLine] = field(default_factory=list)
    row_lines: list[int] = field(default_factory=list)  # where each row is (JSON Lines)
    error: str = ""  # the whole file could not be read (named), "" otherwise

    @property
    def problems(self) -> list[str]:
        return ([self.error] if self.error else []) + [str(b) for b in self.bad]

    def message(self, limit: int = 3) -> str:
        """One line for a status bar or a log: the first problems and how many more."""
        probs = self.problems
        if not probs:
            return ""
        more = f" (and {len(probs) - limit} more)" if len(probs) > limit else ""
        return "; ".join(probs[:limit]) + more

    def strict(self) -> list[Any]:
        """The rows, or a ResultsError naming the first problem."""
        if self.error or self.bad:
            raise ResultsError(self.message(1))
        return self.rows


def _name(path: Path) -> str:
    """How messages name a results file: results/<name> (or the path's last two parts)."""
    return str(Path(path.parent.name) / path.name) if path.parent.name else path.name


# -- JSON Lines: lines, parsing, appends ---------------------------------------------------


def _raw_lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, bytes without the newline, ends with a newline) for every line."""
    data = path.read_bytes()
    if not data:
        return
    parts = data.split(b"\n")
    last_terminated = parts[-1] == b""
    if last_terminated:
        parts.pop()
    for n, raw in enumerate(parts, start=1):
        yield n, raw, (n < len(parts) or last_terminated)


def _parse_line(raw: bytes, terminated: bool) -> tuple[Any, str]:
    """(value, "") or (None, why the line is unreadable)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 text (byte {e.start + 1})"
    try:
        return json.loads(text), ""
    except json.JSONDecodeError as e:
        if not terminated:
            return None, f"torn last line (a write was cut off: {e.msg})"
        return None, f"not valid JSON ({e.msg}, column {e.colno})"


Check = Callable[[Any], str]  # "" when the value is a good row, else what is wrong with it


def read_jsonl_checked(path: str | Path, check: Check | None = None) -> Loaded:
    """Every non-blank line of a JSON Lines file that parses and passes ``check``; the rest
    are reported. A missing file reads as empty; an unreadable one sets ``error``."""
    path = Path(path)
    out = Loaded()
    if not path.exists():
        return out
    try:
        lines = list(_raw_lines(path))
    except OSError as e:
        out.error = f"{_name(path)}: cannot be read ({e.strerror or e})"
        return out
    for n, raw, terminated in lines:
        if not raw.strip():
            continue
        value, problem = _parse_line(raw, terminated)
        if not problem and check is not None:
            problem = check(value)
        if problem:
            out.bad.append(BadLine(_name(path), n, problem, raw))
        else:
            out.rows.append(value)
            out.row_lines.append(n)
    return out


def append_jsonl(path: str | Path, record: Mapping[str, Any]) -> Path:
    """Append one JSON line and fsync. If a crash left the file without a final newline (a
    torn line), the record starts on a fresh line instead of being glued onto it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    try:
        with open(path, "ab+") as f:
            end = f.seek(0, os.SEEK_END)
            if end > 0:
                f.seek(end - 1)
                if f.read(1) != b"\n":
                    line = b"\n" + line
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        from engine.store.atomic import WriteError

        raise WriteError(path, e) from e
    return path


def _is_obj(kind: str) -> Check:
    def check(v: Any) -> str:
        return "" if isinstance(v, dict) else f"expected a JSON object ({kind}), found {_kind(v)}"

    return check


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false"}.get(
        type(v), "a number" if isinstance(v, int | float) else "null"
    )


# -- method outputs: baseline / prompting / sft / rlaif / ditto ------------------------------


def _check_method_output(v: Any) -> str:
    if not isinstance(v, dict):
        return f"expected an object with input/expected_output/output, found {_kind(v)}"
    for key in ("input", "output"):
        if not isinstance(v.get(key), str):
            return f'field "{key}" must be text, found {_kind(v.get(key))}'
    if "expected_output" in v and not isinstance(v["expected_output"], str):
        return f'field "expected_output" must be text, found {_kind(v["expected_output"])}'
    return ""


def read_method_outputs(path: str | Path) -> Loaded:
    """A method's outputs (a JSON list of MethodOutput). Bad entries are reported by number
    (``line`` holds the 1-based entry); a file that is not UTF-8 or not JSON sets ``error``."""
    path = Path(path)
    out = Loaded()
    if not path.exists():
        return out
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        out.error = f"{_name(path)}: cannot be read ({e.strerror or e})"
        return out
    except UnicodeDecodeError as e:
        out.error = f"{_name(path)}: not UTF-8 text (byte {e.start + 1}); rerun its stage"
        return out
    except json.JSONDecodeError as e:
        out.error = f"{_name(path)}: not valid JSON (line {e.lineno}: {e.msg}); rerun its stage"
        return out
    if not isinstance(data, list):
        out.error = f"{_name(path)}: expected a JSON list of outputs, found {_kind(data)}"
        return out
    for i, row in enumerate(data, start=1):
        problem = _check_method_output(row)
        if problem:
            out.bad.append(BadLine(_name(path), i, problem, unit="entry"))
        else:
            out.rows.append(
                {
                    "input": row["input"],
                    "expected_output": str(row.get("expected_output", "")),
                    "output": row["output"],
                }
            )
    return out


def write_method_outputs(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    rows = [
        {
            "input": r["input"],
            "expected_output": r.get("expected_output", ""),
            "output": r["output"],
        }
        for r in rows
    ]
    return atomic_write_json(path, rows)


# -- synthetic inputs -------------------------------------------------------------------------


def _check_synthetic_input(v: Any) -> str:
    if not isinstance(v, dict):
        return f'expected an object with "id", "seed" and "input", found {_kind(v)}'
    if not isinstance(v.get("input"), str):
        return f'field "input" must be text, found {_kind(v.get("input"))}'
    for key in ("id", "seed"):
        if key in v and not isinstance(v[key], str | int):
            return f'field "{key}" must be text, found {_kind(v[key])}'
    return ""


def read_synthetic_inputs(path: str | Path) -> Loaded:
    """results/synthetic_inputs.jsonl as SyntheticInput rows (id and seed as text)."""
    loaded = read_jsonl_checked(path, _check_synthetic_input)
    loaded.rows = [
        {"id": str(r.get("id", "")), "seed": str(r.get("seed", "")), "input": r["input"]}
        for r in loaded.rows
    ]
    return loaded


def write_synthetic_inputs(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    return atomic_write_jsonl(path, [dict(r) for r in rows])


# -- synthetic rows (the reviewed training data) ---------------------------------------------


def check_synthetic_row(v: Any) -> str:
    """ "" for a well-formed SyntheticRow, else what is wrong (for BadLine)."""
    if not isinstance(v, dict):
        return f'expected an object with "messages" and "status", found {_kind(v)}'
    msgs = v.get("messages")
    if not isinstance(msgs, list):
        return f'"messages" must be a list of {{"role", "content"}} objects, found {_kind(msgs)}'
    for k, m in enumerate(msgs, start=1):
        if not isinstance(m, dict):
            return f"message {k} must be an object, found {_kind(m)}"
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f'message {k} needs text "role" and "content"'
    status = v.get("status", "pending")
    if not isinstance(status, str) or status not in SYNTH_STATUSES:
        shown = status if isinstance(status, str) else _kind(status)
        return f'"status" must be one of {", ".join(SYNTH_STATUSES)}, found {shown!s}'
    for key in ("id", "seed", "reason", "draft"):
        if key in v and not isinstance(v[key], str | int):
            return f'field "{key}" must be text, found {_kind(v[key])}'
    return ""


def read_synthetic_rows(path: str | Path) -> Loaded:
    """results/synthetic_personalized_data.jsonl: well-formed rows; the rest reported."""
    return read_jsonl_checked(path, check_synthetic_row)


def row_input(row: Mapping[str, Any]) -> str:
    msgs = row.get("messages")
    for m in msgs if isinstance(msgs, list) else []:
        if isinstance(m, dict) and m.get("role") == "user":
            return str(m.get("content", ""))
    return ""


def row_output(row: Mapping[str, Any]) -> str:
    msgs = row.get("messages")
    for m in reversed(msgs) if isinstance(msgs, list) else []:
        if isinstance(m, dict) and m.get("role") == "assistant":
            return str(m.get("content", ""))
    return ""


def row_key(row: Mapping[str, Any]) -> tuple[str, str]:
    """What identifies a synthetic row across writers: its id and its request."""
    return (str(row.get("id", "")), row_input(row))


def is_review_decision(row: Mapping[str, Any]) -> bool:
    """A person's decision (accepted/edited/rejected by hand), not an automatic rejection."""
    return row.get("status") in REVIEWED and not row.get("reason")


def _dump(row: Mapping[str, Any]) -> bytes:
    return json.dumps(row, ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class SaveReport:
    """What a merge-write did: rows replaced, rows appended, lines kept byte for byte."""

    path: Path
    replaced: int = 0
    appended: int = 0
    kept_unparsed: int = 0
    merged_from_disk: int = 0


def save_review(
    path: str | Path, decisions: Mapping[tuple[str, str], Mapping[str, Any]] | Iterable[Mapping]
) -> SaveReport:
    """The review screen's save: write only the rows the person touched.

    ``decisions`` are the touched rows (or a mapping ``row_key(row) -> row``). The file is
    re-read under the writers' lock; each line whose row has the key of a decision is replaced
    by that decision, every other line (a row reviewed elsewhere, a line that is not JSON, a
    JSON list) is kept byte for byte. A decision whose row is no longer on disk is appended,
    so no decision is ever lost.
    """
    path = Path(path)
    if not isinstance(decisions, Mapping):
        decisions = {row_key(r): r for r in decisions}
    todo = dict(decisions)
    with _file_lock(path):
        out: list[bytes] = []
        replaced = kept = 0
        if path.exists():
            for _n, raw, terminated in _raw_lines(path):
                value, problem = _parse_line(raw, terminated)
                if not problem and isinstance(value, dict) and not check_synthetic_row(value):
                    key = row_key(value)
                    if key in todo:
                        out.append(_dump(todo.pop(key)))
                        replaced += 1
                        continue
                elif raw.strip():
                    kept += 1
                out.append(raw)
        appended = len(todo)
        out.extend(_dump(r) for r in todo.values())
        atomic_write_bytes(path, b"".join(line + b"\n" for line in out))
    return SaveReport(path, replaced=replaced, appended=appended, kept_unparsed=kept)


def snapshot_synthetic_rows(path: str | Path) -> dict[tuple[str, str], dict[str, Any]]:
    """The rows on disk by key: what a long-running writer saw when it started."""
    return {row_key(r): r for r in read_synthetic_rows(path).rows}


def write_synthetic_rows(
    path: str | Path,
    rows: Iterable[Mapping[str, Any]],
    *,
    started_from: Mapping[tuple[str, str], Mapping[str, Any]] | None = None,
) -> SaveReport:
    """The synth-outputs stage's final write, which cannot lose a review made meanwhile.

    ``started_from`` is ``snapshot_synthetic_rows(path)`` taken when the stage began. Under the
    writers' lock the file is re-read: a row that changed on disk since then (a review decision
    saved while the stage ran) wins over the stage's row with the same key; one whose key the
    stage no longer writes is kept at the end. Lines that do not parse are kept byte for byte
    at the end. Without ``started_from`` the rows are written as given.
    """
    path = Path(path)
    rows = [dict(r) for r in rows]
    with _file_lock(path):
        merged = unparsed = 0
        tail: list[bytes] = []
        if started_from is not None and path.exists():
            index = {row_key(r): i for i, r in enumerate(rows)}
            for _n, raw, terminated in _raw_lines(path):
                value, problem = _parse_line(raw, terminated)
                if problem or not isinstance(value, dict) or check_synthetic_row(value):
                    if raw.strip():
                        tail.append(raw)
                        unparsed += 1
                    continue
                key = row_key(value)
                if started_from.get(key) == value:
                    continue  # unchanged since the stage began: the stage's row stands
                merged += 1
                if key in index:
                    rows[index[key]] = value
                else:
                    tail.append(_dump(value))
        body = b"".join(_dump(r) + b"\n" for r in rows) + b"".join(t + b"\n" for t in tail)
        atomic_write_bytes(path, body)
    return SaveReport(path, kept_unparsed=unparsed, merged_from_disk=merged)


# -- human preferences (blind A/B picks; the evaluate stage reads them) ------------------------


def preference_record(request: str, a: str, b: str, choice: str) -> dict[str, Any]:
    if choice not in ("a", "b", "tie"):
        raise ValueError(f"choice must be a, b or tie, not {choice!r}")
    winner = {"a": a, "b": b, "tie": "tie"}[choice]
    loser = {"a": b, "b": a, "tie": "tie"}[choice]
    return {
        "ts": round(time.time(), 3),
        "input": request,
        "a": a,
        "b": b,
        "choice": choice,
        "winner": winner,
        "loser": loser,
    }


def preferences_path(results_dir: str | Path) -> Path:
    return Path(results_dir) / PREFERENCES_FILE


def append_preference(results_dir: str | Path, record: Mapping[str, Any]) -> Path:
    """Append one pick (fsynced; on a fresh line even after a torn one)."""
    return append_jsonl(preferences_path(results_dir), record)


def _check_preference(v: Any) -> str:
    if not isinstance(v, dict):
        return f"expected a JSON object (a pick), found {_kind(v)}"
    for key in ("a", "b", "winner"):
        if not isinstance(v.get(key), str):
            return f'field "{key}" must be text, found {_kind(v.get(key))}'
    if v.get("choice") not in ("a", "b", "tie"):
        return f'"choice" must be a, b or tie, found {v.get("choice")!r}'
    return ""


def read_preferences_checked(results_dir: str | Path) -> Loaded:
    """Every well-formed pick, and every skipped line (torn, not JSON, wrong shape) named."""
    return read_jsonl_checked(preferences_path(results_dir), _check_preference)


def read_preferences(
    results_dir: str | Path, on_bad: Callable[[BadLine], None] | None = None
) -> list[dict[str, Any]]:
    """The picks; bad lines are skipped (and passed to ``on_bad`` when given)."""
    loaded = read_preferences_checked(results_dir)
    if on_bad is not None:
        for b in loaded.bad:
            on_bad(b)
    return loaded.rows


def preference_problems(results_dir: str | Path) -> list[str]:
    """Each line of human_preferences.jsonl that is not a pick (torn by a crash, not JSON,
    the wrong shape), named with its line number: the readers skip it, the file keeps it."""
    loaded = read_preferences_checked(results_dir)
    return [f"{p}: skipped (the line stays in the file)" for p in loaded.problems]


def remove_preference(results_dir: str | Path, record: Mapping[str, Any]) -> bool:
    """Drop the last line equal to ``record`` (an undone pick); every other line is kept
    byte for byte. False when it is not there."""
    path = preferences_path(results_dir)
    try:
        lines = path.read_bytes().splitlines(keepends=True)
    except OSError:
        return False
    for k in range(len(lines) - 1, -1, -1):
        try:
            if json.loads(lines[k]) == dict(record):
                del lines[k]
                if k == len(lines) and k > 0 and _torn_before_append(lines[k - 1]):
                    lines[k - 1] = lines[k - 1][:-1]  # the newline the append put after it
                atomic_write_bytes(path, b"".join(lines))
                return True
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
    return False


def _torn_before_append(line: bytes) -> bool:
    """A last line that is not JSON: ``append_jsonl`` ended it with a newline to start the
    pick on a fresh line, so removing that pick takes the newline too (undo restores it)."""
    try:
        json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return line.endswith(b"\n")
    return False


# -- teacher replies (runs/<run>/teacher_replies.jsonl) ----------------------------------------


def append_teacher_reply(run_dir: str | Path, seed: str, attempt: int, reply: str) -> Path:
    return append_jsonl(
        Path(run_dir) / TEACHER_REPLIES_FILE, {"seed": seed, "attempt": attempt, "reply": reply}
    )


# == RLAIF (stages 7-9): rl_train_data.jsonl, rl_dev_data.jsonl, rm_validation.json ========
#
# rl_train_data.jsonl / rl_dev_data.jsonl (rl-prompts), one row per line, the seed's shape:
#     {"prompt_conversation": [{"role": ..., "content": ...}, ...], "reference": null,
#      "rubric": "..."}
# Train rows carry the system prompt as the first message; dev rows do not (the seed's rule).
#
# rm_validation.json (reward-model): {"summary": {...}, "records": [...]}; each record has
# the seed's fields (input, baseline_output, sft_output, preference, grader_response) with
# preference = 1 when the baseline (A) is preferred, -1 the SFT output (B), 0 a tie, plus
# grader_response_swapped (the answer with the two outputs exchanged) and human_pick (the
# person's blind pick in the same sign, when there is one). A bare list of records (the
# seed's own file) reads too.
#
# rl_model_outputs.json (rlaif) is a method-outputs file: read_method_outputs.

RL_TRAIN_FILE = RESULT_FILES["rl-prompts"]
RM_VALIDATION_FILE = RESULT_FILES["reward-model"]
JUDGE_ACCURACY_FILE = "judge_accuracy_samples.json"  # the samples the judge accuracy check keeps


def rl_prompt_row(conversation: Iterable[Mapping[str, Any]], rubric: str) -> dict[str, Any]:
    return {
        "prompt_conversation": [
            {"role": str(m["role"]), "content": str(m["content"])} for m in conversation
        ],
        "reference": None,
        "rubric": rubric,
    }


def _check_rl_prompt(v: Any) -> str:
    if not isinstance(v, dict):
        return f"expected an object with prompt_conversation/reference/rubric, found {_kind(v)}"
    conv = v.get("prompt_conversation")
    if not isinstance(conv, list) or not conv:
        return '"prompt_conversation" must be a non-empty list of messages'
    for m in conv:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return '"prompt_conversation" entries must be {"role", "content"} objects'
    if not any(m.get("role") == "user" for m in conv):
        return '"prompt_conversation" has no user message'
    if not isinstance(v.get("rubric", ""), str):
        return '"rubric" must be text'
    return ""


def read_rl_prompts(path: str | Path) -> Loaded:
    """rl_train_data.jsonl or rl_dev_data.jsonl."""
    return read_jsonl_checked(path, _check_rl_prompt)


def write_rl_prompts(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    return atomic_write_jsonl(path, [dict(r) for r in rows])


def write_rm_validation(
    path: str | Path, records: Iterable[Mapping[str, Any]], summary: Mapping[str, Any]
) -> Path:
    return atomic_write_json(
        path, {"summary": dict(summary), "records": [dict(r) for r in records]}
    )


def read_rm_validation(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(records, summary) of rm_validation.json; ([], {}) when absent or unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return [], {}
    if isinstance(data, list):
        return [r for r in data if isinstance(r, dict)], {}
    if not isinstance(data, dict):
        return [], {}
    records = data.get("records")
    summary = data.get("summary")
    return (
        [r for r in records if isinstance(r, dict)] if isinstance(records, list) else [],
        summary if isinstance(summary, dict) else {},
    )


# == Evaluation (stage 11): evaluation.json, evaluation_samples.jsonl, evaluation_judgements.jsonl
#
# evaluation.json: every number of the evaluate stage, each with its n and 95% interval
# (see engine/eval/evaluation.py for the shapes; the report and the Compare tab read it through
# engine.eval.report.load_report). A copy is kept in the run folder (the rubric history).
# evaluation_samples.jsonl: one row per text behind a number: {"kind": "sample", "id":
# "<method>/r<request>/s<sample>", "method", "request", "demo_index", "input",
# "person_output", "output", "tokens", "length_words", "style_distance", "similarity",
# "centroid_similarity", "judge": [wins, losses, ties]}; {"kind": "dev_sample", "id":
# "<method>/dev<j>", ...}; {"kind": "nll", "method", "request", "input", "nll_total",
# "tokens", "nll_mean"}.
# evaluation_judgements.jsonl: {"set": "heldout"|"dev", "a", "b" (sample ids), "method_a",
# "method_b", "request", "input", "preference" (1: a won), "text_ab", "verdict_ab",
# "text_ba", "verdict_ba", "consistent"}.

EVALUATION_SAMPLES_FILE = "evaluation_samples.jsonl"
EVALUATION_JUDGEMENTS_FILE = "evaluation_judgements.jsonl"


def write_evaluation(results_dir: str | Path, data: Mapping[str, Any]) -> Path:
    return atomic_write_json(Path(results_dir) / EVALUATION_FILE, dict(data))


def read_evaluation(results_dir: str | Path) -> dict[str, Any] | None:
    """evaluation.json, or None when evaluate has not run (or the file is unreadable)."""
    try:
        data = json.loads((Path(results_dir) / EVALUATION_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def methods_dropped(results_dir: str | Path, names: Iterable[str]) -> list[str]:
    """The methods of the current evaluation.json that ``names`` leaves out: an evaluation of
    ``names`` would write a narrower result over a wider one (evaluate says so first)."""
    old = read_evaluation(results_dir) or {}
    had = [m.get("name") for m in old.get("methods", []) if isinstance(m, dict)]
    keep = set(names)
    return [str(m) for m in had if m and m not in keep]


def narrower_warning(dropped: Iterable[str]) -> str:
    """What evaluate says before it writes fewer methods than the evaluation it replaces."""
    return (
        f"the last evaluation also measured {', '.join(dropped)}; this one does not, so "
        f"{EVALUATION_FILE} and report.md will leave them out (the earlier "
        f"{EVALUATION_FILE} stays in its runs/evaluate-* folder). Rerun or fix those stages, "
        "or cancel now, to keep them."
    )


def write_evaluation_rows(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """evaluation_samples.jsonl or evaluation_judgements.jsonl, atomically."""
    return atomic_write_jsonl(path, [dict(r) for r in rows])


def read_evaluation_rows(path: str | Path) -> list[dict[str, Any]]:
    """The object rows of an evaluation JSONL file ([] when missing; bad lines skipped)."""
    return read_jsonl_checked(path, _is_obj("an evaluation row")).rows
