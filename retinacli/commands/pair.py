"""`retina pair DIR... --out manifest.csv`: pair OCT volumes with fundus images into a cohort manifest."""

from __future__ import annotations

from pathlib import Path

import typer

from retinacli.cohort_manifest import LABEL_COLUMNS
from retinacli.commands import options
from retinacli.errors import EXIT_NOTHING_DONE, EXIT_OK


def register(app: typer.Typer) -> None:
    @app.command("pair")
    def pair(
        paths: list[Path] = typer.Argument(..., help="Folders (or files) with the OCT and fundus exports."),
        out: Path = typer.Option(
            ..., "--out", "-o", help="Manifest CSV to write (paths inside are relative to it)."
        ),
        labels: Path | None = typer.Option(
            None,
            "--labels",
            help=f"Labels CSV: patient_id, eye, date (or visit) and any of {', '.join(LABEL_COLUMNS)}; "
            "joined by patient, eye and date (patient_id as in the files or in --metadata / --pattern).",
        ),
        metadata: Path | None = typer.Option(
            None,
            "--metadata",
            help="Sidecar CSV for plain images: columns path, patient, eye, date (optional time, modality). "
            "path is relative to the CSV (a file, or a folder: applies to everything under it); eye "
            "OD/OS/R/L/right/left; date YYYY-MM-DD or YYYYMMDD. Its values win over file headers. Bad rows "
            "are listed with their row number.",
        ),
        pattern: str | None = typer.Option(
            None,
            "--pattern",
            help="File-name pattern for plain images, e.g. '{patient}_{eye}_{date}_{modality}.png'. Groups "
            "{patient}, {eye}, {date} (required), {modality} (oct/fundus), {time}; other text matches itself "
            "(any case). With '/' it matches the last path components. Its values win over file headers.",
        ),
        window_hours: float = typer.Option(
            24.0, "--window-hours", help="Fallback matching: largest OCT-fundus time difference in hours."
        ),
        keep_identifiers: bool = typer.Option(
            False,
            "--keep-identifiers",
            help="Write the real patient IDs instead of pseudonyms (keyed by secret.key beside the CSV).",
        ),
        as_json: bool = options.json_option("Print the summary as JSON to stdout."),
        redact_paths: bool = options.redact_paths_option(
            "Print every path with each component replaced by a pseudonym keyed with the manifest's "
            "secret.key (a per-run key when none is written), and write the manifest's oct_path / "
            "fundus_path so too: a manifest to share, which no longer opens the files. Without it, printed "
            "paths are relative to the PATH given, components naming the patient replaced."
        ),
        max_pixels: str | None = options.max_pixels_option(),
    ) -> None:
        """Build the cohort manifest: each OCT volume with the fundus image of that eye and visit.

        Pairs by the OCT's localizer reference (DICOM), else by patient + eye + nearest time;
        plain images get patient, eye and date from --metadata or --pattern. Equally close
        candidates are not guessed. Reports what stayed unpaired and why. Patient IDs (from headers,
        the sidecar or file names) are pseudonymised unless asked otherwise.
        Exit 0 when at least one pair was written, 1 when none, 2 when a PATH is missing or an option is bad.
        """
        from retinacli.commands.common import pass_undecodable_names_through, require_paths
        from retinacli.console import err, print_json
        from retinacli.console import out as stdout

        pass_undecodable_names_through()
        from retinacli.errors import UsageError
        from retinacli.pairing import pair_folders

        require_paths(paths)
        if labels is not None and not labels.is_file():
            raise UsageError(f"{labels}: labels CSV not found")
        if metadata is not None and not metadata.is_file():
            raise UsageError(f"{metadata}: metadata CSV not found")
        report = pair_folders(paths, out, labels, window_hours, keep_identifiers, redact_paths,
                              metadata_csv=metadata, pattern=pattern)
        result, shown = report.result, report.shown
        unpaired = [
            {"root": shown.locate(u.path)[0], "path": shown.show(u.path), "modality": u.modality,
             "reason": u.reason} for u in result.unpaired
        ]
        errors = []
        for error in result.errors:
            path, reason = shown.error(error.path, error.reason)
            errors.append({"root": shown.locate(error.path)[0], "path": path, "error": reason})
        if as_json:
            print_json(
                {
                    "manifest": str(report.manifest) if report.manifest else None,
                    "pairs": len(report.rows),
                    "by_method": report.by_method(),
                    "labels_rows": report.labels_rows,
                    "labels_matched": report.labels_matched,
                    "unpaired": unpaired,
                    "errors": errors,
                    "ignored": result.ignored,
                }
            )
        else:
            _print_summary(report, unpaired, errors, stdout, err)
        raise typer.Exit(EXIT_OK if report.rows else EXIT_NOTHING_DONE)


def _print_summary(report, unpaired: list[dict], errors: list[dict], stdout, err) -> None:
    from retinacli.console import print_error_table, print_table, safe, styled

    if report.rows:
        methods = ", ".join(f"{n} by {m}" for m, n in sorted(report.by_method().items()))
        stdout.print(f"wrote {len(report.rows)} pair(s) to {safe(report.manifest)} ({methods})",
                     highlight=False)
        if report.labels_rows:
            stdout.print(
                f"labels: {report.labels_matched} of {report.labels_rows} label row(s) matched a pair",
                highlight=False,
            )
    if unpaired:
        print_table(err, [("path", "path"), ("modality", "short"), ("reason", "text")],
                    [[record["path"], record["modality"], record["reason"]] for record in unpaired],
                    title=f"{len(unpaired)} unpaired", title_style="bold yellow")
    if errors:
        print_error_table(errors)
    if not report.rows:
        err.print(styled(("error:", "bold red"), " no OCT-fundus pair found; nothing written"),
                  highlight=False)
