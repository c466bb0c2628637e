"""The training loop: AdamW, warm-up + cosine, optional bf16 autocast and channels-last-3d, gradient
clipping, a checkpoint every epoch, exact --resume, per-epoch validation retrieval, metrics.jsonl.

Exact resume: the data order and the augmentation of epoch e depend only on (seed, e); model,
optimiser, scheduler and the global torch RNG state are checkpointed; so stopping after any epoch
and resuming gives the same weights as an uninterrupted run (tests/test_train.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retinacli.cohort_manifest import read_cohort_manifest
from retinacli.fsutil import folder_entries, remove_new_entries
from retinacli.package import sha256_file
from retinacli.ranking import both_directions, eye_key
from training import distributed
from training.checkpoint import (
    LAST_CHECKPOINT,
    checkpoint_dir,
    init_checkpoint_path,
    load_checkpoint,
    load_encoder_weights,
    save_checkpoint,
)
from training.config import TrainConfig, config_from_dict
from training.data import (
    loader_workers,
    make_loader,
    open_cache,
    remember_pairs,
    save_split,
    set_loader_epoch,
    split_patients,
)
from training.model import CONFIG_FILE, METRICS_FILE, SPEC_FILE, SPLIT_FILE, RetinaModel, build_model
from training.objective import compute_loss

LOG_FILE = "train.log"
COLLAPSE_STD = 1e-3  # val embeddings with a smaller mean per-dimension spread are reported as collapsed


class RunExistsError(ValueError):
    pass


# --- runtime choices --------------------------------------------------------------------------


def resolve_device(name: str, local_rank: int = 0, local_world_size: int = 1) -> torch.device:
    """This process's device for `--device` (see distributed.device_for_rank)."""
    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    return distributed.device_for_rank(name, local_rank, local_world_size, available, count)


BF16_MIN_CAPABILITY = (8, 0)  # Ampere: native bf16 tensor cores; older GPUs only emulate it (slower)


def bf16_native(capability: tuple[int, int] | None) -> bool:
    """Whether a CUDA device of this compute capability (None: no GPU) runs bf16 natively."""
    return capability is not None and tuple(capability) >= BF16_MIN_CAPABILITY


