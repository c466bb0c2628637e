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
    print_table(err, [("path", "path"), ("error", "text")],
                [[record["path"], record["error"]] for record in errors],
                title=f"{len(errors)} unreadable", title_style="bold red")


# --- tables that fit the terminal ---------------------------------------------------------------------

ELLIPSIS = "…"
SHORTENED_NOTE = f"{ELLIPSIS} = path shortened to fit the terminal; --json prints it in full"
_MIN_PATH = 20  # a path column narrower than this says too little: the table turns vertical instead
_MAX_WORD = 30  # a "word" longer than this (a hash, a URL) may fold rather than widen its column


def _head(text: str, cells: int) -> str:
    """The longest start of `text` that takes at most `cells` terminal cells."""
    from rich.cells import cell_len

    while cell_len(text) > cells:
        text = text[: max(0, len(text) - max(1, cell_len(text) - cells))]
    return text


def _tail(text: str, cells: int) -> str:
    """The longest end of `text` that takes at most `cells` terminal cells."""
    return _head(text[::-1], cells)[::-1]


def middle_truncate(text: Any, width: int) -> str:
    """`text` in at most `width` terminal cells, cut in the middle: a path keeps its start and its whole
    file name (``exports/clinic…/oct_0001.dcm``); a file name too long for that keeps its start and its end
    (extension included). Text that fits is returned unchanged."""
    from rich.cells import cell_len

    text = safe(text)
    if cell_len(text) <= width:
        return text
    if width <= 1:
        return ELLIPSIS[:width]
    cut = max(text.rfind("/"), text.rfind("\\"))
    name = text[cut:] if cut > 0 else ""  # with its separator: "…/name"
    if name and cell_len(name) + 1 <= width:  # room for the whole file name: the start gets what is left
        return _head(text[:cut], width - 1 - cell_len(name)) + ELLIPSIS + name
    left = width // 2
    return _head(text, left) + ELLIPSIS + _tail(text, width - 1 - cell_len(_head(text, left)))


def _width_of(cell: str | Text) -> int:
    from rich.cells import cell_len

    return cell.cell_len if isinstance(cell, Text) else cell_len(cell)


def _file_name(cell: str | Text) -> str:
    text = str(cell)
    return text[max(text.rfind("/"), text.rfind("\\")) + 1:]


def _longest_word(cell: str | Text) -> int:
    from rich.cells import cell_len

    return max((cell_len(word) for word in str(cell).split()), default=0)


