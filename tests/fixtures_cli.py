"""Helpers for tests that run the CLI in-process and check how it fails."""

from __future__ import annotations


def one_error_line(result) -> str:
    """The single `error:` line of a failed command (no traceback, nothing else named an error)."""
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def run_cli(*args) -> tuple[int, str, str]:
    """Run `retina ARGS...` in-process: (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from retinacli.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr
