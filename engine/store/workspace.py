"""The workspace: a folder with persona.toml, data/, results/, runs/ and .env.

Everything a stage reads from the user goes through here and is validated with
messages that name the file, the entry and the problem. Validation never writes.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import PersonaError
from engine.store.atomic import atomic_write_json, atomic_write_text
from engine.store.config import PERSONA_TOML_TEMPLATE, PersonaConfig, load_config, load_secrets
from engine.store.results import RESULT_FILES  # noqa: F401 - re-exported: engine.store.results owns the names
from engine.store.templates import PROMPTS_TOML_TEMPLATE, prompts_problems, write_prompts

MIN_DEMOS = 3
# A demonstration longer than this many tokens fits no model Persona runs. Without a tokenizer
# the length is estimated as characters / CHARS_PER_TOKEN_MAX (an underestimate for any text,
# so only a demonstration that is too long for certain is flagged).
MAX_DEMO_TOKENS = 32_768
CHARS_PER_TOKEN_MAX = 8
EXAMPLE_DATA = Path(__file__).resolve().parents[2] / "data" / "data.example.json"


class WorkspaceError(PersonaError):
    """A problem with the user's files; ``str()`` names the file and what to fix."""

    def __init__(
        self, message: str, problems: list[str] | None = None, entries: set[int] | None = None
    ):
        super().__init__(message)
        self.problems = problems or [message]
        self.entries = entries or set()  # 0-based positions of the offending entries


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


@dataclass(frozen=True)
class Workspace:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    # -- paths ---------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / "persona.toml"

    @property
    def env_path(self) -> Path:
        return self.root / ".env"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def demos_path(self) -> Path:
        return self.data_dir / "data.json"

    @property
    def prompts_path(self) -> Path:
        return self.data_dir / "prompts.toml"

    @property
    def results_dir(self) -> Path:
        return self.root / "results"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def result(self, name: str) -> Path:
        return self.results_dir / name

    def setting_path(self, value: str | Path) -> Path:
        """A file setting's path (``reward_model.dataset``): relative ones are read from this
        workspace's folder, wherever the command was started."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.root / p

    def rel(self, path: str | Path) -> str:
        """A path relative to the workspace root when it is inside it (for messages)."""
        p = Path(path)
        try:
            return str(p.resolve().relative_to(self.root))
        except ValueError:
            return str(p)

    # -- config and secrets --------------------------------------------------
    def config(
        self, overrides: list[str] | dict[str, Any] | None = None, backend: str | None = None
    ) -> PersonaConfig:
        return load_config(self.config_path, overrides, backend)

    def secrets(self) -> dict[str, str]:
        return load_secrets(self.env_path)

    # -- demonstrations ------------------------------------------------------
    def load_demos(self) -> list[dict[str, str]]:
        if not self.demos_path.exists():
            raise WorkspaceError(
                f"{self.rel(self.demos_path)}: file not found. Run `persona init` or copy "
                "data/data.example.json there and edit it."
            )
        return validate_demos_text(
            read_text_file(self.demos_path, self.rel(self.demos_path)), self.rel(self.demos_path)
        )

    def read_demos_as_written(self) -> tuple[list[dict[str, str]], str]:
        """data/data.json as it stands, for screens that show or edit it even when invalid:
        its object entries as text, and the problem that kept part of it unread ("" if none)."""
        path, name = self.demos_path, self.rel(self.demos_path)
        if not path.exists():
            return [], ""
        try:
            raw = json.loads(read_text_file(path, name))
        except WorkspaceError as e:
            return [], str(e)
        except json.JSONDecodeError as e:
            return [], f"{name}: not valid JSON (line {e.lineno}: {e.msg}); fix it in an editor."
        if not isinstance(raw, list):
            return [], f"{name}: expected a JSON list of demonstrations; fix it in an editor."
        demos = [
            {"input": str(e.get("input", "")), "output": str(e.get("output", ""))}
            for e in raw
            if isinstance(e, dict)
        ]
        skipped = [i + 1 for i, e in enumerate(raw) if not isinstance(e, dict)]
        if skipped:
            return demos, (
                f"{name}: entry {skipped[0]} is not an object with input/output; fix it in an editor."
            )
        return demos, ""

    def save_demos(self, demos: list[dict[str, str]]) -> Path:
        """Validate, then write atomically. On a problem nothing is written."""
        text = json.dumps(demos, indent=2, ensure_ascii=False) + "\n"
        validate_demos_text(text, self.rel(self.demos_path))
        return atomic_write_text(self.demos_path, text)

    # -- prompts -------------------------------------------------------------
    def load_prompts(self) -> dict[str, Any]:
        path = self.prompts_path
        name = self.rel(path)
        defaults = tomllib.loads(PROMPTS_TOML_TEMPLATE)
        if not path.exists():
            return defaults
        try:
            data = tomllib.loads(read_text_file(path, name))
        except tomllib.TOMLDecodeError as e:
            raise WorkspaceError(
                f"{name}: not valid TOML ({e}). Fix the file or delete it to get the defaults."
            ) from e
        problems = prompts_problems(data, name)
        if problems:
            raise WorkspaceError("\n".join(problems), problems)
        merged = {**defaults, **data}
        merged["templates"] = {**defaults["templates"], **data.get("templates", {})}
        merged["seeds"] = [s.strip() for s in merged["seeds"] if s.strip()]
        return merged

    def save_prompts(self, prompts: dict[str, Any]) -> Path:
        """Atomically, keeping the file's header comments and multi-line strings."""
        return write_prompts(self.prompts_path, prompts)


