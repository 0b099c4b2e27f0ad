"""persona.toml: defaults, loading, ``--set`` overrides and the secret-free snapshot.

Secrets never live here: they come from ``.env`` (see ``load_secrets``) and are only
passed to the backend in memory.
"""

from __future__ import annotations

import copy
import os
import tomllib
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

DEFAULT_LOCAL_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_MODEL = "persona/tiny-random"
ROLES = ("policy", "teacher", "judge")
SECRET_KEYS = ("TINKER_API_KEY", "WANDB_API_KEY")

DEFAULTS: dict[str, Any] = {
    "backend": {"name": "local"},
    "models": {
        "local": {
            "policy": DEFAULT_LOCAL_MODEL,
            "teacher": DEFAULT_LOCAL_MODEL,
            "judge": DEFAULT_LOCAL_MODEL,
        },
        "tinker": {
            "policy": "Qwen/Qwen3-4B-Instruct-2507",
            "teacher": "Qwen/Qwen3-235B-A22B-Instruct-2507",
            "judge": "Qwen/Qwen3-30B-A3B-Instruct-2507",
        },
    },
    # Sampling the policy (baseline, prompting, sft outputs). SmolLM2 loops under greedy
    # decoding, so sample with temperature; repeated trailing lines are trimmed afterwards.
    "sampling": {
        "max_tokens": 160,
        "temperature": 0.7,
        "top_p": 0.95,
        "seed": 0,
        # requests in flight; the local backend batches them into one generation pass
        "concurrency": 16,
        "trim_repeats": True,
    },
    "synth_inputs": {
        "per_seed": 10,  # requests asked per topic seed
        "num_examples": 3,  # demonstrations shown to the teacher
        "retries": 2,  # extra attempts per seed while it is short of per_seed
        "max_tokens": 400,
        "temperature": 0.8,
        "max_seeds": 0,  # 0 = every seed in prompts.toml
        "concurrency": 16,
    },
    "synth_outputs": {
        "concurrency": 16,
        "max_tokens": 200,
        "temperature": 0.7,
        "critique": False,  # draft -> critique -> revise
        "signoff": "",  # e.g. "— Maya": appended when the text does not end with it
        "default_status": "pending",  # status new rows get; review sets accepted/rejected/edited
        "limit": 0,  # 0 = answer every synthetic input
    },
    "sft": {
        "lr": 2e-4,
        "lr_schedule": "constant",  # "constant" | "linear" (decay to 0 at the last step)
        "rank": 16,
        "batch_size": 4,
        "epochs": 3,
        "steps": 0,  # 0 = epochs * ceil(train rows / batch_size)
        "val_fraction": 0.2,
        "eval_every": 1,
        "checkpoint_every": 10,
        "max_length": 768,
        "train_on": "auto",  # "auto" | "reviewed" | "non-rejected" (see stages/sft.py)
        "use_system_prompt": False,
        "resume": True,
        "seed": 0,
        "sample_after": True,
    },
    "wandb": {"project": "", "entity": ""},
}

PERSONA_TOML_TEMPLATE = """\
# Persona workspace configuration. Override any key for one run with
#   persona run STAGE --set section.key=value
# Secrets (TINKER_API_KEY, WANDB_API_KEY) go in .env, never here.

[backend]
name = "local"  # "local" (in-process, no account) or "tinker" (needs TINKER_API_KEY)

# Models per role. [models.<backend>] picks per backend; keys set directly under
# [models] (policy/teacher/judge) apply to every backend.
[models.local]
policy = "HuggingFaceTB/SmolLM2-135M-Instruct"
teacher = "HuggingFaceTB/SmolLM2-135M-Instruct"
judge = "HuggingFaceTB/SmolLM2-135M-Instruct"

[models.tinker]
policy = "Qwen/Qwen3-4B-Instruct-2507"
teacher = "Qwen/Qwen3-235B-A22B-Instruct-2507"
judge = "Qwen/Qwen3-30B-A3B-Instruct-2507"

[sampling]
max_tokens = 160
temperature = 0.7
top_p = 0.95
seed = 0
concurrency = 16  # requests in flight (the local backend samples them as one batch)
trim_repeats = true  # drop repeated trailing lines (small models loop)

[synth_inputs]
per_seed = 10
num_examples = 3
retries = 2
max_tokens = 400
temperature = 0.8
max_seeds = 0  # 0 = all seeds

[synth_outputs]
concurrency = 16
max_tokens = 200
temperature = 0.7
critique = false  # draft -> critique -> revise
signoff = ""  # enforce a sign-off, e.g. "— Maya"
default_status = "pending"

[sft]
lr = 2e-4
rank = 16
batch_size = 4
epochs = 3
steps = 0  # 0 = derived from epochs
val_fraction = 0.2
checkpoint_every = 10
max_length = 768
train_on = "auto"  # auto: reviewed rows, or every non-rejected row when none are reviewed
resume = true

[wandb]
project = ""  # set to log metrics to wandb (offline mode without WANDB_API_KEY)
"""


