"""Self-contained HTML reports of `retina retrieve` and `retina predict` (`--html FILE`).

One file, no scripts, no fonts, no external resources: every image is a PNG data URI and a
Content-Security-Policy forbids loading anything else. The DOM is a contract (the browser tests and
users' scripts read it):

* retrieval: per query ``<section class="query-block" data-query="N">`` with ``<figure class="query">``
  and per result ``<figure class="result" data-rank data-same-eye data-ood>`` holding
  ``<img class="thumb bscan">`` + ``<img class="thumb enface">`` (OCT) or ``<img class="thumb">``
  (fundus), or ``<div class="placeholder" data-reason>`` when the file cannot be shown;
* predictions: ``<section class="head">`` (label meaning, threshold, cross-validated quality,
  reliability, research-use notice) and ``<table class="predictions">`` with one
  ``<tr class="prediction" data-ood data-plausible>`` per item.

Ids and paths are the payload's (pseudonymous, redacted as in the text outputs); every text is escaped.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from retinacli.reports.thumbnails import SMALL_MAX, Locator, Thumb

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
PREDICTION_THUMBS = 200  # rows beyond this get no thumbnail: reading every volume of a big store is slow

CSS = """
:root { color-scheme: light; }
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5rem;
       color: #1d232a; background: #fafbfc; }
