"""`retina inspect PATH...`: what the readers see in files and folders (no model needed)."""

from __future__ import annotations

from pathlib import Path

import typer

from retinacli.commands import options
from retinacli.errors import EXIT_NOTHING_DONE, EXIT_OK


def _date(value: str | None) -> str | None:
    """YYYYMMDD -> YYYY-MM-DD (ISO) for display and JSON."""
    if value and len(value) >= 8 and value[:8].isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:8]}"
    return None


def item_record(item) -> dict:
    """The public view of one item: no patient identifiers, ever."""
    meta = item.meta
    spacing = meta.pixel_spacing_mm
    return {
        "path": item.path,
        "modality": item.modality,
        "format": item.format,
        "shape": list(item.shape),
        "dtype": str(item.pixels.dtype),
        "laterality": meta.laterality,
        "study_date": _date(meta.study_date),
        "device": meta.device,
        "pixel_spacing_mm": [None if v != v else round(float(v), 6) for v in spacing] if spacing else None,
    }


def inspect_paths(paths: list[Path]) -> tuple[list[dict], list[dict], list[dict]]:
    """Read every source under `paths`: (item records, error records, ignored-file records)."""
    from rich.progress import Progress

    from retinacli.console import err
    from retinacli.readers import scan

    found = scan(paths)
    items: list[dict] = []
    errors = [{"path": e.path, "error": e.reason} for e in found.errors]
    with Progress(console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task("reading", total=len(found.sources))
        for source in found.sources:
            _read_one(source, items, errors)
            progress.advance(task)
    ignored = [{"path": str(path), "reason": why} for path, why in found.ignored]
    return items, errors, ignored


def _read_one(source, items: list[dict], errors: list[dict]) -> None:
    """Decode one source into `items`, or its failure into `errors` (one bad file never stops the rest)."""
    from retinacli.errors import ReadError
    from retinacli.readers import read_source

    try:
        items.extend(item_record(item) for item in read_source(source))
    except ReadError as exc:
        errors.append({"path": exc.path, "error": exc.reason})
    except MemoryError:
        errors.append({"path": str(source.path), "error": "not enough memory to read this item"})
    except Exception as exc:  # a reader bug must not hide the other files
        errors.append({"path": str(source.path), "error": f"unexpected read failure ({type(exc).__name__})"})


def _print_table(items: list[dict], errors: list[dict], ignored: list[dict]) -> None:
    from rich.table import Table

    from retinacli.console import err, out, print_error_table

    if items:
        table = Table(title=f"{len(items)} item(s)", title_justify="left")
        table.add_column("path", overflow="fold", min_width=24)
        for column in ("modality", "format", "shape", "eye", "date", "device", "spacing (mm)"):
            table.add_column(column, overflow="fold")
        for record in items:
            spacing = record["pixel_spacing_mm"]
            table.add_row(
                record["path"],
                record["modality"],
                record["format"],
                "x".join(str(s) for s in record["shape"]) + f" {record['dtype']}",
                record["laterality"] or "-",
                record["study_date"] or "-",
                record["device"] or "-",
                " x ".join("-" if v is None else f"{v:.4g}" for v in spacing) if spacing else "-",
            )
        out.print(table)
    if errors:
        print_error_table(errors)
    if ignored:
        err.print(f"ignored {len(ignored)} file(s) that are not images retina reads (--json lists them)",
                  highlight=False)


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect(
        paths: list[Path] = typer.Argument(
            ...,
            help="Files or folders (walked recursively): DICOM, images, B-scan folders, TIFF, .npy, .vol.",
        ),
        as_json: bool = options.json_option(
            "Print one JSON object {items, errors, ignored, ignored_files} to stdout."
        ),
    ) -> None:
        """Show what the readers see: modality, format, shape, eye, date and device of every item.

        Unreadable files are listed with the reason; patient identifiers are never shown.
        Exit 0 when at least one item was read, 1 when nothing readable was found.
        """
        from retinacli.commands.common import pass_undecodable_names_through
        from retinacli.console import err, print_json

        pass_undecodable_names_through()
        items, errors, ignored = inspect_paths(paths)
        if as_json:
            print_json({"items": items, "errors": errors, "ignored": len(ignored), "ignored_files": ignored})
        else:
            _print_table(items, errors, ignored)
        if not items:
            if not as_json:
                err.print("[bold red]error:[/] no readable OCT volume or fundus image found", highlight=False)
            raise typer.Exit(EXIT_NOTHING_DONE)
        raise typer.Exit(EXIT_OK)
