"""Shared Rich consoles: data goes to stdout, progress and messages to stderr (pipes stay clean).

File names, header text and manifest cells are data, not markup: both consoles render strings
literally (no Rich markup, no emoji codes) and show control characters as backslash escapes, so a
name like ``[link=...]`` or ``esc\x1b[2J`` prints as text. A line that wants style builds it with
`styled`; data put into a message goes through `safe` (which also escapes newlines, so a file name
cannot start a line of its own, e.g. a forged ``error:`` line).
"""

from __future__ import annotations

import contextlib
import sys
import unicodedata
from typing import Any

from rich.console import Console
from rich.text import Text

# Characters a terminal acts on rather than shows: C0/C1 controls (ESC starts cursor moves, screen
# clears and OSC 8 hyperlinks), line/paragraph separators and bidirectional overrides.
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_EXTRA = {0x2028, 0x2029, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}


def _escape_char(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _is_control(char: str) -> bool:
    return unicodedata.category(char) == "Cc" or ord(char) in _EXTRA


def safe(text: Any) -> str:
    """`text` (a path, header text, a manifest cell, an error reason) as one printable line:
    control characters and newlines become backslash escapes (``\\n``, ``\\x1b``, ``\\u202e``).

    The consoles below print it literally (markup is off); for a ``markup=True`` print use
    `safe_markup`.
    """
    text = str(text)
    if not any(_is_control(c) for c in text):
        return text
    return "".join(_escape_char(c) if _is_control(c) else c for c in text)


def safe_markup(text: Any) -> str:
    """`safe` plus Rich markup escaping, for interpolating data into a ``markup=True`` string."""
    from rich.markup import escape

    return escape(safe(text))


def styled(*parts: str | tuple[str, str]) -> Text:
    """One line of literal text: ``styled(("error:", "bold red"), " ", message)``; every part is `safe`."""
    return Text.assemble(*((safe(p[0]), p[1]) if isinstance(p, tuple) else safe(p) for p in parts))


class SafeConsole(Console):
    """A Console that never lets a control character (other than a line break or tab) through as is,
    whatever the print site passes: strings, table cells and titles all pass through `render_str`."""

    def render_str(self, text: str, **kwargs: Any) -> Text:
        if any(_is_control(c) and c not in "\n\t" for c in text):
            text = "".join(_escape_char(c) if _is_control(c) and c not in "\n\t" else c for c in text)
        if not self.encoding.startswith("utf"):
            # ascii / latin-1 stdout: escape what it cannot hold here, where Rich still measures widths
            # (the stream's own backslashreplace would do it after the table is laid out)
            with contextlib.suppress(LookupError):
                text = text.encode(self.encoding, "backslashreplace").decode(self.encoding)
        return super().render_str(text, **kwargs)

    def on_broken_pipe(self) -> None:
        """The reader of this console's stream went away (`retina ... 2>&1 | head -1`): stop quietly,
        with the exit status `retina` uses for a closed stdout (retinacli.cli.main)."""
        import os

        from retinacli.errors import EXIT_BROKEN_PIPE

        self.quiet = True
        with contextlib.suppress(OSError, ValueError):  # nothing buffered may surface at shutdown
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.file.fileno())
        raise SystemExit(EXIT_BROKEN_PIPE)


# markup/emoji off: a '[/]' or ':smile:' in a file name is text. Styled lines use `styled` (or markup=True).
out = SafeConsole(soft_wrap=True, markup=False, emoji=False)
err = SafeConsole(stderr=True, soft_wrap=True, markup=False, emoji=False)


def print_json(payload: Any) -> None:
    """Write one JSON document to stdout (no Rich markup, no wrapping); NaN/Infinity print as null."""
    from retinacli.jsonutil import dumps

    sys.stdout.write(dumps(payload, indent=2, default=str) + "\n")
    sys.stdout.flush()


def print_error_table(errors: list[dict[str, str]]) -> None:
    """The unreadable inputs of a batch, one line each (path, reason), on stderr."""
    from rich.table import Table

    table = Table(title=f"{len(errors)} unreadable", title_justify="left", title_style="bold red")
    table.add_column("path", overflow="fold")
    table.add_column("error", overflow="fold")
    for record in errors:
        table.add_row(safe(record["path"]), safe(record["error"]))
    err.print(table)
