"""The `retina` command line. Each command lives in retinacli/commands/<name>.py and registers itself.

Command modules import their heavy dependencies (pydicom, onnxruntime, torch via `training`) inside
the command function, so `retina --help` stays fast and the CLI never imports torch unless a
training command runs.
"""

from __future__ import annotations

import contextlib
import importlib

import typer
from typer.core import TyperGroup

from retinacli import __version__
from retinacli.errors import EXIT_BROKEN_PIPE, EXIT_NOTHING_DONE, RetinaError

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
    from retinacli.console import err, styled

    # The message is literal text on one line: '[train]' in a pip hint or brackets, a newline or an
    # escape sequence in a path are shown, never interpreted.
    err.print(styled(("error:", "bold red"), " ", str(exc)), highlight=False)
    return typer.Exit(exc.exit_code)


# Library warnings that say nothing a user can act on: dropped instead of shown.
SILENCED_WARNINGS = (
    "does not have a deterministic implementation",  # torch, under evaluation's warn_only determinism
)
_PACKAGE_NAMES = {"sklearn": "scikit-learn", "PIL": "Pillow"}
# Libraries that parse input files: their warning and log texts can quote header values.
FILE_READING_LIBRARIES = frozenset({"pydicom", "tifffile", "Pillow", "PIL", "eyepy", "oct_converter",
                                    "pylibjpeg", "openjpeg", "imagecodecs", "imageio"})
MAX_WARNING_CHARS = 300  # scikit-learn's run to paragraphs of links


def _warning_source(category: type, filename: str, text: str) -> str:
    """The library a warning comes from: 'scikit-learn', 'numpy', 'pydicom', ... ('python' if unknown)."""
    import re

    module = getattr(category, "__module__", "") or ""
    top = module.split(".")[0]
    if issubclass(category, RuntimeWarning) and " encountered in " in text:
        top = "numpy"  # numpy's floating-point warnings name the caller's file, not numpy's
    elif top in ("builtins", "warnings", ""):
        found = re.search(r"(?:site|dist)-packages[/\\]([A-Za-z0-9_]+)", filename or "")
        top = found.group(1) if found else ("retina" if "retinacli" in (filename or "") else "python")
    return _PACKAGE_NAMES.get(top, top)


@contextlib.contextmanager
def routed_library_warnings():
    """Inside: every Python warning (scikit-learn, numpy, faiss, pydicom, tifffile, Pillow, ...) and
    every WARNING log record of a library is one ``warning: <library>: <message>`` line on stderr,
    each distinct message once, never a raw ``file:line: Category: ...`` block."""
    import logging
    import warnings

    from retinacli.commands.options import warn

    shown: set[tuple[str, str]] = set()

    def say(source: str, text: str) -> None:
        if source in FILE_READING_LIBRARIES:
            # Their messages quote header values and file names ("Invalid value for VR DA: '…'"):
            # never passed on; the reader's own one-line reason says what was wrong with the file.
            text = "a warning while reading a file (its text is withheld: it may quote header values)"
        text = " ".join(str(text).split())  # one line, whatever the library put in it
        if not text or any(pattern in text for pattern in SILENCED_WARNINGS) or (source, text) in shown:
            return
        shown.add((source, text))
        warn(f"{source}: {text if len(text) <= MAX_WARNING_CHARS else text[:MAX_WARNING_CHARS] + '...'}")

    def showwarning(message, category, filename, lineno, file=None, line=None):
        say(_warning_source(category, filename, str(message)), message)

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            with contextlib.suppress(Exception):  # a log record must never fail the command
                say(record.name.split(".")[0], record.getMessage())

    handler = Handler(logging.WARNING)
    root = logging.getLogger()
    with warnings.catch_warnings():
        warnings.showwarning = showwarning
        root.addHandler(handler)
        try:
            yield
        finally:
            root.removeHandler(handler)


class RetinaGroup(TyperGroup):
    """The root command group: the one place a RetinaError becomes a message and an exit code, and
    where library warnings become one ``warning:`` line each (`routed_library_warnings`).

    Every command (and sub-group, e.g. ``retina models``) runs inside this ``invoke``, so the same
    handling applies under ``retina ...`` and under a test's ``CliRunner().invoke(app, ...)``.
    """

    def invoke(self, ctx):
        with routed_library_warnings():
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


def configure_streams() -> None:
    """Make stdout/stderr unable to fail on a character.

    On a UTF-8 stream, file names that are not valid UTF-8 (common on old exports) are written back
    as their original bytes (surrogateescape), as `ls` shows them. On any other encoding (ascii,
    latin-1: PYTHONIOENCODING, an old locale) what the encoding cannot hold becomes a backslash
    escape (µm -> \\xb5m) instead of a UnicodeEncodeError; Rich tables switch to ASCII borders there.
    """
    import sys

    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape" if encoding == "utf8" else "backslashreplace")


class OutputError(Exception):
    """Writing to stdout failed (a closed pipe, a full disk): carries the OSError."""

    def __init__(self, cause: OSError):
        super().__init__(str(cause))
        self.cause = cause


class _GuardedStdout:
    """sys.stdout, with a failed write or flush raised as OutputError, so `main` can tell "stdout is
    gone" (one line, a documented exit code) from any other OSError (a bug: a traceback)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError as exc:
            raise OutputError(exc) from None

    def flush(self):
        try:
            return self._stream.flush()
        except OSError as exc:
            raise OutputError(exc) from None

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main() -> None:
    """The `retina` entry point.

    Exit status when stdout fails: EXIT_BROKEN_PIPE (141, as a shell reports a process killed by
    SIGPIPE) and no message when the reader went away (`retina ... | head -1`); EXIT_NOTHING_DONE (1)
    and one ``error: cannot write to stdout: <reason>`` line when writing failed otherwise (a full disk).
    """
    import errno
    import os
    import sys

    configure_streams()
    real_stdout = sys.stdout
    if real_stdout is not None:  # None when started with stdout closed (`retina ... >&-`)
        sys.stdout = _GuardedStdout(real_stdout)
    code: int | str | None = 0
    try:
        try:
            app()
        except SystemExit as exc:
            code = exc.code
        except RetinaError as exc:  # raised outside a command (RetinaGroup.invoke handles the rest)
            code = report_error(exc).exit_code
        if sys.stdout is not None:
            sys.stdout.flush()  # inside the try: a failure here would otherwise surface at shutdown
    except OutputError as exc:
        # Whatever is still buffered can never be written: point stdout at devnull so the
        # interpreter's own flush at exit is silent (https://docs.python.org/3/library/signal.html).
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, real_stdout.fileno())
        except (OSError, ValueError):
            pass
        sys.stdout = real_stdout
        if exc.cause.errno == errno.EPIPE:
            code = EXIT_BROKEN_PIPE
        else:
            reason = exc.cause.strerror or str(exc.cause)
            try:
                from retinacli.console import err, styled

                err.print(styled(("error:", "bold red"), f" cannot write to stdout: {reason}"),
                          highlight=False)
            except OSError:
                pass
            code = EXIT_NOTHING_DONE
    raise SystemExit(code)


if __name__ == "__main__":
    main()
