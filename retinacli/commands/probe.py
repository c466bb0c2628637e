"""`retina probe RUN`: fit linear task heads on the run's embeddings of a labelled cohort."""

from __future__ import annotations

from pathlib import Path

import typer

from retinacli.commands import options
from retinacli.errors import EXIT_NOTHING_DONE, RetinaError
from retinacli.tasks import TASKS, parse_tasks, tasks_help


def _format_metrics(task: str, metrics: dict) -> str:
    def fmt(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    info = TASKS[task]
    parts = []
    for split in ("cv", "train"):
        m = metrics.get(split)
        if not m:
            continue
        if info.kind == "regression":
            parts.append(f"{split}: MAE {fmt(m['mae'], 1)} {info.units}, R² {fmt(m['r2'])}")
        else:
            parts.append(f"{split}: AUROC {fmt(m['auroc'])}, bal. acc. {fmt(m['balanced_accuracy'])}")
    return "; ".join(parts)


def _swap_lines(task: str, head) -> list[str]:
    """One line per modality swap: the same folds' heads on the other modality, the comparison, verdict."""
    lines = []
    fitted = head.input_modality
    for modality, swap in (head.metrics.get("swap") or {}).items():
        parts = [_format_metrics(task, {"cv": swap})]
        if swap.get("ratio") is not None:
            parts.append(f"{swap['ratio']:.2f}x the {fitted} MAE")
        elif swap.get("auroc_drop") is not None:
            drop = swap["auroc_drop"]
            parts.append(f"{abs(drop):.3f} {'below' if drop >= 0 else 'above'} the {fitted} AUROC")
        verdict = (f"validated on {modality}" if swap.get("validated")
                   else f"not validated on {modality} (bar: {swap.get('criterion')})")
        lines.append(f"    {fitted} head on {modality} embeddings: {', '.join(parts)} -> {verdict}")
    return lines


def register(app: typer.Typer) -> None:
    @app.command("probe")
    def probe(
        run_dir: Path = options.run_dir_argument(),
        manifest: Path = options.manifest_option(
            "Labelled cohort manifest CSV. Default: the run's own manifest."
        ),
        manifest_m: Path = options.hidden_alias("-m"),
        tasks: str = typer.Option(
            ",".join(TASKS), "--tasks",
            help=f"Comma-separated tasks: {tasks_help()}. A task without labels in the manifest is skipped.",
        ),
        modality: str = typer.Option(
            "oct", "--modality",
            help="Embeddings the heads read: oct or fundus. Each head is also tested out of fold on the "
            "paired embeddings of the other modality (the modality swap, recorded in its metrics).",
        ),
        seed: int = typer.Option(0, "--seed", help="Seed for the cross-validation folds."),
        batch_size: int = typer.Option(8, "--batch-size", help="Items per torch forward pass."),
        as_json: bool = options.json_option("Print the fitted heads' metrics as JSON."),
    ) -> None:
        """Embed a labelled cohort with the run's encoder; fit one linear head per task -> RUN/heads.json."""
        from retinacli.commands.common import require_paths, require_run_dir, require_training
        from retinacli.console import err, print_json, safe, styled
        from retinacli.console import out as stdout

        manifest = options.resolve_manifest(manifest, manifest_m)
        require_training("retina probe", "torch", "onnx")
        from rich.progress import Progress

        from training.probe import probe_run

        task_list = list(parse_tasks(tasks))
        require_run_dir(run_dir)
        if manifest is not None:
            require_paths([manifest], "--manifest")
        err.print(f"probing {safe(run_dir)} (tasks {', '.join(task_list)}, {modality} embeddings, "
                  f"seed {seed})")
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
        except RetinaError:
            raise  # with its own exit code (an unknown task or modality is a UsageError)
        except (ValueError, FileNotFoundError) as exc:
            raise RetinaError(str(exc)) from None
        for message in result.errors:
            err.print(styled(("skipped:", "yellow"), f" {message}"), highlight=False)
        if as_json:
            print_json(result.to_dict())
        else:
            stdout.print(f"{result.n_embedded}/{result.n_rows} manifest rows embedded "
                         f"({safe(result.manifest)})")
            for head in result.heads:
                threshold = "" if head.threshold is None else f", threshold {head.threshold:.3f}"
                stdout.print(
                    f"  {head.task} ({head.kind}, n={head.n_train}{threshold}): "
                    f"{_format_metrics(head.task, head.metrics)}",
                    highlight=False,
                )
                for line in _swap_lines(head.task, head):
                    stdout.print(line, highlight=False)
            for task, why in result.skipped.items():
                stdout.print(f"  {task}: no head ({safe(why)})", highlight=False)
            if result.heads_path:
                stdout.print(f"heads written to {safe(result.heads_path)}")
        if not result.heads:
            raise typer.Exit(EXIT_NOTHING_DONE)
