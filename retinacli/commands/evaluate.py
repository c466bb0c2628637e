"""`retina evaluate`: the paper's downstream protocol on a labelled cohort (docs/evaluation.md).

Baseline / CLIP / CLOOB encoders × linear probe / fine-tune × every registry task with 5-fold
patient-grouped cross-validation, modality swap, retrieval on held-out patients, figures, and
optionally the final heads stored in each run. Needs the `train` extra (torch); imported lazily.

Exit codes: 0 done; 1 the evaluation failed (or torch is missing); 2 bad options or inputs (manifest,
column, run dir, no task with usable labels) — reported in one line before any training starts. A task
whose labels cannot be evaluated (one class, too few patients or positives for the folds) is skipped
with its reason (stderr and results.json "skipped"); the others are evaluated. A failed run removes
what it wrote to --out.
"""

from __future__ import annotations

from pathlib import Path

import typer

from retinacli.commands import options
from retinacli.tasks import TASKS, parse_tasks, tasks_help

MODES = ("probe", "finetune")
MODALITIES = ("oct", "fundus")


def _split_choice(value: str, allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
    """'a,b' -> ('a', 'b') in the canonical order; raises UsageError naming the option."""
    from retinacli.errors import UsageError

    picked = [v.strip().lower() for v in value.split(",") if v.strip()]
    unknown = [v for v in picked if v not in allowed]
    if unknown or not picked:
        raise UsageError(f"{option}: choose from {','.join(allowed)} (got {value!r})")
    return tuple(v for v in allowed if v in picked)


class _RichReporter:
    """Progress bar per stage and one-line messages, all on stderr."""

    def __init__(self, progress):
        self.progress = progress
        self.task = None

    def message(self, text: str) -> None:
        from retinacli.console import safe

        self.progress.console.print(safe(text), highlight=False)

    def stage(self, name: str, total: int) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=self.progress.tasks[self.task].total)
        self.task = self.progress.add_task(name, total=max(total, 1))
        if not self.progress.console.is_terminal:  # logs and pipes get one line per stage instead of a bar
            self.progress.console.print(f"{name}: {total} step(s)", highlight=False)

    def advance(self, n: int = 1) -> None:
        if self.task is not None:
            self.progress.advance(self.task, n)


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate(
        manifest: Path = options.manifest_option(
            "Cohort manifest CSV with the label column of each task ("
            + ", ".join(f"{t.name}: {t.column}" for t in TASKS.values()) + "). Required.",
        ),
        manifest_m: Path = options.hidden_alias("-m"),
        runs: list[Path] = typer.Option(
            ..., "--runs", "-r",
            help="Training run folders to evaluate (e.g. a CLIP and a CLOOB run): '--runs A B' or '--runs A "
            "--runs B'.",
        ),
        more_runs: list[Path] | None = typer.Argument(
            None, metavar="RUN", show_default=False,
            help="More run folders (lets '--runs RUN_CLIP RUN_CLOOB' take several).",
        ),
        baseline: str | None = typer.Option(
            None, "--baseline",
            help="Reference encoder without contrastive training: 'random', 'imagenet' or 'kinetics' "
            "(torchvision supervised weights for both towers, from the local torch hub folder), "
            "a run folder, or 'none' to skip it. Default: the first run's own initialisation and seed.",
        ),
        out: Path = typer.Option(
            Path("evaluation"), "--out", "-o",
            help="Output folder: results.json, results.md, folds.csv, timings.json, figures/*.png.",
        ),
        folds: int = typer.Option(5, "--folds", help="Cross-validation folds (grouped by patient; >= 2)."),
        modes: str = typer.Option(
            "probe,finetune", "--modes",
            help="Comma-separated: 'probe' (frozen encoder + linear layer), 'finetune' (end to end).",
        ),
        tasks: str = typer.Option(
            ",".join(TASKS), "--tasks", help=f"Comma-separated tasks: {tasks_help()}.",
        ),
        modalities: str = typer.Option(
            "oct,fundus", "--modalities",
            help="Encoders to evaluate: oct, fundus (both also give the modality swap rows, each direction).",
        ),
        seed: int = typer.Option(
            0, "--seed", help="Seed for folds, heads and fine-tuning (same seed, same results.json)."
        ),
        finetune_epochs: int = typer.Option(
            2, "--finetune-epochs", help="Fine-tuning epochs per fold (encoder + linear layer, end to end)."
        ),
        finetune_modalities: str = typer.Option(
            "oct", "--finetune-modalities",
            help="Encoders to fine-tune: oct (default: the paper's downstream encoder), fundus, or both.",
        ),
        finetune_scope: str = typer.Option(
            "auto", "--finetune-scope",
            help="What fine-tuning trains: 'full' (every encoder layer), 'top' (last residual stage + "
            "projection; lower stages frozen and computed once: ~4-8x cheaper on CPU), 'auto' (full on GPU, "
            "top on CPU).",
        ),
        finetune_batch_size: int = typer.Option(8, "--finetune-batch-size", help="Fine-tuning batch size."),
        finetune_lr: float = typer.Option(
            1e-2, "--finetune-lr", help="Fine-tuning learning rate of the linear layer (SGD, momentum 0.9)."
        ),
        finetune_encoder_lr: float = typer.Option(
            1e-4, "--finetune-encoder-lr",
            help="Fine-tuning learning rate of the encoder (lower: adapt, not erase).",
        ),
        fit_final: bool = typer.Option(
            False, "--fit-final",
            help="Refit each task head on all labelled rows and store it in each run (RUN/heads.json, "
            "with the CV metrics), ready for 'retina export'.",
        ),
        figures: bool = typer.Option(True, "--figures/--no-figures", help="Write t-SNE and retrieval PNGs."),
        device: str = typer.Option("cpu", "--device", help="torch device: cpu, cuda or cuda:N."),
        threads: int = typer.Option(0, "--threads", help="torch CPU threads (0 = torch's default)."),
        json_output: bool = options.json_option("Print results.json to stdout instead of the results table."),
    ) -> None:
        """Cross-validated linear probe / fine-tune / retrieval evaluation of trained encoders.

        Writes results.json, results.md, folds.csv and figures (docs/evaluation.md). Exit codes: 0 done;
        1 the evaluation failed; 2 bad options or inputs (one line on stderr, before any training).
        """
        import time

        from retinacli.console import err
        from retinacli.console import out as stdout
        from retinacli.errors import MissingExtraError, RetinaError, UsageError

        manifest = options.resolve_manifest(manifest, manifest_m)
        if manifest is None:
            raise UsageError("missing option --manifest (the labelled cohort manifest CSV)")
        picked_modes = _split_choice(modes, MODES, "--modes")
        picked_tasks = parse_tasks(tasks)
        picked_modalities = _split_choice(modalities, MODALITIES, "--modalities")
        picked_ft_modalities = _split_choice(finetune_modalities, MODALITIES, "--finetune-modalities")
        if finetune_scope not in ("auto", "full", "top"):
            raise UsageError(f"--finetune-scope: choose from auto, full, top (got {finetune_scope!r})")
        try:
            import torch

            from training.evaluation import EvalConfig
            from training.evaluation.protocol import prepare, run_evaluation
        except ModuleNotFoundError as exc:
            raise MissingExtraError("retina evaluate", "train", exc.name or "torch") from None
        if threads > 0:
            torch.set_num_threads(threads)
        cfg = EvalConfig(
            manifest=manifest,
            runs=[*runs, *(more_runs or [])],
            out_dir=out,
            baseline=baseline,
            folds=folds,
            modes=picked_modes,
            tasks=picked_tasks,
            modalities=picked_modalities,
            seed=seed,
            finetune_epochs=finetune_epochs,
            finetune_modalities=picked_ft_modalities,
            finetune_scope=finetune_scope,
            finetune_batch_size=finetune_batch_size,
            finetune_lr=finetune_lr,
            finetune_encoder_lr=finetune_encoder_lr,
            fit_final=fit_final,
            figures=figures,
            device=device,
        )
        cohort, task_folds, _ = prepare(cfg)  # every cheap check, before any model is loaded
        err.print(
            f"evaluating {len(cfg.runs)} run(s) + baseline '{baseline or 'run init'}' on {len(cohort)} rows: "
            f"modes {','.join(cfg.modes)}, tasks {','.join(task_folds)}, {folds} folds, seed {seed} -> {out}",
            highlight=False,
        )
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        start = time.perf_counter()
        try:
            with Progress(
                TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=err, transient=False,
            ) as progress:
                results = run_evaluation(cfg, _RichReporter(progress))
        except RetinaError:
            raise
        except (ValueError, RuntimeError, FileNotFoundError) as exc:
            raise RetinaError(f"evaluation failed: {exc}") from None
        elapsed = time.perf_counter() - start
        if json_output:
            import sys

            sys.stdout.write((out / "results.json").read_text())
        else:
            stdout.print((out / "results.md").read_text(), markup=False, highlight=False)
        heads = results.get("final_heads")
        err.print(
            f"wrote {out}/results.json, results.md, folds.csv"
            + (", figures/" if figures else "")
            + f" in {elapsed:.1f} s"
            + (f"; heads stored in {', '.join(heads)}" if heads else ""),
            highlight=False,
        )
