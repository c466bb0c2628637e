"""`retina embed --ray` / `--ray-address`: the embedding run on Ray Data (extra `retina[ray]`).

What runs where (docs/scale-out.md):

* the driver (the `retina embed` process): discovery and planning (`pipeline.StreamingPlan`: sources the
  store already holds are skipped), every pseudonym (item ids, source keys, patients, paths: the store's
  secret never leaves the driver) and the commits through the same `StoreWriter` and
  `pipeline.SourceCommits` as the local run, so shards, errors.csv, the lock, resume and the summary are
  the local run's;
* Ray tasks (a fraction of a CPU each): reading and preprocessing sources (`pipeline.decode_items`, the
  local run's code); they get the source records and the package's preprocessing spec, nothing keyed;
* an autoscaling pool of Ray actors: the ONNX encoders, one engine per actor loaded from the package path
  (verified, sessions built inside the actor with threads = the actor's CPUs; sessions are never pickled),
  plus the package's out-of-distribution check.

Sources go to Ray in windows, each one Ray Data execution: everything discovery has found when Ray is
ready for the next window (the first: what it found while Ray started), between `min_window` and
`max_window` sources. Discovery runs on while a window is embedded, and the driver never holds the
list of a whole archive. Inputs must be paths every worker can read (a local disk for a local
Ray, a network mount on a cluster), and the package path likewise.

A worker that dies is retried by Ray (tasks and actors both); when Ray gives up, the run stops with one
error line, the sources committed so far stay in the store, and a re-run embeds only the rest.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from retinacli.errors import ReadError, RetinaError, first_line

EXTRA = "ray"
DECODE_CPUS = 0.5  # a fraction, so decoders run beside the encoder actors on a 2-core machine
# Sources per decode task: fewer, larger tasks cost Ray less (16 -> 64 took --ray from 0.62x to 0.94x of
# the local rate, benchmarks/RESULTS.md), a retry redoes that many, and a small window still gets a few
# tasks per CPU so every decoder has work.
MAX_SOURCES_PER_TASK = 64
MIN_SOURCES_PER_TASK = 8
TASKS_PER_CPU = 4
ENCODER_ROWS = 64  # sources per encoder actor call (model batches of --batch-size inside it)
MIN_WINDOW = 10_000  # sources per Ray Data execution: each one starts its actor pool and drains (seconds)
WINDOW_PER_CPU = 5000  # windows long enough that starting the actors is a few % of each
MAX_WINDOW = 100_000  # source records the driver holds at once
FAULT_ENV = "RETINA_TEST_RAY_KILL_ONCE"  # tests only: a marker path; one decode task exits hard once
_NO_PIXELS = np.zeros(0, dtype=np.uint8)


def require_ray() -> None:
    from retinacli.errors import require

    require("retina embed --ray", EXTRA, "ray", "pyarrow")


# --- worker side (no secret, no store) ---------------------------------------------------------------


def decode_sources(batch: dict[str, np.ndarray], *, spec: dict[str, Any], modality: str | None,
                   max_pixels: int | None, fault: str | None = None) -> dict[str, np.ndarray]:
    """Ray task: read and preprocess sources (`pipeline.decode_items`); pixels are dropped, the model
    inputs kept. Rows in: job, source (the record); rows out: job, payload (items, count, errors). Ray
    moves these Python objects between processes with its own serialization; our code unpickles nothing."""
    from retinacli import pipeline
    from retinacli.preprocess import preprocess
    from retinacli.readers.common import set_max_pixels

    set_max_pixels(max_pixels)  # the driver's --max-pixels / $RETINA_MAX_PIXELS
    if fault and int(batch["job"][0]) > 0:
        _fail_once(fault)
    frames = pipeline.oct_frames_for(SimpleNamespace(spec=spec))
    read = pipeline.read_with_readers if frames is None else _reader(frames)
    payloads = []
    for source in batch["source"]:
        items = pipeline.read_safely(read, source, modality)
        decoded = pipeline.decode_items(items, lambda item: preprocess(item.modality, item.pixels, spec),
                                        modality=modality, source=pipeline.source_path(source))
        kept = [(ordinal, _without_pixels(item), array) for ordinal, item, array in decoded.items]
        payloads.append((kept, decoded.count, _errors(decoded.errors)))
    return {"job": batch["job"], "payload": _objects(payloads)}


def _reader(frames: Callable[[int], Any]) -> Callable[[Any, str | None], Any]:
    from retinacli import pipeline

    def read(source: Any, modality: str | None) -> Any:
        return pipeline.read_with_readers(source, modality, oct_frames=frames)

    return read


def _fail_once(marker: str) -> None:
    """Tests: the worker process dies (no exception, no cleanup) the first time, as a killed node would."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(1)


