"""`retina embed`: embed OCT volumes and fundus images into an embedding store (docs/store.md)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from retinacli.commands import options

MODALITIES = ("auto", "oct", "fundus")
MAX_ERRORS_SHOWN = 20


def register(app: typer.Typer) -> None:
    @app.command("embed")
    def embed(
        paths: list[Path] = typer.Argument(
            ..., help="Files or folders (searched recursively) holding OCT volumes and fundus images."
        ),
        model: str | None = options.model_option(),
        store: Path | None = options.store_option(),
        out: Path | None = options.hidden_alias("--out", "-o"),
        modality: str = typer.Option(
            "auto", "--modality", help="Embed only 'oct' or 'fundus'; 'auto' embeds both."
        ),
        batch_size: int = typer.Option(16, "--batch-size", min=1, help="Items per model call."),
        workers: int | None = typer.Option(
            None, "--workers", min=1,
            help=f"Threads reading and preprocessing files. Default: one per core ({os.cpu_count()} here, "
            "minus one above two cores).",
        ),
        shard_size: int = typer.Option(
            4096, "--shard-size", min=1,
            help="Rows per committed shard (a killed run loses at most one shard's work)."
        ),
        keep_identifiers: bool = typer.Option(
            False, "--keep-identifiers",
            help="Also store the raw patient ID (default: only keyed-hash pseudonyms are stored).",
        ),
        engine_name: str = typer.Option(
            "auto", "--engine",
            help="Inference backend: onnxruntime, openvino (installed with retina on x86-64) or auto "
            "(the fastest installed; see docs/performance.md).",
        ),
        device: str = options.device_option(),
        precision: str = typer.Option(
            "auto", "--precision",
            help="fp32, int8 (needs a package exported with --quantize int8) or auto "
            "(int8 where it passed the package's accuracy gate on the chosen backend).",
        ),
        json_output: bool = options.json_option(
            "Print a JSON summary (embedded, skipped, failed, store, model)."
        ),
        redact_paths: bool = options.redact_paths_option(
            "Store and print every file path with each component replaced by a pseudonym keyed with the "
            "store's key (for a store or outputs that leave the site). Without it, paths are relative to "
            "the PATH given and only components naming the file's patient are replaced."
        ),
        max_pixels: str | None = options.max_pixels_option(),
        strict: bool = options.strict_option(
            "Do not store items the package flags as out of distribution (unlike its training data); "
            "list them in STORE/errors.csv with their score and the package's threshold instead. Without "
            "it they are stored with ood=true.",
        ),
        use_ray: bool = typer.Option(
            False, "--ray",
            help="Decode and embed on a Ray started for this run on this machine (extra retina[ray]; "
            "docs/scale-out.md). Same store, resume and errors as without it.",
        ),
        ray_address: str | None = typer.Option(
            None, "--ray-address", metavar="ADDRESS",
            help="Decode and embed on the Ray cluster at ADDRESS (e.g. auto, or ray://head:10001); the "
            "files and the package must be at the same paths on every node.",
        ),
    ) -> None:
        """Embed files into a store; re-runs skip what is already in it; failures go to STORE/errors.csv."""
        from retinacli.commands.common import require_paths
        from retinacli.console import err, print_json, safe, styled
        from retinacli.console import out as stdout
        from retinacli.errors import EXIT_NOTHING_DONE, EXIT_OK, RetinaError, UsageError

        store = options.resolve_store(store, out, "--out")
        if modality not in MODALITIES:
            raise UsageError(f"--modality must be one of {', '.join(MODALITIES)}, not {modality!r}")
        require_paths(paths)  # before the package is loaded or the store created
        ray = None
        if use_ray or ray_address:
            from retinacli.distributed import require_ray

            require_ray()  # before the package is loaded
            ray = {"address": ray_address}
        try:
            report, store_root, engine, errors_file, total_rows, shown, ignored = _run(
                paths, model, store, None if modality == "auto" else modality, batch_size, workers,
                shard_size, keep_identifiers, engine_name, precision, redact_paths, strict, device, ray,
            )
        except OSError as exc:  # disk full, read-only or vanished store: committed shards stay valid
            where = f" ({exc.filename})" if exc.filename else ""
            raise RetinaError(f"cannot write the embedding store: {exc.strerror or exc}{where}; the shards "
                              "committed so far are kept, and a re-run continues from them") from None
        for error in report.errors[:MAX_ERRORS_SHOWN]:
            err.print(styled(("failed:", "yellow"), f" {error}"), highlight=False)
        if len(report.errors) > MAX_ERRORS_SHOWN:
            err.print(f"... and {len(report.errors) - MAX_ERRORS_SHOWN} more", highlight=False)
        if report.errors and errors_file is not None:
            err.print(f"failures listed in {safe(errors_file)}", highlight=False)
        if report.embedded + report.skipped + report.failed == 0:
            wanted = "OCT volumes or fundus images" if modality == "auto" else f"{modality} items"
            where = ", ".join(shown.show(p) for p in paths)
            err.print(f"no {wanted} found under {safe(where)}", highlight=False)
        summary = {
            "embedded": report.embedded,
            "skipped": report.skipped,
            "failed": report.failed,
            "store": str(store_root),
            "rows": total_rows,
            "model": engine.model_id,
            "engine": {m: v.label for m, v in getattr(engine, "variants", {}).items()},
            # what the built sessions really run on (a fall-back from CUDA to the CPU shows here)
            "providers": engine.providers_used() if hasattr(engine, "providers_used") else {},
            "seconds": round(report.seconds, 3),
            # discovery streams into inference: the first model call comes before discovery ends
            "discovery_seconds": _rounded(report.discovery_seconds),
            "first_batch_seconds": _rounded(report.first_batch_seconds),
            "items_per_second": round(report.throughput, 2),
            "errors": [{"path": e.path, "error": e.reason} for e in report.errors],
            "ignored": ignored,
            # out of distribution (retinacli.ood): null when the package has no reference
            "ood_flagged": report.flagged if report.ood_checked else None,
            "ood_refused": report.refused if report.ood_checked else None,
        }
        if ray is not None:  # the Ray it ran on: address, CPUs, windows, seconds to start or reach it
            summary["ray"] = getattr(report, "ray", None)
        if json_output:
            print_json(summary)
        else:
            stdout.print(safe(
                f"embedded {report.embedded}, skipped {report.skipped} (already in the store), "
                f"failed {report.failed} -> {store_root} ({total_rows} vectors, model {engine.model_id})"),
                highlight=False,
            )
        if report.ood_checked and report.flagged:
            what = "not stored (--strict)" if strict else "stored with ood=true"
            err.print(styled(("out of distribution:", "yellow"), f" {report.flagged} item(s) do not look "
                             f"like the package's training data; {what}"), highlight=False)
        raise typer.Exit(EXIT_OK if report.embedded + report.skipped > 0 else EXIT_NOTHING_DONE)


def _run(paths, model, out, modality, batch_size, workers, shard_size, keep_identifiers,
         backend="auto", precision="auto", redact_paths=False, strict=False, device="auto", ray=None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from retinacli.console import err, safe, styled
    from retinacli.distributed import ray_engine_line
    from retinacli.engine import engine_line
    from retinacli.pipeline import (
        StreamingPlan,
        default_workers,
        engine_for_store,
        load_engine,
        run_embedding,
    )
    from retinacli.readers.discover import OUTPUT_FOLDER_NOTE
    from retinacli.redaction import PathRedactor
    from retinacli.store import (
        INDEX_FILE,
        EmbeddingStore,
        StoreWriter,
        discard_new_store,
        refuse_orphan_shards,
        store_path_and_origin,
    )

    store_root, store_origin = store_path_and_origin(out, "--store")
    # An existing store keeps its own package: the default package may have changed since.
    existing = model is None and (store_root / INDEX_FILE).is_file()
    new_store = not (store_root / INDEX_FILE).exists()
    made_folder = not store_root.exists()
    there_before = {p.name for p in store_root.iterdir()} if store_root.is_dir() else set()
    if new_store:
        refuse_orphan_shards(store_root)  # damaged (exit 5) before any package is looked for
    if existing:
        engine, package = engine_for_store(EmbeddingStore.open(store_root), None, backend, precision, device)
    else:
        engine, package = load_engine(model, backend, precision, device)
        if (store_root / INDEX_FILE).is_file() and hasattr(engine, "adopt_model_id"):
            # a store made under the older model id rule: this package's vectors keep its id
            engine.adopt_model_id(EmbeddingStore.open(store_root).model_id)
    workers = workers or default_workers()
    chosen_by = "" if model else ", the store's package" if existing else ", default"
    err.print(safe(f"model: {engine.model_id} ({package}{chosen_by})"), highlight=False)
    # The encoders' sessions are built here, so the providers printed are the ones really used (and a
    # --device cuda that cannot start CUDA stops before any work).
    wanted = [modality] if modality else ["fundus", "oct"]
    # with Ray the sessions are built in the encoder actors, not here
    chosen = engine_line(engine, wanted) if ray is None else ray_engine_line(engine, wanted)
    if chosen:
        err.print(f"engine: {safe(chosen)}", highlight=False)
    for m, v in getattr(engine, "variants", {}).items():
        if v.precision == "int8" and not v.gate_passed:
            verdict = "failed" if v.gate_passed is False else "was not checked against"
            err.print(styled(("note:", "yellow"), f" the {m} int8 encoder {verdict} the package's accuracy "
                             f"gate on {v.backend}; used because --precision int8 asked for it"),
                      highlight=False)
    err.print(f"store: {safe(store_root)} ({store_origin})", highlight=False)
    readers = f"workers {workers}" if ray is None else "reading in Ray tasks"
    err.print(f"modality: {modality or 'auto'}, batch size {batch_size}, {readers}", highlight=False)
    if getattr(engine, "ood", None) is None:
        from retinacli.ood import say_no_check

        say_no_check(engine)
    opened = False  # set once this run holds the lock: only then is a new store this run's own
    try:
        with StoreWriter.open_for_model(
            store_root,
            model_id=engine.model_id,
            embed_dim=engine.embed_dim,
            spec_hash=_spec_hash(engine),
            model_name=getattr(engine, "name", None),
            model_version=getattr(engine, "version", None),
            shard_rows=shard_size,
            package=package,
        ) as writer:
            opened = True
            if writer.upgraded_from is not None:
                record = writer.package_record
                err.print(f"store: upgraded store.json from format version {writer.upgraded_from} to "
                          f"{writer.format_version}; "
                          + (f"recorded package {safe(record['path'])}" if record
                             else "no package folder to record"),
                          highlight=False)
            # Rows name their root (a PATH given, recorded in store.json) and a path relative to it.
            run_roots = writer.add_roots(paths)
            shown = PathRedactor(run_roots, writer.secret, redact_all=redact_paths)
            progress = Progress(
                TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                console=err, transient=True, disable=not err.is_terminal,  # no bar lines in logs
            )
            with progress:
                task = progress.add_task("embed", total=None)  # grows as discovery finds sources
                # Discovery streams into inference (a thread, a bounded queue): embedding starts with the
                # first source found, and no list of every source is kept.
                plan = StreamingPlan(paths, writer.secret, writer.column_values("source_key"),
                                     exclude=store_root, old_paths=writer.paths_without_root(),
                                     on_found=lambda found: progress.update(task, total=found),
                                     modality=modality)
                if ray is None:
                    report = run_embedding(
                        engine, plan, writer, modality=modality, batch_size=batch_size, workers=workers,
                        keep_identifiers=keep_identifiers, on_source_done=lambda _r: progress.advance(task),
                        paths=shown, strict=strict,
                    )
                else:
                    from retinacli.distributed import RaySettings, run_embedding_ray

                    settings = RaySettings(address=ray["address"], package=package, backend=backend,
                                           precision=precision, device=device)
                    report = run_embedding_ray(
                        engine, plan, writer, settings, modality=modality, batch_size=batch_size,
                        keep_identifiers=keep_identifiers, on_source_done=lambda _r: progress.advance(task),
                        paths=shown, strict=strict, log=lambda line: err.print(safe(line), highlight=False),
                    )
            if plan.skipped_sources:
                err.print(f"{plan.skipped_sources} source(s) already in the store: skipped",
                          highlight=False)
            ignored = [{"path": shown.show(path), "reason": why} for path, why in plan.ignored]
            for record in ignored:
                if record["reason"].endswith(OUTPUT_FOLDER_NOTE):  # a folder not walked is never silent
                    err.print(safe(f"ignored folder {record['path']}: {record['reason']}"),
                              highlight=False)
            writer.commit()
            writer.record_roots(run_roots, shown)
            errors_file = writer.write_errors((e.path, e.reason) for e in report.errors)
            # Derived search indexes are updated here, under the lock, never by a query; a failure is a
            # one-line note (the vectors are committed; retrieve searches exactly until it is fixed).
            from retinacli.vector_index import after_commit

            after_commit(writer, log=lambda message: err.print(safe(message), highlight=False))
            total_rows = len(writer)
    except BaseException:
        if new_store and opened:  # failed before anything was committed: leave no empty store behind
            discard_new_store(store_root, remove_folder=made_folder, keep=there_before)
        raise
    if new_store and total_rows == 0:
        # Nothing committed: a store made by this run would only pin its model and key, and refuse a
        # retry with another package once the cause is fixed. Leave the folder as it was.
        discard_new_store(store_root, remove_folder=made_folder, keep=there_before)
        errors_file = None
        err.print(f"nothing embedded: {safe(store_root)} was not created", highlight=False)
    return report, store_root, engine, errors_file, total_rows, shown, ignored


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def _spec_hash(engine) -> str | None:
    from retinacli.preprocess import spec_hash

    spec = getattr(engine, "spec", None)
    return spec_hash(spec) if spec else None
