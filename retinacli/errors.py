"""Errors and the exit-code policy shared by every command (documented in docs/cli.md)."""

from __future__ import annotations

# Exit codes. Batch commands exit 0 when at least one input succeeded; the failures are listed
# in the command's error report, never silently dropped.
EXIT_OK = 0
EXIT_NOTHING_DONE = 1  # no readable input, or the command failed as a whole
EXIT_USAGE = 2  # bad options or arguments (Typer/Click also uses 2)
EXIT_MODEL_INVALID = 3  # model package missing, corrupt, or failed verification
EXIT_STORE_BUSY = 4  # another process holds the embedding store's lock
EXIT_STORE_DAMAGED = 5  # the embedding store's files are inconsistent (`retina store verify`)
EXIT_BROKEN_PIPE = 141  # stdout's reader went away (`| head`): 128 + SIGPIPE, as shells report it


class RetinaError(Exception):
    """Base class: the message is one line a user can act on.

    The exit code belongs to the error: a subclass sets it as a class attribute, and a one-off error
    passes ``exit_code=`` (``retinacli.cli`` prints the message and exits with it).
    """

    exit_code = EXIT_NOTHING_DONE

    def __init__(self, *args: object, exit_code: int | None = None):
        super().__init__(*args)
        if exit_code is not None:
            self.exit_code = exit_code


class ReadError(RetinaError):
    """A file could not be read as an OCT volume or fundus image.

    ``str(err)`` is ``"<path>: <reason>"`` so it can be printed as the one-line report.
    """

    def __init__(self, path: object, reason: str):
        self.path = str(path)
        self.reason = " ".join(str(reason).split())  # one line, whatever the file put in the message
        super().__init__(f"{self.path}: {self.reason}")


class UsageError(RetinaError):
    exit_code = EXIT_USAGE


class ModelPackageError(RetinaError):
    exit_code = EXIT_MODEL_INVALID


class StoreBusyError(RetinaError):
    exit_code = EXIT_STORE_BUSY


class StoreDamagedError(RetinaError):
    """The store's files disagree with ``store.json`` or with each other; nothing was changed."""

    exit_code = EXIT_STORE_DAMAGED


class MissingExtraError(RetinaError):
    """An optional dependency group is needed for this feature."""

    def __init__(self, feature: str, extra: str, module: str):
        super().__init__(
            f"{feature} needs the optional '{extra}' dependencies ({module} is not installed). "
            f"Install them with: pip install 'retina[{extra}]'"
        )


def require(feature: str, extra: str, *modules: str) -> None:
    """Raise :class:`MissingExtraError` naming the first of `modules` that is not installed.

    Looks the modules up without importing them, so a command can check before its slow imports.
    """
    import importlib.util

    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module without a spec
            found = False
        if not found:
            raise MissingExtraError(feature, extra, module)


def first_line(exc: BaseException) -> str:
    """An exception as one line: its message's first line, else its type's name (a library's message,
    onnxruntime's or LanceDB's, can span many lines)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
