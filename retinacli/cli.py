"""The `retina` command line. Each command lives in retinacli/commands/<name>.py and registers itself.

Command modules import their heavy dependencies (pydicom, onnxruntime, torch via `training`) inside
the command function, so `retina --help` stays fast and the CLI never imports torch unless a
training command runs.
"""

from __future__ import annotations

import importlib

import typer
from typer.core import TyperGroup

from retinacli import __version__
from retinacli.errors import RetinaError

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
    "store",
)

def report_error(exc: RetinaError) -> typer.Exit:
    """Print the one-line ``error: ...`` for `exc` on stderr; return the Exit carrying its code."""
    from rich.markup import escape

    from retinacli.console import err

    # The message is literal text: '[train]' in a pip hint or brackets in a path are not Rich markup.
    err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False)
    return typer.Exit(exc.exit_code)


class RetinaGroup(TyperGroup):
    """The root command group: the one place a RetinaError becomes a message and an exit code.

    Every command (and sub-group, e.g. ``retina models``) runs inside this ``invoke``, so the same
    handling applies under ``retina ...`` and under a test's ``CliRunner().invoke(app, ...)``.
    """

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RetinaError as exc:
            raise report_error(exc) from None


app = typer.Typer(
    name="retina",
    cls=RetinaGroup,
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
    try:
        app()
    except RetinaError as exc:  # raised outside a command (RetinaGroup.invoke handles the rest)
        raise SystemExit(report_error(exc).exit_code) from None


if __name__ == "__main__":
    main()
