"""Regenerate docs/cli.md from the commands' own --help (run after changing a command's options).

    python scripts/gen_cli_reference.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from retinacli.cli import COMMAND_MODULES, app

REPO = Path(__file__).resolve().parents[1]

HEADER = """# CLI reference

Generated from each command's `--help` by `scripts/gen_cli_reference.py`; the help text is the source of
truth. All commands print data to stdout (`--json` where the output is data) and progress / messages to
stderr. Tables fit the terminal's width (80 columns included) without splitting a word: a path too long
for its column is cut in the middle, keeping its file name (`…`; `--json` prints it in full), text wraps
between words, and a table that cannot fit prints one `key  value` line a field instead. Every date is
YYYY-MM-DD.

## Exit codes

| code | meaning |
|---|---|
| 0 | done; for batch commands at least one input succeeded (failures are listed in the error report) |
| 1 | nothing done: no readable input, every input failed, or the command failed as a whole |
| 1 | ... or stdout cannot be written (`> /dev/full`): one line `error: cannot write to stdout: ...` |
| 2 | usage error in every command: bad option value, missing argument or path (see below) |
| 3 | model package missing, corrupt (sha256 mismatch) or not a valid package, in every command |
| 4 | the embedding store is locked by another running `retina embed` |
| 5 | the embedding store is damaged: ``... store damaged: run `retina store verify` `` (docs/store.md) |
| 141 | stdout closed by its reader (piped into `head -1`): stops quietly, no message (128 + SIGPIPE) |

Usage errors (2) include a PATH, `--store`, `--manifest`, run folder or weights file that does not exist,
an output folder that is not empty (without `--force` / `--overwrite`), a modality or model the store was
not built with, an unknown task, and no task with usable labels (`evaluate`; an unusable task among
others is skipped with its reason). A folder without `retina.json` given as `--model` is 3.

A command that fails leaves nothing that blocks its retry: no half-made run folder (`train`), store
(`embed` into a new store that commits nothing), partial `--out` (`evaluate`) or package (`export`).
Library warnings (scikit-learn, numpy, faiss, decoders) are one `warning: <library>: ...` line each on
stderr. Every code above is held by `tests/test_exit_codes.py` (docs/reliability.md).

## Environment

| variable | meaning |
|---|---|
| `RETINA_HOME` | installed model packages (`$RETINA_HOME/models`) and settings; default `~/.retina` |
| `RETINA_MODEL` | default model package (name or path) when `--model` is not given |
| `RETINA_STORE` | default embedding store when `--store` is not given; default `./.retina/store` |
| `RETINA_MAX_PIXELS` | per-item decoded-size budget (samples) without `--max-pixels`; default `2**27` |

## Option names

The same option means the same thing in every command: `--store` / `-s` is the embedding store,
`--model` / `-m` the model package, `--manifest` the cohort manifest CSV, `--json` prints data as JSON.
Deprecated spellings still work in this release and print a one-line warning on stderr:
`retina embed --out/-o` and `retina retrieve|predict --index/-i` (use `--store`), and `-m` for
`--manifest` on `train`, `probe` and `evaluate` (use `--manifest`; `-m` will mean `--model` there).

## Reports

`retina retrieve ... --html FILE` and `retina predict ... --html FILE` also write one self-contained
HTML file (stdout is unchanged; `wrote report: FILE` on stderr). Images are embedded PNGs (OCT: central
B-scan and en-face projection; fundus: the photo, at most 256 px), a Content-Security-Policy forbids
scripts and every external resource, and ids and paths are the pseudonymous ones of the text output. A
source that cannot be shown (moved or deleted, a path redacted into a pseudonym, unreadable) gets a
placeholder with the reason. Retrieval: one block per query, results with rank, score, eye, date and a
"same eye" marker; predictions: the head's label meaning, threshold, cross-validated quality and
reliability, one row per item with its flags (thumbnails for the first 200 items). The DOM (class
and `data-` attributes) is listed in `retinacli/reports/html.py`; `tests/test_reports_html.py` holds it.

"""


def help_text(*args: str) -> str:
    env = {**os.environ, "COLUMNS": "100", "TERM": "dumb", "NO_COLOR": "1"}
    retina = str(Path(sys.executable).parent / "retina")
    result = subprocess.run([retina, *args, "--help"], capture_output=True, text=True, env=env)
    return "\n".join(line.rstrip() for line in result.stdout.strip("\n").splitlines())


def subcommands(name: str) -> list[str]:
    """The commands of a command group (`retina models ...`, `retina store ...`), in definition order."""
    import typer

    command = typer.main.get_command(app).commands.get(name)
    return list(getattr(command, "commands", {}))


def main() -> None:
    parts = [HEADER, "## retina\n", "```text", help_text(), "```\n"]
    for name in COMMAND_MODULES:
        parts += [f"## retina {name}\n", "```text", help_text(name), "```\n"]
        for sub in subcommands(name):
            text = help_text(name, sub)
            if text:
                parts += [f"### retina {name} {sub}\n", "```text", text, "```\n"]
    (REPO / "docs" / "cli.md").write_text("\n".join(parts))
    print(f"wrote {REPO / 'docs' / 'cli.md'}")


if __name__ == "__main__":
    main()
