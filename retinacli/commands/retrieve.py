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
        queries: list[str] | None = typer.Argument(
            None, metavar="QUERY",
            help="OCT volume / fundus image files (embedded on the fly) or item ids in the store; several "
            "are searched in turn with the store and model opened once.",
        ),
        queries_file: Path | None = typer.Option(
            None, "--queries",
            help="A text file of more queries, one file path or item id a line (blank lines and lines "
            "starting with # skipped; relative paths are relative to the file's folder).",
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
        patient: str | None = typer.Option(
            None, "--patient", metavar="PSEUDONYM",
            help="Only results of this patient: the store's pseudonymous `patient` column (a raw patient ID "
            "is also matched, through the store's key, and never printed).",
        ),
        date_from: str | None = typer.Option(
            None, "--date-from", metavar="YYYY-MM-DD",
            help="Only results with a study date on or after this day (rows without a date are left out).",
        ),
        date_to: str | None = typer.Option(
            None, "--date-to", metavar="YYYY-MM-DD",
            help="Only results with a study date on or before this day (rows without a date are left out).",
        ),
        search_method: str = typer.Option(
            "auto", "--search",
            help="exact (scan every vector), ann (the index 'retina store index' built, in STORE/ann; "
            "refused when missing or out of date) or auto (that index when it is current, else exact with "
            "a note). Filters apply before the top results are chosen, on every search.",
        ),
        json_output: bool = options.json_option("Print the query and results as JSON."),
        csv_output: bool = typer.Option(
            False, "--csv", help="Print one CSV row per query and rank (columns in docs/store.md)."
        ),
        redact_paths: bool = options.redact_paths_option(
            "Print every path with each component replaced by a pseudonym keyed with the store's key (for "
            "outputs that leave the site). Without it, paths are shown as stored: relative to the root "
            "given to 'retina embed', components naming the patient replaced."
        ),
        max_pixels: str | None = options.max_pixels_option(),
        device: str = options.device_option(
            options.DEVICE_HELP.replace("the encoders run", "a query file is embedded")),
        html_report: Path | None = typer.Option(
            None, "--html", metavar="FILE",
            help="Also write a self-contained HTML report to FILE: each query beside its results (OCT: "
            "central B-scan and en-face thumbnails), score, rank, eye, date and a same-eye marker; a file "
            "that cannot be shown gets a placeholder with the reason.",
        ),
    ) -> None:
        """Search the store by cosine similarity (fundus query -> OCT results and the reverse).

        A query that cannot be read or found is listed with the reason and the others still run: exit 0
        when at least one query was answered, 1 when none."""
        from retinacli.console import err, print_json
        from retinacli.errors import EXIT_NOTHING_DONE, EXIT_OK, UsageError

        store = options.resolve_store(store, index, "--index")
        if json_output and csv_output:
            raise UsageError("--json and --csv cannot be combined: choose one output format")
        given = list(queries or [])
        if queries_file is not None:
            given += _read_queries_file(queries_file)
        if not given:
            raise UsageError("no query: give QUERY files or item ids, or --queries FILE")
        if html_report is not None:
            from retinacli.reports.html import check_report_path

            check_report_path(html_report)  # before any query is embedded
        if target is not None and target not in TARGETS:
            raise UsageError(f"--target must be oct or fundus, not {target!r}")
        if laterality is not None:
            laterality = laterality.upper()
            if laterality not in ("OD", "OS"):
                raise UsageError(f"--laterality must be OD or OS, not {laterality!r}")
        where = _filter(laterality, patient, date_from, date_to)
        # One query argument keeps the single-query shape and fails as a whole; a batch lists failures.
        single = len(given) == 1 and queries_file is None
        payload = _retrieve_many(given, store, top, model, target, laterality, search_method, redact_paths,
                                 stop_on_error=single, device=device, where=where)
        for answer in payload["queries"]:
            if not answer["results"]:
                err.print(f"no {answer['target']} items in the store match the filters", highlight=False)
        if payload["errors"]:
            from retinacli.console import safe, styled

            err.print(styled(("failed:", "red"), f" {len(payload['errors'])} of {len(given)} queries"),
                      highlight=False)
            for entry in payload["errors"]:
                err.print(safe(f"  {entry['error']}"), highlight=False)
        if html_report is not None:
            _write_html(html_report, payload, redact_paths)
        if csv_output:
            _print_csv(payload)
        elif json_output:
            print_json(_single_payload(payload) if single else _batch_json(payload))
        else:
            for answer in payload["queries"]:
                _print_table({**payload, **answer})
        raise typer.Exit(EXIT_OK if payload["queries"] else EXIT_NOTHING_DONE)


