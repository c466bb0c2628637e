"""`retina store ...`: commands about an embedding store itself (docs/store.md).

`info` describes a store and its indexes; `index` builds or updates a search index (lancedb, faiss or
qdrant: retinacli.vector_index; only writers change STORE/ann, queries never build one); `verify` lists
what is damaged and `repair` drops the damaged shards (retinacli/storecheck.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from retinacli.commands import options


def _existing_store_root(store: Path | None) -> Path:
    """The store folder `verify` / `repair` work on (named on stderr); a usage error when there is none
    there. A folder with shards but no store.json is a (damaged) store, not none."""
    from retinacli.console import err, safe
    from retinacli.errors import EXIT_USAGE
    from retinacli.store import INDEX_FILE, StoreError, store_path_and_origin

    store_root, origin = store_path_and_origin(store, "--store")
    err.print(f"store: {safe(store_root)} ({origin})", highlight=False)
    if not (store_root / INDEX_FILE).exists() and not (store_root / "embeddings").is_dir():
        raise StoreError(f"{store_root}: no embedding store here (no {INDEX_FILE})", exit_code=EXIT_USAGE)
    return store_root


def store_summary(store_root: Path) -> dict[str, Any]:
    """What `retina store info` reports: format, rows per modality, shards, model and package."""
    from retinacli.package import locate_store_package
    from retinacli.store import EmbeddingStore, read_errors
    from retinacli.vector_index import index_status, modality_counts

    store = EmbeddingStore.open(store_root)
    modalities = modality_counts(store)
    record = store.package_record
    found, how = locate_store_package(store.model_id, (record or {}).get("path"))
    return {
        "store": str(store_root),
        "path": str(Path(store_root).resolve()),
        "format_version": store.format_version,
        "rows": len(store),
        "rows_per_modality": dict(sorted(modalities.items())),
        "shards": len(store.shards),
        "model_id": store.model_id,
        "embed_dim": store.embed_dim,
        "spec_hash": store.spec_hash,
        "package": {
            "recorded": record,
            "found": found is not None,
            "path": str(found) if found is not None else None,
            "how": how,
        },
        "failed_inputs": len(read_errors(store_root)),
        "created": store.index.get("created"),
        "updated": store.index.get("updated"),
        "indexes": index_status(store),
    }


def register(app: typer.Typer) -> None:
    store_app = typer.Typer(help="Describe and look after an embedding store.", no_args_is_help=True)
    app.add_typer(store_app, name="store")

    @store_app.command("info")
    def info(
        store: Path = options.store_option(),
        as_json: bool = options.json_option("Print the description as JSON."),
    ) -> None:
        """Describe a store: format version, rows per modality, shards, model, and the package it uses."""
        from retinacli.console import err, out, print_fields, print_json, safe
        from retinacli.store import store_path_and_origin

        store_root, origin = store_path_and_origin(store, "--store")
        err.print(f"store: {safe(store_root)} ({origin})", highlight=False)
        summary = store_summary(store_root)
        if as_json:
            print_json(summary)
            return
        package = summary["package"]
        recorded = package["recorded"]
        lines = [
            ("store", summary["path"]),
            ("format version", str(summary["format_version"])),
            ("rows", f"{summary['rows']} ("
             + (", ".join(f"{m} {n}" for m, n in summary["rows_per_modality"].items()) or "empty") + ")"),
            ("shards", str(summary["shards"])),
            ("model", summary["model_id"]),
            ("embed dim", str(summary["embed_dim"])),
            ("recorded package", recorded["path"] if recorded else "none (store format 1, or none given)"),
            ("package", f"{package['path']} ({package['how']})" if package["found"]
             else f"not found: {package['how']}"),
            ("failed inputs", str(summary["failed_inputs"])),
            ("created", summary["created"] or "-"),
            ("updated", summary["updated"] or "-"),
            *_index_lines(summary["indexes"]),
        ]
        print_fields(out, [(f"{key}:", value) for key, value in lines])  # wrapped to the terminal


    @store_app.command("index")
    def index(
        store: Path = options.store_option(),
        backend: str | None = typer.Option(
            None, "--backend",
            help="lancedb (embedded, files in STORE/ann/lancedb; extra retina\\[lancedb]), faiss (one local "
            "IVF file per modality; retina\\[faiss]) or qdrant (a Qdrant server with --url, else its local "
            "mode in STORE/ann/qdrant; retina\\[qdrant]). Default: the index the store uses now, else "
            "lancedb when installed, else faiss.",
        ),
        url: str | None = typer.Option(
            None, "--url", metavar="URL",
            help="qdrant only: the server, e.g. http://qdrant.example:6333 (its API key from the "
            "QDRANT_API_KEY environment variable). Without it qdrant runs in local mode (small stores, "
            "tests).",
        ),
        as_json: bool = options.json_option("Print the modalities indexed as JSON."),
    ) -> None:
        """Build or update a search index of the store (one per modality) and make it the one 'retina
        retrieve' uses.

        An update is incremental: rows of shards committed since are added, rows of shards the store no
        longer holds (store remove / prune / repair) deleted. Queries never build an index: 'retrieve
        --search ann' refuses to run without a current one and 'retrieve --search auto' then searches
        exactly, with a note. 'retina embed' keeps the index up to date and builds one from 200,000
        vectors. The store's npy + parquet shards stay the source of truth (docs/store.md).
        """
        from retinacli.console import err, out, print_json, safe
        from retinacli.errors import UsageError
        from retinacli.store import EmbeddingStore, _Lock, store_path_and_origin
        from retinacli.vector_index import (
            BACKEND_NAMES,
            active_backend,
            default_backend,
            get_backend,
            update_indexes,
        )

        store_root, origin = store_path_and_origin(store, "--store")
        err.print(f"store: {safe(store_root)} ({origin})", highlight=False)
        # Clear errors for a missing store, a bad option or a missing extra before taking the lock.
        opened = EmbeddingStore.open(store_root)
        if backend is not None and backend not in BACKEND_NAMES:
            raise UsageError(f"--backend must be one of {', '.join(BACKEND_NAMES)}, not {backend!r}")
        chosen = backend or active_backend(opened) or default_backend()
        if chosen is None:
            get_backend("lancedb")  # the one-line MissingExtraError naming retina[lancedb]
        if url is not None and chosen != "qdrant":
            raise UsageError(f"--url names a Qdrant server: use it with --backend qdrant, not {chosen}")
        get_backend(chosen)
        lock = _Lock(store_root)
        lock.acquire()  # one writer at a time: embed also updates the index
        try:
            built = update_indexes(EmbeddingStore.open(store_root), chosen, url=url,
                                   log=lambda message: err.print(safe(message), highlight=False))
        finally:
            lock.release()
        if as_json:
            print_json({"store": str(store_root), "backend": chosen, "indexed": built})
            return
        if not built:
            out.print("nothing to index: the store holds no vectors", highlight=False)
        for modality, vectors in built.items():
            out.print(f"{modality}: {vectors} vectors indexed ({chosen})", highlight=False)

    @store_app.command("verify")
    def verify(
        store: Path = options.store_option(),
        as_json: bool = options.json_option("Print the problems as JSON."),
    ) -> None:
        """Check every file of a store: store.json, each shard's vectors and metadata (every row is
        read), secret.key, the search indexes and stray temp files. Exit 0 when healthy, 5 when damaged.
        """
        from retinacli.console import out, print_json, safe
        from retinacli.errors import EXIT_STORE_DAMAGED
        from retinacli.storecheck import verify as verify_store

        store_root = _existing_store_root(store)
        report = verify_store(store_root)
        if as_json:
            print_json(report)
        else:
            for problem in report["problems"]:
                kind = "damaged" if problem["damaged"] else "note"
                out.print(safe(f"{kind}: {problem['where']}: {problem['problem']}"), highlight=False,
                          soft_wrap=True)
            shards = report["shards"]
            if report["shards_ok"] is None:
                summary = "store.json unusable (restore it from a backup; repair cannot rebuild it)"
            else:
                summary = f"{report['shards_ok']} of {shards} shards intact" + (
                    "" if report["healthy"] else " (retina store repair drops the damaged shards)")
            out.print(f"{'healthy' if report['healthy'] else 'damaged'}: {summary}", highlight=False)
        if not report["healthy"]:
            raise typer.Exit(EXIT_STORE_DAMAGED)

    @store_app.command("repair")
    def repair(
        store: Path = options.store_option(),
        as_json: bool = options.json_option("Print what was dropped and removed as JSON."),
    ) -> None:
        """Drop the damaged shards of a store from store.json (their files move to STORE/damaged/, so
        their sources are embedded again by the next 'retina embed') and their rows from the search
        indexes; remove stray temp files. Never drops an intact shard; takes the store's lock like embed.
        Exit 0 when the store is healthy afterwards, 5 when it is not (e.g. store.json itself is broken).
        """
        from retinacli.console import out, print_json, safe
        from retinacli.errors import EXIT_STORE_DAMAGED
        from retinacli.storecheck import repair as repair_store

        store_root = _existing_store_root(store)
        report = repair_store(store_root)
        if as_json:
            print_json(report)
        else:
            for shard in report["dropped"]:
                out.print(safe(f"dropped shard {shard['index']} ({shard['rows']} rows): "
                               + "; ".join(shard["problems"])), highlight=False, soft_wrap=True)
            for path in report["moved"]:
                out.print(safe(f"moved {path}"), highlight=False, soft_wrap=True)
            for path in report["removed"]:
                out.print(safe(f"removed {path}"), highlight=False, soft_wrap=True)
            for problem in report["problems"]:
                if problem["damaged"]:
                    out.print(safe(f"still damaged: {problem['where']}: {problem['problem']}"),
                              highlight=False, soft_wrap=True)
            out.print(("nothing to repair" if not report["changed"] else "repaired")
                      + f": {report['rows']} rows kept", highlight=False)
        if not report["healthy"]:
            raise typer.Exit(EXIT_STORE_DAMAGED)

    @store_app.command("remove")
    def remove(
        patient: str = typer.Option(..., "--patient", help="The patient's pseudonym (the store's `patient` "
                                    "column; the raw patient ID is also matched, through the store's key).",
                                    show_default=False),
        store: Path = options.store_option(),
        dry_run: bool = typer.Option(False, "--dry-run", help="List the rows that would go; change nothing."),
        as_json: bool = options.json_option("Print what was (or would be) removed as JSON."),
    ) -> None:
        """Remove every row of one patient (consent withdrawn): the shards holding them are rewritten
        without them, then store.json is replaced (a crash leaves the old store intact); their lines in
        errors.csv go too, and every search index is updated so that it no longer holds them (a local
        one whose extra is missing is deleted). Takes the store's lock. Exit 1 and nothing changed when
        no row names the patient.
        """
        from retinacli.privacy import SecretKeyError, load_secret
        from retinacli.storeedit import patient_selector, rewrite

        store_root = _existing_store_root(store)
        try:
            secret: bytes | None = load_secret(store_root)
        except SecretKeyError:
            secret = None  # the pseudonym still matches; a raw ID cannot be hashed without the key
        select, tokens = patient_selector(patient, secret)
        summary = rewrite(store_root, lambda _store: select, dry_run=dry_run, errors_token=tokens,
                          log=_log, none_message=f"{store_root}: no rows for this patient; nothing changed")
        _print_removal(summary, as_json, [])

    @store_app.command("prune")
    def prune(
        store: Path = options.store_option(),
        dry_run: bool = typer.Option(False, "--dry-run", help="List the rows that would go; change nothing."),
        as_json: bool = options.json_option("Print what was (or would be) removed as JSON."),
    ) -> None:
        """Remove the rows whose source file changed (size or mtime) or vanished, found by scanning each
        root the store records as 'retina embed' does; 'retina embed' then adds changed files again.
        Rewrites shards and store.json atomically and updates (or deletes) the search indexes, under
        the store's lock. A root that is missing or holds no readable file (an unmounted drive looks so)
        keeps its rows, with a note.
        """
        from retinacli.privacy import load_secret
        from retinacli.storeedit import prune_selector, rewrite

        store_root = _existing_store_root(store)
        notes: list[str] = []
        summary = rewrite(store_root, lambda opened: prune_selector(opened, load_secret(store_root), notes),
                          dry_run=dry_run, log=_log)
        _print_removal(summary, as_json, notes)


def _index_lines(indexes: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """`store info`'s lines for the search indexes: backend, modality, vectors, current or why not."""
    if not indexes:
        return [("indexes", "none (exact search; 'retina store index' builds one)")]
    lines = []
    for entry in indexes:
        where = f" at {entry['url']}" if entry.get("url") else ""
        state = "current" if entry["current"] else f"stale: {entry['why']}"
        count = f"{entry['vectors']} vectors, " if entry["vectors"] is not None else ""
        used = ", used by retrieve" if entry["active"] and entry["current"] else ""
        lines.append((f"index {entry['backend']} {entry['modality']}", f"{count}{state}{where}{used}"))
    return lines


