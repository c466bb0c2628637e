"""`retina retrieve`: the store items most similar to a query image/volume or a stored item."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from retinacli.commands import options

TARGETS = ("oct", "fundus")


def register(app: typer.Typer) -> None:
    @app.command("retrieve")
    def retrieve(
        query: str = typer.Argument(
            ..., help="An OCT volume / fundus image file (embedded on the fly), or an item id in the store."
        ),
        store: Path | None = options.store_option(f"Embedding store to search. {options.STORE_DEFAULT_HELP}"),
        index: Path | None = options.hidden_alias("--index", "-i"),
        top: int = typer.Option(10, "--top", "-k", min=1, help="Number of results."),
        model: str | None = options.model_option(
            "Model package for embedding a query file; must be the store's model. "
            "Default: the known package whose id is the store's model id.",
        ),
        target: str | None = typer.Option(
            None, "--target",
            help="Modality to search: oct or fundus. Default: the other modality than the query's."
        ),
        laterality: str | None = typer.Option(
            None, "--laterality", help="Only results of this eye: OD or OS."
        ),
        search_method: str = typer.Option(
            "auto", "--search",
            help="exact (scan every vector), ann (approximate index in STORE/ann, extra 'retina\\[faiss]'; "
            "built by 'retina store index' or 'retina embed', never by a query: refused when missing or out "
            "of date) or auto (ann from 200,000 stored vectors when faiss is installed and the index is "
            "current, else exact with a note).",
        ),
        json_output: bool = options.json_option("Print the query and results as JSON."),
        redact_paths: bool = options.redact_paths_option(
            "Print every path with each component replaced by a pseudonym keyed with the store's key (for "
            "outputs that leave the site). Without it, paths are shown as stored: relative to the root "
            "given to 'retina embed', components naming the patient replaced."
        ),
        max_pixels: str | None = options.max_pixels_option(),
    ) -> None:
        """Search the store by cosine similarity (fundus query -> OCT results and the reverse)."""
        from retinacli.console import err, print_json
        from retinacli.errors import EXIT_OK, UsageError

        store = options.resolve_store(store, index, "--index")
        if target is not None and target not in TARGETS:
            raise UsageError(f"--target must be oct or fundus, not {target!r}")
        if laterality is not None:
            laterality = laterality.upper()
            if laterality not in ("OD", "OS"):
                raise UsageError(f"--laterality must be OD or OS, not {laterality!r}")
        payload = _retrieve(query, store, top, model, target, laterality, search_method, redact_paths)
        if not payload["results"]:
            err.print(f"no {payload['target']} items in the store match the filters", highlight=False)
        if json_output:
            print_json(payload)
        else:
            _print_table(payload)
        raise typer.Exit(EXIT_OK)


def _retrieve(query: str, index: Path | None, top: int, model: str | None, target: str | None,
              laterality: str | None, search_method: str = "exact", redact_paths: bool = False
              ) -> dict[str, Any]:
    from retinacli.ann import resolve_method, search_plan
    from retinacli.console import err, safe
    from retinacli.errors import UsageError
    from retinacli.retrieval import OTHER_MODALITY, search
    from retinacli.store import EmbeddingStore, store_path_and_origin

    store_root, origin = store_path_and_origin(index)
    err.print(f"store: {safe(store_root)} ({origin})", highlight=False)
    store = EmbeddingStore.open(store_root)
    resolve_method(store, search_method)  # a bad --search fails before the query is embedded
    err.print(f"model: {safe(store.model_id)} (the store's)", highlight=False)
    from retinacli.privacy import existing_secret
    from retinacli.redaction import stored_path

    key = existing_secret(store.root)  # never created here: retrieve does not write into the store
    query_path = Path(query).expanduser()
    if query_path.exists():
        vector, info = _embed_query(store, query_path, model, target, redact_paths, key)
    else:
        found = store.find(query)
        if found is None:
            raise UsageError(f"{query}: not a file, and no item with this id in {store_root}")
        if model is not None:
            from retinacli.pipeline import load_engine

            engine = load_engine(model)[0]
            store.require_model(engine.model_id, *getattr(engine, "model_ids", ()))
        vector, row = found
        info = {k: row.get(k) for k in ("id", "root", "path", "modality", "laterality", "date", "ood_score",
                                        "ood")}
        info["path"] = stored_path(row, key, redact_paths)
    target = target or OTHER_MODALITY[info["modality"]]
    method, note = search_plan(store, search_method, target)  # reads the index, never builds it
    if note:
        err.print(safe(note), highlight=False)
    err.print(f"searching {target} items, top {top}, {method} search"
              + (f", laterality {laterality}" if laterality else ""), highlight=False)
    hits = search(store, vector, target=target, laterality=laterality, top_k=top, method=method,
                  log=lambda message: err.print(safe(message), highlight=False))
    return {
        "query": info,
        "model": store.model_id,
        "store": str(store_root),
        "target": target,
        "search": method,
        "results": [{**hit.to_dict(), "root": hit.row.get("root"),
                     "path": stored_path(hit.row, key, redact_paths)} for hit in hits],
    }


def _embed_query(store: Any, path: Path, model: str | None, target: str | None,
                 redact_paths: bool = False, secret: bytes | None = None) -> tuple[Any, dict]:
    """Read and embed the query file with the store's model; its id is the one it has (or would
    have) in the store. Its path is shown relative to the folder holding it (retinacli.redaction)."""
    from retinacli.errors import ReadError, RetinaError
    from retinacli.pipeline import (
        discover_with_readers,
        engine_for_store,
        item_id,
        item_identity,
        read_with_readers,
        source_identity,
    )
    from retinacli.readers.sanitize import date_of
    from retinacli.redaction import PathRedactor

    engine, _package = engine_for_store(store, model)
    shown = PathRedactor.for_paths([path], secret, redact_all=redact_paths)
    sources, errors = discover_with_readers([path])
    if len(sources) != 1:
        if errors:
            raise ReadError(shown.show(errors[0].path, probe=True), errors[0].reason)
        found = f"{len(sources)} images/volumes" if sources else "no OCT volume or fundus image"
        raise RetinaError(f"{shown.show(path)}: the query must be one image or volume; found {found}")
    try:
        read = list(read_with_readers(sources[0], None))
    except ReadError as exc:
        read = [exc]
    items = [x for x in read if not isinstance(x, ReadError)]
    if not items:
        if read:
            raise ReadError(shown.show(read[0].path, probe=True), read[0].reason)
        raise RetinaError(f"{shown.show(path)}: no OCT volume or fundus image found")
    # A source holding both modalities (a Heidelberg .vol) queries with the one not searched.
    chosen = next((i for i in items if target is None or i.modality != target), items[0])
    array = engine.preprocess(chosen)[None]
    vector = engine.embed(chosen.modality, array)[0]
    ood = getattr(engine, "ood", None)
    if ood is None:
        from retinacli.ood import say_no_check

        say_no_check(engine)
        check = {"ood_score": None, "ood": None}
    else:
        verdicts = ood.check(chosen.modality, vector[None], array)  # embedding and input checks
        verdict = verdicts[0] if verdicts else None  # None: no reference for this modality
        check = verdict.fields if verdict is not None else {"ood_score": None, "ood": None}
        if verdict is not None and verdict.flag:
            from retinacli.console import err, safe, styled

            err.print(styled(("warning:", "yellow"), " the query is " + safe(ood.reason(
                chosen.modality, verdict.score, engine.model_id, verdict)) + "; the results may mean little"),
                highlight=False)
    if secret is None:
        from retinacli.console import err, safe

        err.print(f"note: {safe(store.root)} has no secret.key, so the query's id cannot be computed "
                  "(shown as none)", highlight=False)
    identity = item_identity(chosen, source_identity(sources[0]), items.index(chosen), len(items))
    meta = chosen.meta
    info = {
        "id": item_id(identity, secret) if secret is not None else None,
        "path": shown.show(chosen.path, chosen.meta),
        "modality": chosen.modality,
        "laterality": meta.laterality,
        "date": date_of(meta.study_date, meta.acquisition_datetime),
        **check,
    }
    return vector, info


def _print_table(payload: dict[str, Any]) -> None:
    from rich.table import Table

    from retinacli.console import out, safe
    from retinacli.retrieval import display_path

    q = payload["query"]
    # Name the query as the user gave it; show only the metadata it has (a PNG has no eye or date).
    known = ", ".join(str(v) for v in (q.get("modality"), q.get("laterality"), q.get("date")) if v)
    if q.get("ood"):
        known += f", OUT OF DISTRIBUTION: score {q['ood_score']:.3f}"
    name = display_path(q["path"]) if q.get("path") else q.get("id")
    table = Table(title=safe(f"{payload['target']} items nearest to {name} ({known})"), title_justify="left")
    for column in ("rank", "score", "id", "source", "laterality", "date", "ood"):
        # Paths wrap rather than being cut: the source is what the user opens next.
        table.add_column(column, justify="right" if column in ("rank", "score") else "left",
                         overflow="fold", no_wrap=column != "source")
    for r in payload["results"]:
        table.add_row(*map(safe, (r["rank"], f"{r['score']:.4f}", r["id"] or "", display_path(r["path"]),
                                  r["laterality"] or "", r["date"] or "", _ood_cell(r))))
    out.print(table)


def _ood_cell(record: dict[str, Any]) -> str:
    """The ood column: "yes (0.412)" when flagged, "no" when checked, empty without a check."""
    if record.get("ood") is None:
        return ""
    return f"yes ({record['ood_score']:.3f})" if record["ood"] else "no"
