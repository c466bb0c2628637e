"""Files -> readers -> preprocessing -> model batches, with decoding overlapped with inference.

Worker threads read and preprocess whole sources (a file, or a folder that is one volume) while the
main thread batches the preprocessed arrays per modality and runs the model: numpy, the image
decoders and onnxruntime release the GIL for their heavy loops, so the two overlap. At most
`2 * workers` sources are in flight and a source's pixels are dropped as soon as it is preprocessed,
so memory stays bounded however big the folder is. The default reader decodes only the B-scans the
package's spec samples, where the file format allows it (`oct_frames`).

Discovery can stream (`StreamingPlan`, what `retina embed` uses): it runs in a thread that plans each
source as it is found (identity, skip what the store holds) and feeds a bounded queue, so inference
starts with the first sources found and no list of every source is kept.

Resume: a source is identified by a keyed hash of its resolved path, size and mtime (`source_key`;
stores before format 3 hashed the absolute path, which kept `..`: those keys are still honoured).
All the items one source yields are committed to the store together, so a source whose key is in
the store is complete and is skipped on the next run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISDIR
from typing import Any

import numpy as np

from retinacli.errors import ReadError, first_line
from retinacli.items import FundusImage, OctVolume
from retinacli.privacy import pseudonym
from retinacli.redaction import PathRedactor

ReadSource = Callable[[Any, "str | None"], Iterable["OctVolume | FundusImage | ReadError"]]


def default_workers() -> int:
    """Decoder threads: one per core, leaving the main thread a core for inference when there are many."""
    cores = os.cpu_count() or 1
    return max(1, cores - 1) if cores > 2 else cores


READER_NICENESS = 10  # added to the process's nice value


def _lower_reader_priority() -> None:
    """Decoder threads run at a lower CPU priority than inference (Linux: per-thread nice value).

    Inference uses every core; a decoder thread that preempts one of its threads stalls the whole
    parallel operator. At nice 10 decoding fills the gaps instead, and still gets whole cores when
    inference waits for input.
    """
    # Not Linux, or not permitted: the same results, less overlap.
    with contextlib.suppress(AttributeError, OSError):
        thread = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, current + READER_NICENESS))


def read_with_readers(
    source: Any, modality: str | None, oct_frames: Callable[[int], Sequence[int]] | None = None,
) -> Iterable[OctVolume | FundusImage | ReadError]:
    """All items of one source: a discovered `readers.Source` (decoded directly), or a path.

    `oct_frames`: the B-scan indices the model samples from a volume of n B-scans; readers that can
    decode selectively then read only those (an OCT item then holds just those B-scans, in order)."""
    from retinacli import readers

    if isinstance(source, readers.Source):
        return readers.read_source(source, modality, oct_frames=oct_frames)
    return readers.iter_items([source], modality=modality)


@functools.lru_cache(maxsize=64)
def accepts_keyword(function: Callable[..., Any], name: str) -> bool:
    """Whether `function` takes the keyword argument `name` (custom readers keep their two arguments)."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def oct_frames_for(engine: Any) -> Callable[[int], Sequence[int]] | None:
    """The B-scans the engine's preprocessing samples from a volume of n (None without a spec)."""
    spec = getattr(engine, "spec", None)
    try:
        slices = int(spec["oct"]["slices"])
    except (TypeError, KeyError, ValueError):
        return None
    from retinacli.preprocess import slice_indices

    return functools.partial(_frames, slice_indices, slices)


def _frames(pick: Callable[[int, int], Any], slices: int, n: int) -> list[int]:
    return [int(i) for i in pick(n, slices)]


class Discovered(tuple):
    """``(sources, errors)`` (unpacks as a pair), with ``.ignored``: the (path, why) not read."""

    ignored: list[tuple[Path, str]]


