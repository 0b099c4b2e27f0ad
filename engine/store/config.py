"""persona.toml: loading and checking it into a typed ``PersonaConfig``, ``--set`` overrides,
the ``persona init`` template, and the secret-free snapshot a run records.

The shape (sections, keys, types, defaults, ranges) lives in ``engine.store.settings``; this module
only reads, checks and writes it. Order: defaults <- backend defaults <- persona.toml <-
``--set`` <- ``--backend``. Every problem is a ``ConfigError`` that names the file or the
``--set`` argument, the key, what was given and what is accepted.

Secrets never live here: they come from ``.env`` (see ``load_secrets``) and are only
passed to the backend in memory.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
import typing
from pathlib import Path
from typing import Any

import tomli_w
from dotenv import dotenv_values

from engine.errors import PersonaError
from engine.store.settings import (
    BACKEND_DEFAULTS,
    DEFAULT_LOCAL_MODEL,
    PersonaConfig,
    as_plain,
)

__all__ = [
    "DEFAULT_LOCAL_MODEL",
    "ConfigError",
    "PersonaConfig",
    "load_config",
    "parse_override",
    "persona_toml_template",
]

ROLES = ("policy", "teacher", "judge")
SECRET_KEYS = ("TINKER_API_KEY", "WANDB_API_KEY")


class ConfigError(PersonaError):
    """A configuration problem a person can fix; the message says where."""


# -- checking ---------------------------------------------------------------------------


_TYPE_NAMES = {int: "an integer", float: "a finite number", bool: "true or false", str: "text"}
_PLURAL = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        (inner, _) = typing.get_args(tp)
        return f"a list of {_PLURAL.get(inner, inner)}"
    return _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _given(value: Any) -> str:
    kind = {
        str: "text",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)
    return f"{kind} {value!r}" if not isinstance(value, dict) else "a table"


def _coerce(tp: Any, value: Any) -> tuple[bool, Any]:
    """(ok, value as the field's type)."""
    if typing.get_origin(tp) is tuple:
        (inner, _) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            return False, value
        out = []
        for v in value:
            ok, c = _coerce(inner, v)
            if not ok:
                return False, value
            out.append(c)
        return True, tuple(out)
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(float(value))
        )
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    return False, value


def _range_problem(meta: Any, value: Any) -> str:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        return "choose one of " + ", ".join(repr(c) for c in choices)
    for bound, ok, word in (
        ("ge", lambda v, b: v >= b, "at least"),
        ("gt", lambda v, b: v > b, "greater than"),
        ("le", lambda v, b: v <= b, "at most"),
        ("lt", lambda v, b: v < b, "less than"),
    ):
        b = meta.get(bound)
        if b is not None and isinstance(value, int | float) and not ok(value, b):
            return f"must be {word} {b:g}"
    return ""


def _unknown(where: str, key: str, names: list[str], section: str) -> ConfigError:
    near = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    scope = f"[{section}]" if section else "persona.toml"
    full = f"{section}.{key}" if section else key
    return ConfigError(f"{where}: unknown key {full!r}{hint} ({scope} accepts: {', '.join(names)})")