def read_text_file(path: Path, name: str) -> str:
    """A user's text file as text; not UTF-8 or unreadable -> WorkspaceError naming it."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise WorkspaceError(
            f"{name}: not UTF-8 text (line {line}, byte {e.start + 1}); save it as UTF-8"
        ) from e
    except OSError as e:
        raise WorkspaceError(f"{name}: cannot be read ({e.strerror or e})") from e


def demo_length_problems(
    demos: list[dict[str, str]],
    name: str = "data/data.json",
    *,
    max_tokens: int = MAX_DEMO_TOKENS,
    count_tokens: Any = None,
) -> list[str]:
    """Demonstrations longer than ``max_tokens`` (a model's context), each named with its
    length. ``count_tokens(text) -> int`` counts exactly; without it the count is a lower bound."""
    problems = []
    for i, d in enumerate(demos, start=1):
        text = d["input"] + "\n" + d["output"]
        n = count_tokens(text) if count_tokens else len(text) // CHARS_PER_TOKEN_MAX
        if n > max_tokens:
            about = "" if count_tokens else "at least "
            problems.append(
                f"{name}: entry {i}: {about}{n} tokens ({len(text)} characters), longer than "
                f"the model's context of {max_tokens} tokens; shorten it"
            )
    return problems


def validate_demos(data: Any, name: str = "data/data.json") -> list[dict[str, str]]:
    """Check parsed demonstrations; raise WorkspaceError listing every problem."""
    if not isinstance(data, list):
        raise WorkspaceError(
            f'{name}: expected a JSON list of {{"input": ..., "output": ...}} objects, '
            f"found a JSON {type(data).__name__ if not isinstance(data, dict) else 'object'}"
        )
    problems: list[str] = []
    bad: set[int] = set()
    seen: dict[str, int] = {}
    demos: list[dict[str, str]] = []

    def flag(i: int, problem: str) -> None:
        problems.append(f"{name}: entry {i}: {problem}")
        bad.add(i - 1)

    for i, entry in enumerate(data, start=1):
        if not isinstance(entry, dict):
            flag(i, f'expected an object with "input" and "output", found {type(entry).__name__}')
            continue
        ok = True
        for key in ("input", "output"):
            if key not in entry:
                flag(i, f'missing field "{key}"')
                ok = False
            elif not isinstance(entry[key], str):
                flag(i, f'field "{key}" must be text, found {type(entry[key]).__name__}')
                ok = False
            elif not entry[key].strip():
                flag(i, f'field "{key}" is empty')
                ok = False
        if not ok:
            continue
        long = demo_length_problems([entry], name)
        if long:
            problems.append(long[0].replace(f"{name}: entry 1:", f"{name}: entry {i}:"))
            bad.add(i - 1)
            continue
        key = _norm(entry["input"])
        if key in seen:
            flag(i, f"duplicate of entry {seen[key]} (same input)")
            continue
        seen[key] = i
        demos.append({"input": entry["input"].strip(), "output": entry["output"].strip()})
    if not problems and len(demos) < MIN_DEMOS:
        problems.append(
            f"{name}: {len(demos)} demonstration(s); at least {MIN_DEMOS} are needed (about 10 is best)"
        )
    if problems:
        raise WorkspaceError("\n".join(problems), problems, bad)
    return demos


def validate_demos_text(text: str, name: str = "data/data.json") -> list[dict[str, str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise WorkspaceError(
            f"{name}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from e
    return validate_demos(data, name)


def find_workspace(start: str | Path | None = None) -> Workspace:
    """The nearest folder at or above ``start`` holding persona.toml (else ``start``)."""
    here = Path(start or Path.cwd()).resolve()
    for p in (here, *here.parents):
        if (p / "persona.toml").exists():
            return Workspace(p)
    return Workspace(here)


def init_workspace(root: str | Path, *, force: bool = False) -> Workspace:
    """Create a workspace with the example data. Never overwrites existing files unless ``force``."""
    ws = Workspace(Path(root))
    ws.root.mkdir(parents=True, exist_ok=True)
    for d in (ws.data_dir, ws.results_dir, ws.runs_dir):
        d.mkdir(exist_ok=True)
    example = json.loads(EXAMPLE_DATA.read_text(encoding="utf-8")) if EXAMPLE_DATA.exists() else []
    writes: list[tuple[Path, Any]] = [
        (ws.config_path, PERSONA_TOML_TEMPLATE),
        (ws.prompts_path, PROMPTS_TOML_TEMPLATE),
        (ws.data_dir / "data.example.json", example),
        (ws.demos_path, example),
    ]
    for path, content in writes:
        if path.exists() and not force:
            continue
        if isinstance(content, str):
            atomic_write_text(path, content)
        else:
            atomic_write_json(path, content)
    if not ws.env_path.exists():
        atomic_write_text(
            ws.env_path,
            "# Secrets for Persona. Never committed, never written to logs or results.\n"
            "# TINKER_API_KEY=\n# WANDB_API_KEY=\n",
        )
        ws.env_path.chmod(0o600)  # API keys go here: readable by its owner only
    gi = ws.root / ".gitignore"
    if not gi.exists():
        atomic_write_text(gi, ".env\nruns/\nwandb/\n")
    return ws