def print_table(console: Console, columns: list[tuple[str, ...]], rows: list[list[Any]], *,
                title: str | None = None, caption: str | None = None, title_style: str | None = None) -> None:
    """Print `rows` as a table no wider than `console`, never splitting a word or a path across lines.

    `columns` are ``(header, kind)`` or ``(header, kind, justify)``; kind is ``short`` (ids, dates,
    numbers: never wrapped), ``path`` (cut in the middle with `middle_truncate` when the table is too
    wide) or ``text`` (wraps between words). When even the narrowest such table is too wide, each row
    is printed as ``key  value`` lines instead (a vertical layout). Cells are data: they pass through
    `safe`; a `rich.text.Text` cell keeps its style. Title and caption wrap between words.
    """
    from rich.table import Table

    specs = [(c[0], c[1], c[2] if len(c) > 2 else "left") for c in columns]
    title = None if title is None else safe(title)
    rows = [[c if isinstance(c, Text) else safe("" if c is None else c) for c in row] for row in rows]
    total = console.width
    natural = [max([_width_of(h)] + [_width_of(r[i]) for r in rows]) for i, (h, _, _) in enumerate(specs)]
    # Three passes, each letting columns shrink further: text keeps lines of _MAX_WORD cells and paths keep
    # their whole file names ("…/name"); then text wraps down to its longest word; then paths shrink to
    # _MIN_PATH (the file name cut in its middle too).
    floors: list[list[int]] = [[], [], []]
    for i, (header, kind, _) in enumerate(specs):
        if kind == "path":
            names = max((_width_of(_file_name(r[i])) + 2 for r in rows), default=0)
            path_floor = max(_width_of(header), min(natural[i], _MIN_PATH))
            keep_names = max(path_floor, min(natural[i], names))
            tiers = (keep_names, keep_names, path_floor)
        elif kind == "text":
            word = max([_longest_word(header)] + [min(_longest_word(r[i]), _MAX_WORD) for r in rows])
            tiers = (min(natural[i], max(word, _MAX_WORD)), min(natural[i], word), min(natural[i], word))
        else:
            tiers = (natural[i],) * 3
        for floor, width in zip(floors, tiers, strict=True):
            floor.append(width)
    overhead = 3 * len(specs) + 1  # Rich's default box: a border and one space either side of each cell
    widths = list(natural)
    for minimum in floors:
        while sum(widths) + overhead > total:
            shrinkable = [i for i in range(len(specs)) if widths[i] > minimum[i]]
            if not shrinkable:
                break
            widest = max(shrinkable, key=lambda i: widths[i])
            widths[widest] -= 1  # one cell at a time from the widest: wide columns give up space first
    shortened = False

    def cell(value: str | Text, kind: str, width: int) -> str | Text:
        nonlocal shortened
        if kind != "path" or isinstance(value, Text) or _width_of(value) <= width:
            return value
        shortened = True
        return middle_truncate(value, width)

    # Title and caption are printed apart from the table, wrapped between words at the terminal's width
    # (as a table title they would wrap at the table's, however wide the terminal).
    if title:
        console.print(Text(title, style=title_style or "italic"), soft_wrap=False)
    if sum(widths) + overhead <= total:
        table = Table()
        for (header, kind, justify), width in zip(specs, widths, strict=True):
            table.add_column(header, justify=justify, no_wrap=kind != "text",  # type: ignore[arg-type]
                             overflow="fold", max_width=width if kind != "short" else None)
        for row in rows:
            table.add_row(*(cell(v, kind, w) for v, (_, kind, _), w in zip(row, specs, widths, strict=True)))
        console.print(table)
    else:
        # vertical: one "key  value" line a field, a blank line between rows
        keys = max(_width_of(h) for h, _, _ in specs)
        value_width = max(1, total - keys - 2)
        grid = Table.grid(padding=(0, 2))
        grid.add_column(no_wrap=True, style="bold", justify="right")
        grid.add_column(overflow="fold", max_width=value_width)
        for n, row in enumerate(rows):
            if n:
                grid.add_row("", "")
            for value, (header, kind, _) in zip(row, specs, strict=True):
                if str(value):
                    grid.add_row(header, cell(value, kind, value_width))
        console.print(grid)
    if caption:
        console.print(caption, soft_wrap=False)
    if shortened:
        err.print(SHORTENED_NOTE, style="dim", highlight=False)


def print_fields(console: Console, fields: list[tuple[str, Any]], *, key_width: int = 0, right: bool = False,
                 gap: int = 1, key_style: str | None = None) -> None:
    """Print ``key value`` lines (``retina info``, ``store info``, ``models show``) no wider than `console`:
    a value wraps between words under its own column (a hanging indent), and a word longer than a whole
    line (a deep path) is cut in the middle with `middle_truncate`, keeping its file name. Keys are
    padded to `key_width`, right-aligned when `right`; values (None shows as "-") pass through `safe`."""
    import re

    from rich.table import Table

    keys = max([key_width] + [_width_of(f[0]) for f in fields])
    value_width = max(1, console.width - keys - gap)
    grid = Table.grid(padding=(0, gap, 0, 0))
    grid.add_column(no_wrap=True, style=key_style, justify="right" if right else "left", min_width=keys)
    grid.add_column(overflow="fold", max_width=value_width)
    shortened = False
    for key, value in fields:
        value = safe("-" if value is None else value)
        if any(_width_of(word) > value_width for word in value.split()):
            value = re.sub(r"\S+", lambda m: middle_truncate(m.group(), value_width), value)
            shortened = True
        grid.add_row(key, value)
    console.print(grid)
    if shortened:
        err.print(SHORTENED_NOTE, style="dim", highlight=False)