def check_table(cls: type, data: Any, where: str, section: str = "") -> dict[str, Any]:
    """Check ``data`` against dataclass ``cls``; return it with values coerced (lists -> tuples,
    ints -> floats where a number is wanted). Raises ConfigError on the first problem."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}: {section} must be a table of settings ([{section}] with key = value "
            f"lines), not {_given(data)}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{section}.{key}" if section else key
        if key not in fields:
            raise _unknown(where, key, list(fields), section)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            out[key] = check_table(tp, value, where, full)
            continue
        ok, coerced = _coerce(tp, value)
        if not ok:
            raise ConfigError(f"{where}: {full} must be {_type_name(tp)}, got {_given(value)}")
        problem = _range_problem(fields[key].metadata, coerced)
        if problem:
            raise ConfigError(f"{where}: {full} = {value!r}: {problem}")
        out[key] = coerced
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _build(cls: type, data: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        v = data[f.name]
        kwargs[f.name] = _build(hints[f.name], v) if dataclasses.is_dataclass(hints[f.name]) else v
    return cls(**kwargs)


# -- overrides ---------------------------------------------------------------------------


def parse_scalar(text: str) -> Any:
    """A ``--set`` value as a TOML value (``3``, ``2e-4``, ``true``, ``"x"``, ``[1, 2]``);
    anything TOML cannot read stays text."""
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


def _nest(parts: list[str], value: Any) -> dict[str, Any]:
    out: Any = value
    for p in reversed(parts):
        out = {p: out}
    return out


def check_overrides(overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """``--set`` items (or a {"section.key": value} dict from the app), checked and nested."""
    if not overrides:
        return {}
    items = (
        [(k.split("."), v, f"override {k}") for k, v in overrides.items()]
        if isinstance(overrides, dict)
        else [(*parse_override(o), f"--set {o}") for o in overrides]
    )
    merged: dict[str, Any] = {}
    for parts, value, where in items:
        merged = _merge(merged, check_table(PersonaConfig, _nest(parts, value), where))
    return merged


# -- loading -----------------------------------------------------------------------------


def read_toml_file(path: str | Path) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from e


def load_config(
    path: str | Path | None,
    overrides: list[str] | dict[str, Any] | None = None,
    backend: str | None = None,
) -> PersonaConfig:
    """The typed config. Raises ConfigError naming the file or the --set argument."""
    user: dict[str, Any] = {}
    if path is not None and Path(path).exists():
        user = check_table(PersonaConfig, read_toml_file(path), str(path))
    over = check_overrides(overrides)
    if backend is not None:
        over = _merge(over, check_table(PersonaConfig, {"backend": {"name": backend}}, "--backend"))
    chosen = _merge(user, over)
    name = chosen.get("backend", {}).get("name", "local")
    layered = _merge(BACKEND_DEFAULTS.get(name, {}), chosen)
    try:
        return _build(PersonaConfig, layered)
    except ValueError as e:  # a section's own cross-field check
        raise ConfigError(f"{path or 'config'}: {e}") from e


# -- the init template -------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return tomli_w.dumps({"v": as_plain(value)}).strip()[len("v = ") :]


def _section_lines(cls: type, obj: Any, name: str, backend_keys: set[str]) -> list[str]:
    hints = typing.get_type_hints(cls)
    lines = [f"[{name}]"]
    nested = []
    for f in dataclasses.fields(cls):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            nested.append((hints[f.name], value, f"{name}.{f.name}", f.metadata.get("doc", "")))
            continue
        doc = f.metadata.get("doc", "")
        line = f"{f.name} = {_toml_value(value)}  # {doc}"
        if f.name in backend_keys:
            others = [
                f"{b}: {_toml_value(d[name.split('.')[0]][f.name])}"
                for b, d in BACKEND_DEFAULTS.items()
                if f.name in d.get(name.split(".")[0], {})
            ]
            line = f"# {line} ({'; '.join(others)})"
        elif value == "" and name == "models":
            line = f"# {line}"
        lines.append(line)
    for sub_cls, sub_obj, sub_name, doc in nested:
        lines += ["", f"# {doc}", *_section_lines(sub_cls, sub_obj, sub_name, set())]
    return lines


def persona_toml_template() -> str:
    """persona.toml as ``persona init`` writes it: every key, its default and what it means.
    Keys whose default depends on the backend are written commented out, so the backend's
    own default applies until the person sets one."""
    out = [
        "# Persona workspace configuration. Override any key for one run with",
        "#   persona run STAGE --set section.key=value",
        "# Secrets (TINKER_API_KEY, WANDB_API_KEY) go in .env, never here.",
    ]
    cfg = PersonaConfig()
    for f in dataclasses.fields(PersonaConfig):
        backend_keys = {k for d in BACKEND_DEFAULTS.values() for k in d.get(f.name, {})}
        out += ["", f"# {f.metadata['doc']}"]
        out += _section_lines(
            type(getattr(cfg, f.name)), getattr(cfg, f.name), f.name, backend_keys
        )
    return "\n".join(out) + "\n"


PERSONA_TOML_TEMPLATE = persona_toml_template()


# -- secrets -----------------------------------------------------------------------------


def load_secrets(env_path: str | Path | None) -> dict[str, str]:
    """Keys from ``.env`` (then the process environment). Kept in memory only."""
    values: dict[str, str] = {}
    if env_path is not None and Path(env_path).exists():
        values.update({k: v for k, v in dotenv_values(env_path).items() if v})
    for key in SECRET_KEYS:
        if key not in values and os.environ.get(key):
            values[key] = os.environ[key]
    return values


SECRET_SUFFIXES = ("_KEY", "_TOKEN", "_SECRET", "_PASSWORD")


def is_secret_name(name: str) -> bool:
    """A .env entry whose value must never be written: the known keys and anything named
    like one. Other entries (HF_HOME=/tmp, flags) are settings, not secrets: redacting them
    would mangle every path and word that contains their value."""
    upper = name.upper()
    return upper in SECRET_KEYS or upper.endswith(SECRET_SUFFIXES)


def redact(obj: Any, secrets: dict[str, str] | list[str]) -> Any:
    """Replace any secret value found in strings of ``obj`` (recursively) with ``***``.
    With a dict (the .env entries), only the entries named like secrets count."""
    chosen = (
        [v for k, v in secrets.items() if is_secret_name(k)]
        if isinstance(secrets, dict)
        else list(secrets)
    )
    vals = [v for v in chosen if v and len(v) >= 4]
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


def snapshot(cfg: PersonaConfig, secrets: dict[str, str]) -> dict[str, Any]:
    """The config a run records: no secret values."""
    return redact(cfg.to_dict(), secrets)