def use_bf16(config: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast? precision auto: on CUDA devices of capability >= 8.0 only, else fp32."""
    if config.precision == "auto":
        return device.type == "cuda" and bf16_native(torch.cuda.get_device_capability(device))
    return config.precision == "bf16"


CHANNELS_LAST_MIN_VOXELS = 8 * 32 * 32


def use_channels_last(config: TrainConfig, device: torch.device) -> bool:
    """channels_last_3d for the OCT encoder: 1.4-2x faster r3d_18 steps on CPU at demo sizes and up,
    slower for tiny volumes, where weight-gradient layout conversions dominate (benchmarks/RESULTS.md)."""
    if config.channels_last == "auto":
        voxels = config.oct_slices * config.oct_size * config.oct_size
        return device.type == "cpu" and voxels >= CHANNELS_LAST_MIN_VOXELS
    return config.channels_last == "on"


def autocast(enabled: bool, device: torch.device):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up from ~0 to 1 over `warmup_steps`, then cosine decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_optimizer(model: RetinaModel, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norm parameters and temperatures (open_clip convention)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    try:  # the fused kernel is ~4x faster on CPU too (one pass over ~45M parameters)
        return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6)


# --- one step ---------------------------------------------------------------------------------


def step_loss(model: nn.Module, fundus: torch.Tensor, oct: torch.Tensor) -> torch.Tensor:
    """Encode the local batch, gather features over ranks, loss on the global batch."""
    f, o = model(fundus, oct)
    return compute_loss(model, distributed.gather_features(f), distributed.gather_features(o))


# --- the run ----------------------------------------------------------------------------------


class RunLog:
    """Messages to stderr (Rich) and to RUN/train.log; only the main rank writes."""

    def __init__(self, run_dir: Path, enabled: bool, echo: Callable[[str], None] | None):
        self.path = run_dir / LOG_FILE
        self.enabled = enabled
        self.echo = echo

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        if self.echo is not None:
            self.echo(message)
        with open(self.path, "a") as handle:
            handle.write(f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} {message}\n")


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise RunExistsError(f"{run_dir}: is a file, not a run folder; choose another --out")
    if resume:
        if not (run_dir / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{run_dir}: nothing to resume (no {CONFIG_FILE})")
    elif (run_dir / CONFIG_FILE).exists():
        raise RunExistsError(
            f"{run_dir}: already holds a run; pass --resume to continue it or choose a new --out"
        )


def train(
    config: TrainConfig,
    run_dir: str | Path,
    resume: bool = False,
    echo: Callable[[str], None] | None = None,
    progress_factory: Callable[..., Any] | None = None,
    stop_after_epochs: int | None = None,
) -> Path:
    """Train (or resume) a run in `run_dir`; returns the run dir. See docs/training.md.

    `stop_after_epochs` ends this call early (for tests of --resume); the schedule still assumes
    `config.epochs`.
    """
    run_dir = Path(run_dir)
    _check_run_dir(run_dir, resume)
    if not resume:  # what can fail cheaply fails before the run folder exists
        _check_inputs(config)
    # The backend follows the resolved device, so `auto` on a GPU machine gets nccl.
    dist_info = distributed.init_distributed(resolve_device(config.device, *distributed.launch_env()))
    try:
        made_dir = not run_dir.exists()
        before = folder_entries(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        try:
            return _train(config, run_dir, resume, dist_info, echo, progress_factory, stop_after_epochs)
        except BaseException:
            # A new run that fails (or is interrupted) before its first checkpoint leaves nothing behind
            # that would make the same command refuse ("already holds a run") once the cause is fixed.
            if dist_info.is_main and not resume and not (checkpoint_dir(run_dir) / LAST_CHECKPOINT).is_file():
                remove_new_entries(run_dir, before, remove_folder=made_dir)
            raise
    finally:
        distributed.cleanup(dist_info)  # also on error, so no rank leaves a dangling group


def _check_inputs(config: TrainConfig) -> None:
    """The manifest and any pretrained weights exist (no pixel is read, no model built)."""
    from training.encoders import check_init

    if config.manifest is not None and not Path(config.manifest).is_file():
        raise FileNotFoundError(f"{config.manifest}: manifest not found")
    check_init(config.fundus_arch, config.fundus_init)
    check_init(config.oct_arch, config.oct_init)
    if config.init_from is not None:
        init_checkpoint_path(config.init_from)


def _train(config, run_dir, resume, dist_info, echo, progress_factory, stop_after_epochs) -> Path:
    log = RunLog(run_dir, dist_info.is_main, echo)

    if resume:
        saved = json.loads((run_dir / CONFIG_FILE).read_text())
        runtime = {k: getattr(config, k) for k in ("device", "threads", "activation_checkpointing",
                                                     "cache_dir", "loader_workers")}
        if runtime["cache_dir"] is None:  # not given now: the cache the run was started with
            runtime.pop("cache_dir")
        config = config_from_dict({**saved, **runtime})
        log(f"resuming {run_dir} ({config.objective}, preset {config.preset})")

    device = dist_info.device
    if device.type == "cpu" and config.threads > 0:
        torch.set_num_threads(config.threads)
    bf16, channels_last = use_bf16(config, device), use_channels_last(config, device)

    manifest = Path(config.manifest).resolve()
    rows = read_cohort_manifest(manifest)
    sha = sha256_file(manifest)
    if resume and config.manifest_sha256 and sha != config.manifest_sha256:
        log(f"warning: {manifest} changed since the run started (sha256 differs); resuming anyway")
    config.manifest, config.manifest_sha256 = str(manifest), sha
    if config.cache_dir:
        config.cache_dir = str(Path(config.cache_dir).expanduser().resolve())
    spec = config.preprocess_spec

    if dist_info.is_main and not resume:
        (run_dir / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        (run_dir / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")

    local_rank, local_world = distributed.launch_env()
    with _progress_for_build(progress_factory if dist_info.is_main else None) as progress:
        # The processes of a node share the build (shards local_rank, local_rank + local_world, ...).
        pairs = open_cache(rows, spec, sha, config.cache_dir, part=(local_rank, local_world),
                           progress=progress, barrier=distributed.barrier, log=log)
    remember_pairs(sha, spec, pairs)  # the demo's probe reads the same cache, not the files again
    for message in pairs.errors:
        log(f"skipped: {message}")
    split = split_patients(pairs.patients, config.val_fraction, config.seed)
    if dist_info.is_main:
        save_split(split, run_dir / SPLIT_FILE)
    train_set, val_set = pairs.subset(set(split["train"])), pairs.subset(set(split["val"]))
    batch_size = min(config.batch_size, len(train_set.rows))
    batch_size -= batch_size % dist_info.world_size
    if batch_size < 2:
        raise ValueError(f"only {len(train_set.rows)} training pairs: too few for contrastive training")
    if batch_size != config.batch_size:
        log(f"batch size {config.batch_size} -> {batch_size} (training pairs / processes)")
    log(
        f"train: {len(train_set.rows)} pairs from {len(split['train'])} patients; "
        f"val: {len(val_set.rows)} pairs from {len(split['val'])} patients (held out)"
    )

    torch.manual_seed(config.seed)
    model = build_model(config)
    if config.init_from is not None and not resume:  # on resume the checkpoint holds the weights
        count = load_encoder_weights(model, config.init_from)
        log(f"encoders start from {config.init_from} ({count} tensors)")
    model = model.to(device)
    if channels_last:
        model.oct_encoder.to(memory_format=torch.channels_last_3d)
    optimizer = make_optimizer(model, config)
    steps_per_epoch = len(train_set.rows) // batch_size
    total_steps = steps_per_epoch * config.epochs
    warmup = round(config.warmup_fraction * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup))

    start_epoch = 0
    if resume:
        state = load_checkpoint(run_dir)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch = int(state["epoch"])
        _truncate_metrics(run_dir / METRICS_FILE, start_epoch, dist_info.is_main)
        log(f"resumed after epoch {start_epoch} of {config.epochs}")

    wrapped: nn.Module = model
    if dist_info.enabled:
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    log(
        f"device {device}, {torch.get_num_threads()} threads, precision {'bf16' if bf16 else 'fp32'}, "
        f"channels_last_3d {'on' if channels_last else 'off'}, {dist_info.world_size} process(es), "
        f"{steps_per_epoch} steps/epoch of {batch_size} pairs"
    )

    end_epoch = config.epochs if stop_after_epochs is None else min(config.epochs, stop_after_epochs)
    workers = loader_workers(config.loader_workers, local_world)
    # Each rank reads its own slice of every global batch; the order and each sample's augmentation
    # depend only on (seed, epoch, sample), so they are the same for any world size and worker count.
    loader = make_loader(train_set, spec, batch_size, config.seed, config.augment, dist_info.rank,
                         dist_info.world_size, workers, pin_memory=device.type == "cuda",
                         batch_composition=config.batch_composition)
    for epoch in range(start_epoch, end_epoch):
        started = time.perf_counter()
        model.train()
        set_loader_epoch(loader, epoch)
        losses = []
        factory = progress_factory if dist_info.is_main else None
        with _progress(factory, f"epoch {epoch + 1}/{config.epochs}", len(loader)) as tick:
            for fundus_t, oct_t in loader:
                fundus_t = fundus_t.to(device, non_blocking=True)
                oct_t = oct_t.to(device, non_blocking=True)
                if channels_last:
                    oct_t = oct_t.contiguous(memory_format=torch.channels_last_3d)
                with autocast(bf16, device):
                    loss = step_loss(wrapped, fundus_t, oct_t)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                scheduler.step()
                model.clamp_temperatures()
                losses.append(loss.detach())
                if device.type == "cpu" or len(losses) % 20 == 0:  # a GPU syncs only every 20 steps
                    tick(len(losses), loss=float(losses[-1]))
            if losses and tick.done < len(losses):
                tick(len(losses), loss=float(losses[-1]))
        train_seconds = time.perf_counter() - started
        record = {
            "epoch": epoch + 1,
            "train_loss": float(torch.stack(losses).double().mean()) if losses else None,
            "lr": scheduler.get_last_lr()[0],
            **model.temperatures(),
            "train_pairs": len(train_set.rows),
            "batch_size": batch_size,
            "train_seconds": round(train_seconds, 3),
            "pairs_per_second": round(len(loader) * batch_size / max(train_seconds, 1e-9), 2),
        }
        if dist_info.is_main:
            record.update(_validate(model, val_set, device, bf16, channels_last))
            _append_metrics(run_dir / METRICS_FILE, record)
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "epoch": epoch + 1,
                "objective": config.objective,
            }
            save_checkpoint(run_dir, epoch + 1, state, config.keep_epoch_checkpoints)
            log(_summary(record))
        distributed.barrier()
    if dist_info.is_main and end_epoch == config.epochs:
        log(f"done: {run_dir} ({platform.node() or 'this machine'})")
    return run_dir


def _validate(model, val_set, device, bf16, channels_last) -> dict[str, Any]:
    if len(val_set.rows) < 2:
        return {"val_pairs": len(val_set.rows)}
    f = torch.from_numpy(model.encode("fundus", val_set.fundus, 32, device, bf16))
    o = torch.from_numpy(model.encode("oct", val_set.oct, 32, device, bf16, channels_last))
    with torch.no_grad():
        val_loss = float(compute_loss(model, f.to(device), o.to(device)))
    # Eye level next to visit level: other visits of the query's eye count as hits there.
    retrieval = both_directions(f.numpy(), o.numpy(), eyes=[eye_key(r) for r in val_set.rows])
    # Mean per-dimension spread of the unit embeddings: ~0 means the encoder collapsed to a constant.
    spread = {"fundus": float(f.std(dim=0).mean()), "oct": float(o.std(dim=0).mean())}
    return {
        "val_pairs": len(val_set.rows),
        "val_loss": val_loss,
        "val": retrieval,
        "val_embedding_std": spread,
    }


def _summary(record: dict[str, Any]) -> str:
    text = f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}"
    if "val" in record:
        r = record["val"]["fundus_to_oct"]
        text += (
            f", val loss {record['val_loss']:.4f}, fundus->OCT top-1 {r['top1']:.3f} "
            f"(chance {r['chance_top1']:.3f}, pool {r['pool_size']}), top-5 {r['top5']:.3f}, "
            f"median rank {r['median_rank']:.0f}"
        )
        eye_level = record["val"].get("eye_level")
        if eye_level:
            parts = []
            for label, key in (("fundus->OCT", "fundus_to_oct"), ("OCT->fundus", "oct_to_fundus")):
                e = eye_level[key]
                parts.append(
                    f"{label} hit@1/5/10 {e['top1']:.3f}/{e['top5']:.3f}/{e['top10']:.3f} (chance "
                    f"{e['chance_top1']:.3f}/{e['chance_top5']:.3f}/{e['chance_top10']:.3f}), "
                    f"MRR {e['mrr']:.3f}"
                )
            text += f"; eye level ({eye_level['eyes']} eyes) " + "; ".join(parts)
    text += f", {record['pairs_per_second']:.1f} pairs/s"
    collapsed = [k for k, v in record.get("val_embedding_std", {}).items() if v < COLLAPSE_STD]
    if collapsed:
        text += f"\nwarning: {' and '.join(collapsed)} embeddings collapsed to a constant; try a lower --lr"
    return text


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    from retinacli.jsonutil import dumps

    with open(path, "a") as handle:
        handle.write(dumps(record) + "\n")  # a diverged (NaN) loss is written as null: strict JSON


def _truncate_metrics(path: Path, epochs_done: int, is_main: bool) -> None:
    """Drop lines of epochs after the checkpoint (an interrupted epoch is trained again)."""
    if not (is_main and path.is_file()):
        return
    lines = [line for line in path.read_text().splitlines() if line]
    kept = [line for line in lines if json.loads(line)["epoch"] <= epochs_done]
    path.write_text("".join(line + "\n" for line in kept))


class _Tick:
    """Advances a progress task to `steps` done (several at once when a GPU run ticks every 20 steps)."""

    def __init__(self, update: Callable[..., None] | None = None):
        self.update, self.done = update, 0

    def __call__(self, steps: int | None = None, **fields: Any) -> None:
        steps = self.done + 1 if steps is None else steps
        if self.update is not None:
            self.update(advance=steps - self.done, **fields)
        self.done = steps


@contextlib.contextmanager
def _progress(factory, description: str, total: int):
    if factory is None:
        yield _Tick()
        return
    with factory() as progress:
        task = progress.add_task(description, total=total, loss=float("nan"))
        yield _Tick(lambda **fields: progress.update(task, **fields))


@contextlib.contextmanager
def _progress_for_build(factory):
    """``progress(n)`` -> per-row tick for the cache build (a bar only when rows are read)."""
    if factory is None:
        yield None
        return
    with contextlib.ExitStack() as stack:

        def start(total: int) -> Callable[[], None]:
            if not total:
                return lambda: None
            progress = stack.enter_context(factory())
            task = progress.add_task("preprocessing", total=total, loss=float("nan"))
            return lambda: progress.advance(task)

        yield start
