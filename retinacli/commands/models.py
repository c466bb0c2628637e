"""`retina models list|show|verify|default` (not implemented yet)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    models = typer.Typer(help="List, inspect and verify model packages.", no_args_is_help=True)
    app.add_typer(models, name="models")

    @models.command("list")
    def list_() -> None:
        """Not implemented yet."""
        raise typer.Exit(1)
