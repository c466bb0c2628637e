"""`retina synth` (not implemented yet)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("synth")
    def synth() -> None:
        """Not implemented yet."""
        raise typer.Exit(1)
