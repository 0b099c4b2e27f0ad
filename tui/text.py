"""User text on screen: Rich Text with markup shown literally, one-line cells, and files that
cannot be read described in one line naming the file and line."""

from __future__ import annotations

from rich.text import Text


def read_problem(path, e: Exception, rel: str = "") -> str:
    """A one-line description of why ``path`` could not be read, naming the file and line."""
    name = rel or str(path)
    if isinstance(e, UnicodeDecodeError):
        try:
            line = path.read_bytes()[: e.start].count(b"\n") + 1
        except OSError:
            line = "?"
        return f"{name}: line {line} is not UTF-8 text (byte {e.start}); save it as UTF-8."
    lineno = getattr(e, "lineno", None)
    if lineno:
        return f"{name}: line {lineno}: {getattr(e, 'msg', e)}"
    return f"{name}: {e}"


def read_demos(ws) -> tuple[list[dict[str, str]], str]:
    """data/data.json as written (Workspace.read_demos_as_written), never raising: a file that
    is not UTF-8 or cannot be read comes back as an error naming the file and line."""
    try:
        return ws.read_demos_as_written()
    except (OSError, ValueError) as e:
        return [], read_problem(ws.demos_path, e, ws.rel(ws.demos_path)) + " Fix it in an editor."


def one_line(text: str, width: int = 60) -> str:
    """Collapse whitespace and cut to ``width`` characters (for table cells)."""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def plain(text: str, style: str = "") -> Text:
    """User text as a Rich Text: markup characters like ``[/b]`` show as written."""
    return Text(str(text), style=style)


def cell(text: str, width: int = 60, style: str = "") -> Text:
    return Text(one_line(text, width), style=style, no_wrap=True, overflow="ellipsis")
