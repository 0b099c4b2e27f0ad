"""Workspace: init, demo validation messages (file + entry + problem, nothing changed), config, atomic writes."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest

from engine.llm.parsing import dedupe, parse_requests
from engine.store.atomic import atomic_write_json, atomic_write_text
from engine.store.config import (
    ConfigError,
    load_config,
    parse_scalar,
    snapshot,
)
from engine.store.templates import DEFAULT_SEEDS, fill
from engine.store.workspace import (
    EXAMPLE_DATA,
    Workspace,
    WorkspaceError,
    init_workspace,
    validate_demos_text,
)


def test_example_data_is_ten_demos_in_one_style():
    demos = validate_demos_text(EXAMPLE_DATA.read_text(), "data/data.example.json")
    assert len(demos) == 10
    for d in demos:
        assert d["output"].startswith("Hi ") and " —\n" in d["output"].split("\n")[0] + "\n"
        assert d["output"].rstrip().endswith("Thanks!\n— Maya")
        assert len(d["output"].split()) < 130
        assert any(ch.isdigit() for ch in d["input"])  # dates / amounts in the context


def test_init_creates_workspace_and_does_not_clobber(tmp_path: Path):
    ws = init_workspace(tmp_path / "w")
    for p in (
        ws.config_path,
        ws.prompts_path,
        ws.demos_path,
        ws.env_path,
        ws.results_dir,
        ws.runs_dir,
    ):
        assert p.exists(), p
    assert len(ws.load_demos()) == 10
    prompts = ws.load_prompts()
    assert prompts["seeds"] == DEFAULT_SEEDS
    assert "{examples}" in prompts["templates"]["synth_inputs"]
    cfg = tomllib.loads(ws.config_path.read_text())
    assert cfg["backend"]["name"] == "local"
    ws.demos_path.write_text("[]")
    init_workspace(ws.root)  # again: keeps the user's file
    assert ws.demos_path.read_text() == "[]"


BAD = [
    ("not json", "{ nope", "not valid JSON (line 1"),
    ("wrong type", '{"input": "a", "output": "b"}', "expected a JSON list"),
    (
        "entry not object",
        '[1, {"input": "a b", "output": "c"}, {"input": "d", "output": "e"}]',
        "entry 1: expected an object",
    ),
    (
        "missing field",
        '[{"input": "a"}, {"input": "b", "output": "c"}, {"input": "d", "output": "e"}]',
        'entry 1: missing field "output"',
    ),
    (
        "not text",
        '[{"input": "a", "output": 5}, {"input": "b", "output": "c"}, {"input": "d", "output": "e"}]',
        'entry 1: field "output" must be text',
    ),
    (
        "empty text",
        '[{"input": "a", "output": "x"}, {"input": "  ", "output": "c"}, {"input": "d", "output": "e"}]',
        'entry 2: field "input" is empty',
    ),
    ("too few", '[{"input": "a", "output": "x"}, {"input": "b", "output": "c"}]', "at least 3"),
    (
        "duplicate",
        '[{"input": "Write to Bob", "output": "x"}, {"input": "b", "output": "c"}, {"input": "write  to bob", "output": "e"}]',
        "entry 3: duplicate of entry 1",
    ),
]


@pytest.mark.parametrize(("label", "text", "expected"), BAD, ids=[b[0] for b in BAD])
def test_bad_demos_named_and_unchanged(ws: Workspace, label: str, text: str, expected: str):
    ws.demos_path.write_text(text)
    before = ws.demos_path.read_bytes()
    with pytest.raises(WorkspaceError) as e:
        ws.load_demos()
    assert "data/data.json" in str(e.value)
    assert expected in str(e.value)
    assert ws.demos_path.read_bytes() == before


def test_save_demos_validates_first(ws: Workspace):
    before = ws.demos_path.read_bytes()
    with pytest.raises(WorkspaceError):
        ws.save_demos([{"input": "a", "output": ""}])
    assert ws.demos_path.read_bytes() == before
    demos = ws.load_demos()[:3]
    ws.save_demos(demos)
    assert json.loads(ws.demos_path.read_text()) == demos


def test_prompts_validation(ws: Workspace):
    ws.prompts_path.write_text("seeds = 3\n")
    with pytest.raises(WorkspaceError, match="data/prompts.toml: seeds must be a list"):
        ws.load_prompts()
    ws.prompts_path.write_text("system_prompt = [")
    with pytest.raises(WorkspaceError, match="data/prompts.toml: not valid TOML"):
        ws.load_prompts()
    ws.save_prompts({"system_prompt": "Be brief.", "seeds": ["a topic"]})
    p = ws.load_prompts()
    assert (
        p["system_prompt"] == "Be brief."
        and p["seeds"] == ["a topic"]
        and "revise" in p["templates"]
    )


def test_config_overrides_and_models(tmp_path: Path):
    cfg = load_config(
        None,
        ["sft.lr=1e-5", "sft.epochs=2", 'wandb.project="x"', "sampling.trim_repeats=false"],
    )
    assert cfg.sft.lr == 1e-5 and cfg.sft.epochs == 2 and cfg.wandb.project == "x"
    assert cfg.sampling.trim_repeats is False
    assert cfg.model("policy") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    t = load_config(None, backend="tinker")
    assert t.model("policy") == "Qwen/Qwen3-4B-Instruct-2507"
    assert t.model("teacher") == "Qwen/Qwen3-235B-A22B-Instruct-2507"
    assert t.model("judge") == "Qwen/Qwen3-30B-A3B-Instruct-2507"
    assert load_config(None, ['models.policy="m"'], backend="tinker").model("policy") == "m"
    assert parse_scalar("3") == 3 and parse_scalar("true") is True and parse_scalar("x y") == "x y"
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["nonsense"])
    with pytest.raises(ConfigError, match="backend.name"):
        load_config(None, ['backend.name="gpu"'])
    bad = tmp_path / "persona.toml"
    bad.write_text("[sft\n")
    with pytest.raises(ConfigError, match="persona.toml: not valid TOML"):
        load_config(bad)


def test_snapshot_has_no_secrets():
    cfg = load_config(None, ['wandb.project="sk-secret-123"'])
    snap = snapshot(cfg, {"TINKER_API_KEY": "sk-secret-123"})
    assert "sk-secret-123" not in json.dumps(snap)


def test_secrets_from_env_file(ws: Workspace, monkeypatch):
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    ws.env_path.write_text("TINKER_API_KEY=tk-abc\nWANDB_API_KEY=wb-def\n")
    assert ws.secrets() == {"TINKER_API_KEY": "tk-abc", "WANDB_API_KEY": "wb-def"}
    assert "TINKER_API_KEY" not in os.environ


def test_atomic_write_leaves_no_temp_files(tmp_path: Path):
    p = tmp_path / "d" / "f.json"
    atomic_write_json(p, {"a": 1})
    atomic_write_text(p, "x")
    assert p.read_text() == "x"
    assert [q.name for q in p.parent.iterdir()] == ["f.json"]


def test_fill_leaves_other_braces():
    assert (
        fill("{n} items as JSON {like: this} on {seed}", n=3, seed="x")
        == "3 items as JSON {like: this} on x"
    )


def test_parse_requests_formats():
    a = "Email Bob Smith about the budget meeting on Friday March 3."
    b = "Write to Dr. Lee to cancel my appointment on 4/2 at 9am."
    assert parse_requests(f'["{a}", "{b}"]') == [a, b]
    assert parse_requests(
        f'Sure! Here they are:\n```json\n{{"requests": ["{a}", {{"request": "{b}"}}]}}\n```'
    ) == [a, b]
    assert parse_requests(f"Here are 2 requests:\n1. {a}\n2) {b}\n3. ok\n") == [a, b]
    assert parse_requests(f'- {a}\n* "{b}"\n') == [a, b]
    assert parse_requests(f"{a}\n\n{b}") == [a, b]
    assert parse_requests("random ## ++ 12 34\n!!!\n") == []
    seen = {"email bob smith about the budget meeting on friday march 3"}
    assert dedupe([a, b, b.upper(), "  " + b + "  "], seen) == [b]
