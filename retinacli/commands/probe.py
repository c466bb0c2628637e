"""`retina probe RUN`: fit linear task heads on the run's embeddings of a labelled cohort."""

from __future__ import annotations

from pathlib import Path

import typer

from retinacli.errors import EXIT_NOTHING_DONE, EXIT_USAGE


def _format_metrics(kind: str, metrics: dict) -> str:
    def fmt(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    parts = []
    for split in ("cv", "train"):
        m = metrics.get(split)
        if not m:
            continue
        if kind == "regression":
            parts.append(f"{split}: MAE {fmt(m['mae'], 1)} µm, R² {fmt(m['r2'])}")
        else:
            parts.append(f"{split}: AUROC {fmt(m['auroc'])}, bal. acc. {fmt(m['balanced_accuracy'])}")
    return "; ".join(parts)


def register(app: typer.Typer) -> None:
    @app.command("probe")
    def probe(
        run_dir: Path = typer.Argument(
            ..., help="Training run folder (from 'retina train').", show_default=False
        ),
        manifest: Path = typer.Option(
            None, "--manifest", "-m", help="Labelled cohort manifest CSV. Default: the run's own manifest."
        ),
        tasks: str = typer.Option("cst,bcva,tn", "--tasks", help="Comma-separated tasks: cst, bcva, tn."),
        modality: str = typer.Option("oct", "--modality", help="Embeddings the heads read: oct or fundus."),
        seed: int = typer.Option(0, "--seed", help="Seed for the cross-validation folds."),
        batch_size: int = typer.Option(8, "--batch-size", help="Items per torch forward pass."),
        as_json: bool = typer.Option(False, "--json", help="Print the fitted heads' metrics as JSON."),
    ) -> None:
        """Embed a labelled cohort with the run's encoder; fit one linear head per task -> RUN/heads.json."""
        from retinacli.commands.export import _needs_torch
        from retinacli.console import err, fail, print_json
        from retinacli.console import out as stdout

        _needs_torch("retina probe")
        from rich.progress import Progress

        from training.probe import probe_run

        task_list = [t.strip() for t in tasks.split(",") if t.strip()]
        if not (run_dir / "config.json").is_file():
            fail(f"{run_dir}: not a training run (no config.json)", EXIT_USAGE)
        err.print(f"probing {run_dir} (tasks {', '.join(task_list)}, {modality} embeddings, seed {seed})")
        try:
            with Progress(console=err, transient=True) as bar:
                job = bar.add_task("embedding", total=None)
                result = probe_run(
                    run_dir,
                    manifest=manifest,
                    tasks=task_list,
                    modality=modality,
                    seed=seed,
                    batch_size=batch_size,
                    progress=lambda done, total: bar.update(job, completed=done, total=total),
                )
        except (ValueError, FileNotFoundError) as exc:
            fail(str(exc), EXIT_USAGE if "unknown" in str(exc) else EXIT_NOTHING_DONE)
        for message in result.errors:
            err.print(f"[yellow]skipped:[/] {message}", highlight=False)
        if as_json:
            print_json(result.to_dict())
        else:
            stdout.print(f"{result.n_embedded}/{result.n_rows} manifest rows embedded ({result.manifest})")
            for head in result.heads:
                threshold = "" if head.threshold is None else f", threshold {head.threshold:.3f}"
                stdout.print(
                    f"  {head.task} ({head.kind}, n={head.n_train}{threshold}): "
                    f"{_format_metrics(head.kind, head.metrics)}",
                    highlight=False,
                )
            for task, why in result.skipped.items():
                stdout.print(f"  {task}: no head ({why})", highlight=False)
            if result.heads_path:
                stdout.print(f"heads written to {result.heads_path}")
        if not result.heads:
            raise typer.Exit(EXIT_NOTHING_DONE)