def _filter(laterality: str | None, patient: str | None, date_from: str | None, date_to: str | None):
    """The metadata filter of the options (retinacli.vector_index.filters.Filter); a bad date is a
    usage error naming the option."""
    from datetime import date

    from retinacli.errors import UsageError
    from retinacli.vector_index.filters import Filter

    days: dict[str, int | None] = {}
    for option, value in (("--date-from", date_from), ("--date-to", date_to)):
        if value is None:
            days[option] = None
            continue
        try:
            days[option] = int(date.fromisoformat(value.strip()).strftime("%Y%m%d"))
        except ValueError:
            raise UsageError(f"{option} must be a date as YYYY-MM-DD, not {value!r}") from None
    if days["--date-from"] and days["--date-to"] and days["--date-from"] > days["--date-to"]:
        raise UsageError(f"--date-from {date_from} is after --date-to {date_to}: no row can match")
    if patient is not None and not patient.strip():
        raise UsageError("--patient needs a pseudonym (the store's `patient` column)")
    return Filter(laterality=laterality, patient=patient.strip() if patient else None,
                  date_from=days["--date-from"], date_to=days["--date-to"])


def _write_html(path: Path, payload: dict[str, Any], redact_paths: bool) -> None:
    """The --html report; each answered query's file is the query as given (None for a stored id, which
    the report locates in the store)."""
    from retinacli.console import err, safe
    from retinacli.reports.html import retrieval_report, write_report

    files: list[Path | None] = []
    for answer in payload["queries"]:
        source = Path(answer["given"]).expanduser()
        files.append(source if source.exists() else None)
    written = write_report(path, retrieval_report(payload, query_files=files))
    err.print(f"wrote report: {safe(written)}", highlight=False)


def _read_queries_file(path: Path) -> list[str]:
    """The queries listed in `path`: one a line, blank and # lines skipped, relative paths resolved
    against the file's folder (a line naming no file there and holding no / or . is an item id)."""
    from retinacli.errors import UsageError

    try:
        text = path.expanduser().read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the --queries file ({exc.strerror or type(exc).__name__})") \
            from None
    found = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        candidate = Path(line).expanduser()
        if not candidate.is_absolute():
            candidate = path.expanduser().parent / candidate
        # A line that names no file there and looks like no file name ("/" or ".") is an item id.
        found.append(str(candidate) if candidate.exists() or "/" in line or "." in line else line)
    return found


