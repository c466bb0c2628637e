"""`retina predict`: task-head predictions per item (a value in the task's units for regression heads,
a probability and label for binary heads); the tasks are those of :mod:`retinacli.tasks`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from retinacli.commands import options
from retinacli.tasks import TASKS, tasks_help

# What the head says about each prediction: plausibility, validation, cross-validated quality.
HEAD_CONTEXT_COLUMNS: list[str] = ["plausible", "validated", "note", "reliable"]
# Whether the item looks like the package's training data (out-of-distribution score and flag).
OOD_COLUMNS: list[str] = ["ood_score", "ood"]
CSV_COLUMNS = ["id", "path", "modality", "laterality", "date", "task", "value", "units", "probability",
               "label", "threshold", "label_meaning", *HEAD_CONTEXT_COLUMNS, *OOD_COLUMNS, "root"]
PREDICT_CHUNK = 4096


def register(app: typer.Typer) -> None:
    @app.command("predict")
    def predict(
        paths: list[Path] | None = typer.Argument(
            None, help="OCT volumes / folders to predict on (embedded on the fly, not stored). "
            "Default: every OCT item already in the store, from its stored embeddings.",
        ),
        task: str = typer.Option(
            ..., "--task", "-t", help=f"Task head: {tasks_help()}; binary heads give a probability + label."
        ),
        model: str | None = options.model_option(
            "Model package. Default: the store's package (the folder it records, else the known package "
            "with its model id); with PATHs and no store, the default package ($RETINA_MODEL, 'retina "
            "models default', else the newest).",
        ),
        store: Path | None = options.store_option(
            f"Embedding store (used without PATHs). {options.STORE_DEFAULT_HELP}"
        ),
        index: Path | None = options.hidden_alias("--index", "-i"),
        modality: str | None = typer.Option(
            None, "--modality", help="Items to predict on: oct or fundus. Default: the modality the head was "
            "fitted on (its input_modality in retina.json, normally oct); the other one applies the head in "
            "the shared embedding space, marked 'not validated on <modality>' unless the package records a "
            "cross-validated result there.",
        ),
        batch_size: int = typer.Option(16, "--batch-size", min=1, help="Items per model call (with PATHs)."),
        json_output: bool = options.json_option("Print predictions as JSON."),
        csv_output: bool = typer.Option(False, "--csv", help="Print predictions as CSV."),
        redact_paths: bool = options.redact_paths_option(
            "Print every path with each component replaced by a pseudonym keyed with the store's key (a "
            "per-run key without a store), for outputs that leave the site. Without it, paths are relative "
            "to the root given (to 'retina embed', or PATH here), components naming the patient replaced."
        ),
        max_pixels: str | None = options.max_pixels_option(),
        device: str = options.device_option(
            options.DEVICE_HELP.replace("the encoders run", "the encoder and the task head run")),
        strict: bool = options.strict_option(
            "Refuse items the package flags as out of distribution (unlike its training data): they "
            "are listed under errors with their score and the threshold, not predicted. Without it every "
            "prediction carries ood_score and ood.",
        ),
        html_report: Path | None = typer.Option(
            None, "--html", metavar="FILE",
            help="Also write a self-contained HTML report to FILE: the head's label meaning, threshold, "
            "cross-validated quality and reliability, and one row per item with a thumbnail, the value or "
            "probability and label, and its out-of-distribution and plausibility flags.",
        ),
        dicom_sr: Path | None = typer.Option(
            None, "--dicom-sr", metavar="OUTDIR",
            help="Also write one DICOM Structured Report (TID 1500 measurement report) per DICOM input into "
            "OUTDIR, named by its SOPInstanceUID: the model, the value with its units, and a reference to "
            "the source instance. It COPIES THE SOURCE'S PATIENT AND STUDY MODULES (name, ID, birth date) "
            "so a PACS can file it: the one output that carries identifiers, never written by default. "
            "Needs the 'retina\\[sr]' extra.",
        ),
    ) -> None:
        """Predict a clinical task per item with the package's head (units, threshold from the package).

        Each prediction comes with the head's label meaning, threshold and cross-validated quality; a
        head below AUROC 0.6 / R² 0.1 is marked unreliable, a value outside the training range
        (±10 %) implausible, a head applied to another modality "not validated". Predictions are for
        research use only, not for diagnosis or treatment decisions.
        """
        from retinacli.console import err, print_json, styled
        from retinacli.errors import EXIT_NOTHING_DONE, EXIT_OK, UsageError

        store = options.resolve_store(store, index, "--index")
        if task not in TASKS:
            raise UsageError(f"--task must be one of {', '.join(TASKS)}, not {task!r}")
        if modality not in (None, "oct", "fundus"):
            raise UsageError(f"--modality must be oct or fundus, not {modality!r}")
        if json_output and csv_output:
            raise UsageError("choose one of --json and --csv")
        if html_report is not None:
            from retinacli.reports.html import check_report_path

            check_report_path(html_report)  # before the model loads
        if dicom_sr is not None:
            from retinacli.reports.dicom_sr import check_option

            check_option(dicom_sr)  # before the model loads
        if paths:
            from retinacli.commands.common import require_paths

            require_paths(paths)  # a missing PATH is a typo to fix (exit 2), before the model loads
            payload = _predict_files(paths, task, model, modality, batch_size, store, redact_paths, strict,
                                     device)
        else:
            payload = _predict_store(task, model, store, modality, redact_paths, strict, device)
        sources, algorithm = payload.pop("_sources", None), payload.pop("_algorithm", None)
        if dicom_sr is not None:
            payload["dicom_sr"] = _write_sr(dicom_sr, payload, sources, algorithm)
        for error in payload["errors"][:20]:
            err.print(styled(("failed:", "yellow"), f" {error['path']}: {error['error']}"), highlight=False)
        if html_report is not None:
            _write_html(html_report, payload, paths)
        if json_output:
            print_json(payload)
        elif csv_output:
            _print_csv(payload)
        else:
            _print_table(payload)
        raise typer.Exit(EXIT_OK if payload["predictions"] else EXIT_NOTHING_DONE)


def _write_html(path: Path, payload: dict[str, Any], paths: list[Path] | None) -> None:
    """The --html report; item files are found under the PATHs (numbered as the records' roots) or
    through the store's roots."""
    from retinacli.console import err, safe
    from retinacli.reports.html import prediction_report, write_report
    from retinacli.reports.thumbnails import Locator

    locator = Locator.for_paths(paths) if paths else Locator.for_store(payload.get("store"))
    written = write_report(path, prediction_report(payload, locator))
    err.print(f"wrote report: {safe(written)}", highlight=False)


def _write_sr(outdir: Path, payload: dict[str, Any], sources: dict[str, Path] | None,
              algorithm: dict[str, str]) -> dict[str, Any]:
    """The --dicom-sr reports: each prediction's source file (remembered when predicting on files,
    found through the store's roots otherwise), one SR per DICOM source."""
    from retinacli.console import err, safe
    from retinacli.reports.dicom_sr import write_reports
    from retinacli.reports.thumbnails import Locator

    reasons: dict[str, str] = {}
    if sources is None:
        locator, sources = Locator.for_store(payload.get("store")), {}
        for record in payload["predictions"]:
            path, why = locator.locate(record)
            sources[record["id"]] = path
            if why:
                reasons[record["id"]] = why
    result = write_reports(outdir, payload["task"], payload["predictions"], algorithm, sources, reasons)
    for skipped in result["skipped"][:20]:
        err.print(safe(f"no DICOM SR: {skipped['path']}: {skipped['reason']}"), highlight=False)
    err.print(safe(f"wrote {len(result['written'])} DICOM SR file(s) to {outdir} (they carry the "
                   "sources' patient and study identifiers)"), highlight=False)
    return result


def _algorithm(engine: Any) -> dict[str, str]:
    """The package behind the predictions, as the SR's observer device and algorithm."""
    descriptor = getattr(engine, "descriptor", None) or {}
    return {"name": str(descriptor.get("name") or engine.model_id),
            "version": str(descriptor.get("version") or "unknown"), "model_id": str(engine.model_id)}


def _check_task(engine: Any, task: str) -> None:
    from retinacli.errors import UsageError

    tasks = list(getattr(engine, "tasks", []) or [])
    if task not in tasks:
        have = ", ".join(tasks) or "none"
        raise UsageError(f"model {engine.model_id} has no '{task}' head (it has: {have}); "
                         "fit one with 'retina probe' and re-export")


def _head_modality(engine: Any, task: str, modality: str | None) -> str:
    if modality is not None:
        return modality
    head = (getattr(engine, "descriptor", None) or {}).get("heads", {}).get(task, {})
    return head.get("input_modality", "oct")


def _head_entry(engine: Any, task: str) -> dict[str, Any]:
    """The head's retina.json entry ({} for an engine without a descriptor)."""
    return (getattr(engine, "descriptor", None) or {}).get("heads", {}).get(task) or {}


def _head_summary(engine: Any, task: str, modality: str) -> dict[str, Any]:
    from retinacli.headinfo import head_summary

    return head_summary(task, _head_entry(engine, task), modality)


def _records(engine: Any, task: str, rows: list[dict[str, Any]], vectors: Any) -> list[dict[str, Any]]:
    from retinacli.headinfo import record_context
    from retinacli.readers.sanitize import iso_date

    head = _head_entry(engine, task)
    records = []
    for start in range(0, len(rows), PREDICT_CHUNK):
        chunk = rows[start : start + PREDICT_CHUNK]
        preds = engine.predict(task, vectors[start : start + PREDICT_CHUNK])
        for row, pred in zip(chunk, preds, strict=True):
            record = {k: row.get(k) for k in ("id", "root", "path", "modality", "laterality", "date")}
            record["date"] = iso_date(record["date"])  # 0.1.0 stores hold YYYYMMDD
            record.update(pred)
            record.update(record_context(head, pred, record["modality"]))  # plausible, validated, note
            record.update({"ood_score": row.get("ood_score"), "ood": row.get("ood")})  # retinacli.ood
            records.append(record)
    return records


def _ood_check(engine: Any, rows: list[dict[str, Any]], vectors: Any, strict: bool
               ) -> tuple[list[dict[str, Any]], Any, list[dict[str, str]]]:
    """Fill `ood_score` / `ood` where a row lacks them (rows of store formats before 4) from its vector,
    when the package has a reference (else say once that it has none); with `strict`, drop flagged
    rows: (rows, vectors, errors naming each dropped item and why)."""
    import numpy as np

    from retinacli.ood import say_no_check

    ood = getattr(engine, "ood", None)
    if ood is None:
        say_no_check(engine)
        return rows, vectors, []
    todo = [i for i, row in enumerate(rows) if row.get("ood") is None]
    for modality in {rows[i]["modality"] for i in todo}:
        mine = [i for i in todo if rows[i]["modality"] == modality]
        for i, fields in zip(mine, ood.fields(modality, vectors[mine]), strict=True):
            rows[i].update(fields)
    if not strict:
        return rows, vectors, []
    keep = np.array([not row.get("ood") for row in rows], dtype=bool)
    errors = [{"path": row.get("path") or row.get("id"),
               "error": ood.reason(row["modality"], row["ood_score"], engine.model_id)}
              for row, kept in zip(rows, keep, strict=True) if not kept]
    return [r for r, k in zip(rows, keep, strict=True) if k], vectors[keep], errors


def _predict_store(task: str, model: str | None, index: Path | None, modality: str | None,
                   redact_paths: bool = False, strict: bool = False, device: str = "auto") -> dict[str, Any]:
    import numpy as np

    from retinacli.console import err, safe
    from retinacli.pipeline import engine_for_store
    from retinacli.store import EmbeddingStore, store_path_and_origin

    store_root, origin = store_path_and_origin(index)
    err.print(f"store: {safe(store_root)} ({origin})", highlight=False)
    store = EmbeddingStore.open(store_root)
    engine, package = engine_for_store(store, model, device=device)
    err.print(safe(f"model: {engine.model_id} ({package}{'' if model else ', the store model'})"),
              highlight=False)
    _check_task(engine, task)
    modality = _head_modality(engine, task, modality)
    err.print(f"task: {task}; predicting every {modality} item in the store from its stored embedding",
              highlight=False)
    rows, parts = [], []
    from retinacli.privacy import existing_secret
    from retinacli.redaction import stored_path

    key = existing_secret(store_root)
    columns = ["id", "root", "path", "modality", "laterality", "date", "ood_score", "ood"]
    for _shard, vectors, meta in store.iter_shards(columns):
        keep = np.array([m == modality for m in meta["modality"]], dtype=bool)
        parts.append(np.asarray(vectors[keep]))
        names = list(meta)
        rows.extend({n: meta[n][i] for n in names} for i in np.flatnonzero(keep))
    for row in rows:  # as stored (relative and redacted from format 3 on), or every component
        row["path"] = stored_path(row, key, redact_paths)
    vectors = np.concatenate(parts) if parts else np.zeros((0, store.embed_dim), np.float32)
    if not rows:
        err.print(f"the store holds no {modality} items", highlight=False)
    rows, vectors, refused = _ood_check(engine, rows, vectors, strict)
    return {"task": task, "model": engine.model_id, "head": _head_summary(engine, task, modality),
            "source": "store", "store": str(store_root),
            "predictions": _records(engine, task, rows, vectors), "errors": refused,
            "_algorithm": _algorithm(engine)}


class _MemoryWriter:
    """Stands in for a StoreWriter when predicting on files: the vectors stay in memory."""

    def __init__(self, embed_dim: int, secret: bytes):
        self.embed_dim = embed_dim
        self.secret = secret
        self.rows: list[dict[str, Any]] = []
        self.vectors: list[Any] = []

    def column_values(self, _column: str) -> set[str]:
        return set()

    def add(self, rows: list[dict[str, Any]], vectors: Any) -> None:
        self.rows.extend(rows)
        self.vectors.extend(vectors)


class _Remembering:
    """A PathRedactor that remembers the file behind each output path (for --dicom-sr: an output path
    may be redacted, so it cannot be resolved back)."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.files: dict[tuple[str | None, str], Path] = {}

    def output(self, path: str | Path, meta: Any = None, probe: bool = False) -> tuple[str | None, str]:
        root, shown = self.inner.output(path, meta, probe)
        self.files[(root, shown)] = Path(path)
        return root, shown

    def show(self, path: str | Path, meta: Any = None, probe: bool = False) -> str:
        return self.output(path, meta, probe)[1]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _predict_files(paths: list[Path], task: str, model: str | None, modality: str | None, batch_size: int,
                   index: Path | None, redact_paths: bool = False, strict: bool = False,
                   device: str = "auto") -> dict[str, Any]:
    import secrets

    import numpy as np

    from retinacli.console import err, safe
    from retinacli.pipeline import engine_for_store, load_engine, plan_embedding, run_embedding
    from retinacli.privacy import existing_secret
    from retinacli.store import INDEX_FILE, EmbeddingStore, store_path_and_origin

    store_root, _origin = store_path_and_origin(index)
    # With a store, predictions use its package (so they join with it), not the default package.
    existing = model is None and (store_root / INDEX_FILE).is_file()
    if existing:
        engine, package = engine_for_store(EmbeddingStore.open(store_root), None, device=device)
    else:
        engine, package = load_engine(model, "auto", "auto", device)
    chosen_by = "" if model else ", the store's package" if existing else ", default"
    err.print(safe(f"model: {engine.model_id} ({package}{chosen_by})"), highlight=False)
    _check_task(engine, task)
    modality = _head_modality(engine, task, modality)
    err.print(f"task: {task}; embedding {modality} items on the fly (nothing is written)", highlight=False)
    from retinacli.engine import engine_line

    chosen = engine_line(engine, [modality])  # builds the encoder: the providers it really uses
    if chosen:
        err.print(f"engine: {safe(chosen)}", highlight=False)
    # Ids match the store's when a store exists (same secret), so predictions join with it. The key is
    # only read, never created: predict writes nothing into a store.
    secret = existing_secret(store_root)
    if secret is None:
        secret = secrets.token_bytes(32)
        if (store_root / INDEX_FILE).is_file():
            err.print(f"note: {safe(store_root)} has no secret.key; the ids below are this run's only and "
                      "do not match the store's", highlight=False)
    from retinacli.redaction import PathRedactor

    shown = _Remembering(PathRedactor.for_paths(paths, secret, redact_all=redact_paths))  # r0: 1st PATH
    plan = plan_embedding(paths, secret, set())
    writer = _MemoryWriter(engine.embed_dim, secret)
    # flagged items are refused here with --strict (errors, with the reason); rows carry ood fields
    report = run_embedding(engine, plan, writer, modality=modality, batch_size=batch_size, paths=shown,
                           strict=strict)
    if getattr(engine, "ood", None) is None:
        from retinacli.ood import say_no_check

        say_no_check(engine)
    vectors = np.stack(writer.vectors) if writer.vectors else np.zeros((0, engine.embed_dim), np.float32)
    if not writer.rows and not report.errors:
        where = ", ".join(shown.show(p) for p in paths)
        err.print(f"no {modality} items found under {safe(where)}", highlight=False)
    return {"task": task, "model": engine.model_id, "head": _head_summary(engine, task, modality),
            "source": "files",
            "predictions": _records(engine, task, writer.rows, vectors),
            "errors": [{"path": e.path, "error": e.reason} for e in report.errors],
            "_algorithm": _algorithm(engine),
            "_sources": {row["id"]: shown.files.get((row["root"], row["path"])) for row in writer.rows}}


def _print_csv(payload: dict[str, Any]) -> None:
    import csv
    import sys

    writer = csv.DictWriter(sys.stdout, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    head = payload.get("head") or {}
    context = {"task": payload["task"], "label_meaning": head.get("label_meaning"),
               "reliable": head.get("reliable")}
    for record in payload["predictions"]:
        writer.writerow({**context, **record})
    sys.stdout.flush()


def _print_table(payload: dict[str, Any]) -> None:
    from retinacli.console import out, print_table, safe
    from retinacli.retrieval import display_path

    preds = payload["predictions"]
    head = payload.get("head") or {}
    kind = head.get("kind") or ("regression" if preds and "value" in preds[0] else "binary")
    regression = kind == "regression"
    lines = _context_lines(head) if head else []
    flagged = sum(p.get("ood") is True for p in preds)
    if flagged:
        lines.insert(0, f"ood: {flagged} of {len(preds)} item(s) look unlike the package's training data; "
                        "their values are not to be trusted (--strict refuses them)")
    caption = "\n".join(map(safe, lines)) or None  # one safe line each
    units = head.get("units") or (preds[0].get("units", "") if preds else "")
    columns = ["id", "source", "laterality", "date"]
    columns += [f"value ({units})"] if regression else ["probability", "label"]
    show_ood = any("ood" in p for p in preds)
    show_note = any(p.get("plausible") is False for p in preds)
    columns += ["ood"] * show_ood + ["note"] * show_note
    kinds = {"source": "path", "note": "text"}  # the rest are short: never wrapped (see print_table)
    rows = []
    for p in preds:
        cells = [p.get("id") or "", display_path(p.get("path")), p.get("laterality") or "",
                 p.get("date") or ""]
        if regression:
            # an implausible value is never shown bare: it is marked, and the note says why
            cells.append(f"{p['value']:.1f}" + (" (implausible)" if p.get("plausible") is False else ""))
        else:
            cells += [f"{p['probability']:.3f}", str(p.get("label"))]
        if show_ood:
            cells.append({True: "flagged", False: ""}.get(p.get("ood"), "n/a"))
        if show_note:
            cells.append(p["note"] if p.get("plausible") is False else "")
        rows.append(cells)
    print_table(out, [(column, kinds.get(column, "short")) for column in columns], rows,
                title=f"{payload['task']} predictions ({payload['model']})", caption=caption)


def _context_lines(head: dict[str, Any]) -> list[str]:
    """The table caption: what the head predicts, how well, and what the values can be trusted for."""
    from retinacli.headinfo import NO_RANGE, RESEARCH_USE, quality_text, range_text

    threshold = head.get("threshold")
    meaning = f"{head.get('label_meaning') or '-'}"
    if threshold is not None:
        meaning += f"; label 1 when probability >= {threshold:.3f}"
    trust = f"reliable ({head['reason']})" if head.get("reliable") else f"UNRELIABLE: {head.get('reason')}"
    lines = [f"head: {head['task']} ({head.get('kind')}, fitted on {head.get('input_modality')}): {meaning}",
             f"quality: {quality_text({**head, 'metrics': {'cv': head.get('cv')}})}; {trust}"]
    if head.get("kind") == "regression":
        rng = range_text(head)
        lines.append(f"plausible: within the training range {rng}; values outside are marked (implausible)"
                     if rng else NO_RANGE)
    if head.get("cv_applied"):
        swapped = quality_text({**head, "metrics": {"cv": head["cv_applied"]}})
        lines.append(f"applied to {head['applied_to']} (fitted on {head['input_modality']}): {swapped}")
    if not head.get("validated", True):
        applied, fitted = head["applied_to"], head["input_modality"]
        if head.get("swap_check"):  # measured, but below the bar
            lines.append(f"not validated on {applied}: the head was fitted on {fitted} embeddings and its "
                         f"cross-validated {applied} result misses the bar: {head['swap_check']}")
        else:
            lines.append(f"not validated on {applied}: the head was fitted on {fitted} embeddings and the "
                         f"package records no cross-validated {applied} result")
    lines.append(RESEARCH_USE)
    return lines
