"""Every loader against a corpus of malformed files
(tests/data/malformed/<kind>/...). Each gives a clear message that names the file (and the
line or entry where there is one), never a traceback, and changes no file."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from engine.errors import PersonaError
from engine.store import results
from engine.store.workspace import Workspace, init_workspace

CORPUS = Path(__file__).resolve().parent.parent / "data" / "malformed"
FILES = sorted(p for p in CORPUS.rglob("*") if p.is_file())

# where each kind of file goes in a workspace, and the name messages must use
PLACE = {
    "data": ("data/data.json", "data/data.json"),
    "prompts": ("data/prompts.toml", "data/prompts.toml"),
    "persona": ("persona.toml", "persona.toml"),
    "synthetic": ("results/synthetic_personalized_data.jsonl", "synthetic_personalized_data.jsonl"),
    "inputs": ("results/synthetic_inputs.jsonl", "synthetic_inputs.jsonl"),
    "preferences": ("results/human_preferences.jsonl", "human_preferences.jsonl"),
    "checkpoints": ("results/checkpoints.toml", "checkpoints.toml"),
    "holdout": ("data/holdout.json", "data/holdout.json"),
    "outputs": ("results/baseline_results.json", "baseline_results.json"),
}


def _fingerprint(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _messages(kind: str, ws: Workspace) -> list[str]:
    """Run every loader of this kind; collect what it says (an error or reported bad lines)."""
    said: list[str] = []

    def expect_error(fn) -> None:
        with pytest.raises(PersonaError) as e:
            fn()
        said.append(str(e.value))

    if kind == "data":
        expect_error(ws.load_demos)
        _demos, problem = ws.read_demos_as_written()
        said.append(problem or "data/data.json (read as written)")
    elif kind == "prompts":
        expect_error(ws.load_prompts)
    elif kind == "persona":
        expect_error(ws.config)
    elif kind == "synthetic":
        path = ws.result("synthetic_personalized_data.jsonl")
        loaded = results.read_synthetic_rows(path)
        assert loaded.bad, "a malformed row was not reported"
        said += loaded.problems
        from engine.stages.synth_outputs import read_jsonl

        expect_error(lambda: read_jsonl(path))
    elif kind == "inputs":
        loaded = results.read_synthetic_inputs(ws.result("synthetic_inputs.jsonl"))
        assert loaded.bad and not loaded.rows
        said += loaded.problems
    elif kind == "preferences":
        loaded = results.read_preferences_checked(ws.results_dir)
        assert loaded.bad
        said += loaded.problems
        results.read_preferences(ws.results_dir)  # the plain reader skips, never raises
    elif kind == "checkpoints":
        from engine.store.checkpoints import check_registry, load_registry, require_registry

        assert results.read_registry(ws.results_dir) == {}  # views: the bad entry left out
        read = load_registry(ws.results_dir)
        for stage in read.problems or ["sft"]:  # every stage reading it gets the checked error
            expect_error(lambda s=stage: results.latest_checkpoint(ws.results_dir, s))
        expect_error(lambda: require_registry(ws.results_dir))  # evaluate reads every entry
        expect_error(lambda: results.read_registry(ws.results_dir, strict=True))
        said.append(check_registry(ws.results_dir))
    elif kind == "holdout":
        from engine.store.settings import DataConfig
        from engine.store.split import workspace_split

        expect_error(lambda: workspace_split(ws, DataConfig()))  # checked before it writes
    elif kind == "outputs":
        loaded = results.read_method_outputs(ws.result("baseline_results.json"))
        assert loaded.problems and not loaded.rows
        said += loaded.problems
    return said


def test_the_corpus_is_big_enough():
    assert len(FILES) >= 30
    assert {p.relative_to(CORPUS).parts[0] for p in FILES} == set(PLACE)


@pytest.mark.parametrize("sample", FILES, ids=lambda p: str(p.relative_to(CORPUS)))
def test_every_loader_names_the_file_and_changes_nothing(sample: Path, tmp_path: Path):
    kind = sample.relative_to(CORPUS).parts[0]
    ws = init_workspace(tmp_path / "ws")
    where, name = PLACE[kind]
    shutil.copyfile(sample, ws.root / where)
    before = _fingerprint(ws.root)
    said = _messages(kind, ws)
    assert said and all(name in m for m in said), said
    assert not any(m.rstrip().endswith("..") for m in said), said
    assert _fingerprint(ws.root) == before  # no loader wrote, moved or deleted anything