def _without_pixels(item: Any) -> Any:
    if dataclasses.is_dataclass(item) and hasattr(item, "pixels"):
        return dataclasses.replace(item, pixels=_NO_PIXELS)  # the driver needs the metadata only
    return item


def _errors(errors: list[ReadError]) -> list[tuple[str, str]]:
    return [(e.path, e.reason) for e in errors]  # ReadError does not unpickle (two-argument __init__)


def _objects(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


class Encoder:
    """Ray actor: one engine loaded from the package path inside the actor (sha256-verified, sessions
    built here with `threads` intra-op threads), run on the decoded sources' items in model batches."""

    def __init__(self, package: str, backend: str, precision: str, device: str | None, threads: int,
                 batch_size: int):
        from retinacli.engine import Engine

        self.engine = Engine.load(package, providers=device, threads=threads, backend=backend,
                                  precision=precision)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        engine, ood = self.engine, self.engine.ood
        sources = list(batch["payload"])
        outcomes: list[list[Any]] = [[None] * len(kept) for kept, _, _ in sources]
        queued: dict[str, list[tuple[int, int, np.ndarray]]] = {}
        for s, (kept, _, _) in enumerate(sources):
            for i, (_, item, array) in enumerate(kept):
                queued.setdefault(item.modality, []).append((s, i, array))
        for modality, entries in queued.items():
            label = engine.variant(modality).label
            for start in range(0, len(entries), self.batch_size):
                chunk = entries[start:start + self.batch_size]
                arrays = np.stack([array for _, _, array in chunk])
                try:
                    vectors = np.asarray(engine.embed(modality, arrays), dtype=np.float32)
                except Exception as exc:  # as the local run: the chunk's items fail, their sources wait
                    failure = f"the model failed on it ({first_line(exc)})"
                    for s, i, _ in chunk:
                        outcomes[s][i] = (None, None, label, failure)
                    continue
                checks = ood.check(modality, vectors, arrays) if ood is not None else None
                for n, (s, i, _) in enumerate(chunk):
                    outcomes[s][i] = (vectors[n], checks[n] if checks is not None else None, label, None)
        payloads = []
        for (kept, count, errors), outcome in zip(sources, outcomes, strict=True):
            items = [(ordinal, item) for ordinal, item, _ in kept]  # the model inputs stay here
            payloads.append((items, outcome, count, errors))
        return {"job": batch["job"], "payload": _objects(payloads)}


# --- driver side ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class RaySettings:
    """How the run uses Ray: `address` None starts a local Ray for the run (`--ray`)."""

    address: str | None = None
    package: Path | None = None
    backend: str = "auto"
    precision: str = "auto"
    device: str | None = None
    min_window: int = MIN_WINDOW
    max_window: int | None = None  # default: WINDOW_PER_CPU per cluster CPU


class RayConnection:
    """Ray for one run: an already initialised Ray is used as it is (and left running), else one is
    started (`address` None: a local Ray; else the cluster at `address`) and shut down at the end."""

    def __init__(self, address: str | None):
        require_ray()
        import ray

        self.started = not ray.is_initialized()
        if self.started:
            _check_reachable(address)
            try:
                ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            except Exception as exc:  # ConnectionError, RuntimeError, ...: one line, naming the address
                where = f"the Ray cluster at {address}" if address else "a local Ray"
                raise RetinaError(f"cannot start or reach {where} ({first_line(exc)})") from None
        self.cpus = float(ray.cluster_resources().get("CPU", 1.0))
        self._stdout = _errors_to_stderr()

    def close(self) -> None:
        if self._stdout is not None:
            from ray._private import worker

            worker.print_to_stdstream = self._stdout
        if self.started:
            import ray

            ray.shutdown()


def _check_reachable(address: str | None, timeout: float = 10.0) -> None:
    """A HOST:PORT (or ray://HOST:PORT) that nothing answers on is one line in seconds; Ray itself keeps
    retrying an unreachable address for minutes."""
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # not HOST:PORT: Ray says what it makes of it
    import socket

    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise RetinaError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); check the "
                          "address (ray status on the head node prints it)") from None