def _batch_json(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch JSON shape: {"model", "store", "search", "queries": [{"query", "target", "results"}],
    "errors": [{"query", "error"}]}."""
    queries = [{k: answer[k] for k in ("query", "target", "results")} for answer in batch["queries"]]
    return {**batch, "queries": queries}


def _single_payload(batch: dict[str, Any]) -> dict[str, Any]:
    """The one-query JSON shape: {"query", "model", "store", "target", "search", "results"}."""
    answer = batch["queries"][0]
    return {"query": answer["query"], "model": batch["model"], "store": batch["store"],
            "target": answer["target"], "search": batch["search"], "results": answer["results"]}


def _retrieve_many(queries: list[str], index: Path | None, top: int, model: str | None, target: str | None,
                   laterality: str | None, search_method: str = "exact", redact_paths: bool = False,
                   stop_on_error: bool = False, device: str = "auto", where: Any = None) -> dict[str, Any]:
    """Search the store for each query in turn, the store and model opened once.

    Returns {"model", "store", "search", "queries": [{"query", "target", "results"}], "errors":
    [{"query", "error"}]}; a query that cannot be read or found is an error entry (raised instead with
    `stop_on_error`). Errors of the whole command (store, model, index) are raised."""
    from retinacli.console import err, safe
    from retinacli.errors import RetinaError
    from retinacli.privacy import existing_secret
    from retinacli.redaction import stored_path
    from retinacli.retrieval import OTHER_MODALITY, same_eye, search
    from retinacli.store import EmbeddingStore, store_path_and_origin
    from retinacli.vector_index import SEARCH_METHODS, active_backend, open_searcher, search_plan

    store_root, origin = store_path_and_origin(index)
    err.print(f"store: {safe(store_root)} ({origin})", highlight=False)
    store = EmbeddingStore.open(store_root)
    if search_method not in SEARCH_METHODS:  # a bad --search fails before the query is embedded
        from retinacli.errors import UsageError

        raise UsageError(f"unknown search method {search_method!r} (use auto, exact or ann)")
    err.print(f"model: {safe(store.model_id)} (the store's)", highlight=False)
    key = existing_secret(store.root)  # never created here: retrieve does not write into the store
    where = _patient_pseudonym(where, key)
    engine = _engine(store, model, [Path(q).expanduser() for q in queries], device)
    plans: dict[str, str] = {}  # target -> search method, planned once per target
    searchers: dict[str, Any] = {}  # target -> its index opened once for every query
    said: set[str] = set()  # notes printed once per command, not once per query
    answers: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    try:
        for query in queries:
            try:
                vector, info, patient = _resolve_query(store, engine, query, target, redact_paths, key, said)
            except Exception as exc:
                if stop_on_error:
                    raise
                # A reader bug must not stop the batch; its message may quote header values, so not shown.
                label = _query_label(query, key, redact_paths)
                reason = str(exc) if isinstance(exc, RetinaError) else \
                    f"{label}: could not be read ({type(exc).__name__})"
                errors.append({"query": label, "error": reason})
                continue
            _say_engine(engine, said)
            wanted = target or OTHER_MODALITY[info["modality"]]
            if wanted not in plans:
                plans[wanted], note = search_plan(store, search_method, wanted)  # reads the index only
                if note:
                    err.print(safe(note), highlight=False)
                how = "exact search"
                if plans[wanted] == "ann":
                    searchers[wanted] = open_searcher(store, wanted)
                    how = f"ann search ({active_backend(store)} index)"
                err.print(f"searching {wanted} items, top {top}, {how}" + _filter_words(laterality, where),
                          highlight=False)
            hits = search(store, vector, target=wanted, laterality=laterality, top_k=top,
                          method=plans[wanted], where=where, searcher=searchers.get(wanted))
            # label: the query as outputs name it (the CSV's query column); given: as typed (the report opens
            # it). Neither is part of the JSON.
            answers.append({"label": _query_label(query, key, redact_paths), "given": query, "query": info,
                            "target": wanted,
                            "results": [
                {**hit.to_dict(), "same_eye": same_eye(patient, info.get("laterality"), hit.row),
                 "root": hit.row.get("root"), "path": stored_path(hit.row, key, redact_paths)}
                for hit in hits]})
    finally:
        for opened in searchers.values():  # a local Qdrant allows one client: let the next one in
            getattr(opened, "close", lambda: None)()
    return {
        "model": store.model_id,
        "store": str(store_root),
        "search": ", ".join(dict.fromkeys(plans.values()))
        or ("exact" if search_method == "auto" else search_method),
        "queries": answers,
        "errors": errors,
    }


def _patient_pseudonym(where: Any, key: bytes | None) -> Any:
    """A --patient given as the raw patient ID (not a pseudonym) matched through the store's key, as
    'retina store remove --patient' does; the raw value is never printed."""
    import re
    from dataclasses import replace

    from retinacli.privacy import pseudonym

    if where is None or not where.patient or key is None or re.fullmatch(r"p[0-9a-f]{12}", where.patient):
        return where
    return replace(where, patient=pseudonym(where.patient, key, prefix="p"))


def _filter_words(laterality: str | None, where: Any) -> str:
    """The filters as the `searching ...` line names them (the patient pseudonym is the store's own)."""
    words = [f"laterality {laterality}"] if laterality else []
    if where is not None and where.patient:
        words.append(f"patient {where.patient}")
    if where is not None and (where.date_from or where.date_to):
        day = [f"{d // 10000:04d}-{d // 100 % 100:02d}-{d % 100:02d}" if d else "" for d in
               (where.date_from, where.date_to)]
        words.append(f"dates {day[0] or '...'} to {day[1] or '...'}")
    return "".join(f", {w}" for w in words)


def _say_engine(engine: Any, said: set[str]) -> None:
    """`engine: ...` on stderr once per encoder built for a query file: the providers really used."""
    from retinacli.console import err, safe
    from retinacli.engine import engine_line

    built = [m for m in (engine.providers_used() if hasattr(engine, "providers_used") else {})
             if f"engine {m}" not in said]
    if built:
        said.update(f"engine {m}" for m in built)
        err.print(f"engine: {safe(engine_line(engine, built))}", highlight=False)


def _engine(store: Any, model: str | None, paths: list[Path], device: str = "auto") -> Any:
    """The store's engine, loaded once when a query is a file (or --model is to be checked); None when
    every query is a stored id and no --model is given (stored vectors need no model)."""
    from retinacli.pipeline import engine_for_store, load_engine

    if any(p.exists() for p in paths):
        return engine_for_store(store, model, device=device)[0]
    if model is None:
        return None
    engine = load_engine(model, "auto", "auto", device)[0]
    store.require_model(engine.model_id, *getattr(engine, "model_ids", ()))
    return engine


def _resolve_query(store: Any, engine: Any, query: str, target: str | None, redact_paths: bool,
                   key: bytes | None, said: set[str]) -> tuple[Any, dict[str, Any], str | None]:
    """(vector, the query's output record, its patient pseudonym or None) for a file or a stored id."""
    from retinacli.errors import UsageError
    from retinacli.redaction import stored_path

    query_path = Path(query).expanduser()
    if query_path.exists():
        return _embed_query(store, query_path, engine, target, redact_paths, key, said)
    found = store.find(query)
    if found is None:
        label = _query_label(query, key, redact_paths)
        if "/" in query or "." in query:  # meant as a file: an item id has neither
            raise UsageError(f"{label}: no such file (nor an item id in {store.root})")
        raise UsageError(f"{label}: not a file, and no item with this id in {store.root}")
    vector, row = found
    info = {k: row.get(k) for k in ("id", "root", "path", "modality", "laterality", "date", "ood_score",
                                    "ood")}
    info["path"] = stored_path(row, key, redact_paths)
    return vector, info, row.get("patient")


def _query_label(query: str, key: bytes | None, redact_paths: bool) -> str:
    """A query as outputs name it: an item id as given, a path relative to its folder (components
    naming a patient, or every one with --redact-paths, replaced), like the query file's own path."""
    import re

    from retinacli.redaction import PathRedactor

    if re.fullmatch(r"i[0-9a-f]{16}", query):
        return query
    path = Path(query).expanduser()
    return PathRedactor.for_paths([path], key, redact_all=redact_paths).show(path, probe=path.exists())


def _embed_query(store: Any, path: Path, engine: Any, target: str | None, redact_paths: bool = False,
                 secret: bytes | None = None, said: set[str] | None = None) -> tuple[Any, dict, str | None]:
    """Read and embed the query file with the store's engine; its id and patient pseudonym are the
    ones it has (or would have) in the store. Its path is shown relative to the folder holding it
    (retinacli.redaction). `said`: the once-per-command notes already printed (a batch has many queries)."""
    from retinacli.errors import ReadError, RetinaError
    from retinacli.pipeline import (
        discover_with_readers,
        item_id,
        item_identity,
        patient_pseudonym,
        read_with_readers,
        source_identity,
    )
    from retinacli.readers.sanitize import date_of
    from retinacli.redaction import PathRedactor

    said = said if said is not None else set()
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

        if "no check" not in said:
            say_no_check(engine)
        said.add("no check")
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
    if secret is None and "no key" not in said:
        from retinacli.console import err, safe

        said.add("no key")
        err.print(f"note: {safe(store.root)} has no secret.key, so the query's id cannot be computed "
                  "(shown as none; same_eye unknown)", highlight=False)
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
    return vector, info, patient_pseudonym(meta, secret) if secret is not None else None


def _print_table(payload: dict[str, Any]) -> None:
    from retinacli.console import middle_truncate, out, print_table
    from retinacli.retrieval import display_path

    q = payload["query"]
    # Name the query as the user gave it; show only the metadata it has (a PNG has no eye or date).
    known = ", ".join(str(v) for v in (q.get("modality"), q.get("laterality"), q.get("date")) if v)
    if q.get("ood"):
        known += f", OUT OF DISTRIBUTION: score {q['ood_score']:.3f}"
    name = display_path(q["path"]) if q.get("path") else q.get("id")
    # Paths too long for the terminal are cut in the middle (file name kept); --json/--csv keep them whole.
    name = middle_truncate(name, max(20, out.width // 2))
    columns = [("rank", "short", "right"), ("score", "short", "right"), ("id", "short"), ("source", "path"),
               ("laterality", "short"), ("date", "short"), ("same eye", "short"), ("ood", "short")]
    rows = [[r["rank"], f"{r['score']:.4f}", r["id"] or "", display_path(r["path"]), r["laterality"] or "",
             r["date"] or "", _same_eye_cell(r), _ood_cell(r)] for r in payload["results"]]
    print_table(out, columns, rows, title=f"{payload['target']} items nearest to {name} ({known})")


def _same_eye_cell(record: dict[str, Any]) -> str:
    """The same-eye column: "yes" for the query's own eye, "no" for another, empty when unknown."""
    flag = record.get("same_eye")
    return "" if flag is None else "yes" if flag else "no"


CSV_COLUMNS = ["query", "query_id", "query_path", "query_modality", "query_laterality", "rank", "score", "id",
               "path", "modality", "laterality", "date", "same_eye", "ood_score", "ood", "root"]


def _print_csv(payload: dict[str, Any]) -> None:
    """One row per query x rank (docs/store.md); `query` names the query as the error list does."""
    import csv
    import sys

    writer = csv.DictWriter(sys.stdout, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for answer in payload["queries"]:
        q = answer["query"]
        context = {"query": answer["label"], "query_id": q.get("id"), "query_path": q.get("path"),
                   "query_modality": q.get("modality"), "query_laterality": q.get("laterality")}
        for record in answer["results"]:
            writer.writerow({**record, **context})
    sys.stdout.flush()


def _ood_cell(record: dict[str, Any]) -> str:
    """The ood column: "yes (0.412)" when flagged, "no" when checked, empty without a check."""
    if record.get("ood") is None:
        return ""
    return f"yes ({record['ood_score']:.3f})" if record["ood"] else "no"
