"""Option types shared by the commands, so each concept has one spelling everywhere (docs/cli.md).

`--store/-s` is the embedding store, `-m` is `--model`, `--manifest` the cohort manifest CSV and
`--json` prints data as JSON. The old spellings (`embed --out/-o`, `retrieve/predict --index/-i`,
`-m` for `--manifest` on train/probe/evaluate) are hidden aliases that still work for one release and
print a one-line deprecation warning on stderr (:func:`deprecated_alias`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import typer

T = TypeVar("T")

STORE_DEFAULT_HELP = "Default: $RETINA_STORE, else ./.retina/store."
MODEL_DEFAULT_HELP = (
    "Default: $RETINA_MODEL, else the 'retina models default', else the newest package in ./exported or "
    "$RETINA_HOME/models."
)


def store_option(help: str = f"Embedding store folder. {STORE_DEFAULT_HELP}") -> Any:
    """`--store/-s`: the embedding store folder."""
    return typer.Option(None, "--store", "-s", help=help)


def model_option(help: str = f"Model package (folder or name). {MODEL_DEFAULT_HELP}") -> Any:
    """`--model/-m`: a model package, by folder or name."""
    return typer.Option(None, "--model", "-m", help=help)


def manifest_option(help: str) -> Any:
    """`--manifest`: the cohort manifest CSV (no short form: `-m` is `--model`)."""
    return typer.Option(None, "--manifest", help=help)


def json_option(help: str = "Print the result as JSON.") -> Any:
    """`--json`: print data as one JSON document on stdout."""
    return typer.Option(False, "--json", help=help)


REDACT_PATHS_HELP = (
    "Replace every component of every printed or written file path with a keyed pseudonym (for outputs "
    "that leave the site). Without it, paths are relative to the PATH given and only components naming "
    "the file's patient are replaced."
)


def redact_paths_option(help: str = REDACT_PATHS_HELP) -> Any:
    """`--redact-paths`: every path component in outputs becomes a keyed pseudonym (retinacli.redaction)."""
    return typer.Option(False, "--redact-paths", help=help)


def strict_option(help: str) -> Any:
    """`--strict`: items the package flags as out of distribution (retinacli.ood) are refused, not used."""
    return typer.Option(False, "--strict", help=help)


MAX_PIXELS_HELP = (
    "Largest item decoded, in samples (voxels or pixels x channels: frames x rows x columns x samples "
    "per pixel), e.g. 134217728, 1.2e8 or 2**27. A file whose header, JPEG 2000/JPEG codestream or TIFF "
    "page declares more is refused before decoding. Default: $RETINA_MAX_PIXELS, else 2**27 (a 128x1024x512 "
    "OCT volume is 6.7e7, a 4000x4000 RGB photo 4.8e7)."
)


def _set_max_pixels(value: str | None) -> int | None:
    """Parse `--max-pixels` and make it this process's per-item budget (retinacli.readers.common)."""
    from retinacli.readers.common import parse_max_pixels, set_max_pixels

    if value is None:
        set_max_pixels(None)
        return None
    try:
        limit = parse_max_pixels(value)
    except (ValueError, OverflowError):
        raise typer.BadParameter("must be a positive number of samples, e.g. 134217728, 1.2e8 or 2**27") \
            from None
    set_max_pixels(limit)
    return limit


def max_pixels_option(help: str = MAX_PIXELS_HELP) -> Any:
    """`--max-pixels`: the per-item decoded-size budget (also $RETINA_MAX_PIXELS); set when parsed."""
    return typer.Option(
        None, "--max-pixels", envvar="RETINA_MAX_PIXELS", metavar="SAMPLES", callback=_set_max_pixels,
        help=help, show_default=False, show_envvar=False,
    )


DEVICE_HELP = (
    "Where the encoders run: cpu, cuda (onnxruntime's CUDA provider: needs the onnxruntime-gpu package in "
    "place of onnxruntime, 'pip uninstall onnxruntime && pip install onnxruntime-gpu'; exit 2 when CUDA "
    "cannot start) or auto (CUDA when onnxruntime has it, else the CPU). The providers really used are "
    "printed after 'engine:'."
)


def device_option(help: str = DEVICE_HELP) -> Any:
    """`--device`: auto, cpu or cuda (retinacli.engine.choose_providers)."""
    return typer.Option("auto", "--device", metavar="auto|cpu|cuda", help=help, callback=_check_device)


def _check_device(value: str) -> str:
    from retinacli.engine import DEVICES

    if value not in DEVICES:
        raise typer.BadParameter(f"must be one of {', '.join(DEVICES)}, not {value!r}")
    return value


def run_dir_argument() -> Any:
    """RUN: a training run folder."""
    return typer.Argument(..., help="Training run folder (from 'retina train').", show_default=False)


def hidden_alias(*names: str) -> Any:
    """A deprecated spelling of an option, kept out of --help; resolve it with :func:`deprecated_alias`."""
    return typer.Option(None, *names, hidden=True)


def deprecated_alias(value: T | None, old_value: T | None, old: str, new: str, *, meaning: str = "",
                     note: str = "") -> T | None:
    """The option's value, taking a deprecated spelling's value with a one-line warning on stderr.

    `old` / `new` are the spellings (e.g. ``"--index"``, ``"--store"``); `meaning` follows `old` in
    the warning (``"for --manifest"``) and `note` follows "is deprecated" (``" and will mean --model"``).
    """
    from retinacli.errors import UsageError

    if old_value is None:
        return value
    if value is not None:
        raise UsageError(f"give {new} or {old}, not both")
    warn(f"{old}{' ' + meaning if meaning else ''} is deprecated{note}; use {new}")
    return old_value


def warn(message: str) -> None:
    """One `warning: ...` line on stderr (literal text on one line, not Rich markup)."""
    from retinacli.console import err, styled

    err.print(styled(("warning:", "yellow"), f" {message}"), highlight=False)


def resolve_store(store: Path | None, old_value: Path | None, old: str) -> Path | None:
    """`--store`, or its deprecated spelling `old` (`--out` on embed, `--index` elsewhere)."""
    return deprecated_alias(store, old_value, old, "--store")


def resolve_manifest(manifest: Path | None, short_m: Path | None) -> Path | None:
    """`--manifest`, or `-m` (deprecated: `-m` will mean `--model`)."""
    return deprecated_alias(manifest, short_m, "-m", "--manifest", meaning="for --manifest",
                            note=" and will mean --model")
