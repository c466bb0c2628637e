"""The `retina` command line. Each command lives in retinacli/commands/<name>.py and registers itself.

Command modules import their heavy dependencies (pydicom, onnxruntime, torch via `training`) inside
the command function, so `retina --help` stays fast and the CLI never imports torch unless a
training command runs.
"""

from __future__ import annotations

import importlib

import typer

from retinacli import __version__

COMMAND_MODULES = (
    "synth",
    "inspect",
    "pair",
    "probe",
    "train",
    "export",
    "evaluate",
    "embed",
    "retrieve",
    "predict",
    "models",
    "info",
    "demo",
)

app = typer.Typer(
    name="retina",
    help="Multi-modal retinal representation learning: fundus + OCT embeddings, retrieval and prediction.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"retina {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """retina: embed, retrieve and predict on local OCT / fundus folders; train and export models."""


for _name in COMMAND_MODULES:
    importlib.import_module(f"retinacli.commands.{_name}").register(app)


def main() -> None:
    import sys

    # File names that are not valid UTF-8 (common on old exports) must print, not crash a batch.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    app()


if __name__ == "__main__":
    main()
