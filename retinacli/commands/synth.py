"""`retina synth OUT`: write a synthetic paired fundus + OCT cohort with labels (docs/synthetic-cohort.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from retinacli.commands import options


def register(app: typer.Typer) -> None:
    @app.command("synth")
    def synth(
        out: Path = typer.Argument(..., help="Output folder (created; must be empty unless --overwrite)."),
        patients: int = typer.Option(
            24, "--patients", "-n", help="Number of patients (one or two eyes each)."
        ),
        visits: int = typer.Option(3, "--visits", help="Visits per eye."),
        oct_shape: str = typer.Option(
            "25x224x256", "--oct-shape",
            help="OCT volume size: B-scans x depth x width (Spectralis-like: 49x496x512).",
        ),
        fundus_size: int = typer.Option(
            384, "--fundus-size", help="Fundus image width and height in pixels."
        ),
        seed: int = typer.Option(0, "--seed", help="Random seed; the same seed writes the same bytes."),
        formats: str = typer.Option(
            "dicom", "--formats",
            help="Comma-separated output formats: dicom, png. The manifest points at the first.",
        ),
        nir_fraction: float = typer.Option(
            0.3, "--nir-fraction", help="Share of patients imaged with the grayscale NIR-SLO device."
        ),
        workers: int = typer.Option(0, "--workers", help="Worker processes (0: one per CPU, at most 4)."),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="Replace a cohort previously written to OUT."
        ),
        as_json: bool = options.json_option("Print the summary as JSON on stdout."),
    ) -> None:
        """Write a synthetic paired cohort: OCT volume + fundus image per visit, labels, manifest.csv."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from retinacli.console import err, print_json, safe
        from retinacli.console import out as stdout
        from retinacli.synth.cohort import cohort_summary, generate_cohort, parse_oct_shape

        shape = parse_oct_shape(oct_shape)  # a bad shape or format is a UsageError (exit 2)
        format_list = [f for f in formats.split(",") if f.strip()]
        columns = (TextColumn("[bold]synth[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("visits"),
                   TimeElapsedColumn())
        with Progress(*columns, console=err, transient=True) as progress:
            task = progress.add_task("synth", total=None)
            manifest = generate_cohort(
                out, patients=patients, visits=visits, seed=seed, oct_shape=shape, fundus_size=fundus_size,
                formats=format_list, nir_fraction=nir_fraction, workers=workers or None, overwrite=overwrite,
                progress=lambda n: progress.advance(task, n),
            )
        summary = cohort_summary(manifest)
        if as_json:
            print_json(summary)
            return
        counts = f"{summary['patients']} patients, {summary['eyes']} eyes, {summary['visits']} visits"
        stdout.print(f"{counts} -> {safe(manifest)}", highlight=False)
        cst, letters = summary["cst_um"], summary["bcva_letters"]
        stdout.print(
            f"cst_um {cst['min']:.0f}-{cst['max']:.0f} (median {cst['median']:.0f}); "
            f"bcva_letters {letters['min']}-{letters['max']} (median {letters['median']:.0f}); "
            f"bcva_label rate {summary['bcva_label_rate']:.2f}; tn_label rate {summary['tn_label_rate']:.2f}",
            highlight=False,
        )
        devices = safe(", ".join(f"{name}: {n}" for name, n in summary["fundus_devices"].items()))
        stdout.print(f"fundus devices: {devices}", highlight=False)
