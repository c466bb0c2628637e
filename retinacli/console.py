"""Shared Rich consoles: data goes to stdout, progress and messages to stderr (pipes stay clean)."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def print_json(payload: Any) -> None:
    """Write one JSON document to stdout (no Rich markup, no wrapping)."""
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    sys.stdout.flush()


def print_error_table(errors: list[dict[str, str]]) -> None:
    """The unreadable inputs of a batch, one line each (path, reason), on stderr."""
    from rich.table import Table

    table = Table(title=f"{len(errors)} unreadable", title_justify="left", title_style="bold red")
    table.add_column("path", overflow="fold")
    table.add_column("error", overflow="fold")
    for record in errors:
        table.add_row(record["path"], record["error"])
    err.print(table)