class ConfigError(ValueError):
    """A configuration problem a person can fix; the message says where."""


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_scalar(text: str) -> Any:
    """A ``--set`` value as a TOML scalar (``3``, ``2e-4``, ``true``, ``"x"``); else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. sft.lr=1e-4")
    key, _, value = item.partition("=")
    parts = [p.strip() for p in key.strip().split(".")]
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. sft.lr=1e-4")
    return parts, parse_scalar(value.strip())


def apply_overrides(
    cfg: dict[str, Any], overrides: list[str] | dict[str, Any] | None
) -> dict[str, Any]:
    cfg = copy.deepcopy(cfg)
    if not overrides:
        return cfg
    items = (
        [(k.split("."), v) for k, v in overrides.items()]
        if isinstance(overrides, dict)
        else [parse_override(o) for o in overrides]
    )
    for parts, value in items:
        node = cfg
        for p in parts[:-1]:
            if not isinstance(node.setdefault(p, {}), dict):
                raise ConfigError(f"--set {'.'.join(parts)}: {p!r} is not a section")
            node = node[p]
        node[parts[-1]] = value
    return cfg


def load_config(
    path: str | Path | None,
    overrides: list[str] | dict[str, Any] | None = None,
    backend: str | None = None,
) -> dict[str, Any]:
    """Defaults <- persona.toml <- overrides <- backend. Raises ConfigError naming the file."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None and Path(path).exists():
        try:
            user = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from e
        cfg = deep_merge(cfg, user)
    cfg = apply_overrides(cfg, overrides)
    if backend:
        cfg["backend"]["name"] = backend
    name = cfg["backend"].get("name", "local")
    if name not in ("local", "tinker"):
        raise ConfigError(f"backend.name = {name!r}: choose 'local' or 'tinker'")
    return cfg


def backend_name(cfg: dict[str, Any]) -> str:
    return str(cfg.get("backend", {}).get("name", "local"))


def model_for(cfg: dict[str, Any], role: str) -> str:
    """The model for a role on the configured backend (a direct [models] key wins)."""
    models = cfg.get("models", {})
    direct = models.get(role)
    if isinstance(direct, str) and direct:
        return direct
    per = models.get(backend_name(cfg), {})
    if isinstance(per, dict) and per.get(role):
        return str(per[role])
    return str(DEFAULTS["models"].get(backend_name(cfg), DEFAULTS["models"]["local"])[role])


def load_secrets(env_path: str | Path | None) -> dict[str, str]:
    """Keys from ``.env`` (then the process environment). Kept in memory only."""
    values: dict[str, str] = {}
    if env_path is not None and Path(env_path).exists():
        values.update({k: v for k, v in dotenv_values(env_path).items() if v})
    for key in SECRET_KEYS:
        if key not in values and os.environ.get(key):
            values[key] = os.environ[key]
    return values


def redact(obj: Any, secrets: dict[str, str] | list[str]) -> Any:
    """Replace any secret value found in strings of ``obj`` (recursively) with ``***``."""
    vals = [
        v for v in (secrets.values() if isinstance(secrets, dict) else secrets) if v and len(v) >= 4
    ]
    if not vals:
        return obj

    def go(x: Any) -> Any:
        if isinstance(x, str):
            for v in vals:
                x = x.replace(v, "***")
            return x
        if isinstance(x, dict):
            return {k: go(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return type(x)(go(v) for v in x)
        return x

    return go(obj)


def snapshot(cfg: dict[str, Any], secrets: dict[str, str]) -> dict[str, Any]:
    """The config a run records: no secret keys, no secret values."""
    clean = {k: v for k, v in cfg.items() if k.upper() not in SECRET_KEYS}
    return redact(clean, secrets)
