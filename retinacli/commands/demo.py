"""`retina demo`: synthetic cohort -> CLIP and CLOOB training -> export -> embed / retrieve / predict."""

from __future__ import annotations

from pathlib import Path

import typer

from retinacli.commands import options

DEFAULT_WORKDIR = Path("retina-demo")


def _parse_shape(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise typer.BadParameter(f"expected SLICESxHEIGHTxWIDTH like 25x224x256, got {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def _task_table(summary):
    """One row a registry task (a new task shows up without an edit), one column an objective."""
    from rich.table import Table

    from retinacli.tasks import TASKS

    def fmt(value, metric):
        # errors in the task's units need no decimals (µm, letters); scores keep two
        return "—" if value is None else f"{value:.{0 if metric in ('mae', 'rmse') else 2}f}"

    table = Table(title="task heads, cross-validated")
    table.add_column("task")
    table.add_column("metric")
    for objective in summary.objectives:
        table.add_column(objective.upper(), justify="right")
    for task in TASKS.values():
        table.add_row(task.name, " / ".join(task.metric_label(m) for m in task.metrics), *(
            " / ".join(fmt(result["heads_cv"].get(task.name, {}).get(m), m) for m in task.metrics)
            for result in summary.objectives.values()
        ))
    return table


def _retrieval_table(summary):
    """Retrieval per objective, held-out and unseen patients, both directions: visit and eye level."""
    from rich.table import Table

    table = Table(title="retina demo: retrieval through the exported ONNX packages")
    for column in ("objective", "patients", "pool", "direction", "visit top-1", "eye hit@1", "eye hit@5",
                   "eye hit@10", "eye MRR"):
        table.add_column(column, overflow="fold")

    def cell(metrics, k):
        return f"{metrics[f'top{k}']:.0%} ({metrics[f'chance_top{k}']:.0%})"

    for objective, result in summary.objectives.items():
        for label, key in (("held-out", "retrieval"), ("unseen", "unseen_retrieval")):
            r = result.get(key)
            if not r or "eye_level" not in r:
                continue
            for direction, name in (("fundus_to_oct", "F→O"), ("oct_to_fundus", "O→F")):
                visit, eye = r[direction], r["eye_level"][direction]
                first = direction == "fundus_to_oct"
                lead = [f"{objective.upper()} {label}", str(r.get("patients", "?")), str(r["pool_size"])]
                table.add_row(
                    *(lead if first else ["", "", ""]), name, cell(visit, 1), cell(eye, 1), cell(eye, 5),
                    cell(eye, 10), f"{eye['mrr']:.2f}",
                )
    return table


def _print_summary(summary) -> None:
    from retinacli.console import out

    out.print(_retrieval_table(summary))
    unseen = summary.cohort.get("unseen") or {}
    out.print(
        "Chance in brackets. Visit level: only the photo's own visit counts; eye level (hit@k): any OCT of "
        "the photo's eye counts. held-out: the patients each run left out; unseen: a fresh cohort "
        f"(seed {unseen.get('seed', '?')}) no model saw. F = fundus, O = OCT.", highlight=False
    )
    out.print(_task_table(summary))
    out.print(
        "Task heads: 5-fold patient-grouped cross-validation on the cohort "
        f"({summary.cohort['pairs']} pairs, {summary.cohort['patients']} patients)."
    )
    card = summary.card
    same_eye = card["same_eye_top5"]
    out.print(
        f"Card check: {card['embed'].get('embedded', '?')} held-out OCT volumes embedded from ./oct_dir; "
        f"for {same_eye.get('top5', 0):.0%} of {same_eye['queries']} held-out fundus photos an OCT of the "
        f"same eye is in the top 5 (chance {same_eye.get('chance_top5', 0):.0%}); predict --task bcva gave "
        f"{card['predict_records']} records. Total {summary.seconds['total']:.0f} s."
    )
    engines = card.get("engine") or {}
    if engines:  # which precision users of the default package get
        out.print("Engines the card commands used (int8 only where it passed the accuracy gate): "
                  + ", ".join(f"{m} {label}" for m, label in sorted(engines.items())), highlight=False)
    out.print(
        f"\nThe commands below use {card['default_model']} (the better held-out retrieval; newest in "
        "./exported). Next, in a fresh shell:\n"
        f"  cd {summary.workdir}\n"
        "  retina embed ./oct_dir              # already-embedded volumes are skipped\n"
        "  retina retrieve fundus.png --top 5  # the 5 stored OCT volumes nearest to this photo\n"
        "  retina predict --task bcva          # visual acuity worse than 20/40, per stored OCT\n"
        "  retina train                        # retrain on ./manifest.csv with ./train.toml"
    )


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        workdir: Path = typer.Option(
            DEFAULT_WORKDIR, "--workdir", help="Folder for the cohort, runs, packages and store (created; a "
            "previous demo there is replaced, any other non-empty folder is refused)."
        ),
        patients: int = typer.Option(240, "--patients", min=4, help="Synthetic patients."),
        visits: int = typer.Option(2, "--visits", min=1, help="Visits per eye."),
        seed: int = typer.Option(0, "--seed", help="Seed for the cohort, the split and training."),
        preset: str = typer.Option("demo", "--preset", help="Training preset: demo (CPU, minutes) or tiny."),
        epochs: int = typer.Option(None, "--epochs", min=1, help="Override the preset's epochs."),
        oct_shape: str = typer.Option(
            "12x128x160", "--oct-shape", help="Synthetic OCT B-scans x height x width."
        ),
        fundus_size: int = typer.Option(
            160, "--fundus-size", min=32, help="Synthetic fundus image size (px)."
        ),
        json_output: bool = options.json_option("Print the summary as JSON."),
    ) -> None:
        """Run the whole chain on a synthetic cohort and print what it reached (about 3 minutes on 2 CPUs).

        Synthesises a cohort, trains CLIP and CLOOB, fits task heads, exports ONNX packages into
        WORKDIR/exported, embeds the held-out OCT volumes, retrieves and predicts with the torch-free CLI,
        and prints retrieval against chance (visit and eye level, held-out and unseen patients) and the
        task metrics.
        """
        from retinacli.commands.common import require_training, training_progress
        from retinacli.console import err, print_json, safe
        from retinacli.errors import UsageError

        require_training("retina demo")
        from training.demo import DemoSettings, run_demo

        if preset not in ("demo", "tiny"):
            raise UsageError(f"--preset must be demo or tiny, not {preset!r}")
        settings = DemoSettings(
            workdir=workdir, patients=patients, visits=visits, seed=seed, preset=preset, epochs=epochs,
            oct_shape=_parse_shape(oct_shape), fundus_size=fundus_size,
        )
        err.print(f"retina demo: workdir {safe(workdir.resolve())}, preset {preset}, seed {seed}",
                  highlight=False)
        summary = run_demo(  # a DemoFolderError (non-demo files in WORKDIR) is a usage error, exit 2
            settings,
            echo=lambda line: err.print(line, highlight=False, markup=False),
            progress_factory=training_progress(err),
        )
        if json_output:
            print_json(summary.to_dict())
        else:
            _print_summary(summary)