def _errors_to_stderr() -> Any:
    """Ray prints what its workers report (e.g. "a worker died") on the driver's stdout; during the run
    it goes to stderr, so stdout keeps only retina's output (--json stays one JSON document)."""
    try:
        from ray._private import worker

        original = worker.print_to_stdstream
    except (ImportError, AttributeError):  # another Ray version: its output is left as it is
        return None

    def to_stderr(data: dict, *args: Any, **kwargs: Any) -> Any:
        return original({**data, "is_err": True}, *args, **kwargs)

    worker.print_to_stdstream = to_stderr
    return original


def ray_engine_line(engine: Any, modalities: list[str]) -> str:
    """How each encoder will run, for the run's header: the actors build the sessions (none here)."""
    variants = getattr(engine, "variants", None) or {}
    parts = [f"{m} {variants[m].label}" for m in modalities if m in variants]
    return ", ".join(parts) + " (sessions built in the Ray actors)" if parts else ""


def actor_plan(cpus: float) -> tuple[float, int, int]:
    """(CPUs per encoder actor, most actors, threads per actor). Half the cluster's CPUs at most go to
    encoders (the pool grows to it when decoding keeps up), the rest to the decode tasks."""
    per_actor = 1.0 if cpus <= 8 else 2.0
    most = max(1, int(cpus // 2 // per_actor))
    return per_actor, most, max(1, int(per_actor))


def run_embedding_ray(engine: Any, plan: Any, writer: Any, settings: RaySettings, *,
                      modality: str | None = None, batch_size: int = 16, keep_identifiers: bool = False,
                      on_source_done: Callable[[Any], None] | None = None, paths: Any = None,
                      strict: bool = False, log: Callable[[str], None] | None = None) -> Any:
    """`pipeline.run_embedding` on Ray Data: the same plan, writer, commits and report."""
    from retinacli import pipeline

    started = time.perf_counter()
    feed = pipeline._Feed(plan, ahead=256)
    windows = _Windows(feed, settings.min_window)  # discovery starts now, while Ray starts
    try:
        connection = RayConnection(settings.address)
    except BaseException:
        windows.close()
        raise
    try:
        return _run(engine, plan, writer, settings, connection, windows, feed, started, modality=modality,
                    batch_size=batch_size, keep_identifiers=keep_identifiers, on_source_done=on_source_done,
                    paths=paths, strict=strict, log=log)
    finally:
        windows.close()  # (again: a no-op when _run got to its own)
        connection.close()


def _run(engine: Any, plan: Any, writer: Any, settings: RaySettings, connection: RayConnection,
         windows: _Windows, feed: Any, started: float, *, modality: str | None, batch_size: int,
         keep_identifiers: bool, on_source_done: Callable[[Any], None] | None, paths: Any, strict: bool,
         log: Callable[[str], None] | None) -> Any:
    from retinacli import pipeline
    from retinacli.readers.common import max_pixels

    report = pipeline.EmbedReport()
    # for the summary (--json "ray"): what this run's Ray was and how long connecting took
    report.ray = {"address": settings.address or "local", "cpus": connection.cpus, "windows": 0,
                  "start_seconds": round(time.perf_counter() - started, 3), "started": connection.started}
    ood = getattr(engine, "ood", None)
    report.ood_checked = ood is not None
    commits = pipeline.SourceCommits(writer, report, ood, engine.model_id, strict)
    per_actor, most, threads = actor_plan(connection.cpus)
    if log is not None:
        where = settings.address or "a local Ray"
        log(f"ray: {where}, {connection.cpus:g} CPUs: decoding in tasks ({DECODE_CPUS:g} CPU each), "
            f"encoders in up to {most} actor(s) of {per_actor:g} CPU, {threads} thread(s) each")
    max_window = settings.max_window or max(settings.min_window,
                                             min(MAX_WINDOW, int(WINDOW_PER_CPU * connection.cpus)))
    windows.most = max_window
    decode_kwargs = {"spec": engine.spec, "modality": modality, "max_pixels": max_pixels(),
                     "fault": os.environ.get(FAULT_ENV) or None}
    encoder_kwargs = {"package": str(Path(settings.package or engine.path).absolute()),
                      "backend": settings.backend, "precision": settings.precision,
                      "device": settings.device, "threads": threads, "batch_size": batch_size}
    gpus = 1 if settings.device == "cuda" else 0
    try:
        while True:
            window = windows.take()
            if not window:
                break
            report.ray["windows"] += 1
            rows = _run_window(window, decode_kwargs, encoder_kwargs, per_actor, most, gpus, connection.cpus)
            for job, payload in rows:
                if report.first_batch_seconds is None:
                    report.first_batch_seconds = time.perf_counter() - started
                _commit(window[job], payload, commits, writer.secret, keep_identifiers, paths,
                        on_source_done)
    finally:
        windows.close()
        pipeline.close_report(report, plan, feed, started)
    return pipeline.shown_errors(report, paths)


class _Windows:
    """Windows of jobs for Ray, gathered in a thread from the discovery feed: a window is everything
    discovery has found when Ray is ready for the next one (the first: all it found while Ray started),
    at least `least` jobs (fewer only at the end) and at most `most` (discovery waits beyond it). Each
    job's source loses its parsed header as it is taken (_without_header), so waiting jobs are small."""

    def __init__(self, feed: Any, least: int, most: int = MAX_WINDOW):
        self.feed, self.least, self.most = feed, least, most
        self._pending: list[tuple[Any, str, str]] = []
        self._done = False
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._fill, name="retina-ray-windows", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                with self._changed:
                    if len(self._pending) >= self.most:
                        self._changed.wait(0.1)
                        continue
                job = self.feed.take(block=False)
                if job is None:
                    if self.feed.done:
                        return
                    time.sleep(0.02)  # polled, so close() never waits on an idle discovery
                    continue
                source, identity, key = job
                with self._changed:
                    self._pending.append((_without_header(source), identity, key))
                    self._changed.notify_all()
        except BaseException as exc:  # discovery failed: raised again in the driver's loop
            self._error = exc
        finally:
            with self._changed:
                self._done = True
                self._changed.notify_all()

    def take(self) -> list[tuple[Any, str, str]]:
        """The next window; empty when discovery has ended and every job was taken."""
        with self._changed:
            while len(self._pending) < self.least and not self._done:
                self._changed.wait(0.1)
            if self._error is not None:
                raise self._error
            window, self._pending = self._pending[:self.most], self._pending[self.most:]
            self._changed.notify_all()
            return window

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.feed.join()


def _without_header(source: Any) -> Any:
    """The source record a task reads, with absolute paths (a worker's working folder is not the
    driver's) and without the header discovery parsed (a pydicom dataset is large and the driver's):
    the worker parses the file again."""
    from retinacli.readers.dicom import HeaderMetas

    if not dataclasses.is_dataclass(source):
        return Path(source).absolute()
    changes: dict[str, Any] = {"path": Path(source.path).absolute()}
    if getattr(source, "header", None) is not None:
        changes["header"] = None
    if isinstance(getattr(source, "metas", None), HeaderMetas):
        changes["metas"] = {}  # it holds the parsed dataset; the worker's reader reads the metadata itself
    if getattr(source, "members", None):
        changes["members"] = tuple(Path(m).absolute() for m in source.members)
    return dataclasses.replace(source, **changes)


def _shipped(source: Any) -> Any:
    return _without_header(source)


def sources_per_task(sources: int, cpus: float) -> int:
    """Sources per decode task for a window: TASKS_PER_CPU tasks per CPU at least, within
    [MIN_SOURCES_PER_TASK, MAX_SOURCES_PER_TASK]."""
    wanted = sources // max(1, int(TASKS_PER_CPU * cpus))
    return max(MIN_SOURCES_PER_TASK, min(MAX_SOURCES_PER_TASK, wanted))


def _run_window(window: list[tuple[Any, str, str]], decode_kwargs: dict[str, Any],
                encoder_kwargs: dict[str, Any], per_actor: float, most: int, gpus: int,
                cpus: float) -> Any:
    """(job, payload) for each source of the window, as Ray Data's stream yields them."""
    import logging

    import ray
    import ray.data as rd

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its per-run notes would go to our stderr
    context = rd.DataContext.get_current()
    context.enable_progress_bars = False  # the CLI has its own progress bar
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False
    rows = [{"job": n, "source": _shipped(source)} for n, (source, _, _) in enumerate(window)]
    per_task = sources_per_task(len(rows), cpus)
    ds = rd.from_items(rows, override_num_blocks=max(1, -(-len(rows) // per_task)))
    ds = ds.map_batches(decode_sources, fn_kwargs=decode_kwargs, batch_size=per_task,
                        batch_format="numpy", num_cpus=DECODE_CPUS)
    ds = ds.map_batches(Encoder, fn_constructor_kwargs=encoder_kwargs, batch_size=ENCODER_ROWS,
                        batch_format="numpy", compute=rd.ActorPoolStrategy(min_size=1, max_size=most),
                        num_cpus=per_actor, num_gpus=gpus)
    iterator = iter(ds.iter_rows())
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except ray.exceptions.RayError as exc:
            raise RetinaError(f"the Ray job failed ({_ray_reason(exc)}); the sources committed so far are "
                              "kept, and a re-run embeds only the rest") from None
        yield int(row["job"]), tuple(row["payload"])


def _ray_reason(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, RetinaError):  # e.g. the package path not visible on a worker
        return first_line(cause)
    return first_line(exc)


def _commit(job: tuple[Any, str, str], payload: tuple, commits: Any, secret: bytes, keep_identifiers: bool,
            paths: Any, on_source_done: Callable[[Any], None] | None) -> None:
    """One source back from the encoders: its rows made here (pseudonyms with the store's secret) and
    committed as the local run does."""
    from retinacli import pipeline

    source, identity, key = job
    items, outcomes, count, errors = payload
    decoded = pipeline.Decoded([(ordinal, item, _NO_PIXELS) for ordinal, item in items], count,
                               [ReadError(path, reason) for path, reason in errors])
    path = pipeline.source_path(source)
    result = pipeline.prepared_result(decoded, source=path, source_id=identity, skey=key, secret=secret,
                                      keep_identifiers=keep_identifiers, paths=paths)
    fresh = {id(prepared) for prepared in commits.accept(result)}
    for prepared, (vector, check, label, failure) in zip(result.items, outcomes, strict=True):
        if id(prepared) not in fresh:
            continue
        if failure is not None:
            commits.failed(key, prepared, failure)
        else:
            commits.embedded(key, prepared, vector, check, label)
    if on_source_done is not None:
        on_source_done(result)