def discover_with_readers(paths: Sequence[Path]) -> tuple[list[Any], list[ReadError]]:
    """The sources under `paths` as `readers.Source` records (kind, member files; no pixels read)."""
    from retinacli.readers import scan

    found = scan(paths)
    result = Discovered((list(found.sources), list(found.errors)))
    result.ignored = list(found.ignored)
    return result


def _discover_stream(paths: Sequence[Path]) -> Iterator[Any]:
    """Sources, ReadErrors and Ignored (path, why), each as soon as discovery finds it. A DICOM header's
    metadata is left to the reader threads (scan_iter's metas=False): embedding never uses it before."""
    from retinacli.readers.discover import scan_iter

    return scan_iter(paths, metas=False)


discover_with_readers.stream = _discover_stream  # StreamingPlan streams through it


# --- identities -------------------------------------------------------------------------------------


def source_path(source: Any) -> Path:
    """A source is a path, or a record with `.path` (and `.members`) such as `readers.Source`."""
    return Path(getattr(source, "path", source))


def source_identity(source: Any, legacy: bool = False) -> str:
    """What makes a source "the same input" for resume: resolved path + size + mtime.

    A volume made of several files (B-scan images, a single-frame DICOM series) is identified by its
    path and its files' names, sizes and mtimes, so adding or replacing a B-scan makes it new.
    `legacy`: the identity older versions computed (the absolute path, `..` and links kept), so a
    store they wrote still skips what it holds.
    """
    def where(p: Path) -> Path:
        return p.absolute() if legacy else p.resolve()

    path = where(source_path(source))
    members = tuple(getattr(source, "members", ()) or ())
    if members:
        listing = hashlib.sha256()
        for member in members:
            st = Path(member).stat()
            listing.update(f"{where(Path(member))}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return f"set:{path}|{listing.hexdigest()}"
    stat = path.stat()
    if not S_ISDIR(stat.st_mode):  # one stat per source
        return f"file:{path}|{stat.st_size}|{stat.st_mtime_ns}"
    listing = hashlib.sha256()
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.is_file() and not entry.name.startswith("."):
            st = entry.stat()
            listing.update(f"{entry.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return f"dir:{path}|{listing.hexdigest()}"


def item_identity(item: OctVolume | FundusImage, source_id: str, ordinal: int, n_items: int) -> str:
    """A DICOM instance is itself wherever the file lives (SOPInstanceUID); other items are their
    source's identity plus their place in it (a Heidelberg .vol yields an OCT and a fundus)."""
    sop = item.meta.sop_instance_uid
    if sop and n_items == 1:
        return f"sop:{sop}"
    return f"{source_id}|{item.modality}|{ordinal}"


def item_id(identity: str, secret: bytes) -> str:
    return pseudonym(identity, secret, prefix="i", length=16)


def source_key(identity: str, secret: bytes) -> str:
    return pseudonym(identity, secret, prefix="s", length=16)


def patient_pseudonym(meta: Any, secret: bytes) -> str | None:
    """The store's `patient` column for an item's ImageMeta: keyed with the store's secret, so a query
    file read by `retina retrieve` gets the pseudonym its patient has in the store."""
    return pseudonym(meta.patient_id, secret, prefix="p") if meta.patient_id else None


def metadata_row(
    item: OctVolume | FundusImage, identity: str, skey: str, secret: bytes, keep_identifiers: bool,
    paths: PathRedactor | None = None,
) -> dict[str, Any]:
    """The store's metadata for one item: pseudonyms instead of identifiers (see store.METADATA_COLUMNS).

    `paths`: the run's roots; the row gets the root id and the output path (retinacli.redaction).
    Without it (library callers) the path is absolute and there is no root."""
    from retinacli.readers.sanitize import date_of

    meta = item.meta
    date = date_of(meta.study_date, meta.acquisition_datetime)  # YYYY-MM-DD, validated
    references = [item_id(f"sop:{uid}", secret) for uid in meta.referenced_sop_uids if uid]
    return {
        "id": item_id(identity, secret),
        "source_key": skey,
        "modality": item.modality,
        **_path_fields(item, paths),
        "format": item.format,
        "laterality": meta.laterality,
        "date": date,
        "acquisition_datetime": meta.acquisition_datetime,
        "device": meta.device,
        "patient": patient_pseudonym(meta, secret),
        "study": pseudonym(meta.study_uid, secret, prefix="st") if meta.study_uid else None,
        "references": " ".join(references) or None,
        "patient_identifier": meta.patient_id if keep_identifiers else None,
    }


def _path_fields(item: OctVolume | FundusImage, paths: PathRedactor | None) -> dict[str, Any]:
    if paths is None:
        return {"root": None, "path": str(Path(item.path).absolute())}
    root, shown = paths.output(item.path, item.meta)
    return {"root": root, "path": shown}


# --- reading + preprocessing (worker side) -------------------------------------------------------


@dataclass
class Prepared:
    """One preprocessed item: the model input and its store metadata (the pixels are gone)."""

    modality: str
    array: np.ndarray
    row: dict[str, Any]
    path: str = ""  # the item's file, for error reports (the row holds the output path)


@dataclass
class SourceResult:
    source: Path
    key: str
    items: list[Prepared] = field(default_factory=list)
    errors: list[ReadError] = field(default_factory=list)


@dataclass
class Decoded:
    """One source read and preprocessed, before any pseudonym is made: what a worker that never holds
    the store's secret returns (retinacli.distributed); `prepared_result` then makes the rows."""

    items: list[tuple[int, Any, np.ndarray]]  # (ordinal among the source's items, item, model input)
    count: int  # items of the wanted modality read (ordinals count those whose preprocessing failed)
    errors: list[ReadError]


def read_safely(read_source: Callable[..., Any], source: Any, modality: str | None) -> Iterable[Any]:
    """`read_source(source, modality)`, a failure becoming the source's one ReadError."""
    try:
        return read_source(source, modality)
    except Exception as exc:
        # the type only, not the message: a parser's message can quote a header value
        reason = f"could not be read ({type(exc).__name__})"
        return [exc if isinstance(exc, ReadError) else ReadError(source_path(source), reason)]


def decode_items(
    items: Iterable[OctVolume | FundusImage | ReadError],
    preprocess: Callable[[OctVolume | FundusImage], np.ndarray],
    *,
    modality: str | None,
    source: Path,
) -> Decoded:
    """Read every item of one source and preprocess it; failures become ReadErrors, never exceptions."""
    try:
        read = list(items)
    except ReadError as exc:
        return Decoded([], 0, [exc])
    except Exception as exc:  # a reader bug must not stop the batch
        reason = f"could not be read ({type(exc).__name__})"  # a message can quote header values
        return Decoded([], 0, [ReadError(source, reason)])
    good = [x for x in read if not isinstance(x, ReadError) and (modality is None or x.modality == modality)]
    decoded = Decoded([], len(good), [x for x in read if isinstance(x, ReadError)])
    for ordinal, item in enumerate(good):
        try:
            array = np.asarray(preprocess(item), dtype=np.float32)
        except Exception as exc:
            decoded.errors.append(ReadError(item.path, f"preprocessing failed ({first_line(exc)})"))
            continue
        decoded.items.append((ordinal, item, array))
    return decoded


def prepared_result(
    decoded: Decoded, *, source: Path, source_id: str, skey: str, secret: bytes, keep_identifiers: bool,
    paths: PathRedactor | None = None,
) -> SourceResult:
    """A decoded source's store rows (pseudonyms keyed with `secret`): the driver's half of a source."""
    result = SourceResult(source, skey, errors=list(decoded.errors))
    for ordinal, item, array in decoded.items:
        identity = item_identity(item, source_id, ordinal, decoded.count)
        row = metadata_row(item, identity, skey, secret, keep_identifiers, paths)
        result.items.append(Prepared(item.modality, array, row, str(item.path)))
    return result


def prepare_items(
    items: Iterable[OctVolume | FundusImage | ReadError],
    preprocess: Callable[[OctVolume | FundusImage], np.ndarray],
    *,
    modality: str | None,
    source: Path,
    source_id: str,
    skey: str,
    secret: bytes,
    keep_identifiers: bool,
    paths: PathRedactor | None = None,
) -> SourceResult:
    """Read every item of one source and preprocess it; failures become ReadErrors, never exceptions."""
    decoded = decode_items(items, preprocess, modality=modality, source=source)
    return prepared_result(decoded, source=source, source_id=source_id, skey=skey, secret=secret,
                           keep_identifiers=keep_identifiers, paths=paths)


# --- the embedding run ----------------------------------------------------------------------------


@dataclass
class EmbedPlan:
    todo: list[tuple[Any, str, str]]  # (source, source identity, source key)
    skipped_sources: int
    errors: list[ReadError]
    ignored: list[tuple[Path, str]] = field(default_factory=list)  # (path, why) discovery did not read


@dataclass
class EmbedReport:
    embedded: int = 0
    skipped: int = 0  # sources already in the store, plus items already in it under another path
    failed: int = 0
    errors: list[ReadError] = field(default_factory=list)
    seconds: float = 0.0
    flagged: int = 0  # items out of distribution for the package (retinacli.ood), stored or refused
    refused: int = 0  # of those, not stored because of `strict` (they are in `errors` too)
    ood_checked: bool = False  # whether the package has an out-of-distribution reference
    # Seconds from the run's start: until discovery had finished (a StreamingPlan; None for a plan made
    # before the run) and until the first model call (None without one). first < discovery: streamed.
    discovery_seconds: float | None = None
    first_batch_seconds: float | None = None

    @property
    def throughput(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


def plan_embedding(
    paths: Sequence[Path | str],
    secret: bytes,
    done_keys: set[str],
    *,
    exclude: Path | None = None,
    discover: Callable[[Sequence[Path]], tuple[list[Any], list[ReadError]]] | None = None,
    old_paths: Iterable[str] = (),
) -> EmbedPlan:
    """Discover the sources under `paths` and drop those the store already holds.

    `old_paths`: the absolute paths of rows written before store format 3, whose keys hashed the
    path as it was spelled (`..` kept): a source at the same place, unchanged, is matched to them
    however it is spelled now, so upgrading a store never embeds its sources again."""
    found = (discover or discover_with_readers)([Path(p) for p in paths])
    sources, errors = found
    planner = _Planner(secret, done_keys, exclude, old_paths, list(errors))
    todo = [job for job in map(planner.plan, sources) if job is not None]
    ignored = list(getattr(found, "ignored", []))  # what discovery did not read, and why
    return EmbedPlan(todo, planner.skipped, planner.errors, ignored)


class _Planner:
    """Per source: its identity and key, or why it is not embedded (the store's own files, named
    twice, already in the store)."""

    def __init__(self, secret: bytes, done_keys: set[str], exclude: Path | None, old_paths: Iterable[str],
                 errors: list[ReadError]):
        self.secret, self.done_keys, self.errors = secret, done_keys, errors
        self.spelled: dict[str, list[str]] = {}
        for old in old_paths:
            self.spelled.setdefault(str(Path(old).resolve()), []).append(old)
        self.excluded = Path(exclude).absolute() if exclude is not None else None
        self.seen: set[str] = set()
        self.skipped = 0

    def plan(self, source: Any) -> tuple[Any, str, str] | None:
        absolute = source_path(source).absolute()
        excluded = self.excluded
        if excluded is not None and (absolute == excluded or excluded in absolute.parents):
            return None  # never embed the store's own files
        try:
            identity = source_identity(source)
        except OSError as exc:
            self.errors.append(ReadError(absolute, f"cannot stat ({exc.strerror or exc})"))
            return None
        secret, done_keys = self.secret, self.done_keys
        key = source_key(identity, secret)
        if key in self.seen:
            return None  # the same source named twice on the command line
        self.seen.add(key)
        if key in done_keys or (done_keys and _legacy_key(source, secret) in done_keys) or (
                self.spelled and _matches_old_row(source, secret, done_keys, self.spelled)):
            self.skipped += 1
            return None
        return (source, identity, key)


class StreamingPlan:
    """A plan made while discovery runs: `run_embedding` plans each source as discovery passes it on
    (in a thread, through a bounded queue), so inference starts before discovery has finished and no
    list of every source is kept. `skipped_sources`, `errors` and `ignored` are final once the run
    has returned. `on_found(n)`: called (from the discovery thread) with the number of sources to
    embed found so far, e.g. to grow a progress bar's total. `modality`: leave out the sources that
    hold no item of it (after the store check, so `skipped_sources` counts them as a full plan does).

    `discover`: like plan_embedding's; a callable with a `stream` attribute (`discover_with_readers`)
    is streamed through it, any other is called once and its (sources, errors) planned in turn."""

    def __init__(
        self,
        paths: Sequence[Path | str],
        secret: bytes,
        done_keys: set[str],
        *,
        exclude: Path | None = None,
        discover: Callable[[Sequence[Path]], Any] | None = None,
        old_paths: Iterable[str] = (),
        on_found: Callable[[int], None] | None = None,
        modality: str | None = None,
    ):
        self.paths = [Path(p) for p in paths]
        self.discover = discover
        self.on_found = on_found
        self.modality = modality
        self._planner = _Planner(secret, done_keys, exclude, old_paths, [])
        self._discovery_errors: list[ReadError] = []
        self._cancelled = False
        self.ignored: list[tuple[Path, str]] = []
        self.found = 0  # sources to embed, so far

    @property
    def skipped_sources(self) -> int:
        return self._planner.skipped

    @property
    def errors(self) -> list[ReadError]:
        """Discovery's errors, then planning's (as plan_embedding orders them)."""
        return self._discovery_errors + self._planner.errors

    def cancel(self) -> None:
        """Stop discovery at the next file (the run ended early)."""
        self._cancelled = True

    def jobs(self) -> Iterator[tuple[Any, str, str]]:
        """(source, identity, key) of each source to embed, as discovery finds it."""
        for kind, found in self._discovered():
            if self._cancelled:
                return
            if kind == "source":
                job = self._planner.plan(found)
                if job is not None and self.modality is not None and self.modality not in getattr(
                        found, "modalities", (self.modality,)):
                    job = None  # it would yield nothing: not read, not counted in the progress total
                if job is not None:
                    self.found += 1
                    if self.on_found is not None:
                        self.on_found(self.found)
                    yield job
            elif kind == "error":
                self._discovery_errors.append(found)
            else:
                self.ignored.append(found)

    def _discovered(self) -> Iterator[tuple[str, Any]]:
        discover = self.discover or discover_with_readers
        stream = getattr(discover, "stream", None)
        if stream is not None:
            for found in stream(self.paths):
                if isinstance(found, ReadError):
                    yield "error", found
                elif isinstance(found, tuple):  # discover.Ignored (path, why)
                    yield "ignored", tuple(found)
                else:
                    yield "source", found
            return
        found = discover(self.paths)
        sources, errors = found
        for source in sources:
            yield "source", source
        for error in errors:
            yield "error", error
        for ignored in getattr(found, "ignored", []):
            yield "ignored", ignored


def _legacy_key(source: Any, secret: bytes) -> str | None:
    try:
        return source_key(source_identity(source, legacy=True), secret)
    except OSError:
        return None


def _matches_old_row(source: Any, secret: bytes, done_keys: set[str], spelled: dict[str, list[str]]) -> bool:
    """Whether an older row names this source under another spelling with the same legacy key (the
    key also hashes size and mtime, so a changed file does not match)."""
    here = source_path(source)
    for old in spelled.get(str(here.resolve()), ()):
        try:
            members = [Path(old) / Path(m).relative_to(here) for m in getattr(source, "members", ()) or ()]
            proxy = _Spelled(Path(old), members)
            if source_key(source_identity(proxy, legacy=True), secret) in done_keys:
                return True
        except (OSError, ValueError):
            continue
    return False


@dataclass
class _Spelled:
    path: Path
    members: list[Path]


class _OpenSource:
    __slots__ = ("failed", "files", "outstanding", "refused", "rows", "vectors")

    def __init__(self, outstanding: int):
        self.outstanding = outstanding
        self.rows: list[dict[str, Any]] = []
        self.vectors: list[np.ndarray] = []
        self.files: list[str] = []  # each row's item file, for error reports
        self.failed = False
        self.refused = False  # an item was refused as out of distribution (--strict)


class SourceCommits:
    """From embedded items to committed rows, for run_embedding and the Ray run (retinacli.distributed)
    alike: a source's rows go to the writer together once its last item is embedded, or not at all (a
    model failure, an item refused by `strict`), so the source is read again by the next run."""

    def __init__(self, writer: Any, report: EmbedReport, ood: Any, model_id: str, strict: bool):
        self.writer, self.report, self.ood, self.model_id, self.strict = writer, report, ood, model_id, strict
        self.known_ids = writer.column_values("id")
        self.open: dict[str, _OpenSource] = {}

    def accept(self, result: SourceResult) -> list[Prepared]:
        """Report the source's errors; its items to embed (not those already stored under another path)."""
        self.report.errors.extend(result.errors)
        fresh = []
        for prepared in result.items:
            if prepared.row["id"] in self.known_ids:
                self.report.skipped += 1  # the same DICOM instance under another path
            else:
                self.known_ids.add(prepared.row["id"])
                fresh.append(prepared)
        if fresh:
            self.open[result.key] = _OpenSource(len(fresh))
        return fresh

    def failed(self, key: str, prepared: Prepared, reason: str) -> None:
        """The model failed on the item: reported, and its source is not committed."""
        self.report.errors.append(ReadError(prepared.path or prepared.row["path"], reason))
        self.open[key].failed = True
        self._done(key)

    def embedded(self, key: str, prepared: Prepared, vector: np.ndarray, check: Any,
                 label: str | None) -> None:
        """The item's vector (and out-of-distribution check, None without a reference)."""
        state, report = self.open[key], self.report
        prepared.row["engine"] = label
        if check is not None:
            prepared.row.update(check.fields)
            report.flagged += check.flag
        if self.strict and check is not None and check.flag:
            report.refused += 1
            state.refused = True
            reason = self.ood.reason(prepared.modality, check.score, self.model_id, check)
            report.errors.append(ReadError(prepared.path or prepared.row["path"], reason))
        else:
            state.rows.append(prepared.row)
            state.vectors.append(vector)
            state.files.append(prepared.path or prepared.row["path"])
        self._done(key)

    def _done(self, key: str) -> None:
        state = self.open[key]
        state.outstanding -= 1
        if state.outstanding:
            return
        del self.open[key]
        if state.failed or not state.rows:
            return  # not committed: the source is retried on the next run
        if state.refused:  # a source is stored whole or not at all, so a later run can still add it whole
            reason = ("not stored: another item of the same file was refused as out of distribution "
                      "(--strict); the file is read again on the next run")
            self.report.errors.extend(ReadError(file, reason) for file in state.files)
            return
        self.writer.add(state.rows, np.stack(state.vectors))
        self.report.embedded += len(state.rows)


_END = object()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _Feed:
    """Jobs for the reader pool: a plan's list, or a StreamingPlan run in a discovery thread that fills
    a bounded queue (discovery stays at most `ahead` sources ahead of reading)."""

    def __init__(self, plan: EmbedPlan | StreamingPlan, ahead: int):
        self.done = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._plan = plan
        self.finished: float | None = None  # perf_counter() when discovery had found everything
        if isinstance(plan, StreamingPlan):
            self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, ahead))
            self._thread = threading.Thread(target=self._produce, args=(plan,), name="retina-discover",
                                            daemon=True)
            self._thread.start()
        else:
            self._jobs = iter(plan.todo)

    def _produce(self, plan: StreamingPlan) -> None:
        # Normal priority, unlike the readers: when inference waits for sources, discovery is all that
        # runs, and on a busy machine a niced thread would starve (the run then waits on it).
        try:
            for job in plan.jobs():
                if not self._put(job):
                    return
        except BaseException as exc:  # raised again in the main thread, as plan_embedding would
            self._put(_Failed(exc))
            return
        self.finished = time.perf_counter()
        self._put(_END)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def take(self, block: bool) -> tuple[Any, str, str] | None:
        """The next job; None when there is none now (`block`: wait for one) or no more at all."""
        if self.done:
            return None
        if self._thread is None:
            job = next(self._jobs, _END)
        else:
            try:
                job = self._queue.get(block=block)
            except queue.Empty:
                return None
        if job is _END or isinstance(job, _Failed):
            self.done = True
            self.join()
            if isinstance(job, _Failed):
                raise job.exc
            return None
        return job

    def join(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._plan.cancel()
            self._thread.join()


def run_embedding(
    engine: Any,
    plan: EmbedPlan | StreamingPlan,
    writer: Any,
    *,
    modality: str | None = None,
    batch_size: int = 16,
    workers: int | None = None,
    keep_identifiers: bool = False,
    read_source: ReadSource | None = None,
    on_source_done: Callable[[SourceResult], None] | None = None,
    paths: PathRedactor | None = None,
    strict: bool = False,
) -> EmbedReport:
    """Embed the plan's sources into `writer` (a StoreWriter). Never raises for a bad input.

    `paths`: the run's roots and redaction; rows and the report's errors then carry output paths.
    Rows get `ood_score` / `ood` from the package's out-of-distribution reference (null without one);
    `strict`: an item flagged out of distribution is an error with the reason, not a row."""
    started = time.perf_counter()
    read_source = read_source or read_with_readers
    frames = oct_frames_for(engine)
    if frames is not None and accepts_keyword(read_source, "oct_frames"):
        read_source = functools.partial(read_source, oct_frames=frames)  # decode only the sampled B-scans
    workers = max(1, int(workers or default_workers()))
    batch_size = max(1, int(batch_size))
    report = EmbedReport()
    secret = writer.secret
    batches: dict[str, list[tuple[str, Prepared]]] = {"oct": [], "fundus": []}
    ood = getattr(engine, "ood", None)
    report.ood_checked = ood is not None
    commits = SourceCommits(writer, report, ood, getattr(engine, "model_id", None), strict)

    def load(job: tuple[Any, str, str]) -> SourceResult:
        source, identity, key = job
        path = source_path(source)
        items = read_safely(read_source, source, modality)
        return prepare_items(items, engine.preprocess, modality=modality, source=path, source_id=identity,
                             skey=key, secret=secret, keep_identifiers=keep_identifiers, paths=paths)

    def run_batch(mod: str) -> None:
        batch, batches[mod] = batches[mod], []
        if not batch:
            return
        variant = getattr(engine, "variant", None)
        variant_label = variant(mod).label if variant is not None else None
        if report.first_batch_seconds is None:
            report.first_batch_seconds = time.perf_counter() - started
        arrays = np.stack([p.array for _, p in batch])  # also what the input check of retinacli.ood reads
        try:
            vectors = np.asarray(engine.embed(mod, arrays), dtype=np.float32)
        except Exception as exc:  # e.g. onnxruntime refusing an input: report, retry next run
            reason = f"the model failed on it ({first_line(exc)})"
            for key, prepared in batch:
                commits.failed(key, prepared, reason)
            return
        checks = ood.check(mod, vectors, arrays) if ood is not None else None
        for i, (key, prepared) in enumerate(batch):
            commits.embedded(key, prepared, vectors[i], checks[i] if checks is not None else None,
                             variant_label)

    def accept(result: SourceResult) -> None:
        for prepared in commits.accept(result):
            batches[prepared.modality].append((result.key, prepared))
            if len(batches[prepared.modality]) >= batch_size:
                run_batch(prepared.modality)
        if on_source_done is not None:
            on_source_done(result)

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="retina-read",
                              initializer=_lower_reader_priority)
    in_flight: deque[Future[SourceResult]] = deque()
    feed = _Feed(plan, ahead=max(64, 4 * workers, 2 * batch_size))

    def top_up(wait: bool) -> None:
        # wait for discovery only when nothing is being read and no result is waiting to be batched
        while len(in_flight) < 2 * workers:
            job = feed.take(block=wait and not in_flight)
            if job is None:
                return
            in_flight.append(pool.submit(load, job))

    try:
        top_up(wait=True)
        while in_flight:
            result = in_flight.popleft().result()
            top_up(wait=False)
            accept(result)
            top_up(wait=True)
        for mod in batches:
            run_batch(mod)
    finally:
        feed.join()
        pool.shutdown(wait=True, cancel_futures=True)
        close_report(report, plan, feed, started)
    return shown_errors(report, paths)


def close_report(report: EmbedReport, plan: Any, feed: Any, started: float) -> None:
    """A run's closing tallies (local or on Ray), also when it stopped early: discovery's errors first,
    as a plan made before the run lists them."""
    report.skipped += plan.skipped_sources
    report.errors[:0] = plan.errors
    if feed.finished is not None:
        report.discovery_seconds = feed.finished - started
    report.seconds = time.perf_counter() - started
    report.failed = len(report.errors)


def shown_errors(report: EmbedReport, paths: PathRedactor | None) -> EmbedReport:
    """The report with its error paths as they are shown; after every read, so identifiers learnt from
    any file apply."""
    if paths is not None:
        report.errors = [ReadError(*paths.error(e.path, e.reason)) for e in report.errors]
    return report


# --- model <-> store -------------------------------------------------------------------------------


def load_engine(model: str | None, backend: str = "auto", precision: str = "auto",
                device: str | None = None) -> tuple[Any, Path]:
    """The engine for `--model` (or the default package) and the package folder it came from.

    `backend` / `precision`: how the encoders run (see retinacli.backends); every variant of one
    package makes vectors of the same model_id, so they share a store (docs/performance.md).
    `device`: `--device` (auto, cpu, cuda; None: cpu), see retinacli.engine.choose_providers."""
    from retinacli.engine import Engine
    from retinacli.package import resolve_package

    package = resolve_package(model)
    return Engine.load(package, providers=device, backend=backend, precision=precision), package


def engine_for_store(
    store: Any, model: str | None, backend: str = "auto", precision: str = "auto", device: str | None = None
) -> tuple[Any, Path]:
    """The engine that made `store`'s vectors, from any working folder.

    `--model` when given (it must match the store's model); else the package folder recorded in
    store.json while it still holds the store's model; else the known package with that model id;
    else a ModelPackageError naming the store, the model id and the recorded folder.
    """
    from retinacli.errors import ModelPackageError
    from retinacli.package import locate_store_package

    if model is None:
        record = getattr(store, "package_record", None) or {}
        package, why = locate_store_package(store.model_id, record.get("path"))
        if package is None:
            raise ModelPackageError(
                f"{store.root}: no package found for the store's model {store.model_id} ({why}); "
                "pass --model PATH to that package (see 'retina models list')"
            )
        model = str(package)
    engine, package = load_engine(model, backend, precision, device)
    adopt = getattr(engine, "adopt_model_id", None)
    if adopt is not None:
        adopt(store.model_id)  # a store made under the older model id rule keeps its id
    store.require_model(engine.model_id)
    return engine, package