def _log(message: str) -> None:
    from retinacli.console import err

    err.print(message, highlight=False)


def _print_removal(summary: dict[str, Any], as_json: bool, notes: list[str]) -> None:
    """`remove` / `prune` output: each row that went (id, path, why), then a one-line summary."""
    from retinacli.console import err, out, print_json, safe

    summary["notes"] = notes
    if as_json:
        print_json(summary)
        return
    for note in notes:
        err.print(safe(f"note: {note}"), highlight=False, soft_wrap=True)
    verb = "would remove" if summary["dry_run"] else "removed"
    for row in summary["removed"]:
        where = f"{row['root']}:{row['path']}" if row["root"] else (row["path"] or "-")
        out.print(safe(f"{verb} {row['id']} {where} ({row['reason']})"), highlight=False, soft_wrap=True)
    index = {"dropped": "; search indexes dropped ('retina store index' rebuilds them)",
             "updated": "; search indexes updated", "stale": "; a search index could not be updated (see the "
             "warning)", "none": ""}[summary["index"]]
    shards = len(summary["shards_rewritten"]) + len(summary["shards_dropped"])
    errors = f", {summary['errors_rows_removed']} errors.csv lines" if summary["errors_rows_removed"] else ""
    out.print(f"{verb} {summary['rows_removed']} rows{errors}"
              + ("" if summary["dry_run"] else f" ({shards} shards rewritten{index})")
              + f"; {summary['rows_after']} rows {'would remain' if summary['dry_run'] else 'remain'}",
              highlight=False)