h1 { font-size: 1.35rem; margin: 0 0 .3rem; }
h2 { font-size: 1.1rem; margin: 0 0 .6rem; }
.meta, .notice { color: #52606d; font-size: .9rem; }
.notice { border-left: 4px solid #d9822b; padding: .4rem .7rem; background: #fff8ef; margin: .8rem 0; }
section { background: #fff; border: 1px solid #dde3ea; border-radius: 8px; padding: 1rem; margin: 1rem 0; }
.query-block { display: grid; grid-template-columns: minmax(180px, 280px) 1fr; gap: 1rem;
               align-items: start; }
.results { display: grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); gap: .8rem; }
figure { margin: 0; padding: .5rem; border: 1px solid #dde3ea; border-radius: 6px; background: #fff; }
figure.query { border-color: #3b6ea5; background: #f3f7fc; }
figure.result[data-same-eye="true"] { border: 2px solid #1f8a4c; }
figure.result[data-ood="true"], tr.prediction[data-ood="true"] { background: #fff4f2; }
.thumbs { display: flex; gap: .3rem; align-items: flex-start; }
.thumbs > * { flex: 1 1 0; min-width: 0; }
img.thumb { display: block; width: 100%; height: auto; max-height: 240px; object-fit: contain;
            background: #000; border-radius: 3px; }
.placeholder { display: flex; align-items: center; justify-content: center; min-height: 90px; width: 100%;
               padding: .5rem; box-sizing: border-box; background: #eef1f4; color: #52606d;
               border: 1px dashed #9aa5b1; border-radius: 3px; font-size: .85rem; text-align: center; }
figcaption { margin-top: .4rem; font-size: .85rem; }
.rank { font-weight: 600; }
.info { white-space: nowrap; }
.id, .path { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: .78rem;
             word-break: break-all; color: #52606d; }
.badge { display: inline-block; padding: 0 .4rem; border-radius: 9px; font-size: .75rem; font-weight: 600; }
.same-eye { background: #1f8a4c; color: #fff; }
.flag { background: #c23030; color: #fff; }
.ok { background: #e3f4ea; color: #1f6a3c; }
table.predictions { border-collapse: collapse; width: 100%; }
table.predictions th, table.predictions td { border-bottom: 1px solid #dde3ea; padding: .35rem .5rem;
                                             text-align: left; vertical-align: middle; }
table.predictions td.thumb-cell { width: 100px; }
table.predictions td.thumb-cell .placeholder { min-height: 40px; font-size: .7rem; }
dl.head { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; margin: 0; }
dl.head dt { font-weight: 600; }
dl.head dd { margin: 0; }
ul.errors { color: #8a1c1c; }
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _flag(value: Any) -> str:
    """A data attribute's value: true, false or unknown."""
    return "true" if value is True else "false" if value is False else "unknown"


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        "<meta name=\"referrer\" content=\"no-referrer\">\n"
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def _thumbs_html(thumbs: list[Thumb]) -> str:
    parts = []
    for thumb in thumbs:
        if thumb.uri is None:
            reason = thumb.reason or "cannot be shown"
            parts.append(f"<div class=\"placeholder\" data-reason=\"{esc(reason)}\">{esc(reason)}</div>")
        else:
            cls = "thumb" if thumb.kind == "fundus" else f"thumb {thumb.kind}"
            alt = {"bscan": "central B-scan", "enface": "en-face projection"}.get(thumb.kind, "fundus image")
            parts.append(f"<img class=\"{cls}\" src=\"{thumb.uri}\" alt=\"{alt}\">")
    return f"<div class=\"thumbs\">{''.join(parts)}</div>"


def _ood_badge(record: dict[str, Any]) -> str:
    if record.get("ood") is not True:
        return ""
    score = record.get("ood_score")
    text = "out of distribution" + (f" ({score:.3f})" if isinstance(score, int | float) else "")
    return f" <span class=\"badge flag ood\">{esc(text)}</span>"


def _date(value: Any) -> str | None:
    from retinacli.readers.sanitize import iso_date

    return iso_date(value)


def _describe(record: dict[str, Any]) -> str:
    """'OCT · OD · 2024-03-01': the metadata the item has."""
    modality = str(record.get("modality") or "").upper() or None
    bits = [modality, record.get("laterality"), _date(record.get("date"))]
    return " · ".join(esc(b) for b in bits if b)


def _error_text(name: Any, error: Any) -> str:
    """'name: reason', the name once when the reason already starts with it."""
    text = str(error or "")
    if name and not text.startswith(f"{name}:"):
        text = f"{name}: {text}"
    return esc(text)


def _errors_section(title: str, items: str) -> str:
    return f"<section class=\"errors\"><h2>{esc(title)}</h2><ul class=\"errors\">{items}</ul></section>"


def _blocks(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The query blocks of either payload shape (one query, or the batch's "queries")."""
    if "queries" in payload:
        return list(payload.get("queries") or [])
    return [{"query": payload.get("query") or {}, "target": payload.get("target"),
             "results": payload.get("results") or []}]


def _result_figure(result: dict[str, Any], thumbs: list[Thumb]) -> str:
    same = _flag(result.get("same_eye"))
    score = result.get("score")
    score_text = f"{score:.4f}" if isinstance(score, int | float) else "-"
    marker = " <span class=\"badge same-eye\">same eye</span>" if same == "true" else ""
    return (
        f"<figure class=\"result\" data-rank=\"{esc(result.get('rank'))}\" data-same-eye=\"{same}\" "
        f"data-ood=\"{_flag(result.get('ood'))}\">{_thumbs_html(thumbs)}"
        f"<figcaption><span class=\"rank\">#{esc(result.get('rank'))}</span> · score "
        f"<span class=\"score\">{esc(score_text)}</span>{marker}{_ood_badge(result)}<br>"
        f"<span class=\"info\">{_describe(result)}</span><br>"
        f"<span class=\"id\">{esc(result.get('id'))}</span><br>"
        f"<span class=\"path\">{esc(result.get('path'))}</span></figcaption></figure>"
    )


def retrieval_report(payload: dict[str, Any], query_files: list[Path | None] | None = None,
                     locator: Locator | None = None) -> str:
    """The HTML of a `retina retrieve` payload (one query or a batch).

    `query_files`: the query FILE of each block, in order (None for a query given as a store id); a
    block without one is located through the store like a result. `locator`: finds result files
    (default: the payload's store)."""
    locator = locator or Locator.for_store(payload.get("store"))
    blocks = _blocks(payload)
    files = list(query_files or [])
    sections = []
    for n, block in enumerate(blocks):
        query = block.get("query") or {}
        given = files[n] if n < len(files) else None
        query_thumbs = locator.thumbs(query, Path(given) if given is not None else None)
        name = query.get("path") or query.get("id") or f"query {n + 1}"
        results = block.get("results") or []
        figures = "".join(_result_figure(r, locator.thumbs(r)) for r in results)
        if not results:
            figures = (f"<p class=\"meta\">no {esc(block.get('target'))} items in the store match the "
                       "filters</p>")
        sections.append(
            f"<section class=\"query-block\" data-query=\"{n}\">"
            f"<figure class=\"query\">{_thumbs_html(query_thumbs)}<figcaption>"
            f"<strong>Query {n + 1}</strong>{_ood_badge(query)}<br>"
            f"<span class=\"info\">{_describe(query)}</span><br>"
            f"<span class=\"id\">{esc(query.get('id') or 'id: none')}</span><br>"
            f"<span class=\"path\">{esc(name)}</span></figcaption></figure>"
            f"<div><h2>{esc(len(results))} nearest {esc(block.get('target'))} items</h2>"
            f"<div class=\"results\">{figures}</div></div></section>"
        )
    errors = payload.get("errors") or []
    error_html = ""
    if errors:
        items = "".join(f"<li>{_error_text(e.get('query'), e.get('error'))}</li>" for e in errors)
        error_html = _errors_section("Queries that failed", items)
    header = (
        "<header><h1>Retrieval report</h1>"
        f"<p class=\"meta\">model {esc(payload.get('model'))} · store {esc(payload.get('store'))} · "
        f"{esc(payload.get('search'))} cosine search · {len(blocks)} "
        f"{'query' if len(blocks) == 1 else 'queries'}. A green border and \"same eye\" mark a result "
        "from the query's own patient and eye (when both are known).</p></header>"
    )
    notice = ("<p class=\"notice\">For research use only, not for diagnosis or treatment decisions. Ids are "
              "pseudonyms; paths are shown as in the text outputs.</p>")
    return _page("retina retrieve", header + notice + "".join(sections) + error_html)


def _head_html(head: dict[str, Any], task: str | None) -> str:
    from retinacli.headinfo import RESEARCH_USE, quality_text, range_text, reliability_text

    rows: list[tuple[str, str]] = [
        ("task", f"{task} ({head.get('kind') or '?'}, fitted on {head.get('input_modality') or '?'}, "
                 f"applied to {head.get('applied_to') or '?'})"),
        ("label meaning", str(head.get("label_meaning") or "-")),
    ]
    threshold = head.get("threshold")
    if isinstance(threshold, int | float):
        rows.append(("threshold", f"label 1 when probability >= {threshold:.3f}"))
    if head.get("units"):
        rows.append(("units", str(head["units"])))
    rows.append(("cross-validated quality", quality_text({**head, "metrics": {"cv": head.get("cv")}})))
    if head.get("reliable") is not None:
        trust = reliability_text({**head, "metrics": {"cv": head.get("cv")}})
        rows.append(("reliability", trust))
    if head.get("kind") == "regression":
        rng = range_text(head)
        rows.append(("plausible range", f"{rng} (values outside are marked implausible)" if rng else
                     "no training range recorded (values are not checked)"))
    if head.get("cv_applied"):
        rows.append((f"quality on {head.get('applied_to')}",
                     quality_text({**head, "metrics": {"cv": head["cv_applied"]}})))
    if head.get("validated") is False:
        measured = f"; measured there: {head['swap_check']}" if head.get("swap_check") else ""
        rows.append(("validation", f"not validated on {head.get('applied_to')}: the head was fitted on "
                                   f"{head.get('input_modality')} embeddings{measured}"))
    items = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in rows)
    research = head.get("research_use") or RESEARCH_USE
    return (f"<section class=\"head\"><h2>What the head predicts</h2><dl class=\"head\">{items}</dl>"
            f"<p class=\"notice research-use\">{esc(research)}</p></section>")


def _prediction_row(record: dict[str, Any], regression: bool, thumbs: list[Thumb] | None) -> str:
    if regression:
        value = record.get("value")
        shown = f"{value:.1f}" if isinstance(value, int | float) else "-"
        if record.get("plausible") is False:
            shown += " (implausible)"
        cells = [f"<td class=\"value\">{esc(shown)}</td>"]
    else:
        probability = record.get("probability")
        shown = f"{probability:.3f}" if isinstance(probability, int | float) else "-"
        cells = [f"<td class=\"probability\">{esc(shown)}</td>",
                 f"<td class=\"label\">{esc(record.get('label'))}</td>"]
    flags = _ood_badge(record)
    if record.get("plausible") is False:
        flags += " <span class=\"badge flag implausible\">implausible</span>"
    if record.get("validated") is False:
        flags += " <span class=\"badge flag not-validated\">not validated</span>"
    note = f"<br><span class=\"meta\">{esc(record.get('note'))}</span>" if record.get("note") else ""
    thumb_cell = f"<td class=\"thumb-cell\">{_thumbs_html(thumbs)}</td>" if thumbs is not None else ""
    return (
        f"<tr class=\"prediction\" data-ood=\"{_flag(record.get('ood'))}\" "
        f"data-plausible=\"{_flag(record.get('plausible'))}\">{thumb_cell}"
        f"<td><span class=\"id\">{esc(record.get('id'))}</span><br><span class=\"path\">"
        f"{esc(record.get('path'))}</span></td><td>{_describe(record)}</td>{''.join(cells)}"
        f"<td class=\"flags\">{flags.strip()}{note}</td></tr>"
    )


def prediction_report(payload: dict[str, Any], locator: Locator | None = None, thumbnails: bool = True
                      ) -> str:
    """The HTML of a `retina predict` payload. `locator` finds each item's file for a small B-scan or
    fundus thumbnail (default: the payload's store); `thumbnails=False` leaves them out."""
    head = payload.get("head") or {}
    preds = payload.get("predictions") or []
    kind = head.get("kind") or ("regression" if preds and "value" in preds[0] else "binary")
    regression = kind == "regression"
    if thumbnails and locator is None:
        locator = Locator.for_store(payload.get("store"))
    units = head.get("units") or (preds[0].get("units") if preds else None)
    value_cols = [f"value ({units})" if units else "value"] if regression else ["probability", "label"]
    columns = (["image"] if thumbnails else []) + ["item", "eye · date", *value_cols, "flags"]
    def thumb_for(i: int, record: dict[str, Any]) -> list[Thumb] | None:
        if not thumbnails or locator is None:
            return None
        if i >= PREDICTION_THUMBS:
            return [Thumb("none", None, f"not shown: thumbnails of the first {PREDICTION_THUMBS} items only")]
        return locator.thumbs(record, max_side=SMALL_MAX, enface=False)

    rows = "".join(_prediction_row(r, regression, thumb_for(i, r)) for i, r in enumerate(preds))
    flagged = sum(p.get("ood") is True for p in preds)
    summary = f"{len(preds)} item(s)"
    if flagged:
        summary += (f"; {flagged} look unlike the package's training data (out of distribution): their "
                    "values are not to be trusted")
    table = (f"<section class=\"predictions\"><h2>Predictions</h2><p class=\"meta\">{esc(summary)}</p>"
             "<table class=\"predictions\"><thead><tr>"
             + "".join(f"<th>{esc(c)}</th>" for c in columns)
             + f"</tr></thead><tbody>{rows}</tbody></table></section>")
    errors = payload.get("errors") or []
    error_html = ""
    if errors:
        items = "".join(f"<li>{_error_text(e.get('path'), e.get('error'))}</li>" for e in errors)
        error_html = _errors_section("Not predicted", items)
    header = (f"<header><h1>{esc(payload.get('task'))} predictions</h1><p class=\"meta\">model "
              f"{esc(payload.get('model'))} · from {esc(payload.get('source'))}"
              + (f" · store {esc(payload.get('store'))}" if payload.get("store") else "") + "</p></header>")
    return _page(f"retina predict {payload.get('task') or ''}".strip(),
                 header + _head_html(head, payload.get("task")) + table + error_html)


def check_report_path(path: str | Path) -> None:
    """Refuse an --html FILE that cannot be written (a missing folder, a folder named as the file)
    before any work is done."""
    from retinacli.errors import UsageError

    path = Path(path).expanduser()
    if path.is_dir():
        raise UsageError(f"{path}: --html names a folder; give a file name such as report.html")
    if not path.parent.is_dir():
        raise UsageError(f"{path}: --html folder {path.parent} does not exist")


def write_report(path: str | Path, text: str) -> Path:
    """Write a report atomically (a reader never sees half a file); returns the path."""
    from retinacli.errors import RetinaError
    from retinacli.fsutil import atomic_write_text

    path = Path(path).expanduser()
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        raise RetinaError(f"{path}: cannot write the report ({exc.strerror or type(exc).__name__})") from None
    return path
