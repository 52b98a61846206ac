"""How govctl prints: rich tables for people, plain JSON (``--json``) for scripts, errors on stderr.

JSON goes straight to stdout, never through rich, so it is never wrapped, coloured or truncated.
Error messages are one plain line each (``error: ...``) on stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from functools import cache
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console, RenderableType
from rich.table import Column, Table
from rich.text import Text

#: The ``--json`` flag every listing (and most other commands) takes.
JsonFlag = Annotated[
    bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")
]

#: ``--tenant`` of a listing: one tenant, or (absent) every tenant.
TenantFilter = Annotated[
    str | None, typer.Option("--tenant", "-t", help="One tenant (default: every tenant).")
]

#: Task ids are 36 characters: never fold them, so they can be copied from a table.
ID_WIDTH = 36


def console() -> Console:
    """The stdout console: the terminal's width (or ``COLUMNS``); when not a terminal and
    ``COLUMNS`` is unset, wide, so piped tables are not folded."""
    return _console(sys.stdout.isatty(), os.environ.get("COLUMNS", ""))


@cache
def _console(tty: bool, columns: str) -> Console:
    if tty or columns.isdigit():
        return Console(soft_wrap=False)
    return Console(width=160, soft_wrap=False)


def width() -> int | None:
    """The width to wrap plain text at: ``COLUMNS``, else the terminal's; None when piped."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return None


def emit_lines(blocks: Iterable[list[str]], limit: int | None = None) -> None:
    """Blocks of plain lines on stdout, a blank line between blocks. A line longer than
    ``limit`` (default :func:`width`) is wrapped at spaces only (never inside a word),
    continued indented by its own indentation plus two."""
    first = True
    out: list[str] = []
    limit = width() if limit is None else limit
    for block in blocks:
        if not first:
            out.append("")
        first = False
        for line in block:
            indent = " " * (len(line) - len(line.lstrip(" ")))
            if limit is None or len(line) <= limit:
                out.append(line)
                continue
            out += textwrap.wrap(
                line.lstrip(" "),
                width=limit,
                initial_indent=indent,
                subsequent_indent=indent + "  ",
                break_long_words=False,
                break_on_hyphens=False,
            )
    sys.stdout.write("".join(line + "\n" for line in out))
    sys.stdout.flush()


def show(*renderables: RenderableType | str) -> None:
    """Print tables, or plain text (never read as rich markup: reasons may contain brackets).

    A table of :func:`table` keeps every word whole: each column is at least as wide as its
    longest word (its header's included). When the terminal is too narrow for that, the rows
    are printed as blocks of ``column: value`` lines instead, wrapped at spaces."""
    for item in renderables:
        if isinstance(item, str):
            console().print(item, markup=False, highlight=False)
        elif isinstance(item, Table) and getattr(item, _WHOLE_WORDS, False):
            _show_whole_words(item)
        else:
            console().print(item)


#: Marks the tables whose words :func:`show` keeps whole.
_WHOLE_WORDS = "_governance_whole_words"


def _texts(column: Column) -> list[str]:
    cells = [c.plain if isinstance(c, Text) else str(c) for c in column.cells]
    header = column.header.plain if isinstance(column.header, Text) else str(column.header)
    return [header, *cells]


def _needed(column: Column) -> int:
    """The narrowest ``column`` can be with no word cut: its longest word (or, for a column
    that never wraps, its longest cell)."""
    texts = _texts(column)
    if column.no_wrap:
        return max((len(t) for t in texts), default=0)
    return max((len(w) for t in texts for w in t.split()), default=0)


def _show_whole_words(shown: Table) -> None:
    out = console()
    needed = [max(column.min_width or 0, _needed(column)) for column in shown.columns]
    # Each column of the box of table() costs a space each side and a separator, bar the last.
    if sum(needed) + 3 * len(needed) - 1 <= out.width:
        for column, width in zip(shown.columns, needed, strict=True):
            column.min_width = width
        out.print(shown)
        return
    # Too narrow for the table: one block per row, the first column first.
    columns = [_texts(column) for column in shown.columns]
    blocks: list[list[str]] = []
    if shown.title:
        blocks.append([str(shown.title)])
    for row in range(shown.row_count):
        values = [texts[row + 1] for texts in columns]
        names = [texts[0] for texts in columns]
        lines = [f"{names[0]} {values[0]}"]
        lines += [f"  {name}: {value}" for name, value in zip(names[1:], values[1:], strict=True)]
        blocks.append(lines)
    if shown.caption:
        blocks.append([str(shown.caption)])
    emit_lines(blocks, limit=console().width)


def add_row(target: Table, *values: object) -> None:
    """Add a row of plain text cells (never read as rich markup)."""
    target.add_row(*(Text("" if v is None else str(v)) for v in values))


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


def error(message: str) -> None:
    for line in message.splitlines() or [""]:
        sys.stderr.write(f"error: {line}\n")
    sys.stderr.flush()


def warn(message: str) -> None:
    """A warning for people, ``warning: ...`` on stderr (stdout stays the command's output)."""
    for line in message.splitlines() or [""]:
        sys.stderr.write(f"warning: {line}\n")
    sys.stderr.flush()


def emit_line(text: str) -> None:
    """One line of plain text on stdout, never wrapped (something to copy or pipe)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def note(message: str) -> None:
    """A hint for people (for example the next cursor), on stderr so stdout stays parseable."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def table(*columns: str, title: str | None = None, caption: str | None = None) -> Table:
    """A table whose columns named ``id``/``task`` never fold, and whose words :func:`show`
    keeps whole (a word longer than the whole terminal alone is folded)."""
    result = Table(
        title=title,
        caption=caption,
        title_justify="left",
        caption_justify="left",
        box=box.SIMPLE_HEAD,  # a rule under the header, no vertical lines: room for the words
        show_edge=False,
    )
    for name in columns:
        if name.lower() in ("id", "task", "task_id", "entry"):
            result.add_column(name, no_wrap=True, min_width=ID_WIDTH if name != "entry" else None)
        else:
            result.add_column(name, overflow="fold")
    setattr(result, _WHOLE_WORDS, True)
    return result


def fields_table(rows: list[tuple[str, Any]], title: str | None = None) -> Table:
    """A two-column key/value table."""
    result = Table(title=title, show_header=False, title_justify="left")
    result.add_column("field", style="bold", no_wrap=True)
    result.add_column("value", overflow="fold")
    for key, value in rows:
        add_row(result, key, value)
    return result


def when(ms: int | None) -> str:
    """A UTC timestamp from epoch milliseconds, e.g. ``2026-01-02 10:00:00Z``."""
    if not ms:
        return ""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def span(seconds: float) -> str:
    """A short duration: ``45s``, ``12m``, ``3h 20m``, ``2d 4h``."""
    s = int(abs(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86_400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86_400}d {s % 86_400 // 3600}h"


def relative(ms: int | None) -> str:
    """``in 23h 59m`` or ``5m ago`` relative to now."""
    if not ms:
        return ""
    delta = ms / 1000 - time.time()
    return f"in {span(delta)}" if delta >= 0 else f"{span(delta)} ago"
