"""The evaluation protocol end to end: `run_evaluation(EvalConfig) -> results dict` (+ files in out_dir).

Order matters for users: everything that can fail cheaply (manifest, columns, labels, run dirs, fold
feasibility) is checked before any array is preprocessed or any encoder is fine-tuned.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from retinacli.errors import UsageError
from retinacli.fsutil import folder_entries, remove_new_entries
from retinacli.ranking import eye_key
from retinacli.tasks import TASKS
from training.evaluation.cohort import Cohort, label_problem, label_summary, load_cohort
from training.evaluation.config import EvalConfig
from training.evaluation.features import ArrayCache, embed
from training.evaluation.finetune import (
    FinetuneSettings,
    finetune_fold,
    frozen_features,
    resolve_scope,
    split_encoder,
)
from training.evaluation.folds import FoldError, assign_folds, patient_folds, write_folds_csv
from training.evaluation.metrics import summarise, task_metrics
from training.evaluation.probe import cross_validate_probe
from training.evaluation.report import RESULTS_SCHEMA, results_markdown, write_json
from training.evaluation.retrieval import evaluate_retrieval
from training.evaluation.sources import EncoderSource, check_sources, load_sources


class Reporter:
    """Progress hooks; the CLI passes a Rich implementation, tests and the API get this silent one."""

    def message(self, text: str) -> None:  # one line for the user
        pass

    def stage(self, name: str, total: int) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass


@dataclass
class TaskFolds:
    task: str
    kind: str
    rows: np.ndarray  # indices of the labelled manifest rows
    labels: np.ndarray  # labels of those rows
    fold: np.ndarray  # fold of each of those rows
    patients: dict[str, int] = field(default_factory=dict)  # patient -> fold


def prepare(cfg: EvalConfig) -> tuple[Cohort, dict[str, TaskFolds], dict[str, str]]:
    """All cheap checks; raises UsageError (one line) before any model is touched.

    A task whose labels cannot be evaluated (none, not 0/1, one class, too few patients or positives
    for the folds) is left out of the returned folds and listed in the third value (task -> reason);
    only when no task is left is that an error."""
    if cfg.folds < 2:
        raise UsageError(f"--folds must be at least 2 (got {cfg.folds})")
    if cfg.finetune_epochs < 1 and "finetune" in cfg.modes:
        raise UsageError("--finetune-epochs must be at least 1")
    cohort = load_cohort(cfg.manifest, cfg.tasks)
    check_sources(cfg.runs, cfg.baseline)
    return (cohort, *make_task_folds(cohort, cfg))


def make_task_folds(cohort: Cohort, cfg: EvalConfig) -> tuple[dict[str, TaskFolds], dict[str, str]]:
    """(folds of each usable task, task -> why it is skipped); UsageError when no task is usable."""
    task_folds: dict[str, TaskFolds] = {}
    skipped: dict[str, str] = {}
    for task in cfg.tasks:
        problem = label_problem(cohort, task)
        if problem is not None:
            skipped[task] = problem
            continue
        y = cohort.labels(task)
        rows = np.flatnonzero(np.isfinite(y))
        try:
            fold = assign_folds(cohort.patient_ids[rows], y[rows], TASKS[task].kind, cfg.folds, cfg.seed)
            if TASKS[task].kind == "binary":
                _check_classes_per_fold(y[rows], fold)
        except FoldError as exc:
            skipped[task] = str(exc)
            continue
        tf = TaskFolds(task, TASKS[task].kind, rows, y[rows], fold)
        tf.patients = patient_folds(cohort.patient_ids[rows], fold)
        task_folds[task] = tf
    if not task_folds:
        reasons = "; ".join(f"{t}: {why}" for t, why in skipped.items())
        raise UsageError(f"{cfg.manifest}: no task can be evaluated ({reasons})")
    return task_folds, skipped


def _check_classes_per_fold(labels: np.ndarray, fold: np.ndarray) -> None:
    """Every test fold of a binary task holds both classes (else its AUC is undefined and the other
    folds' heads train without that class's rows)."""
    for k in range(int(fold.max()) + 1):
        present = set(np.unique(labels[fold == k]).astype(int))
        if present != {0, 1}:
            missing = "positive" if 1 not in present else "negative"
            counts = f"{int(np.sum(labels == 1))} positive, {int(np.sum(labels == 0))} negative rows"
            n_folds = int(fold.max()) + 1
            raise FoldError(f"fold {k + 1} has no {missing} row ({counts}: too few for {n_folds} folds)")


def set_determinism(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def run_evaluation(cfg: EvalConfig, reporter: Reporter | None = None) -> dict:
    reporter = reporter or Reporter()
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    cohort, task_folds, skipped_tasks = prepare(cfg)
    for task, why in skipped_tasks.items():
        reporter.message(f"skipped task {task}: {why}")
    set_determinism(cfg.seed)
    out_dir = Path(cfg.out_dir)
    made_out = not out_dir.exists()
    before = folder_entries(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _evaluate(cfg, reporter, timings, clock, cohort, task_folds, skipped_tasks, out_dir)
    except BaseException:
        # No partial folds.csv / figures left to be mistaken for results: the folder is as it was.
        remove_new_entries(out_dir, before, remove_folder=made_out)
        raise


def _evaluate(cfg, reporter, timings, clock, cohort, task_folds, skipped_tasks, out_dir) -> dict:
    if skipped_tasks:  # the tables, figures and final heads cover the usable tasks only
        cfg = replace(cfg, tasks=tuple(t for t in cfg.tasks if t in task_folds))

    sources = load_sources(cfg.runs, cfg.baseline, device=cfg.device)
    cache = ArrayCache(cohort, reporter)
    keep = cache.load([s.spec for s in sources])
    unreadable = [f"manifest row {i + 2}: {reason}" for i, reason in sorted(cache.errors.items())]
    if unreadable:  # evaluate what can be read; the folds are re-drawn on the readable rows
        for line in unreadable:
            reporter.message(f"skipped {line}")
        cohort = cohort.subset(keep)
        cache.restrict(keep, cohort)
        task_folds, now_skipped = make_task_folds(cohort, cfg)
        for task, why in now_skipped.items():
            reporter.message(f"skipped task {task}: {why} (after dropping the unreadable rows)")
            skipped_tasks[task] = why
        cfg = replace(cfg, tasks=tuple(t for t in cfg.tasks if t in task_folds))
    write_folds_csv(out_dir / "folds.csv", {t: tf.patients for t, tf in task_folds.items()})
    embeddings: dict[str, dict[str, np.ndarray]] = {}
    probe_heads: dict = {}  # (source, task) -> (modality, fold) -> head, reused by fine-tuning
    _timed(timings, "load_and_embed", lambda: _embed_all(sources, cache, cfg, embeddings, reporter))

    results: dict = {
        "schema": RESULTS_SCHEMA,
        "settings": cfg.to_json(),
        "cohort": {
            "rows": len(cohort),
            "patients": len(np.unique(cohort.patient_ids)),
            "labelled": label_summary(cohort, cfg.tasks),
        },
        "sources": {s.key: s.describe() for s in sources},
        "folds": {t: _fold_sizes(tf, cohort) for t, tf in task_folds.items()},
        "cv": {s.key: {} for s in sources},
        "retrieval": {},
        "skipped": [f"task {t}: {why}" for t, why in skipped_tasks.items()]
        + [f"unreadable {line}" for line in unreadable],
    }
    if "probe" in cfg.modes:
        _timed(
            timings,
            "probe",
            lambda: _run_probe(sources, embeddings, task_folds, cohort, cfg, results, reporter, probe_heads),
        )
    if "finetune" in cfg.modes:
        _timed(
            timings,
            "finetune",
            lambda: _run_finetune(
                sources, cache, embeddings, task_folds, cohort, cfg, results, reporter, probe_heads
            ),
        )
    _timed(timings, "retrieval", lambda: _run_retrieval(sources, embeddings, cohort, cfg, results))

    write_json(out_dir / "results.json", results)
    (out_dir / "results.md").write_text(results_markdown(results))
    if cfg.figures:
        from training.evaluation.figures import make_figures

        _timed(
            timings,
            "figures",
            lambda: make_figures(out_dir / "figures", sources, cache, embeddings, cohort, cfg, results),
        )
    if cfg.fit_final:
        from training.evaluation.final import fit_final_heads

        results["final_heads"] = fit_final_heads(sources, embeddings, cohort, cfg, results)
        reporter.message(f"final heads written to {', '.join(results['final_heads'])}")
    timings["total"] = time.perf_counter() - clock
    write_json(out_dir / "timings.json", {"seconds": timings, "threads": torch.get_num_threads()})
    results["timings"] = timings  # returned to the caller only; never in results.json
    return results


def _timed(timings: dict, name: str, fn: Callable[[], object]) -> None:
    start = time.perf_counter()
    fn()
    timings[name] = time.perf_counter() - start


def _embed_all(sources, cache, cfg, embeddings, reporter) -> None:
    reporter.stage("embedding", len(sources) * 2)
    for source in sources:
        arrays = cache.get(source.spec)
        embeddings[source.key] = {}
        for modality in ("oct", "fundus"):
            embeddings[source.key][modality] = embed(
                source.model, modality, arrays.of(modality), device=cfg.device
            )
            reporter.advance()


def _fold_sizes(tf: TaskFolds, cohort: Cohort) -> dict:
    patients = cohort.patient_ids[tf.rows]
    return {
        "n_folds": int(tf.fold.max()) + 1,
        "rows_per_fold": [int(np.sum(tf.fold == k)) for k in range(int(tf.fold.max()) + 1)],
        "patients_per_fold": [len(np.unique(patients[tf.fold == k])) for k in range(int(tf.fold.max()) + 1)],
    }


def _run_probe(sources, embeddings, task_folds, cohort, cfg, results, reporter, probe_heads) -> None:
    reporter.stage("linear probe", len(sources) * len(task_folds))
    for source in sources:
        by_input: dict[str, dict] = {}
        for task, tf in task_folds.items():
            emb = {m: embeddings[source.key][m][tf.rows] for m in cfg.modalities}
            cv = cross_validate_probe(
                task,
                tf.kind,
                emb,
                tf.labels,
                tf.fold,
                cfg.seed,
                tuple(cfg.modalities),
                groups=cohort.patient_ids[tf.rows],
                heads_out=probe_heads.setdefault((source.key, task), {}),
            )
            for input_key, entry in cv.items():
                by_input.setdefault(input_key, {})[task] = entry
            reporter.advance()
        results["cv"][source.key]["probe"] = by_input


def _run_finetune(sources, cache, embeddings, task_folds, cohort, cfg, results, reporter, probe_heads):
    from training.heads import fit_linear_head

    settings = FinetuneSettings(
        epochs=cfg.finetune_epochs,
        batch_size=cfg.finetune_batch_size,
        head_lr=cfg.finetune_lr,
        encoder_lr=cfg.finetune_encoder_lr,
        device=cfg.device,
        scope=resolve_scope(cfg.finetune_scope, cfg.device),
    )
    results["finetune_scope"] = settings.scope
    n_folds = {t: int(tf.fold.max()) + 1 for t, tf in task_folds.items()}
    modalities = [m for m in cfg.modalities if m in cfg.finetune_modalities]
    reporter.stage("fine-tuning", len(sources) * len(modalities) * sum(n_folds.values()))
    for source in sources:
        arrays = cache.get(source.spec)
        by_input: dict[str, dict] = {}
        for modality in modalities:
            encoder = source.model.oct_encoder if modality == "oct" else source.model.fundus_encoder
            frozen, encoder = split_encoder(encoder, settings.scope)
            x_all = arrays.of(modality)
            if frozen is not None:  # the frozen stages see every row once, then every fold reuses them
                x_all = frozen_features(frozen, x_all, settings.batch_size, cfg.device)
            for task, tf in task_folds.items():
                per_fold = []
                groups = cohort.patient_ids[tf.rows]
                for k in range(n_folds[task]):
                    train, test = tf.fold != k, tf.fold == k
                    emb = embeddings[source.key][modality][tf.rows]
                    head = probe_heads.get((source.key, task), {}).get((modality, k)) or fit_linear_head(
                        task, emb[train], tf.labels[train], seed=cfg.seed, groups=groups[train]
                    )
                    prediction, threshold = finetune_fold(
                        encoder,
                        tf.kind,
                        x_all[tf.rows[train]],
                        tf.labels[train],
                        x_all[tf.rows[test]],
                        head.weight,
                        head.bias,
                        emb[train],
                        settings,
                        seed=cfg.seed * 1000 + k,
                    )
                    scores = task_metrics(tf.kind, tf.labels[test], prediction, threshold)
                    per_fold.append({"fold": k, **scores})
                    reporter.advance()
                metrics_only = [{key: v for key, v in f.items() if key != "fold"} for f in per_fold]
                entry = {"folds": per_fold, "summary": summarise(metrics_only)}
                by_input.setdefault(modality, {})[task] = entry
        results["cv"][source.key]["finetune"] = by_input


def _run_retrieval(sources: list[EncoderSource], embeddings, cohort: Cohort, cfg: EvalConfig, results):
    for source in sources:
        val = set(source.val_patients)
        rows = np.flatnonzero(np.isin(cohort.patient_ids, list(val)))
        if len(rows) < 2:
            results["skipped"].append(
                f"retrieval for {source.label}: no held-out patients of its split.json are in the manifest"
            )
            continue
        e = embeddings[source.key]
        eyes = [eye_key(cohort.rows[i]) for i in rows]
        r = evaluate_retrieval(e["fundus"][rows], e["oct"][rows], tuple(cfg.retrieval_k), eyes=eyes)
        r["patients"] = len(val & set(cohort.patient_ids[rows]))
        r["split"] = "val patients of " + (str(source.run_dir) if source.run_dir else "the first run")
        results["retrieval"][source.key] = r
