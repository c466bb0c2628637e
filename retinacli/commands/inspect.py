"""`retina inspect PATH...`: what the readers see in files and folders (no model needed)."""

from __future__ import annotations

from pathlib import Path

import typer

from retinacli.commands import options
from retinacli.errors import EXIT_NOTHING_DONE, EXIT_OK


def _date(value: str | None) -> str | None:
    """The validated study date, YYYY-MM-DD (ISO) for display and JSON."""
    from retinacli.readers.sanitize import iso_date

    return iso_date(value)


def item_record(item, shown=None) -> dict:
    """The public view of one item: no patient identifiers, ever. `shown`: the run's PathRedactor
    (root id and output path); without it the path is the reader's."""
    meta = item.meta
    spacing = meta.pixel_spacing_mm
    root, path = shown.output(item.path, meta) if shown is not None else (None, item.path)
    return {
        "root": root,
        "path": path,
        "modality": item.modality,
        "format": item.format,
        "shape": list(item.shape),
        "dtype": str(item.pixels.dtype),
        "laterality": meta.laterality,
        "study_date": _date(meta.study_date),
        "device": meta.device,
        "pixel_spacing_mm": [None if v != v else round(float(v), 6) for v in spacing] if spacing else None,
    }


def inspect_paths(paths: list[Path], redact_paths: bool = False) -> tuple[list[dict], list[dict], list[dict]]:
    """Read every source under `paths`: (item records, error records, ignored-file records).

    Paths are relative to the PATH named (root `r0` is the first), components naming the file's
    patient replaced by a pseudonym keyed with a per-run key (no store here), or every component
    with `redact_paths` (retinacli.redaction)."""
    from rich.progress import Progress

    from retinacli.console import err
    from retinacli.readers import scan
    from retinacli.redaction import PathRedactor

    shown = PathRedactor.for_paths(paths, redact_all=redact_paths)
    found = scan(paths)
    items: list[dict] = []
    errors = [{"path": e.path, "error": e.reason} for e in found.errors]
    with Progress(console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task("reading", total=len(found.sources))
        for source in found.sources:
            _read_one(source, items, errors, shown)
            progress.advance(task)
    # After every read: identifiers learnt from any file also hide the paths of unreadable ones.
    records = []
    for error in errors:
        path, reason = shown.error(error["path"], error["error"])
        records.append({"root": shown.locate(error["path"])[0], "path": path, "error": reason})
    ignored = [{"root": shown.locate(path)[0], "path": shown.show(path), "reason": why}
               for path, why in found.ignored]
    return items, records, ignored


def _read_one(source, items: list[dict], errors: list[dict], shown=None) -> None:
    """Decode one source into `items`, or its failure into `errors` (one bad file never stops the rest)."""
    from retinacli.errors import ReadError
    from retinacli.readers import read_source

    try:
        items.extend(item_record(item, shown) for item in read_source(source))
    except ReadError as exc:
        errors.append({"path": exc.path, "error": exc.reason})
    except MemoryError:
        errors.append({"path": str(source.path), "error": "not enough memory to read this item"})
    except Exception as exc:  # a reader bug must not hide the other files
        errors.append({"path": str(source.path), "error": f"unexpected read failure ({type(exc).__name__})"})


def _print_table(items: list[dict], errors: list[dict], ignored: list[dict]) -> None:
    from retinacli.console import err, out, print_error_table, print_table, safe

    if items:
        columns = [("path", "path"), ("modality", "short"), ("format", "short"), ("shape", "text"),
                   ("eye", "short"), ("date", "short"), ("device", "text"), ("spacing (mm)", "text")]
        rows = []
        for record in items:
            spacing = record["pixel_spacing_mm"]
            rows.append([
                record["path"],
                record["modality"],
                record["format"],
                "x".join(str(s) for s in record["shape"]) + f" {record['dtype']}",
                record["laterality"] or "-",
                record["study_date"] or "-",
                record["device"] or "-",
                " x ".join("-" if v is None else f"{v:.4g}" for v in spacing) if spacing else "-",
            ])
        print_table(out, columns, rows, title=f"{len(items)} item(s)")
    if errors:
        print_error_table(errors)
    from retinacli.readers.discover import OUTPUT_FOLDER_NOTE

    folders = [record for record in ignored if record["reason"].endswith(OUTPUT_FOLDER_NOTE)]
    for record in folders:  # a skipped folder may hold what the user meant: name it, with the reason
        err.print(safe(f"ignored folder {record['path']}: {record['reason']}"), highlight=False)
    files = len(ignored) - len(folders)
    if files:
        err.print(f"ignored {files} file(s) that are not images retina reads (--json lists them)",
                  highlight=False)


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect(
        paths: list[Path] = typer.Argument(
            ...,
            help="Files or folders (walked recursively): DICOM, images, B-scan folders, TIFF, .npy, .vol, "
            "HEYEX XML export folders.",
        ),
        as_json: bool = options.json_option(
            "Print one JSON object {items, errors, ignored, ignored_files} to stdout."
        ),
        redact_paths: bool = options.redact_paths_option(
            "Print every path with each component replaced by a pseudonym keyed with a per-run key (for "
            "outputs that leave the site). Without it, paths are relative to the PATH given and only "
            "components naming the file's patient are replaced."
        ),
        max_pixels: str | None = options.max_pixels_option(),
    ) -> None:
        """Show what the readers see: modality, format, shape, eye, date and device of every item.

        Unreadable files are listed with the reason; patient identifiers are never shown.
        Exit 0 when at least one item was read, 1 when nothing readable was found, 2 when a PATH is
        missing.
        """
        from retinacli.commands.common import pass_undecodable_names_through, require_paths
        from retinacli.console import err, print_json, styled

        pass_undecodable_names_through()
        require_paths(paths)
        items, errors, ignored = inspect_paths(paths, redact_paths)
        if as_json:
            print_json({"items": items, "errors": errors, "ignored": len(ignored), "ignored_files": ignored})
        else:
            _print_table(items, errors, ignored)
        if not items:
            if not as_json:
                err.print(styled(("error:", "bold red"), " no readable OCT volume or fundus image found"),
                          highlight=False)
            raise typer.Exit(EXIT_NOTHING_DONE)
        raise typer.Exit(EXIT_OK)
