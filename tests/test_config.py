"""Typed configuration: every key checked once, errors that say where and what is accepted,
and an init template that is the defaults."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from engine.cli import main
from engine.errors import PersonaError
from engine.store.config import ConfigError, load_config, persona_toml_template
from engine.store.settings import BACKEND_DEFAULTS, PersonaConfig
from engine.store.workspace import init_workspace


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("sft.lrr=1e-4", "unknown key 'sft.lrr'; did you mean 'lr'?"),
        ("sft.lr=abc", "sft.lr must be a finite number, got text 'abc'"),
        ("sft.lr=inf", "sft.lr must be a finite number"),
        ("ditto.beta=nan", "ditto.beta must be a finite number"),
        ("ditto.mix=[1, nan, 1]", "ditto.mix must be a list of numbers"),
        ("sft.lr=-1", "sft.lr = -1: must be greater than 0"),
        ("sft.batch_size=0", "sft.batch_size = 0: must be at least 1"),
        ("sampling.max_tokens=-5", "sampling.max_tokens = -5: must be at least 1"),
        ("sampling.temperature=-0.1", "must be at least 0"),
        ("sampling.top_p=1.5", "must be at most 1"),
        ("sft.train_on=all", "choose one of 'auto', 'reviewed', 'non-rejected'"),
        ("sft.rank=2.5", "sft.rank must be an integer"),
        ("sft.resume=1", "sft.resume must be true or false"),
        ("samplng.seed=1", "did you mean 'sampling'?"),
        ("ditto.mix=[1, 2]", "ditto.mix"),
        ("prompting.only=[1, 'x']", "prompting.only must be a list of integers"),
    ],
)
def test_bad_override_names_argument_key_and_accepted(override: str, needle: str):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)
    assert isinstance(e.value, PersonaError)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('backend = "local"\n', "backend must be a table"),
        ("sampling = 5\n", "sampling must be a table"),
        ("[sampling]\nmax_tokens = -5\n", "sampling.max_tokens = -5: must be at least 1"),
        ("[sft]\nlr = -0.1\n", "sft.lr = -0.1"),
        ("[sft]\nbatch_size = 0\n", "sft.batch_size = 0"),
        ("[sampling]\ntemperature = -1\n", "sampling.temperature = -1"),
        ("[sft]\nlrr = 1e-4\n", "did you mean 'lr'?"),
        ("[models.local]\npolicy = 3\n", "models.local.policy must be text"),
        ("[nonsense]\nx = 1\n", "unknown key 'nonsense'"),
    ],
)
def test_bad_file_names_the_file(tmp_path: Path, text: str, needle: str):
    path = tmp_path / "persona.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(str(path)) and needle in str(e.value)


def test_non_utf8_file(tmp_path: Path):
    path = tmp_path / "persona.toml"
    path.write_bytes(b"[sft]\nlr = 1e-4 # \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_types_are_coerced_and_frozen():
    cfg = load_config(None, ["sft.lr=1", "prompting.only=[0, 3]"])
    assert cfg.sft.lr == 1.0 and isinstance(cfg.sft.lr, float)
    assert cfg.prompting.only == (0, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sft.lr = 2.0  # type: ignore[misc]
    assert load_config(None, {"prompting.only": [2]}).prompting.only == (2,)


def test_template_is_the_defaults_for_both_backends(tmp_path: Path):
    path = tmp_path / "persona.toml"
    path.write_text(persona_toml_template())
    tomllib.loads(path.read_text())  # valid TOML
    assert load_config(path) == load_config(None)
    assert load_config(path, backend="tinker") == load_config(None, backend="tinker")
    # keys whose default depends on the backend are commented out, so each backend's applies
    for backend, sections in BACKEND_DEFAULTS.items():
        cfg = load_config(path, backend=backend)
        for section, values in sections.items():
            for key, value in values.items():
                assert getattr(getattr(cfg, section), key) == value, (backend, section, key)
    # every key of every section is in the template, with a comment
    text = persona_toml_template()
    for section in dataclasses.fields(PersonaConfig):
        for f in dataclasses.fields(getattr(PersonaConfig(), section.name)):
            if not dataclasses.is_dataclass(f.type) and f.name not in ("local", "tinker"):
                assert f"{f.name} = " in text, (section.name, f.name)


def test_backend_defaults_apply_under_user_values(tmp_path: Path):
    assert load_config(None, backend="tinker").rlaif.steps == 40
    assert load_config(None).rlaif.steps == PersonaConfig().rlaif.steps  # no local override
    assert load_config(None, ["rlaif.steps=3"], backend="tinker").rlaif.steps == 3


def test_init_writes_the_template(tmp_path: Path):
    ws = init_workspace(tmp_path / "w")
    assert ws.config_path.read_text() == persona_toml_template()


@pytest.mark.parametrize("override", ["sft.lrr=1e-4", "sft.lr=abc", "sampling.max_tokens=-5"])
def test_cli_rejects_bad_set_before_anything_runs(tmp_path: Path, capsys, override: str):
    ws = init_workspace(tmp_path / "w")
    code = main(["-C", str(ws.root), "run", "baseline", "--set", override])
    assert code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--set" in err and override.split("=")[0] in err
    assert not ws.runs_dir.exists() or not any(ws.runs_dir.iterdir())
    assert not any(ws.results_dir.glob("*.json"))


def test_cli_rejects_bad_file(tmp_path: Path, capsys):
    ws = init_workspace(tmp_path / "w")
    ws.config_path.write_text('backend = "local"\n')
    assert main(["-C", str(ws.root), "run", "baseline"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "persona.toml" in err and "backend must be a table" in err and "Traceback" not in err


def test_readme_lists_every_key_from_the_structures():
    from engine.store.config_doc import README, settings_markdown

    assert settings_markdown() in README.read_text(encoding="utf-8"), (
        "README's configuration section is stale: run `.venv/bin/python -m engine.store.config_doc`"
    )


def test_only_secret_entries_are_redacted():
    from engine.store.config import redact

    env = {
        "TINKER_API_KEY": "tml-abcdef123",
        "HF_HOME": "/tmp",
        "MY_TOKEN": "tok-99999",
        "X": "false",
    }
    text = "run_dir /tmp/w/runs/x, resume false, key tml-abcdef123, tok-99999"
    assert redact(text, env) == "run_dir /tmp/w/runs/x, resume false, key ***, ***"
